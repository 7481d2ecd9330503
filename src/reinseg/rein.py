"""Rein: learnable tokens that refine the features of a frozen vision foundation model.

Wei et al., "Stronger, Fewer, & Superior: Harnessing Vision Foundation Models for Domain
Generalized Semantic Segmentation", CVPR 2024.

For block ``i`` of a frozen ViT with patch features ``f`` (N x C) and tokens ``T_i`` (m x C)::

    S     = softmax(f @ T_i^T / sqrt(C))                                  (N x m)
    delta = mlp_delta_f( S[:, 1:] @ mlp_token2feat(T_i[1:]) + f )           (N x C)
    f    <- f + scale * delta

The first token is a sink: it takes part in the softmax but never contributes to ``delta``.
``mlp_token2feat``, ``mlp_delta_f`` and ``scale`` are shared by all layers. Tokens can be
low-rank, ``T_i = A_i @ B_i`` with ``A_i`` (m x r) and ``B_i`` (r x C).

The tokens are also linked to the instances of the segmentation head: for every layer,
``transform(T_i)`` (m x D) is max-pooled, avg-pooled and last-layer-taken over layers, and the
three are merged into the object queries (m x D) of Mask2Former (:meth:`Rein.queries`).

Parameter names follow the official implementation (``Reins`` / ``LoRAReins`` in
w1oves/Rein) so that its checkpoints load strictly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .device import autocast_enabled
from .rein_fused import LowRankRefinement
from .tracing import tracing

__all__ = ["Rein"]


class Rein(nn.Module):
    """Rein adapter shared by all blocks of a ViT.

    Args:
        num_layers: number of transformer blocks ``L`` (one token set per block).
        embed_dims: feature width ``C`` of the backbone.
        patch_size: backbone patch size; only used for the token initialisation bound,
            as in the official code.
        query_dims: width ``D`` of the linked object queries.
        token_length: number of tokens ``m`` per layer (= number of object queries).
        lora_dim: rank ``r`` of the low-rank tokens ``A @ B``; ``None`` for full-rank tokens.
        link_token_to_query: whether the tokens produce the head's object queries.
        scale_init: initial value of the learnable ``scale``.
        use_softmax: normalise the token similarities with a scaled softmax.
        zero_mlp_delta_f: start with a zero delta MLP and a constant scale of 1 (the
            official module then has no ``scale`` parameter).
        num_prefix_tokens: leading tokens (CLS, registers) that Rein leaves untouched.
    """

    # Whether ``delta`` refines each token from that token alone, so that the prefix rows may be
    # refined and given back (Rein's does; FADA's and SET's transforms take the patch rows alone).
    refines_rows_alone = True
    # Whether an image's refinement depends on the other images of its batch (SET's FFT over the
    # batch axis, FADA's reshape): prediction then runs one image at a time, as the official test
    # (batch 1).
    mixes_batch = False

    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        patch_size: int,
        query_dims: int = 256,
        token_length: int = 100,
        lora_dim: int | None = 16,
        link_token_to_query: bool = True,
        scale_init: float = 1e-3,
        use_softmax: bool = True,
        zero_mlp_delta_f: bool = False,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        for name, value in [
            ("num_layers", num_layers),
            ("embed_dims", embed_dims),
            ("patch_size", patch_size),
            ("query_dims", query_dims),
        ]:
            if int(value) < 1:
                raise ValueError(f"Rein: {name} must be a positive integer, got {value!r}")
        if int(token_length) < 2:
            # The first token is a sink that never contributes, so one token would do nothing.
            raise ValueError(f"Rein: token_length must be at least 2, got {token_length!r}")
        if lora_dim is not None and int(lora_dim) < 1:
            raise ValueError(f"Rein: lora_dim must be a positive integer or None, got {lora_dim!r}")
        if int(num_prefix_tokens) < 0:
            raise ValueError(f"Rein: num_prefix_tokens must be >= 0, got {num_prefix_tokens!r}")
        self.num_layers = int(num_layers)
        self.embed_dims = int(embed_dims)
        self.patch_size = int(patch_size)
        self.query_dims = int(query_dims)
        self.token_length = int(token_length)
        self.lora_dim = None if lora_dim is None else int(lora_dim)
        self.link_token_to_query = bool(link_token_to_query)
        self.scale_init = float(scale_init)
        self.use_softmax = bool(use_softmax)
        self.zero_mlp_delta_f = bool(zero_mlp_delta_f)
        self.num_prefix_tokens = int(num_prefix_tokens)
        # What depends on the tokens and MLPs alone, kept inside :meth:`weights_fixed` (None outside).
        self._fixed: dict | None = None
        # Each stacked parameter's per-layer views, inside :meth:`one_forward` (None outside).
        self._per_layer: dict[str, tuple[Tensor, ...]] | None = None
        self._create_parameters()
        if not self.link_token_to_query:
            # Made (the official state dict and random draws hold them) but unused: frozen, so that
            # every trainable parameter gets a gradient (DDP runs without find_unused_parameters).
            self.transform.requires_grad_(False)
            self.merge.requires_grad_(False)

    def _create_parameters(self) -> None:
        # The creation and initialisation order replicates the official code call by call, so
        # that the same seed gives the same initial weights. That is why low-rank Rein also
        # draws (and then drops) full-rank tokens first, as the official LoRAReins does.
        L, m, C = self.num_layers, self.token_length, self.embed_dims
        patch_area = self.patch_size * self.patch_size
        full_tokens = torch.empty(L, m, C)
        scale = torch.tensor(self.scale_init)
        self.mlp_token2feat = nn.Linear(C, C)
        self.mlp_delta_f = nn.Linear(C, C)
        self._create_more()
        bound = math.sqrt(6.0 / float(3 * patch_area + C))
        nn.init.uniform_(full_tokens, -bound, bound)
        nn.init.kaiming_uniform_(self.mlp_delta_f.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_token2feat.weight, a=math.sqrt(5))
        self._init_more(bound)
        self.transform = nn.Linear(C, self.query_dims)
        self.merge = nn.Linear(self.query_dims * 3, self.query_dims)
        self.scale: float | nn.Parameter
        if self.zero_mlp_delta_f:
            nn.init.zeros_(self.mlp_delta_f.weight)
            nn.init.zeros_(self.mlp_delta_f.bias)
            self.scale = 1.0
        else:
            self.scale = nn.Parameter(scale)

        if self.lora_dim is None:
            self.learnable_tokens = nn.Parameter(full_tokens)
        else:
            r = self.lora_dim
            self.learnable_tokens_a = nn.Parameter(torch.empty(L, m, r))
            self.learnable_tokens_b = nn.Parameter(torch.empty(L, r, C))
            bound = math.sqrt(6.0 / float(3 * patch_area + (C * r) ** 0.5))
            nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
            nn.init.uniform_(self.learnable_tokens_b, -bound, bound)

    def _create_more(self) -> None:
        """Subclasses with more parameters (SET's second token set) create them here, where
        their official code draws them, after the shared MLPs."""

    def _init_more(self, bound: float) -> None:
        """Subclasses initialise their parameters here, after Rein's (``bound``: the token bound)."""

    def tokens(self, layer: int | None = None) -> Tensor:
        """The tokens of one layer, ``(m, C)``, or of all layers, ``(L, m, C)``, when ``layer`` is None."""
        if self.lora_dim is None:
            return self.learnable_tokens if layer is None else self._of_layer("learnable_tokens", layer)
        if layer is None:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        a, b = self._factors(layer)
        return a @ b

    def _factors(self, layer: int) -> tuple[Tensor, Tensor]:
        """Low-rank tokens' factors of one layer, ``A (m, r)`` and ``B (r, C)``."""
        return self._of_layer("learnable_tokens_a", layer), self._of_layer("learnable_tokens_b", layer)

    def _of_layer(self, name: str, layer: int) -> Tensor:
        """``getattr(self, name)[layer]`` of a parameter stacked over the layers; inside
        :meth:`one_forward` a view of one unbind of it per forward."""
        stacked = getattr(self, name)
        views = self._per_layer
        if views is None or tracing():
            return stacked[layer]
        key = f"{name} {torch.is_grad_enabled()}"  # views made without a graph carry no gradient
        if key not in views:
            views[key] = stacked.unbind(0)
        return views[key][layer]

    @contextlib.contextmanager
    def one_forward(self) -> Iterator[None]:
        """Within this context (one forward of the backbone's blocks), each layer's tokens or
        token factors are views of one ``unbind`` of their stacked parameter: in backward one
        operation stacks every layer's gradient, where indexing a layer made a zero-filled
        gradient of the whole stack and a sum into it, per layer (about 150 operations, each a
        kernel launch on a GPU, a step at DINOv2-L's 24 blocks). The same values. Nested uses
        share the outer one's; under a tracer the layers are indexed."""
        if self._per_layer is not None:
            yield
            return
        self._per_layer = {}
        try:
            yield
        finally:
            self._per_layer = None

    def delta(self, feats: Tensor, layer: int) -> Tensor:
        """The refinement ``mlp_delta_f(S[..., 1:] @ mlp_token2feat(T[1:]) + f)`` before scaling.

        Args:
            feats: token features ``(B, N, C)``; each row is refined on its own.
            layer: block index selecting the tokens.
        Returns:
            ``(B, N, C)``.
        """
        if self._low_rank_pays(feats.shape[-1]):
            return self._low_rank_delta(feats, layer)
        return self.token_delta(feats, self.tokens(layer), self.mlp_token2feat, self.mlp_delta_f)

    def _low_rank_pays(self, channels: int) -> bool:
        # f @ T^T costs N*C*m multiply-adds as it stands, N*r*(C + m) through the factors.
        rank = self.lora_dim
        return (
            rank is not None
            and isinstance(self.mlp_token2feat, nn.Linear)
            and rank * (channels + self.token_length) < channels * self.token_length
        )

    def _low_rank_delta(self, feats: Tensor, layer: int) -> Tensor:
        """:meth:`token_delta` for low-rank tokens ``T = A @ B`` without forming ``T``: the same
        products re-associated through the rank ``r`` (exact algebra, other float rounding)::

            f @ T^T                    = (f @ B^T) @ A^T
            S' @ token2feat(T[1:])     = (S' @ A[1:]) @ (B @ W^T) + rowsum(S') b

        with ``S' = S[..., 1:]`` and ``token2feat(t) = t @ W^T + b``. For the paper's 100 tokens of
        rank 16 on DINOv2-L this makes Rein's token products about 5x cheaper.
        """
        a, b = self._factors(layer)  # (m, r), (r, C)
        attn = (feats @ b.transpose(0, 1)) @ a.transpose(0, 1)  # (..., N, m)
        if self.use_softmax:
            attn = F.softmax(attn * self.embed_dims**-0.5, dim=-1)
        attn = attn[..., 1:]  # the sink never contributes
        token2feat = self.mlp_token2feat
        mixed = (attn @ a[1:]) @ (b @ token2feat.weight.transpose(0, 1))
        if token2feat.bias is not None:
            mixed = mixed + attn.sum(-1, keepdim=True) * token2feat.bias
        return self.mlp_delta_f(mixed + feats)

    def token_delta(
        self, feats: Tensor, tokens: Tensor, token2feat: nn.Module, delta_f: nn.Module, norm_attn: bool = False
    ) -> Tensor:
        """``delta_f(S[..., 1:] @ token2feat(T[1:]) + f)`` for features ``(..., N, c)`` and tokens
        ``T (m, c)``; ``norm_attn`` standardises ``f @ T^T`` over the tokens before the softmax (an
        instance norm: SET's amplitude branch, FADA's high-frequency branch). The softmax
        temperature is ``sqrt(embed_dims)`` whatever ``c``, as in the official code. Returns
        ``(..., N, c)``."""
        attn = feats @ tokens.transpose(0, 1)  # (B, N, m)
        if norm_attn:
            attn = F.layer_norm(attn, attn.shape[-1:], eps=1e-5)
        if self.use_softmax:
            attn = F.softmax(attn * self.embed_dims**-0.5, dim=-1)
        # The first token is a sink: it absorbs attention but never contributes.
        token_feats = token2feat(tokens[1:])  # (m - 1, C)
        return delta_f(attn[..., 1:] @ token_feats + feats)

    def forward(self, x: Tensor, layer: int) -> Tensor:
        """Refine the tokens output by block ``layer``.

        Args:
            x: batch-first tokens ``(B, P + N, C)``; the first ``num_prefix_tokens`` (P) are
                CLS/register tokens and pass unchanged.
            layer: index of the block whose output ``x`` is.
        Returns:
            ``(B, P + N, C)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dims:
            raise ValueError(f"Rein expects batch-first tokens (B, P + N, {self.embed_dims}), got {tuple(x.shape)}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"Rein has {self.num_layers} layers, got layer {layer}")
        prefix = self.num_prefix_tokens
        if not self.refines_rows_alone:
            feats = x[:, prefix:]
            feats = feats + self.delta(feats, layer) * self.scale
            return torch.cat([x[:, :prefix], feats], dim=1) if prefix else feats
        # Refining every row and then giving the prefix rows back costs less than slicing the
        # patch rows out and concatenating them again.
        as_rein = self._refines_as_rein(x)
        if as_rein and not torch.is_grad_enabled():
            refined = self._folded_refinement(x, layer)
        elif as_rein and self._low_rank_pays(x.shape[-1]) and not tracing():
            return self._fused_refinement(x, layer)
        else:
            refined = x + self.delta(x, layer) * self.scale
        if prefix:
            refined[:, :prefix] = x[:, :prefix]
        return refined

    def _refines_as_rein(self, x: Tensor) -> bool:
        """Whether :meth:`forward` may take the fused forms of Rein's own refinement (folded at
        inference, :meth:`_folded_refinement`; one autograd node in training,
        :meth:`_fused_refinement`): linear MLPs, full precision (in bf16 ``1 + scale * w`` would
        round to 1, losing the delta's own feature term), no autocast."""
        return (
            x.dtype in (torch.float32, torch.float64)
            and not autocast_enabled(x.device.type)
            and type(self).delta is Rein.delta
            and type(self.mlp_token2feat) is nn.Linear
            and type(self.mlp_delta_f) is nn.Linear
        )

    def _fused_refinement(self, x: Tensor, layer: int) -> Tensor:
        """:meth:`forward` with low-rank tokens while a graph is built, as one autograd node
        (:class:`reinseg.rein_fused.LowRankRefinement`: the same forward, less kept for backward)."""
        token2feat, delta_f = self.mlp_token2feat, self.mlp_delta_f
        return LowRankRefinement.apply(
            x,
            *self._factors(layer),
            token2feat.weight,
            token2feat.bias,
            delta_f.weight,
            delta_f.bias,
            self.scale,
            self.num_prefix_tokens,
            self.use_softmax,
        )

    def _folded_refinement(self, x: Tensor, layer: int) -> Tensor:
        """``x + scale * delta(x)`` at inference, with ``mlp_delta_f(y) = y W^T + b`` folded in
        (exact algebra, other float rounding)::

            x + s (W (S' G + x) + b)  =  x (I + s W^T)  +  S' (s G W^T)  +  s b

        with ``S' = S[..., 1:]`` and ``G = mlp_token2feat(T[1:])``: one ``C x C`` product per
        row, as the plain form has, but no separate sum, scaling and residual passes over the
        rows. Low-rank tokens go through their factors (:meth:`_low_rank_delta`):
        ``S' G W^T = [S' A[1:], rowsum(S')] @ [B W_t^T W^T; b_t W^T]``.

        Args:
            x: ``(B, N, C)`` (all rows, prefix included: :meth:`forward` restores the prefix).
        Returns:
            ``(B, N, C)``.
        """
        scale, delta_f = self.scale, self.mlp_delta_f
        rows = x.reshape(-1, x.shape[-1])  # (B*N, C)
        # (C, C): (I + s W)^T = I + s W^T, made per layer from W's own rows (C^2, against the
        # rows' N C^2; a transposed read of W costs as much as a pass over the rows at C = 1024).
        # Not kept in weights_fixed: 24 of them are 96 MiB at C = 1024.
        identity_plus = delta_f.weight * scale + torch.eye(rows.shape[-1], dtype=rows.dtype, device=rows.device)
        if delta_f.bias is None:
            out = rows @ identity_plus.t()
        else:
            out = torch.addmm(delta_f.bias * scale, rows, identity_plus.t())
        keys, factor, mixed = self._folded_tokens(layer, rows.dtype, rows.device)
        attn = rows
        for key in keys:  # (B*N, m): through the factors B^T, A^T, or the tokens T^T
            attn = attn @ key
        if self.use_softmax:
            attn = F.softmax(attn * self.embed_dims**-0.5, dim=-1)
        weights = attn[:, 1:] if factor is None else attn[:, 1:] @ factor
        return out.addmm_(weights, mixed).view_as(x)

    def _folded_tokens(
        self, layer: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[Tensor, ...], Tensor | None, Tensor]:
        """What :meth:`_folded_refinement` takes from the tokens and MLPs alone: the attention's
        right factors (``B^T, A^T``, or ``T^T``), the sum's factor ``(m - 1, r [+ 1])`` or None,
        and ``s G W^T`` ``(r [+ 1] or m - 1, C)``; kept per layer inside :meth:`weights_fixed`."""
        # Not under a tracer: a compiled graph computes them itself (a dict filled between
        # windows and made anew per call gave it a second graph).
        kept = self._fixed if not tracing() else None
        key = (layer, dtype, device)
        if kept is not None and key in kept:
            return kept[key]
        token2feat = self.mlp_token2feat
        if self._low_rank_pays(self.embed_dims):
            a, b = self._factors(layer)  # (m, r), (r, C)
            keys: tuple[Tensor, ...] = (b.t(), a.t())
            # (m - 1, r [+ 1]): the sink's row dropped; a column of ones sums S' for token2feat's bias.
            factor = a[1:] if token2feat.bias is None else torch.cat([a[1:], a.new_ones(a.shape[0] - 1, 1)], 1)
            mixed = b @ token2feat.weight.t()  # (r, C)
            if token2feat.bias is not None:
                mixed = torch.cat([mixed, token2feat.bias[None]], 0)
        else:
            tokens = self.tokens(layer)
            keys, factor, mixed = (tokens.t(),), None, token2feat(tokens[1:])  # (m - 1, C)
        # mixed (., C) through W, scaled: (., C).
        found = (keys, factor, (mixed @ self.mlp_delta_f.weight.t()) * self.scale)
        if kept is not None:
            kept[key] = found
        return found

    @contextlib.contextmanager
    def weights_fixed(self) -> Iterator[None]:
        """Within this context, what inference computes from Rein's tokens and MLPs alone (the
        folded refinement's token products, per layer; the linked queries) is computed once and
        reused: a GPU then runs some six kernels fewer per layer and forward. The weights must
        not change inside (:meth:`reinseg.segmentor.Segmentor.predict` holds it for one call).
        Nested uses share the outer one's; under a tracer (torch.compile, export) nothing is kept."""
        if self._fixed is not None:
            yield
            return
        self._fixed = {}
        try:
            yield
        finally:
            self._fixed = None

    def queries(self) -> Tensor:
        """Object queries linked from the tokens of all layers, ``(m, query_dims)``."""
        if not self.link_token_to_query:
            raise RuntimeError("this Rein was built with link_token_to_query=False: it has no queries")
        kept = self._fixed if not torch.is_grad_enabled() and not tracing() else None
        weight = self.merge.weight
        key = ("queries", weight.dtype, weight.device, autocast_enabled(weight.device.type))
        if kept is not None and key in kept:
            return kept[key]
        per_layer = self.transform(self.tokens())  # (L, m, D)
        pooled = torch.stack([per_layer.amax(0), per_layer.mean(0), per_layer[-1]], dim=-1)  # (m, D, 3)
        # Flattening (D, 3) interleaves the three poolings per channel, as the official
        # merge weight expects.
        queries = self.merge(pooled.flatten(-2))
        if kept is not None:
            kept[key] = queries
        return queries

    def extra_repr(self) -> str:
        rank = "full" if self.lora_dim is None else self.lora_dim
        return (
            f"num_layers={self.num_layers}, embed_dims={self.embed_dims}, token_length={self.token_length}, "
            f"lora_dim={rank}, query_dims={self.query_dims}, link_token_to_query={self.link_token_to_query}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
