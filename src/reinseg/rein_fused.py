"""Rein's low-rank refinement as one autograd node (training).

:meth:`reinseg.Rein.forward` with low-rank tokens ``T = A @ B`` computes, per row ``x`` of a
block's output (see :mod:`reinseg.rein` for the equation)::

    t = x B^T,  S = softmax(t A^T / sqrt(C)),  p = S' A[1:]             (S' = S[:, 1:])
    y = p (B W_t^T) + rowsum(S') b_t + x                                 (mixed + x)
    out = x + s (y W_d^T + b_d)

Autograd would keep a dozen tensors per block for this (the rows twice, ``y``, the delta, the
softmax and its slices) and run one node per operation. :class:`LowRankRefinement` keeps the
rows, the softmax, the rank-``r`` products ``t`` and ``p``, ``K = B W_t^T`` and the row sums of
``S'`` (small: ``(r, C)``, ``(n, 1)``), computes ``y`` again in backward
(one product through the rank, cheap next to the ``C x C`` ones), and takes the scale's gradient
from the delta MLP's weight gradient instead of from a kept delta::

    dL/ds = sum((dL/dout) * (y W_d^T + b_d)) = <G, W_d> + <colsum(dL/dout), b_d>,  G = (dL/dout)^T y

The forward is the same operations as the module's, in the same order (the same bits); the
gradients equal autograd's up to the order of float sums (``tests/test_rein.py`` compares both in
float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["LowRankRefinement"]


class LowRankRefinement(torch.autograd.Function):
    """``x + scale * delta_f(mixed + x)`` for batch-first tokens ``x (B, P + N, C)``, the first
    ``P`` rows of each image (CLS, registers) passed unchanged.

    ``apply(x, a, b, w_t, b_t, w_d, b_d, scale, prefix, use_softmax)``: ``a (m, r)``, ``b (r, C)``
    the layer's token factors; ``w_t, b_t`` and ``w_d, b_d`` the token2feat and delta MLPs (biases
    may be None); ``scale`` a 0-d tensor or a float. Returns ``(B, P + N, C)``.
    """

    @staticmethod
    def forward(ctx, x, a, b, w_t, b_t, w_d, b_d, scale, prefix: int, use_softmax: bool):
        channels = x.shape[-1]
        rows = x.reshape(-1, channels)  # (n, C)
        projected = rows @ b.t()  # t (n, r)
        attn = projected @ a.t()  # (n, m)
        if use_softmax:
            attn = F.softmax(attn * channels**-0.5, dim=-1)
        mix = attn[:, 1:] @ a[1:]  # p (n, r)
        tokens_to_features = b @ w_t.t()  # K (r, C)
        mixed = mix @ tokens_to_features
        weight_sums = None
        if b_t is not None:
            weight_sums = attn[:, 1:].sum(-1, keepdim=True)  # (n, 1)
            mixed = mixed + weight_sums * b_t
        refined = rows + F.linear(mixed + rows, w_d, b_d) * scale
        refined = refined.view_as(x)
        if prefix:
            refined[:, :prefix] = x[:, :prefix]
        saved_scale = scale if isinstance(scale, Tensor) else None
        # K and the row sums are small ((r, C), (n, 1)): kept rather than made again in backward.
        ctx.save_for_backward(
            rows, attn, projected, mix, tokens_to_features, weight_sums, a, b, w_t, b_t, w_d, b_d, saved_scale
        )
        ctx.constant_scale = None if isinstance(scale, Tensor) else scale
        ctx.prefix = prefix
        ctx.use_softmax = use_softmax
        ctx.x_shape = x.shape
        return refined

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        rows, attn, projected, mix, tokens_to_features, weight_sums, a, b, w_t, b_t, w_d, b_d, saved_scale = (
            ctx.saved_tensors
        )
        scale = ctx.constant_scale if saved_scale is None else saved_scale
        prefix = ctx.prefix
        channels = rows.shape[-1]
        grad_out = grad_out.reshape(ctx.x_shape)
        # The prefix rows leave Rein unchanged: only the refined rows reach its branch.
        grad_branch = grad_out
        if prefix:
            grad_branch = grad_out.clone()
            grad_branch[:, :prefix] = 0
        grad_branch = grad_branch.reshape(-1, channels)  # (n, C)

        # The rows' mixture again: y = p K + rowsum(S') b_t + x (fused: each fused operation is one
        # kernel launch fewer on a GPU, whose host sets the pace of a step).
        weights = attn[:, 1:]  # S' (n, m - 1)
        inputs = torch.addmm(rows, mix, tokens_to_features)  # y (n, C)
        if b_t is not None:
            inputs.addcmul_(weight_sums, b_t)

        # out = x + s (y W_d^T + b_d)
        outer = grad_branch.t() @ inputs  # G (C, C)
        column_sums = grad_branch.sum(0)  # (C,)
        grad_w_d = outer * scale
        grad_b_d = column_sums * scale if b_d is not None else None
        grad_scale = None
        if isinstance(scale, Tensor) and ctx.needs_input_grad[7]:
            grad_scale = torch.dot(outer.flatten(), w_d.flatten())
            if b_d is not None:
                grad_scale = grad_scale + torch.dot(column_sums, b_d)
            grad_scale = grad_scale.view_as(scale)
        grad_inputs = (grad_branch @ w_d) * scale  # dL/dy (n, C)

        # y = p K + rowsum(S') b_t + x
        grad_tokens_to_features = mix.t() @ grad_inputs  # (r, C)
        grad_mix = grad_inputs @ tokens_to_features.t()  # (n, r)
        # dL/dS' (n, m - 1), already times the softmax's logit scale (its backward is linear).
        logit_scale = channels**-0.5 if ctx.use_softmax else 1.0
        grad_b_t = None
        if b_t is not None:
            assert weight_sums is not None
            grad_b_t = (weight_sums.t() @ grad_inputs).view_as(b_t)
            row_term = (grad_inputs @ b_t)[:, None]
            grad_weights = torch.addmm(row_term, grad_mix, a[1:].t(), beta=logit_scale, alpha=logit_scale)
        else:
            grad_weights = grad_mix @ a[1:].t()
            if ctx.use_softmax:
                grad_weights.mul_(logit_scale)
        grad_w_t = grad_tokens_to_features.t() @ b  # (C, C)
        # The sink's column of S gets no gradient: it never contributes.
        grad_attn = F.pad(grad_weights, (1, 0))
        if ctx.use_softmax:
            grad_attn = torch._softmax_backward_data(grad_attn, attn, -1, attn.dtype)
        # attn logits = (x B^T) A^T; A[1:] also mixes the rows (p = S' A[1:]).
        grad_a = grad_attn.t() @ projected
        grad_a[1:].addmm_(weights.t(), grad_mix)
        grad_projected = grad_attn @ a  # (n, r)
        grad_b = torch.addmm(grad_tokens_to_features @ w_t, grad_projected.t(), rows)
        grad_x = torch.addmm(grad_out.reshape(-1, channels) + grad_inputs, grad_projected, b).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, grad_w_t, grad_b_t, grad_w_d, grad_b_d, grad_scale, None, None
