"""8-bit RGB <-> HSV with OpenCV's arithmetic (``COLOR_RGB2HSV`` / ``COLOR_HSV2RGB``).

mmseg's PhotoMetricDistortion edits saturation and hue in cv2's 8-bit HSV: H in 0..179 (degrees
halved), S and V in 0..255. Reproducing cv2's fixed-point forward conversion and float backward
conversion keeps the augmentation's effect the same without an OpenCV dependency. Both directions
were checked value for value against opencv-python-headless 4.8.1 (x86-64), the OpenCV of
mmseg 1.x installations; cv2 5.0 gives the same.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rgb_to_hsv", "hsv_to_rgb"]

_SHIFT = 12  # cv2's hsv_shift: 12 fractional bits in the division tables


def _division_tables() -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        saturation = np.where(i > 0, (255 << _SHIFT) / i, 0)
        hue = np.where(i > 0, (180 << _SHIFT) / (6 * i), 0)
    # cv2 fills the tables with saturate_cast<int>, which rounds half to even (np.rint).
    return np.rint(saturation).astype(np.int64), np.rint(hue).astype(np.int64)


_SATURATION_DIV, _HUE_DIV = _division_tables()


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 HSV, H in 0..179."""
    rgb = image.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    diff = value - rgb.min(axis=-1)
    half = 1 << (_SHIFT - 1)
    saturation = (diff * _SATURATION_DIV[value] + half) >> _SHIFT
    # The hue sector is picked by which channel is the maximum, red first, then green.
    hue = np.where(value == r, g - b, np.where(value == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = (hue * _HUE_DIV[diff] + half) >> _SHIFT
    hue = np.where(hue < 0, hue + 180, hue)
    return np.stack([hue, saturation, value], axis=-1).astype(np.uint8)


# For each 60-degree sector, which of (v, p, q, t) is the (b, g, r) output, as in cv2's HSV2RGB.
_SECTOR_BGR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def _one_minus_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``1 - a * b`` rounded once, as the fused multiply-subtract cv2's SIMD build uses."""
    return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 HSV (H in 0..179) -> (H, W, 3) uint8 RGB.

    cv2's vectorized 8-bit path: float32 with S and V scaled to 0..1, the hue sector from the
    truncated hue, ``1 - s * h`` fused, and the result times 255 truncated. This matches
    OpenCV 4.8 bit for bit on every one of the 180 * 256 * 256 HSV values.
    """
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    sector = np.trunc(h)
    frac = h - sector
    table = np.stack(
        [
            v,
            v * (np.float32(1.0) - s),
            v * _one_minus_product(s, frac),
            v * _one_minus_product(s, np.float32(1.0) - frac),
        ],
        axis=-1,
    )
    bgr = np.take_along_axis(table, _SECTOR_BGR[sector.astype(np.int64) % 6], axis=-1)
    return np.clip(np.trunc(bgr[..., ::-1] * np.float32(255.0)), 0, 255).astype(np.uint8)
