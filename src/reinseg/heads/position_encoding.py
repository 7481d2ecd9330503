"""Sine positional encoding of a 2-D feature map (DETR), as mmdet's ``SinePositionalEncoding``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

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

    Returns:
        ``(batch, 2 * num_feats, height, width)``: the y encoding in the first ``num_feats``
        channels, then the x encoding; each interleaves sin (even) and cos (odd) frequencies.
    """
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
    pos = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)
    return pos.unsqueeze(0).expand(batch, -1, -1, -1)
