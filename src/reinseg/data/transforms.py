"""Training and evaluation transforms with the semantics of the official (mmseg) pipelines.

Every transform is a callable ``t(image, label=None, rng=None) -> (image, label)`` on an
(H, W, 3) uint8 RGB image and an (H, W) integer train-ID label (or None). Random transforms
draw from ``rng`` (a ``numpy.random.Generator``, a seed, or None for fresh entropy), so a seed
reproduces a sample exactly. :class:`Compose` threads one generator through its transforms.

Image operations are OpenCV's, as in mmcv/mmseg, so that a sample is bit-identical to the
official pipeline's (tests/test_pipeline_golden.py): images are resized with ``INTER_LINEAR``,
labels with ``INTER_NEAREST``, the photometric steps use cv2's 8-bit HSV. mmseg works on BGR
images, reinseg on RGB; every step acts on each channel alike or (HSV) has the same arithmetic
for either order. Training crops are padded after normalisation (:class:`Pad`), as mmseg's data
preprocessor pads a batch: the padding is never flipped or photometrically distorted.
"""

from __future__ import annotations

import numbers

import cv2
import numpy as np
import torch

from .classes import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "as_generator",
    "Compose",
    "RandomResizeShortestEdge",
    "Resize",
    "RandomCrop",
    "RandomFlip",
    "PhotoMetricDistortion",
    "Normalize",
    "Pad",
    "ToTensor",
    "resize_image",
    "resize_label",
    "rescale_size",
    "train_transform",
    "eval_transform",
]

