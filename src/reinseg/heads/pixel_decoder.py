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
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..backbones import resize_map
from ..device import autocast_enabled, autocast_serves
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


class ReLUInPlaceWithoutGraph(nn.ReLU):
    """mmcv's ``ReLU(inplace=True)``, in place only where no graph is built (inference, no copy).
    In training it applies to a linear layer's output, a view, and autograd would rewrite an
    in-place ReLU there as a copy into slices of its base: several kernels in backward where an
    out-of-place ReLU's is one (29 a step at the paper config). No parameters: the same names."""

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x, inplace=not (x.requires_grad and torch.is_grad_enabled()))


class FFN(nn.Module):
    """Two-layer MLP with ReLU and residual, named as mmcv's FFN (``layers.0.0``, ``layers.1``).

    ``recompute_hidden`` (``train.encoder_ffn_recompute``): while an fp32 graph is built (no
    autocast), keep only the input and compute the hidden activations again in backward, one
    more matrix product for the largest tensor the layer keeps (``hidden_dims`` wide). Forward
    and backward then run ``chunk_rows`` rows at a time, so that a chunk's hidden activations
    stay in the CPU's cache between the two products that use them (and the full-width hidden
    tensor is never made): about 5 % faster at the paper's sizes, and less transient memory.
    """

    def __init__(self, embed_dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), ReLUInPlaceWithoutGraph()),
            nn.Linear(hidden_dims, embed_dims),
        )
        self.recompute_hidden = False
        self.chunk_rows = 1024

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.recompute_hidden
            and torch.is_grad_enabled()
            and x.dtype == torch.float32
            and autocast_serves(x.device.type)
            and not autocast_enabled(x.device.type)
        ):
            fc1: Any = self.layers[0][0]  # type: ignore[index]
            fc2: Any = self.layers[1]
            return x + _HiddenRecomputed.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.chunk_rows)
        return x + self.layers(x)


class _HiddenRecomputed(torch.autograd.Function):
    """``relu(x W1^T + b1) W2^T + b2``, keeping ``x`` (and the weights) for backward only, and
    running ``chunk_rows`` rows of ``x`` at a time (the weights' gradients summed over chunks)."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, chunk_rows: int) -> Tensor:
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.chunk_rows = chunk_rows
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        out = rows.new_empty(rows.shape[0], w2.shape[0])
        for x_chunk, out_chunk in zip(rows.split(chunk_rows), out.split(chunk_rows), strict=True):
            torch.addmm(b2, torch.addmm(b1, x_chunk, w1.t()).relu_(), w2.t(), out=out_chunk)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, b1, w2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        grad = grad.reshape(-1, grad.shape[-1])  # (N, C)
        grad_x = torch.empty_like(rows) if needs[0] else None
        grad_w1 = torch.zeros_like(w1) if needs[1] else None
        grad_b1 = torch.zeros_like(b1) if needs[2] else None
        grad_w2 = torch.zeros_like(w2) if needs[3] else None
        for start in range(0, rows.shape[0], ctx.chunk_rows):
            chunk = slice(start, start + ctx.chunk_rows)
            x_chunk, grad_chunk = rows[chunk], grad[chunk]
            hidden = torch.addmm(b1, x_chunk, w1.t()).relu_()  # (n, hidden), as in forward
            if grad_w2 is not None:
                grad_w2.addmm_(grad_chunk.t(), hidden)
            grad_pre = torch.ops.aten.threshold_backward(grad_chunk @ w2, hidden, 0)
            if grad_x is not None:
                torch.mm(grad_pre, w1, out=grad_x[chunk])
            if grad_w1 is not None:
                grad_w1.addmm_(grad_pre.t(), x_chunk)
            if grad_b1 is not None:
                grad_b1 += grad_pre.sum(0)
        grad_b2 = grad.sum(0) if needs[4] else None
        return None if grad_x is None else grad_x.view_as(x), grad_w1, grad_b1, grad_w2, grad_b2, None


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
    ``forward(maps, scales)`` takes the maps before their resizing to those strides
    (:class:`~reinseg.backbones.BackboneMaps`): a map to be upsampled goes through its 1x1
    projection first and is resized after it (both are linear, and the bilinear weights sum to
    one, so the bias commutes too): the same values up to float rounding, on a quarter or a
    sixteenth of the pixels.

    ``checkpointing`` (``train.pixel_decoder_checkpointing``): while a graph is built, keep only
    each encoder layer's and FPN level's input and compute their activations again in backward.
    The encoder layers' FFNs recompute their hidden activations (``FFN.recompute_hidden``, on).
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
        # The encoder FFNs' hidden activations, the largest it keeps, are computed again in
        # backward (train.encoder_ffn_recompute, on by default).
        layer: Any
        for layer in self.encoder.layers:
            layer.ffn.recompute_hidden = True
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

    def forward(self, features: Sequence[Tensor], scales: Sequence[float] | None = None) -> tuple[Tensor, list[Tensor]]:
        batch = features[0].shape[0]
        num_inputs = len(features)
        if scales is None:
            scales = (1,) * num_inputs
        elif len(scales) != num_inputs:
            raise ValueError(f"got {num_inputs} maps but {len(scales)} scales")
        tokens, positions, references, shapes = [], [], [], []
        conv: Any
        for i, conv in enumerate(self.input_convs):
            level = num_inputs - 1 - i
            projected = _project(conv, features[level], scales[level])
            h, w = projected.shape[-2:]
            pos = sine_position_encoding(batch, h, w, self.feat_channels // 2, device=projected.device)
            pos = pos.to(projected.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            tokens.append(projected.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2))
            references.append(_grid_centers(h, w, projected.device, projected.dtype))
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
            outs.append(self._run(_fpn_level, lateral, output, features[level], scales[level], outs[-1]))
        return self.mask_feature(outs[-1]), outs[: self.num_encoder_levels]

    def _run(self, function: Any, *args: Any) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # The 6 encoder layers on every token of 3 levels and the FPN at stride 4 hold most
            # of a step's activations (benchmarks/RESULTS.md); only their inputs are kept.
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)


def _fpn_level(lateral: ConvNorm, output: nn.Module, feature: Tensor, scale: float, coarser: Tensor) -> Tensor:
    """One FPN step: the lateral projection of ``feature`` (resized by ``scale``) plus ``coarser``
    upsampled to its size."""
    lat = _project(lateral, feature, scale)
    up = F.interpolate(coarser, size=lat.shape[-2:], mode="bilinear", align_corners=False)
    return output(lat + up)


def _project(conv: ConvNorm, x: Tensor, scale: float) -> Tensor:
    """``conv`` (1x1 convolution -> GroupNorm) of ``x`` resized by ``scale``; upsampling after the
    convolution, on ``scale**2`` times fewer pixels, downsampling before it."""
    if scale > 1:
        return conv.gn(resize_map(conv.conv(x), scale))
    return conv(resize_map(x, scale))


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
