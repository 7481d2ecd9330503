"""Cityscapes-C: the common corruptions of Hendrycks & Dietterich (ICLR 2019), at 5 severities,
generated on the fly and deterministic by seed.

The 16 corruptions are those of the segmentation robustness benchmark of Kamann & Rother
(CVPR 2020): blur (motion, defocus, glass, Gaussian), noise (Gaussian, impulse, shot, speckle),
digital (brightness, contrast, saturate, JPEG) and weather (snow, spatter, fog, frost). Their
definitions and severity parameters are those of the ``imagecorruptions`` package (1.1.2), which
no longer imports with current NumPy, scikit-image and setuptools (``pkg_resources``,
``np.float_``, ``gaussian(multichannel=...)``); they are written here with NumPy, SciPy and
OpenCV, drawing from a ``numpy.random.RandomState`` in the package's order, so that with the
same seed they give the package's images (tests/test_corruptions.py checks it, where the package
is installed). What differs:

- impulse noise: drawn from the given generator (scikit-image's ``random_noise`` draws from a
  fresh one, which no seed reaches);
- glass blur: the same sequential pixel moves, the offsets drawn in one call (the same numbers);
  as in the package, each "swap" copies the neighbour onto the pixel (numpy views), and so here;
- frost: overlays the package's six frost pictures, read from an installed ``imagecorruptions``
  (``pip install --no-deps imagecorruptions``: its requirement of ``opencv-python`` would clash
  with reinseg's ``opencv-python-headless``); without it, frost is refused by name.

A ``data.val`` entry with ``corruptions`` (a list, or ``all``), optional ``severities`` (default
1..5) and ``corruption_seed`` (default 0) is evaluated as one domain per corruption and severity,
``<label>-c/<corruption>/<severity>``; results add, per such entry, the mean mIoU over the
corruptions at each severity (:func:`corruption_summary`). Image ``i`` of corruption ``k`` at
severity ``s`` is corrupted with a generator seeded by ``(seed, i, k, s)``.
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.ndimage import zoom as scipy_zoom

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "Corrupt", "corruption_summary", "frost_pictures"]

SEVERITIES = (1, 2, 3, 4, 5)


# --- helpers (the package's definitions) ------------------------------------------------------


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's ``gaussian`` on float data: each channel of (H, W[, C]), edges repeated."""
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    return gaussian_filter(x, sigmas, mode="nearest", truncate=4.0)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    if radius <= 8:
        coords, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        coords, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(coords, coords)
    disk = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)