# RGB, 0-255 scale, as mmseg's SegDataPreProcessor.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def as_generator(rng=None) -> np.random.Generator:
    """A ``numpy.random.Generator`` from an int seed (or seed sequence), or None (fresh entropy);
    a generator (anything with numpy's ``integers``/``uniform``/``random``) is used as it is."""
    if rng is None or isinstance(rng, (int, np.integer, list, tuple, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    return rng


class Compose:
    """Apply transforms in order, all drawing from one generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label=None, rng=None):
        rng = as_generator(rng)
        for transform in self.transforms:
            image, label = transform(image, label, rng=rng)
        return image, label

    def __repr__(self):
        return "Compose(\n" + "".join(f"    {t!r},\n" for t in self.transforms) + ")"


# --- geometry -------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W, C) uint8 to ``size`` = (h, w): cv2 ``INTER_LINEAR`` (fixed point,
    no antialiasing), as ``mmcv.imresize``."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(np.ascontiguousarray(image), (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) uint8 map to ``size`` = (h, w): cv2 ``INTER_NEAREST``
    (output pixel i reads input pixel floor(i * in / out)), as mmcv resizes segmentation maps."""
    if label.shape[:2] == tuple(size):
        return label
    return cv2.resize(np.ascontiguousarray(label), (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)


def rescale_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale``: the largest (h, w) of the same aspect that fits ``scale``.

    ``scale`` is (long, short) edge limits in any order, as mmseg's ``scale=(2048, 1024)``:
    the factor is min(long / max(h, w), short / min(h, w)), and sizes round half up.
    """
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize_pair(image, label, size):
    return resize_image(image, size), (None if label is None else resize_label(label, size))


class RandomResizeShortestEdge:
    """mmseg ``RandomChoiceResize(scales, resize_type="ResizeShortestEdge", max_size)``.

    Picks a short-edge length uniformly from ``scales``, scales the short edge to it unless the
    long edge would exceed ``max_size`` (then the long edge gets ``max_size``), and resizes image
    and label by that factor (keeping the aspect ratio, sizes rounded as mmcv does).
    """

    def __init__(self, scales, max_size: int):
        self.scales = [int(s) for s in scales]
        self.max_size = max_size
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive short-edge lengths, got {scales}")

    def target_size(self, size: tuple[int, int], short_edge: int) -> tuple[int, int]:
        """(h, w) for an image of ``size`` = (h, w) and a chosen short edge."""
        h, w = size
        # mmseg's ResizeShortestEdge arithmetic, float for float (the short edge is set, not scaled).
        factor = short_edge / min(h, w)
        new_h, new_w = (float(short_edge), factor * w) if h < w else (factor * h, float(short_edge))
        if max(new_h, new_w) > self.max_size:
            shrink = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        # mmseg hands (new_w, new_h) to a keep-ratio Resize, which rescales once more.
        return rescale_size(size, (int(new_w + 0.5), int(new_h + 0.5)))

    def sample(self, rng=None) -> int:
        """A short-edge length, uniformly from ``scales``."""
        return self.scales[as_generator(rng).integers(len(self.scales))]

    def __call__(self, image, label=None, rng=None):
        return _resize_pair(image, label, self.target_size(image.shape[:2], self.sample(rng)))

    def __repr__(self):
        return f"RandomResizeShortestEdge(scales={self.scales}, max_size={self.max_size})"


class Resize:
    """mmseg ``Resize(scale, keep_ratio)`` with ``scale`` = (w, h) as in the configs (with
    ``keep_ratio``, (long, short): a portrait image's height fits the larger value).

    With ``keep_ratio`` the image is rescaled to fit (long, short) = ``scale`` (mmcv
    ``imrescale``); otherwise it is resized to exactly (w, h). With ``resize_label=False`` the
    label is left at its resolution, as in the evaluation pipelines, where predictions are
    resized back to the label by the caller.
    """

    def __init__(self, scale: tuple[int, int], keep_ratio: bool = True, resize_label: bool = True):
        self.scale = (int(scale[0]), int(scale[1]))
        self.keep_ratio = keep_ratio
        self.resize_label = resize_label

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return rescale_size(size, self.scale) if self.keep_ratio else (self.scale[1], self.scale[0])

    def __call__(self, image, label=None, rng=None):
        size = self.output_size(image.shape[:2])
        if self.resize_label:
            return _resize_pair(image, label, size)
        return resize_image(image, size), label

    def __repr__(self):
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio}, resize_label={self.resize_label})"


class RandomCrop:
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``.

    A crop window is drawn uniformly. With ``cat_max_ratio`` < 1 it is redrawn (up to 10 times,
    the 11th draw is kept unchecked) while one class covers ``cat_max_ratio`` or more of its
    non-ignored pixels, or it holds fewer than two classes. An image smaller than the crop gives
    a smaller crop (the whole image along that side); :class:`Pad` fills it up after normalisation.
    """

    def __init__(self, size, cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _window(self, shape, rng) -> tuple[slice, slice]:
        top = rng.integers(max(shape[0] - self.size[0], 0) + 1)
        left = rng.integers(max(shape[1] - self.size[1], 0) + 1)
        return slice(top, top + self.size[0]), slice(left, left + self.size[1])

    def _balanced(self, label_crop) -> bool:
        values, counts = np.unique(label_crop, return_counts=True)
        counts = counts[values != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, image, label=None, rng=None):
        rng = as_generator(rng)
        window = self._window(image.shape, rng)
        if self.cat_max_ratio < 1 and label is not None:
            for _ in range(10):
                if self._balanced(label[window]):
                    break
                window = self._window(image.shape, rng)
        return image[window], (None if label is None else label[window])

    def __repr__(self):
        return f"RandomCrop(size={self.size}, cat_max_ratio={self.cat_max_ratio}, ignore_index={self.ignore_index})"


class RandomFlip:
    """Horizontal flip of image and label with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, image, label=None, rng=None):
        if as_generator(rng).random() < self.prob:
            image = image[:, ::-1]
            label = None if label is None else label[:, ::-1]
        return image, label

    def __repr__(self):
        return f"RandomFlip(prob={self.prob})"


# --- photometry -----------------------------------------------------------------------------


def _to_hsv(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> cv2's 8-bit HSV (H in 0..179, S and V in 0..255)."""
    # A flipped crop is a view with negative strides, which cv2 does not take.
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` with its defaults, ranges, probabilities and order.

    1. brightness: add U(-32, 32), with probability 1/2;
    2. a coin decides whether contrast comes now or last;
    3. contrast: multiply by U(0.5, 1.5), p = 1/2 (here or after step 5);
    4. saturation: multiply the 8-bit HSV saturation by U(0.5, 1.5), p = 1/2;
    5. hue: add an integer in [-18, 18) to the 8-bit hue (0..179, wrapping), p = 1/2.

    Every step clips to 0..255 and truncates to uint8 as mmseg does. mmseg converts BGR images
    with cv2's 8-bit HSV; this converts RGB images with cv2's RGB variant, the same arithmetic
    with the channels named the other way round. Labels pass unchanged.
    """

    def __init__(
        self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _affine(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, image, rng):
        if rng.integers(2):
            image = self._affine(image, alpha=rng.uniform(*self.contrast_range))
        return image

    def __call__(self, image, label=None, rng=None):
        rng = as_generator(rng)
        if rng.integers(2):
            image = self._affine(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = rng.integers(2) == 1
        if contrast_first:
            image = self._contrast(image, rng)
        if rng.integers(2):
            hsv = _to_hsv(image)
            hsv[..., 1] = self._affine(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if rng.integers(2):
            hsv = _to_hsv(image)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-self.hue_delta, self.hue_delta)) % 180
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            image = self._contrast(image, rng)
        return image, label

    def __repr__(self):
        return (
            f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, contrast_range="
            f"{self.contrast_range}, saturation_range={self.saturation_range}, hue_delta={self.hue_delta})"
        )


# --- to the model ---------------------------------------------------------------------------


class Normalize:
    """(H, W, 3) uint8 RGB -> float32 ``(image - mean) / std`` (ImageNet statistics by default)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image, label=None, rng=None):
        return (image.astype(np.float32) - self.mean) / self.std, label

    def __repr__(self):
        return f"Normalize(mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"


class Pad:
    """Pad a normalised image and its label at the bottom and right to at least ``size`` (h, w).

    mmseg's ``SegDataPreProcessor`` (``size=crop_size, pad_val=0, seg_pad_val=255``) pads each
    training batch this way after normalising it: the padding is 0 in normalised units (the mean
    colour) and ignored in the label, and nothing before it (flip, photometric distortion) sees it.
    """

    def __init__(self, size, value: float = 0.0, label_value: int = IGNORE_INDEX):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.value = value
        self.label_value = label_value

    @staticmethod
    def _pad(array: np.ndarray, size: tuple[int, int], value) -> np.ndarray:
        pad_h, pad_w = max(size[0] - array.shape[0], 0), max(size[1] - array.shape[1], 0)
        if not (pad_h or pad_w):
            return array
        widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
        return np.pad(array, widths, constant_values=value)

    def __call__(self, image, label=None, rng=None):
        image = self._pad(image, self.size, self.value)
        return image, (None if label is None else self._pad(label, self.size, self.label_value))

    def __repr__(self):
        return f"Pad(size={self.size}, value={self.value}, label_value={self.label_value})"


class ToTensor:
    """Image (H, W, C) -> float32 tensor (C, H, W); label (H, W) -> int64 tensor (or None)."""

    def __call__(self, image, label=None, rng=None):
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1).copy())
        if label is not None:
            label = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return image, label

    def __repr__(self):
        return "ToTensor()"


def train_transform(
    crop_size: int = 512,
    base_size: int = 512,
    ratio_range=(0.5, 2.0),
    max_size: int = 2048,
    cat_max_ratio: float = 0.75,
) -> Compose:
    """The official Rein training pipeline (configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py).

    Short edge drawn from ``[int(base_size * x * 0.1) for x in range(5, 21)]`` (for the default
    ``ratio_range``) with the long edge at most ``max_size``; a ``crop_size`` square crop with
    ``cat_max_ratio``; horizontal flip with p = 0.5; photometric distortion; then, as mmseg's data
    preprocessor, ImageNet normalization and padding to the crop size (0 and ignore).
    """
    for name, value in (("crop_size", crop_size), ("base_size", base_size), ("max_size", max_size)):
        # crop_size may be (h, w), as RandomCrop and Pad take it
        values = value if name == "crop_size" and isinstance(value, (tuple, list)) and len(value) == 2 else [value]
        if not all(_positive_integer(v) for v in values):
            raise ValueError(f"train_transform: {name} must be a positive integer, got {value!r}")
    low, high = round(ratio_range[0] * 10), round(ratio_range[1] * 10)
    if not 1 <= low <= high:
        raise ValueError(
            f"train_transform: ratio_range must be (low, high) with 0.1 <= low <= high, got {ratio_range!r}"
        )
    scales = [int(base_size * x * 0.1) for x in range(low, high + 1)]
    return Compose(
        [
            RandomResizeShortestEdge(scales, max_size),
            RandomCrop(crop_size, cat_max_ratio=cat_max_ratio),
            RandomFlip(0.5),
            PhotoMetricDistortion(),
            Normalize(),
            Pad(crop_size),
            ToTensor(),
        ]
    )


def _positive_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def eval_transform(scale: tuple[int, int] | None = None) -> Compose:
    """The official test pipeline: keep-ratio resize of the image to fit ``scale`` = (long, short)
    (written (w, h) in the official configs; mmcv's ``imrescale`` fits a portrait image's height
    to the larger value too; see ``reinseg.data.TEST_SCALES``), the label left at its
    resolution; then normalization. ``scale=None`` keeps the image as it is."""
    if scale is not None and (len(scale) != 2 or not all(_positive_integer(v) for v in scale)):
        raise ValueError(f"eval_transform: scale must be (long, short), two positive integers, got {scale!r}")
    steps = [] if scale is None else [Resize(scale, keep_ratio=True, resize_label=False)]
    return Compose(steps + [Normalize(), ToTensor()])
