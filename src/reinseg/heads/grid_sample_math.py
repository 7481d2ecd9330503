"""``grid_sample``'s pixel coordinates, as its CPU kernel computes them (align_corners False).

Code that reproduces ``grid_sample`` term for term (the CSR deformable kernel, the loss's
label-map sampling) must put a sample on a pixel edge on the same side as it does. Its kernel
takes ``t = (2c - 1) + 1`` in the input's precision and then ``t * size / 2 - 1/2`` with one
rounding (a fused multiply-add). With a power-of-two size the product is exact, so the plain
float32 arithmetic gives the same value; otherwise float64 does (the product of two float32
values is exact there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grid_sample_pixel", "powers_of_two"]


def powers_of_two(sizes: Sequence[int]) -> bool:
    """Whether every size is a power of two (where ``t * size / 2`` is exact in float32)."""
    return all(size > 0 and size & (size - 1) == 0 for size in sizes)


def grid_sample_pixel(coordinate: Tensor, size: Tensor, exact_product: bool) -> Tensor:
    """Normalized coordinates in [0, 1] -> ``grid_sample``'s pixel coordinates (centres at
    ``i``, edges at ``i + 1/2``), bit for bit, for ``size`` broadcasting against ``coordinate``.

    ``exact_product``: every size is a power of two (:func:`powers_of_two`), so that float32
    arithmetic suffices; float64 coordinates are computed in float64 either way.
    """
    t = 2 * coordinate - 1 + 1
    if exact_product or t.dtype == torch.float64:
        return t * (size / 2) - 0.5
    return (t.double() * (size.double() / 2) - 0.5).to(t.dtype)