def _plasma_fractal(rng: np.random.RandomState, mapsize: int, wibbledecay: float) -> np.ndarray:
    """A (mapsize, mapsize) diamond-square height map in [0, 1] (mapsize a power of two)."""
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(top)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def _clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    ch0 = int(np.ceil(img.shape[0] / float(zoom_factor)))
    top0 = (img.shape[0] - ch0) // 2
    ch1 = int(np.ceil(img.shape[1] / float(zoom_factor)))
    top1 = (img.shape[1] - ch1) // 2
    return scipy_zoom(img[top0 : top0 + ch0, top1 : top1 + ch1], (zoom_factor, zoom_factor, 1), order=1)


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved by (dx, dy), its edge rows/columns repeated into the gap."""
    shifted = image
    if dx < 0:
        shifted = np.roll(image, shift=image.shape[1] + dx, axis=1)
        shifted[:, dx:] = shifted[:, dx - 1 : dx]
    elif dx > 0:
        shifted = np.roll(image, shift=dx, axis=1)
        shifted[:, :dx] = shifted[:, dx : dx + 1]
    if dy < 0:
        shifted = np.roll(shifted, shift=image.shape[0] + dy, axis=0)
        shifted[dy:, :] = shifted[dy - 1 : dy, :]
    elif dy > 0:
        shifted = np.roll(shifted, shift=dy, axis=0)
        shifted[:dy, :] = shifted[dy : dy + 1, :]
    return shifted


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    width = radius * 2 + 1
    kernel = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel /= kernel.sum()
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    blurred = np.zeros_like(x, dtype=np.float32)
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break  # the motion left the image
        blurred = blurred + kernel[i] * _shift(x, dx, dy)
    return blurred


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """scikit-image's ``rgb2hsv`` on (H, W, 3) floats in [0, 1]."""
    value = rgb.max(-1)
    delta = np.ptp(rgb, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = delta / value
        saturation[delta == 0.0] = 0.0
        hue = np.zeros_like(value)
        for channel, offset, (a, b) in ((0, 0.0, (1, 2)), (1, 2.0, (2, 0)), (2, 4.0, (0, 1))):
            idx = rgb[..., channel] == value
            hue[idx] = offset + (rgb[idx, a] - rgb[idx, b]) / delta[idx]
    hue = (hue / 6.0) % 1.0
    hue[delta == 0.0] = 0.0
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """scikit-image's ``hsv2rgb``."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = np.stack([hi, hi, hi], axis=-1).astype(np.uint8) % 6
    choices = [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    return np.choose(hi, np.stack(choices))


# --- the corruptions: (H, W, 3) uint8 RGB -> float image in [0, 255] ---------------------------


def gaussian_noise(x, severity, rng):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x, severity, rng):
    c = [60, 25, 12, 5, 3][severity - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255


def impulse_noise(x, severity, rng):
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    x = x / 255.0
    flipped = rng.random_sample(x.shape) <= amount
    salted = rng.random_sample(x.shape) <= 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return np.clip(x, 0, 1) * 255


def speckle_noise(x, severity, rng):
    c = [0.15, 0.2, 0.35, 0.45, 0.6][severity - 1]
    x = x / 255.0
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def gaussian_blur(x, severity, rng):
    c = [1, 2, 3, 4, 6][severity - 1]
    return np.clip(_gaussian(x / 255.0, c), 0, 1) * 255


def glass_blur(x, severity, rng):
    sigma, delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    x = np.uint8(_gaussian(x / 255.0, sigma) * 255)
    height, width = x.shape[:2]
    # Pixels as one int each in a list: the published per-pixel swap loop, fast enough in Python.
    packed = (x[..., 0].astype(np.int64) << 16 | x[..., 1].astype(np.int64) << 8 | x[..., 2]).ravel().tolist()
    rows = range(height - delta, delta, -1)
    cols = range(width - delta, delta, -1)
    for _ in range(iterations):
        offsets = rng.randint(-delta, delta, size=(len(rows) * len(cols), 2)).tolist()
        k = 0
        for h in rows:
            for w in cols:
                dx, dy = offsets[k]
                k += 1
                # The published "swap" assigns through numpy views, so it copies: the pixel takes
                # its neighbour's value and the neighbour keeps it.
                packed[h * width + w] = packed[(h + dy) * width + (w + dx)]
    flat = np.array(packed, dtype=np.int64).reshape(height, width)
    x = np.stack([(flat >> 16) & 255, (flat >> 8) & 255, flat & 255], axis=-1).astype(np.uint8)
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def defocus_blur(x, severity, rng):
    radius, alias_blur = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    x = x / 255.0
    kernel = _disk(radius, alias_blur)
    channels = np.array([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)]).transpose((1, 2, 0))
    return np.clip(channels, 0, 1) * 255


def motion_blur(x, severity, rng):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    angle = rng.uniform(-45, 45)
    return np.clip(_motion_blur(x, radius, sigma, angle), 0, 255)


def brightness(x, severity, rng):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    hsv = _rgb_to_hsv(x / 255.0)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return np.clip(_hsv_to_rgb(hsv), 0, 1) * 255


def contrast(x, severity, rng):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    x = x / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def saturate(x, severity, rng):
    scale, shift = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][severity - 1]
    hsv = _rgb_to_hsv(x / 255.0)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * scale + shift, 0, 1)
    return np.clip(_hsv_to_rgb(hsv), 0, 1) * 255


def jpeg_compression(x, severity, rng):
    quality = [25, 18, 15, 10, 7][severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer))


def snow(x, severity, rng):
    c = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ][severity - 1]
    x = np.array(x, dtype=np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    layer = _clipped_zoom(layer[..., np.newaxis], c[2])
    layer[layer < c[3]] = 0
    layer = np.clip(layer.squeeze(), 0, 1)
    layer = _motion_blur(layer, radius=c[4], sigma=c[5], angle=rng.uniform(-135, -45))
    layer = np.round(layer * 255).astype(np.uint8) / 255.0
    layer = layer[..., np.newaxis][: x.shape[0], : x.shape[1], :]
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(x.shape[0], x.shape[1], 1)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def spatter(x, severity, rng):
    c = [
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ][severity - 1]
    rgb = x
    x = np.array(x, dtype=np.float32) / 255.0
    liquid = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    liquid = _gaussian(liquid, c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:  # water drops, pale turquoise
        liquid = (liquid * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
        m /= np.max(m, axis=(0, 1))
        m *= c[4]
        ones = np.ones_like(m[..., :1])
        color = np.concatenate((175 / 255.0 * ones, 238 / 255.0 * ones, 238 / 255.0 * ones), axis=2)
        color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
    m = np.where(liquid > c[3], 1, 0)  # mud, brown
    m = _gaussian(m.astype(np.float32), c[4])
    m[m < 0.8] = 0
    ones = np.ones_like(rgb[..., :1], dtype=np.float64)
    color = np.concatenate((63 / 255.0 * ones, 42 / 255.0 * ones, 20 / 255.0 * ones), axis=2)
    color *= m[..., np.newaxis]
    x *= 1 - m[..., np.newaxis]
    return np.clip(x + color, 0, 1) * 255


def fog(x, severity, rng):
    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    height, width = x.shape[:2]
    map_size = 1 << (max(height, width) - 1).bit_length()
    x = x / 255.0
    max_val = x.max()
    x += strength * _plasma_fractal(rng, map_size, decay)[:height, :width][..., np.newaxis]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def frost_pictures() -> list[Path]:
    """The six frost pictures of an installed ``imagecorruptions`` (found without importing it)."""
    spec = importlib.util.find_spec("imagecorruptions")
    folder = Path(next(iter(spec.submodule_search_locations))) / "frost" if spec is not None else None
    names = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"]
    if folder is None or not all((folder / n).is_file() for n in names):
        raise ValueError(
            "the frost corruption overlays the frost pictures of the imagecorruptions package, which is not "
            "installed: pip install --no-deps imagecorruptions (or leave frost out of corruptions)"
        )
    return [folder / n for n in names]


def frost(x, severity, rng):
    image_weight, frost_weight = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    idx = rng.randint(5)  # the package draws among the first five pictures
    picture = cv2.imread(str(frost_pictures()[idx]))
    fh, fw = picture.shape[:2]
    h, w = x.shape[:2]
    factor = 1.0
    if fh < h and fw >= w:
        factor = h / fh
    elif fh >= h and fw < w:
        factor = w / fw
    elif fh < h and fw < w:
        factor = max(h / fh, w / fw)
    factor *= 1.1
    size = (int(np.ceil(fw * factor)), int(np.ceil(fh * factor)))
    picture = cv2.resize(picture, dsize=size, interpolation=cv2.INTER_CUBIC)
    top, left = rng.randint(0, picture.shape[0] - h), rng.randint(0, picture.shape[1] - w)
    picture = picture[top : top + h, left : left + w][..., [2, 1, 0]]
    return np.clip(image_weight * np.array(x) + frost_weight * picture, 0, 255)


CORRUPTIONS = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        speckle_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        gaussian_blur,
        brightness,
        contrast,
        saturate,
        jpeg_compression,
        snow,
        spatter,
        fog,
        frost,
    )
}


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the image under corruption ``name`` at ``severity`` (1..5), uint8
    (truncated, as the package's ``np.uint8``)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{name}'; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be one of 1..5, got {severity!r}")
    if image.shape[0] < 32 or image.shape[1] < 32:
        raise ValueError(f"corruptions need images of at least 32x32 pixels, got {image.shape[1]}x{image.shape[0]}")
    return np.uint8(CORRUPTIONS[name](np.ascontiguousarray(image), severity, rng))


class Corrupt:
    """A transform: the image corrupted, the label as it is. The generator is seeded by the
    dataset's per-item generator (seeded by ``(seed, epoch, index)``), the corruption and severity."""

    pixels_only = True  # changes no geometry: the image as seen (SegmentationDataset.image_as_seen)

    def __init__(self, name: str, severity: int) -> None:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption '{name}'; known: {', '.join(CORRUPTIONS)}")
        if severity not in SEVERITIES:
            raise ValueError(f"corruption severity must be one of 1..5, got {severity!r}")
        self.name, self.severity = name, severity

    def __call__(self, image, label=None, rng=None):
        from .transforms import as_generator

        entropy = int(as_generator(rng).integers(2**32))
        seed = np.random.SeedSequence([entropy, list(CORRUPTIONS).index(self.name), self.severity])
        state = np.random.RandomState(seed.generate_state(1)[0])
        return corrupt(image, self.name, self.severity, state), label

    def __repr__(self):
        return f"Corrupt({self.name!r}, severity={self.severity})"


def corruption_summary(results: dict, domains) -> dict:
    """Per corrupted ``data.val`` entry (its base label), the mean mIoU over its corruptions at
    each severity and over all: ``{base: {"per_severity": {"1": ...}, "mean": ..., "corruptions": [...]}}``.
    ``domains``: ``(domain, entry)`` pairs; ``results``: per domain its scores."""
    groups: dict[str, dict[int, list]] = {}
    names: dict[str, list[str]] = {}
    for domain, entry in domains:
        if entry.corruption is None:
            continue
        name, severity = entry.corruption
        base = domain.split("/")[0]
        groups.setdefault(base, {}).setdefault(severity, []).append(results[domain]["mIoU"])
        names.setdefault(base, [])
        if name not in names[base]:
            names[base].append(name)
    summary = {}
    for base, by_severity in groups.items():
        per = {str(s): _mean(v) for s, v in sorted(by_severity.items())}
        summary[base] = {
            "per_severity": per,
            "mean": _mean([v for values in by_severity.values() for v in values]),
            "corruptions": names[base],
        }
    return summary


def _mean(values):
    from ..metrics import mean_of_rounded  # as the mean over domains

    return mean_of_rounded([v for v in values if v is not None])
