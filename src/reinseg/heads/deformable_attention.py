"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

:func:`multi_scale_deformable_attention` is the reference sampling (``grid_sample``: bilinear,
zero padding, align_corners False, as mmcv's PyTorch path).
:func:`~reinseg.heads.deformable_csr.csr_deformable_attention` computes the same thing as sparse
matrix products, about twice as fast on the CPU; the module picks one by ``kernel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..device import device_tensor
from .deformable_csr import csr_deformable_attention, eager_on_cpu

__all__ = ["KERNELS", "multi_scale_deformable_attention", "MultiScaleDeformableAttention"]

# "auto": the CSR kernel on the CPU (not while compiling or exporting), grid_sample elsewhere.
KERNELS = ("auto", "csr", "grid_sample")


def multi_scale_deformable_attention(
    value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Sample every level at the given locations and take the attention-weighted sum.

    Args:
        value: ``(B, sum(h*w), heads, head_dim)``, the levels' maps flattened and concatenated.
        spatial_shapes: ``(h, w)`` of each level.
        sampling_locations: ``(B, Q, heads, levels, points, 2)``, ``(x, y)`` in [0, 1].
        attention_weights: ``(B, Q, heads, levels, points)``.
    Returns:
        ``(B, Q, heads * head_dim)``.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    # Points before queries: the sum over points then runs over whole contiguous (Q,) rows,
    # which is about twice as fast on CPU as summing the last, 4-long dimension.
    # (B, Q, heads, levels, points) -> (B*heads, levels, points, Q)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(batch * heads, levels, points, queries)
    # Each level's part as a view of one unbind: its backward stacks the levels' gradients in
    # one operation, where indexing each level made a zero-filled full-size gradient and a sum.
    grids_per_level, weights_per_level = grids.unbind(3), weights.unsqueeze(1).unbind(2)
    # Each level's weighted sum is added up as it comes (levels differ in size, so one
    # grid_sample each), rather than stacking all the samples into one more full-size copy.
    out = None
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, heads, d) -> (B*heads, d, h, w)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Q, heads, points, 2) -> (B*heads, points, Q, 2)
        grid_l = grids_per_level[level].permute(0, 2, 3, 1, 4).flatten(0, 1)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * weights_per_level[level]).sum(2)  # (B*heads, d, points, Q) -> (B*heads, d, Q)
        out = term if out is None else out + term
    assert out is not None  # at least one level
    return out.view(batch, heads * head_dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable self-attention over several feature levels, with its residual (as mmcv's module).

    Parameter names follow mmcv (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) so that official weights load unchanged.

    ``kernel`` (one of :data:`KERNELS`, ``train.deformable_kernel``) picks the sampling;
    ``recompute`` (``train.deformable_recompute``) keeps only the sampling's inputs for backward.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.kernel = "auto"
        # Sample again in backward instead of keeping the samples (train.deformable_recompute).
        self.recompute = True
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each head starts looking in its own direction, farther with each point (Deformable DETR).
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, query: Tensor, query_pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Self-attention of ``query`` (its own values) around the reference points.

        Args:
            query: ``(B, Q, C)``, the flattened levels (also the values).
            query_pos: ``(B, Q, C)`` positional encoding added for offsets and weights.
            reference_points: ``(B, Q, levels, 2)``, normalized ``(x, y)``.
            spatial_shapes: ``(h, w)`` per level.
        Returns:
            ``(B, Q, C)``, residual included.
        """
        batch, num_query, _ = query.shape
        value = self.value_proj(query).view(batch, num_query, self.num_heads, -1)
        with_pos = query + query_pos
        offsets = self.sampling_offsets(with_pos).view(
            batch, num_query, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = _softmax_over_last(self.attention_weights(with_pos).view(batch, num_query, self.num_heads, -1))
        weights = weights.view(batch, num_query, self.num_heads, self.num_levels, self.num_points)
        # Offsets are in pixels of each level: normalize by its (w, h). Both terms broadcast as
        # whole (levels, points, 2) blocks: a stride-0 points axis between the levels and (x, y)
        # would keep the CPU's elementwise kernels off their vector loops (about 15x slower).
        levels_points = (self.num_levels, self.num_points, 2)
        normalizer = device_tensor([[w, h] for h, w in spatial_shapes], query.dtype, query.device)
        normalizer = normalizer[:, None].expand(levels_points).contiguous()
        reference = reference_points[:, :, None, :, None].expand(-1, -1, 1, *levels_points).contiguous()
        locations = reference + offsets / normalizer
        out = self._sample(value, spatial_shapes, locations, weights)
        return query + self.output_proj(out)

    def _sample(self, value: Tensor, spatial_shapes, locations: Tensor, weights: Tensor) -> Tensor:
        recompute = self.recompute and torch.is_grad_enabled()
        if self._csr_for(value):
            return csr_deformable_attention(value, spatial_shapes, locations, weights, keep_samples=not recompute)
        if recompute:
            # The samples (B*heads, d, Q, levels*points) outweigh everything else the layer keeps
            # for backward: sample again there instead of keeping them (same values).
            return checkpoint(
                multi_scale_deformable_attention, value, spatial_shapes, locations, weights, use_reentrant=False
            )
        return multi_scale_deformable_attention(value, spatial_shapes, locations, weights)

    def _csr_for(self, value: Tensor) -> bool:
        if self.kernel == "grid_sample":
            return False
        if self.kernel == "csr":
            if value.device.type != "cpu":
                raise ValueError(f"train.deformable_kernel: csr runs on the CPU, not on {value.device.type}")
            return True
        return eager_on_cpu(value)


def _softmax_over_last(x: Tensor) -> Tensor:
    """``x.softmax(-1)``. On the CPU a short last dimension (``levels * points``, 12 in the paper)
    is reduced along the first dimension of the transposed rows instead, where the kernel runs
    across rows: forward and backward several times faster at the paper's sizes, the same values
    up to the order of the short sums (``tests/test_heads.py``)."""
    size = x.shape[-1]
    if size > 32 or not eager_on_cpu(x):
        return x.softmax(-1)
    return x.reshape(-1, size).t().contiguous().softmax(0).t().reshape(x.shape)
