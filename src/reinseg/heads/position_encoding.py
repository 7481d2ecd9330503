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
    device: torch.device | str | int | None = None,
) -> Tensor:
    """Positional encoding of an unpadded ``height x width`` map.

    The y encoding depends on the row alone and the x encoding on the column alone: each axis's
    ``(size, num_feats)`` table is made once per size and device and kept (the last 32; a GPU ran
    some twenty kernels per map and forward), and the map is one concatenation of the two; under a
    tracer the tables are computed in the graph.

    Returns:
        ``(batch, 2 * num_feats, height, width)``: the y encoding in the first ``num_feats``
        channels, then the x encoding; each interleaves sin (even) and cos (odd) frequencies.
    """
    if tracing():  # the tables computed in the graph (a tracer follows no default-device query)
        table = _axis_encoding
    else:
        device, table = _resolved(device), _kept_axis_encoding
    pos_y = table(height, num_feats, temperature, normalize, scale, eps, device)  # (H, F)
    pos_x = table(width, num_feats, temperature, normalize, scale, eps, device)  # (W, F)
    pos = torch.cat((pos_y[:, None].expand(-1, width, -1), pos_x[None].expand(height, -1, -1)), dim=-1)
    return pos.permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


def _resolved(device: torch.device | str | int | None) -> torch.device:
    """``device`` as the tensors made for it land: the default device for None, the current GPU's
    index for an unindexed ``cuda`` (the key of the kept tables)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=32)  # tiny tables: a model's levels at many input sizes
def _kept_axis_encoding(*args) -> Tensor:
    # A plain tensor also when first asked for under inference mode: training may use it later.
    with torch.inference_mode(False), torch.no_grad():
        return _axis_encoding(*args)


def _axis_encoding(
    size: int,
    num_feats: int,
    temperature: float,
    normalize: bool,
    scale: float,
    eps: float,
    device: torch.device | str | int | None,
) -> Tensor:
    """The encoding of positions ``1..size`` along one axis, ``(size, num_feats)``."""
    position = torch.arange(1, size + 1, dtype=torch.float32, device=device)
    if normalize:
        # Positions run from 1 to the last row/column; eps keeps mmdet's exact values.
        position = position / (size + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = position[:, None] / dim_t
    return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=-1).flatten(-2)
