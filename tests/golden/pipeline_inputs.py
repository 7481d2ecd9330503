"""Synthetic inputs of the pipeline goldens, made the same way by the golden script (official
environment, numpy 1.x) and by the tests (numpy 2.x): integer arithmetic only, so that both get
the same pixels (the golden records their SHA-256 and the tests check it before comparing)."""

from __future__ import annotations

import hashlib

import numpy as np


def _box(values: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Integer box filter of ``width`` along ``axis`` (edges repeated), floor-divided."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (width // 2, width - width // 2)
    padded = np.pad(values, pad, mode="edge")
    sums = np.cumsum(padded, axis=axis)
    sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
    n = values.shape[axis]
    return (np.take(sums, np.arange(width, width + n), axis=axis) - np.take(sums, np.arange(n), axis=axis)) // width


def smooth_image(seed: int, h: int, w: int, cell: int = 48) -> np.ndarray:
    """(h, w, 3) uint8 RGB: random colours on a ``cell`` grid, box-blurred into smooth gradients."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3)).astype(np.int64)
    image = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:h, :w]
    for axis in (0, 1):
        image = _box(_box(image, cell, axis), cell // 2 + 1, axis)
    return image.astype(np.uint8)


def block_label(seed: int, h: int, w: int, cell: int = 40, dominant: float = 0.0) -> np.ndarray:
    """(h, w) uint8 train IDs in ``cell`` blocks (some 255); with ``dominant`` that share of the
    blocks is class 0 (so that the crop's cat_max_ratio check rejects windows)."""
    rng = np.random.default_rng(seed + 1000)
    coarse = rng.integers(0, 20, (h // cell + 1, w // cell + 1)).astype(np.uint8)
    coarse[coarse == 19] = 255
    coarse[rng.random(coarse.shape) < dominant] = 0
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:h, :w].copy()


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
