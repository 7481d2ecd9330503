"""Multi-scale deformable attention as sparse matrix products (the CPU kernel).

Bilinear sampling is linear in the values, and so is the attention-weighted sum over levels and
points: for one image and head the output is a sparse matrix times the values. Here the values
of all levels are laid out on one grid of row stride ``R`` (larger than every level's width, the
rest zero), so that a sample's four pixels are always its north-west pixel ``n`` and ``n + 1``,
``n + R``, ``n + R + 1``. With ``V_c`` the layout shifted by corner ``c``'s offset, the output is

    out = sum over corners c of  M_c @ V_c,

where the four CSR matrices ``M_c`` share one pattern (row ``(b, head, query)`` holds the
north-west pixels of its ``levels * points`` samples) and hold the attention weight times the
bilinear weight of corner ``c`` (zero for a pixel outside its level: zero padding). The
``B * heads`` images and heads are diagonal blocks of the same matrices. Backward:

- ``dL/dM_c = (dL/dout) V_c^T`` on the pattern (``torch.sparse.sampled_addmm``), which gives the
  attention weights' and the locations' gradients (a bilinear weight is a product of ``1 - f``
  or ``f`` per axis, ``f`` the location's fractional pixel);
- ``dL/dV_c = M_c^T (dL/dout)``: the transposed pattern comes from one sort of the north-west
  pixels, shared by the four corners.

The same numbers as :func:`~reinseg.heads.deformable_attention.multi_scale_deformable_attention`
(``grid_sample``, the reference) up to float rounding: ``tests/test_deformable_csr.py`` compares both and
their gradients in float64. On the CPU it takes fewer passes over memory than ``grid_sample``'s
backward, which scatters every sample into its four pixels one channel at a time
(``benchmarks/deformable_kernels.py``). CPU only; other devices use the reference.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..tracing import tracing
from .grid_sample_math import grid_sample_pixel, powers_of_two

__all__ = ["csr_deformable_attention", "eager_on_cpu"]


def eager_on_cpu(tensor: Tensor) -> bool:
    """Whether ``tensor`` is on the CPU and no tracer runs (torch.compile, export, jit): where the
    CPU shortcuts of the head (this kernel, the mask product's row-sparse backward) apply. Tracers
    follow neither sparse tensors nor the host-side steps, and get the plain operations."""
    return tensor.device.type == "cpu" and not tracing()


class _Layout:
    """Where every level's pixels sit in one image's and head's block of the common grid.

    Each level ``(h, w)`` takes ``h`` rows of stride ``R = max(w) + 1``; the block starts and
    ends with ``R + 1`` unused rows, so that the four pixels of any sample (clamped to one pixel
    outside its level) are rows of the block.
    """

    def __init__(self, spatial_shapes: list[tuple[int, int]]) -> None:
        self.shapes = spatial_shapes
        self.widths = [w for _, w in spatial_shapes]
        self.heights = [h for h, _ in spatial_shapes]
        self.stride = max(self.widths) + 1
        self.starts = []
        row = self.stride + 1
        for h, _ in spatial_shapes:
            self.starts.append(row)
            row += h * self.stride
        self.block = row + self.stride + 1
        # The four corners' offsets from the north-west pixel: nw, ne, sw, se.
        self.shifts = (0, 1, self.stride, self.stride + 1)

    def scatter(self, value: Tensor) -> Tensor:
        """``(B, sum(h*w), heads, d)`` -> the layout ``(B * heads * block, d)``, zero elsewhere."""
        batch, _, heads, dim = value.shape
        out = value.new_zeros(batch, heads, self.block, dim)
        for (h, w), start, level in zip(
            self.shapes, self.starts, value.split([h * w for h, w in self.shapes], 1), strict=True
        ):
            grid = out[:, :, start : start + h * self.stride].view(batch, heads, h, self.stride, dim)
            grid[:, :, :, :w] = level.view(batch, h, w, heads, dim).permute(0, 3, 1, 2, 4)
        return out.view(-1, dim)

    def gather(self, layout: Tensor, batch: int, heads: int) -> Tensor:
        """The inverse of :meth:`scatter`: ``(B * heads * block, d)`` -> ``(B, sum(h*w), heads, d)``."""
        dim = layout.shape[-1]
        layout = layout.view(batch, heads, self.block, dim)
        out = layout.new_empty(batch, sum(h * w for h, w in self.shapes), heads, dim)
        for (h, w), start, level in zip(
            self.shapes, self.starts, out.split([h * w for h, w in self.shapes], 1), strict=True
        ):
            grid = layout[:, :, start : start + h * self.stride].view(batch, heads, h, self.stride, dim)
            level.view(batch, h, w, heads, dim).copy_(grid[:, :, :, :w].permute(0, 2, 3, 1, 4))
        return out


class _Samples:
    """The bilinear terms of every sample, all ``(B, heads, Q, levels, points)``.

    ``north_west``: int32 row of the sample's north-west pixel in the layout (all blocks);
    ``x_weights``/``y_weights``: per axis the weights of the lower and the upper pixel (``1 - f``,
    ``f``), zero for a pixel outside the level; ``x_slopes``/``y_slopes``: their derivatives with
    respect to ``f`` (-1 and +1, zero outside).
    """

    def __init__(self, coordinates: Tensor, layout: _Layout) -> None:
        """``coordinates``: ``(2, B, heads, Q, levels, points)``, the samples' normalized ``x`` and
        ``y`` as two contiguous planes (every operation below then runs over contiguous memory)."""
        _, batch, heads, queries, levels, points = coordinates.shape
        device, dtype = coordinates.device, coordinates.dtype

        def per_level(values: list[int]) -> Tensor:
            # A (levels, points) constant, whole: broadcasting it runs over contiguous rows.
            return torch.tensor(values, dtype=dtype, device=device).view(levels, 1).expand(levels, points).contiguous()

        widths, heights = layout.widths, layout.heights
        self.x_weights, self.x_slopes, x0 = _axis(coordinates[0], per_level(widths), powers_of_two(widths))
        self.y_weights, self.y_slopes, y0 = _axis(coordinates[1], per_level(heights), powers_of_two(heights))
        starts = torch.tensor(layout.starts, dtype=torch.int32, device=device).view(levels, 1)
        blocks = torch.arange(batch * heads, dtype=torch.int32, device=device).view(batch, heads, 1, 1, 1)
        # (B, heads, 1, levels, points), whole: it then broadcasts over the queries only.
        first_rows = (starts + blocks * layout.block).expand(-1, -1, -1, -1, points).contiguous()
        x0, y0 = x0.to(torch.int32), y0.to(torch.int32)
        self.north_west = (y0 * layout.stride + x0).add_(first_rows)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.north_west, *self.x_weights, *self.y_weights, *self.x_slopes, *self.y_slopes)

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...]) -> _Samples:
        samples = cls.__new__(cls)
        samples.north_west = tensors[0]
        samples.x_weights, samples.y_weights = (tensors[1], tensors[2]), (tensors[3], tensors[4])
        samples.x_slopes, samples.y_slopes = (tensors[5], tensors[6]), (tensors[7], tensors[8])
        return samples

    def corner_weights(self) -> list[Tensor]:
        """nw, ne, sw, se: ``w_y * w_x``."""
        (x_low, x_high), (y_low, y_high) = self.x_weights, self.y_weights
        return [y_low * x_low, y_low * x_high, y_high * x_low, y_high * x_high]


def _axis(
    coordinate: Tensor, size: Tensor, exact_product: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
    """One axis of the samples: normalized coordinates -> the weights and slopes of the lower and
    upper pixel, and the lower pixel clamped to ``[-1, size - 1]`` (float).

    ``exact_product``: every size is a power of two (see :mod:`.grid_sample_math`).
    """
    # grid_sample's arithmetic, so that a sample on a pixel edge falls on the same side as in
    # the reference.
    pixel = grid_sample_pixel(coordinate, size, exact_product)
    low = pixel.floor()
    low_inside = _between(low, 0, size - 1)
    high_inside = _between(low, -1, size - 2)
    # Zero outside the level (a product with 0), NaN for a NaN or infinite location (as
    # grid_sample: the differences below are NaN there).
    weights = ((low + 1 - pixel) * low_inside, (pixel - low) * high_inside)
    slopes = (-low_inside, high_inside)
    # Every pixel index valid, whatever the location.
    low = torch.nan_to_num(low, nan=-1.0).clamp(min=-1)
    return weights, slopes, torch.minimum(low, size - 1)


def _between(whole: Tensor, first: float | Tensor, last: float | Tensor) -> Tensor:
    """1.0 where the whole number ``whole`` is in ``[first, last]``, else 0.0 (also for NaN).

    Float arithmetic instead of comparisons: on the CPU, comparisons, their boolean ``&`` and
    ``where`` on a boolean mask run several times slower than float operations."""
    beyond = (first - whole).clamp_(min=0).add_((whole - last).clamp_(min=0))  # 0 inside, >= 1 outside
    return 1 - torch.nan_to_num(beyond, nan=1.0).clamp_(max=1)


class _CSRDeformableAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, layout, locations, weights, keep_samples):
        batch, _, heads, dim = value.shape
        queries = locations.shape[1]
        grid = layout.scatter(value)
        # Rows (b, head, query): each image's and head's rows are one block.
        coordinates = locations.permute(5, 0, 2, 1, 3, 4).contiguous()  # (2, B, heads, Q, levels, points)
        weights = weights.transpose(1, 2).contiguous()
        samples = _Samples(coordinates, layout)
        columns = grid.shape[0] - layout.shifts[-1]
        entries = [weights * corner for corner in samples.corner_weights()]
        out = grid.new_zeros(samples.north_west[..., 0, 0].numel(), dim)
        for shift, values in zip(layout.shifts, entries, strict=True):
            out.addmm_(_csr(samples.north_west, values, columns), grid[shift : shift + columns])
        # With keep_samples, every sample's terms; else the locations only, to compute them again.
        ctx.save_for_backward(grid, weights, *(samples.tensors() if keep_samples else (coordinates,)))
        ctx.layout = layout
        ctx.dims = (batch, heads, dim, queries)
        return out.view(batch, heads, queries, dim).transpose(1, 2).reshape(batch, queries, heads * dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        layout = ctx.layout
        batch, heads, dim, queries = ctx.dims
        grid, weights, *kept = ctx.saved_tensors
        samples = _Samples(kept[0], layout) if len(kept) == 1 else _Samples.from_tensors(tuple(kept))
        grad = grad_out.reshape(batch, queries, heads, dim).transpose(1, 2).reshape(-1, dim)
        columns = grid.shape[0] - layout.shifts[-1]
        corners = samples.corner_weights()
        transposed = _Transposed(samples.north_west, columns)

        grad_grid = torch.zeros_like(grid)
        grad_weights = None
        grad_corners = []
        for shift, corner in zip(layout.shifts, corners, strict=True):
            # dL/d(entry) of every sample's corner: its row's output gradient . its pixel's value.
            # The corner's pixels as the pattern's columns on the whole layout, and the layout as
            # the transposed view sampled_addmm reads row by row: no copy of the values (a
            # column slice of a transposed copy would be copied again for every corner).
            pattern = _csr(samples.north_west + shift, weights, grid.shape[0])
            grad_entry = torch.sparse.sampled_addmm(pattern, grad, grid.t(), beta=0.0).values().view_as(weights)
            term = grad_entry * corner
            grad_weights = term if grad_weights is None else grad_weights.add_(term)
            grad_corners.append(grad_entry.mul_(weights))
            grad_grid[shift : shift + columns].addmm_(transposed.of(weights * corner), grad)
        # entry_c = weight * w_y * w_x: the fractional pixels' gradients.
        nw, ne, sw, se = grad_corners
        (x_low, x_high), (y_low, y_high) = samples.x_weights, samples.y_weights
        (x_low_slope, x_high_slope), (y_low_slope, y_high_slope) = samples.x_slopes, samples.y_slopes
        grad_x = (nw * y_low + sw * y_high) * x_low_slope + (ne * y_low + se * y_high) * x_high_slope
        grad_y = (nw * x_low + ne * x_high) * y_low_slope + (sw * x_low + se * x_high) * y_high_slope
        # Scaled by the levels' widths and heights, written straight into the locations' layout
        # (B, Q, heads, levels, points, 2).
        grad_locations = grad_x.new_empty(batch, queries, heads, *grad_x.shape[-2:], 2)
        planes = grad_locations.permute(5, 0, 2, 1, 3, 4)
        points = grad_x.shape[-1]
        for plane, per_axis, sizes in ((planes[0], grad_x, layout.widths), (planes[1], grad_y, layout.heights)):
            per_level = torch.tensor(sizes, dtype=grad.dtype, device=grad.device)[:, None].expand(-1, points)
            torch.mul(per_axis, per_level.contiguous(), out=plane)
        return (
            layout.gather(grad_grid, batch, heads),
            None,
            grad_locations,
            grad_weights.transpose(1, 2),
            None,
        )


class _Transposed:
    """``M^T`` for every corner: the pattern's entries grouped by pixel (one sort, shared)."""

    def __init__(self, north_west: Tensor, columns: int) -> None:
        flat = north_west.view(-1)
        self.per_row = north_west[0, 0, 0].numel()
        self.order = torch.sort(flat).indices
        self.crow = torch.zeros(columns + 1, dtype=flat.dtype, device=flat.device)
        torch.cumsum(torch.bincount(flat, minlength=columns), 0, out=self.crow[1:])
        self.rows = torch.div(self.order, self.per_row, rounding_mode="floor").to(flat.dtype)
        self.shape = (columns, flat.numel() // self.per_row)

    def of(self, entries: Tensor) -> Tensor:
        """``M^T`` for the pattern holding ``entries``."""
        return _sparse_csr(self.crow, self.rows, entries.view(-1).index_select(0, self.order), self.shape)


def _csr(north_west: Tensor, entries: Tensor, columns: int) -> Tensor:
    per_row = north_west[0, 0, 0].numel()
    flat = north_west.view(-1)
    crow = torch.arange(0, flat.numel() + 1, per_row, dtype=flat.dtype, device=flat.device)
    return _sparse_csr(crow, flat, entries.reshape(-1), (flat.numel() // per_row, columns))


def _sparse_csr(crow: Tensor, columns: Tensor, entries: Tensor, size: tuple[int, int]) -> Tensor:
    # The indices are valid by construction (pixels clamped into their block, rows counted);
    # torch's one-time notice that CSR tensors are in beta says nothing to a user of this module.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, entries, size=size, check_invariants=False)


def csr_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    keep_samples: bool = True,
) -> Tensor:
    """:func:`~reinseg.heads.deformable_attention.multi_scale_deformable_attention` as sparse
    products (same arguments and result; CPU tensors; float64 stays float64, other types and
    autocast compute in float32, as ``grid_sample`` does under autocast).

    ``keep_samples``: keep every sample's pixel and bilinear weights and slopes for backward (9
    numbers per sample), or only the inputs and compute them again there (as fast here;
    ``train.deformable_recompute``, the default).
    """
    batch, pixels, heads, _ = value.shape
    if pixels != sum(h * w for h, w in spatial_shapes):
        raise ValueError(f"value has {pixels} pixels; the levels {spatial_shapes} have another number")
    layout = _Layout(spatial_shapes)
    layout_rows = batch * heads * layout.block
    if layout_rows >= 2**31 or sampling_locations.numel() >= 2**31:
        raise ValueError(
            f"csr_deformable_attention indexes with int32: {layout_rows} pixel rows or "
            f"{sampling_locations.numel() // 2} samples are too many (use multi_scale_deformable_attention)"
        )
    if value.dtype != torch.float64 and (value.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            return _CSRDeformableAttention.apply(
                value.float(), layout, sampling_locations.float(), attention_weights.float(), keep_samples
            )
    return _CSRDeformableAttention.apply(value, layout, sampling_locations, attention_weights, keep_samples)
