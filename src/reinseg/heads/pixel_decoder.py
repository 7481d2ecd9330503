"""Mask2Former's pixel decoder: a deformable-attention encoder over the coarse maps and an FPN path.

Structured as mmdet's ``MSDeformAttnPixelDecoder`` so its weights map one to one
(``input_convs``, ``encoder.layers``, ``level_encoding``, ``lateral_convs``, ``output_convs``,
``mask_feature``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .deformable_attention import MultiScaleDeformableAttention
from .position_encoding import sine_position_encoding

__all__ = ["ConvNorm", "FFN", "DeformableEncoderLayer", "PixelDecoder"]


class ConvNorm(nn.Sequential):
    """Conv -> GroupNorm (-> ReLU), named ``conv`` and ``gn`` as mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int, bias: bool, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        if relu:
            self.activate = nn.ReLU(inplace=True)


class FFN(nn.Module):
    """Two-layer MLP with ReLU and residual, named as mmcv's FFN (``layers.0.0``, ``layers.1``)."""

    def __init__(self, embed_dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.ReLU(inplace=True)),
            nn.Linear(hidden_dims, embed_dims),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention -> norm -> FFN -> norm."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, ffn_dims: int) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points)
        self.ffn = FFN(embed_dims, ffn_dims)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(2)])

    def forward(
        self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        x = self.norms[0](self.self_attn(x, pos, reference_points, spatial_shapes))
        return self.norms[1](self.ffn(x))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])


class PixelDecoder(nn.Module):
    """Multi-scale features for the transformer decoder and per-pixel mask embeddings.

    Args:
        in_channels: channels of the backbone maps, finest first (strides 4, 8, 16, 32).
        feat_channels: width of the decoder (256 in the paper).
        out_channels: width of the mask features.
        num_encoder_levels: how many of the coarsest maps go through the deformable encoder (3).
        num_layers, num_heads, num_points, ffn_dims: the deformable encoder's sizes (6, 8, 4, 1024).
        num_groups: GroupNorm groups (32).

    ``forward(features)`` returns ``mask_features (B, out_channels, H/4, W/4)`` and the encoder's
    maps, coarsest first: ``[(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)]``.

    ``checkpointing`` (``train.pixel_decoder_checkpointing``): while a graph is built, keep only
    each encoder layer's and FPN level's input and compute their activations again in backward.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_channels: int = 256,
        out_channels: int = 256,
        num_encoder_levels: int = 3,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dims: int = 1024,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        num_inputs = len(in_channels)
        if not 1 <= num_encoder_levels < num_inputs:
            raise ValueError(f"num_encoder_levels must be in [1, {num_inputs}), got {num_encoder_levels}")
        self.num_encoder_levels = num_encoder_levels
        self.feat_channels = feat_channels
        # Coarsest first.
        self.input_convs = nn.ModuleList(
            ConvNorm(in_channels[i], feat_channels, 1, num_groups, bias=True, relu=False)
            for i in range(num_inputs - 1, num_inputs - num_encoder_levels - 1, -1)
        )
        self.encoder = DeformableEncoder(
            num_layers,
            embed_dims=feat_channels,
            num_heads=num_heads,
            num_levels=num_encoder_levels,
            num_points=num_points,
            ffn_dims=ffn_dims,
        )
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        # The maps finer than the encoder's, coarsest first; with GroupNorm the convs carry no bias.
        fpn_levels = range(num_inputs - num_encoder_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList(
            ConvNorm(in_channels[i], feat_channels, 1, num_groups, bias=False, relu=False) for i in fpn_levels
        )
        self.output_convs = nn.ModuleList(
            ConvNorm(feat_channels, feat_channels, 3, num_groups, bias=False, relu=True) for _ in fpn_levels
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, kernel_size=1)
        self.checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's initialisation of the pixel decoder."""
        conv: Any
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv.conv.weight)
            nn.init.zeros_(conv.conv.bias)
        for conv in [*self.lateral_convs, *self.output_convs]:
            _caffe2_xavier_(conv.conv)
        _caffe2_xavier_(self.mask_feature)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        layer: Any
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        batch = features[0].shape[0]
        num_inputs = len(features)
        tokens, positions, references, shapes = [], [], [], []
        for i, conv in enumerate(self.input_convs):
            feat = features[num_inputs - 1 - i]
            h, w = feat.shape[-2:]
            pos = sine_position_encoding(batch, h, w, self.feat_channels // 2, device=feat.device).to(feat.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            tokens.append(conv(feat).flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2))
            references.append(_grid_centers(h, w, feat.device, feat.dtype))
            shapes.append((h, w))
        x = torch.cat(tokens, dim=1)
        pos = torch.cat(positions, dim=1)
        # Every query looks around its own centre, at the same normalized place in every level.
        reference_points = torch.cat(references, dim=0)[None, :, None].expand(batch, -1, len(shapes), -1)
        for layer in self.encoder.layers:
            x = self._run(layer, x, pos, reference_points, shapes)

        outs = [
            level.transpose(1, 2).reshape(batch, -1, h, w)
            for level, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes, strict=False)
        ]
        for lateral, output, level in zip(
            self.lateral_convs, self.output_convs, range(num_inputs - len(shapes) - 1, -1, -1), strict=False
        ):
            outs.append(self._run(_fpn_level, lateral, output, features[level], outs[-1]))
        return self.mask_feature(outs[-1]), outs[: self.num_encoder_levels]

    def _run(self, function: Any, *args: Any) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # The 6 encoder layers on every token of 3 levels and the FPN at stride 4 hold most
            # of a step's activations (benchmarks/RESULTS.md); only their inputs are kept.
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)


def _fpn_level(lateral: nn.Module, output: nn.Module, feature: Tensor, coarser: Tensor) -> Tensor:
    """One FPN step: ``feature``'s lateral projection plus ``coarser`` upsampled to its size."""
    lat = lateral(feature)
    up = F.interpolate(coarser, size=lat.shape[-2:], mode="bilinear", align_corners=False)
    return output(lat + up)


def _grid_centers(h: int, w: int, device, dtype) -> Tensor:
    """Normalized ``(x, y)`` centres of an ``h x w`` grid, row-major: ``(h*w, 2)``."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1).to(dtype)


def _caffe2_xavier_(module: Any) -> None:
    # Caffe2's "xavier" is Kaiming-uniform with a=1 (mmcv's caffe2_xavier_init).
    nn.init.kaiming_uniform_(module.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)
