"""Sine positional encoding of a 2-D feature map (DETR), as mmdet's ``SinePositionalEncoding``."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..tracing import tracing

__all__ = ["sine_position_encoding"]


def sine_position_encoding(
    batch: int,
    height: int,
    width: int,
    num_feats: int,
    *,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    device: torch.device | None = None,
) -> Tensor:
    """Positional encoding of an unpadded ``height x width`` map.

    It depends on the sizes alone, so it is made once per size and device and kept (the last
    few kept: a GPU would otherwise run some twenty kernels per map and forward); under a tracer
    it is computed in the graph. The result is read-only: it is a view of the kept tensor.

    Returns:
        ``(batch, 2 * num_feats, height, width)``: the y encoding in the first ``num_feats``
        channels, then the x encoding; each interleaves sin (even) and cos (odd) frequencies.
    """
    args = (height, width, num_feats, temperature, normalize, scale, eps, torch.device(device or "cpu"))
    encoding = _encoding(*args) if tracing() else _kept_encoding(*args)
    return encoding.unsqueeze(0).expand(batch, -1, -1, -1)


@functools.lru_cache(maxsize=8)  # a model's three levels at a few input sizes
def _kept_encoding(*args) -> Tensor:
    # A plain tensor also when first asked for under inference mode: training may use it later.
    with torch.inference_mode(False), torch.no_grad():
        return _encoding(*args)


def _encoding(
    height: int,
    width: int,
    num_feats: int,
    temperature: float,
    normalize: bool,
    scale: float,
    eps: float,
    device: torch.device,
) -> Tensor:
    """``(2 * num_feats, height, width)``: see :func:`sine_position_encoding`."""
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device).view(height, 1).expand(height, width)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device).view(1, width).expand(height, width)
    if normalize:
        # Positions run from 1 to the last row/column; eps keeps mmdet's exact values.
        y = y / (height + eps) * scale
        x = x / (width + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)
