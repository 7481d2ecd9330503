"""FADA: Rein's refinement split into a low- and a high-frequency branch by a Haar wavelet.

Bi et al., "Learning Frequency-Adapted Vision Foundation Model for Domain Generalized Semantic
Segmentation", NeurIPS 2024 (official code: JingjunYi/FADA, a fork of the official Rein whose
``Reins`` / ``LoRAReins`` it rewrites).

After block ``i`` of a frozen ViT, the patch features ``f`` (N x C, N = h x w tokens) go through a
one-level 2-D Haar transform (the paper's wavelet decomposition) into four bands of N/4 x C
coefficients, each read as N x C/4::

    LL, LH, HL, HH = haar(f)                    LL = (a + b + c + d) / 2     LH = (-a + b - c + d) / 2
                                                HL = (-a - b + c + d) / 2    HH = ( a - b - c + d) / 2
    f_low  = LL                                         (N x C/4, the content)
    f_high = [LH, HL, HH]                               (N x 3C/4, the style)

(``a b / c d``: a 2 x 2 block). Each band has its own Rein-like branch, tokens ``T_i`` (m x C/4)
and ``T2_i`` (m x 3C/4), low rank ``A_i @ B_i`` by default; the high-frequency branch standardises
its token similarities (an instance norm over the m tokens) before the softmax, to take the style
out::

    delta_low  = mlp_delta_f (softmax(f_low T_i^T / sqrt(C))[:, 1:] @ mlp_token2feat(T_i[1:]) + f_low)
    delta_high = mlp_delta_f2(softmax(IN(f_high T2_i^T) / sqrt(C))[:, 1:] @ mlp_token2feat2(T2_i[1:]) + f_high)
    f         <- f + scale * [delta_low, delta_high]          (concatenated back to N x C)

Only the low-frequency tokens ``T`` give the Mask2Former queries, exactly as Rein's
(:meth:`reinseg.Rein.queries`, ``transform``: C/4 -> D).

What the official code computes, which this module reproduces (``tests/test_fada.py`` against
``tests/data/fada_tiny.pt``, made by running it):

- The "map" the Haar filters see is the sequence-first ``(N, B, C)`` tensor's memory read as
  ``(B, C, h, w)`` (a reshape, not a permute), and the bands are read back the same way; so the
  2 x 2 blocks are runs of consecutive entries of that layout, not neighbouring patches.
  ``h = w = sqrt(N)``: the token grid must be square with an even side (512 px crops at patch 16:
  32 x 32). Where ``2 w`` divides ``C`` (every released setting: w = 32, C = 384 ... 1536) each
  block lies within one token's channels: the transform is a Haar transform of each token's
  ``C`` channels laid out as a ``(C / w) x w`` grid, and no token's values mix with another's;
  other shapes would mix neighbouring tokens, and images of a batch. Even so, the map channel,
  and so the trained filter, that a token's block meets follows from its place ``n * B + b`` in
  that layout: the refinement depends on the batch size and the image's place in the batch
  (prediction runs one image at a time: ``mixes_batch``).
- The four Haar filters are depthwise ``Conv2d`` weights (``wavepool.LL.weight``, ... ``(C, 1, 2, 2)``)
  that the official training trains: the filters are made with ``requires_grad=False``, but the
  official ``train()`` turns on every parameter whose name holds "reins". ``learn_wavelet=False``
  keeps them fixed.
- The official ``WavePool(1024)`` is hard-coded to ViT-L's width; here it takes the features' width.

Parameter names are the official ones so that official checkpoints load strictly.

Parameters at the released DINOv2-L config (24 layers, C = 1024, 100 tokens of rank 16, 256-d
queries): low-rank tokens 38,400 + 98,304 (low) and 38,400 + 294,912 (high), the branch MLPs
2 x 65,792 (C/4) and 2 x 590,592 (3C/4), the Haar filters 4 x 4,096, ``transform`` 65,792,
``merge`` 196,864 and ``scale``: 2,061,825, all trained by the official training (2,045,441
without the filters). That is fewer than Rein's 2.99 M, whose two MLPs are C wide. The 11.65 M
published for FADA is not what the official code builds: none of its variants (full-rank tokens:
4,049,409) comes near it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .rein import Rein

__all__ = ["Fada", "HaarSplit", "fits_haar_split"]

# One-level 2-D Haar analysis filters, outer products of L = [1, 1] / sqrt(2) and H = [-1, 1] / sqrt(2)
# (rows: vertical filter, columns: horizontal), applied by cross-correlation to each 2 x 2 block.
HAAR_FILTERS = {
    "LL": ((0.5, 0.5), (0.5, 0.5)),
    "LH": ((-0.5, 0.5), (-0.5, 0.5)),
    "HL": ((-0.5, -0.5), (0.5, 0.5)),
    "HH": ((0.5, -0.5), (-0.5, 0.5)),
}


def fits_haar_split(rows: int, cols: int) -> bool:
    """Whether FADA's Haar split takes a patch grid of ``rows x cols``: square, with an even side
    (the official reshape of the tokens to ``sqrt(N) x sqrt(N)`` maps halved by 2 x 2 filters)."""
    return rows == cols and rows % 2 == 0


class HaarSplit(nn.Module):
    """One-level 2-D Haar transform of every channel: four depthwise stride-2 convolutions.

    ``forward(x (B, C, H, W))`` returns ``LL, LH, HL, HH``, each ``(B, C, H/2, W/2)`` (orthonormal:
    the four bands hold the input's energy and reconstruct it exactly). The filters are parameters
    (``LL.weight``, ... ``(C, 1, 2, 2)``, the official names), trainable as in the official training.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name, kernel in HAAR_FILTERS.items():
            # Built as the official nn.Conv2d (whose default initialisation draws from the random
            # generator before the Haar values replace it: the same seed, the same next draws).
            conv = nn.Conv2d(channels, channels, kernel_size=2, stride=2, bias=False, groups=channels)
            with torch.no_grad():
                conv.weight.copy_(torch.tensor(kernel).expand(channels, 1, 2, 2))
            setattr(self, name, conv)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.LL(x), self.LH(x), self.HL(x), self.HH(x)


class Fada(Rein):
    """FADA's module, shared by all blocks of a ViT (see the module docstring for the equations).

    Args: those of :class:`reinseg.Rein` (``embed_dims`` must be a multiple of 4: the bands are
    ``C/4`` and ``3C/4`` wide; ``lora_dim`` is the rank of both branches' tokens), and

        learn_wavelet: the Haar filters train (the official training); ``False`` keeps them fixed.

    ``forward(x (B, P + N, C), layer)`` -> ``(B, P + N, C)``: the ``P`` prefix tokens pass
    unchanged. ``queries()`` -> ``(m, query_dims)``.
    """

    refines_rows_alone = False  # its transform reads the patch rows alone as an h x w map
    square_even_grid = True  # its Haar split takes square patch grids with an even side only
    # The official reshape of (N, B, C) to (B, C, h, w) (`bands`) gives a token's block the map
    # channel, and so the trained filter, of its place n * B + b: an image's refinement depends
    # on its batch. Prediction runs one image (and one window) at a time, as the official test.
    mixes_batch = True

    def __init__(
        self, num_layers: int, embed_dims: int, patch_size: int, *, learn_wavelet: bool = True, **rein
    ) -> None:
        if int(embed_dims) < 4 or int(embed_dims) % 4:
            raise ValueError(f"FADA: embed_dims must be a multiple of 4 (bands of C/4 channels), got {embed_dims!r}")
        super().__init__(num_layers, embed_dims, patch_size, **rein)
        self.learn_wavelet = bool(learn_wavelet)
        self.wavepool.requires_grad_(self.learn_wavelet)

    def _create_parameters(self) -> None:
        # The official LoRAReins.create_model, call by call, so that a seed gives its weights:
        # FADA's Reins.create_model (full-rank tokens, both branches, the Haar convolutions), then
        # the low-rank tokens replacing the full-rank ones.
        L, m, C = self.num_layers, self.token_length, self.embed_dims
        low, high = C // 4, C // 4 * 3
        patch_area = self.patch_size * self.patch_size
        tokens, tokens2 = torch.empty(L, m, low), torch.empty(L, m, high)
        scale = torch.tensor(self.scale_init)
        self.mlp_token2feat = nn.Linear(low, low)
        self.mlp_delta_f = nn.Linear(low, low)
        self.mlp_token2feat2 = nn.Linear(high, high)
        self.mlp_delta_f2 = nn.Linear(high, high)
        self.wavepool = HaarSplit(C)
        nn.init.uniform_(tokens, -(bound := math.sqrt(6.0 / float(3 * patch_area + low))), bound)
        nn.init.kaiming_uniform_(self.mlp_delta_f.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_token2feat.weight, a=math.sqrt(5))
        nn.init.uniform_(tokens2, -(bound := math.sqrt(6.0 / float(3 * patch_area + high))), bound)
        nn.init.kaiming_uniform_(self.mlp_delta_f2.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_token2feat2.weight, a=math.sqrt(5))
        self.transform = nn.Linear(low, self.query_dims)
        self.merge = nn.Linear(self.query_dims * 3, self.query_dims)
        self.scale: float | nn.Parameter
        if self.zero_mlp_delta_f:
            for mlp in (self.mlp_delta_f, self.mlp_delta_f2):
                nn.init.zeros_(mlp.weight)
                nn.init.zeros_(mlp.bias)
            self.scale = 1.0
        else:
            self.scale = nn.Parameter(scale)

        if self.lora_dim is None:
            self.learnable_tokens = nn.Parameter(tokens)
            self.learnable_tokens2 = nn.Parameter(tokens2)
            return
        r = self.lora_dim
        # The official bounds: the low branch's uses the full width C, the high branch's 3C/4.
        for suffix, width, fan in (("", low, C), ("2", high, high)):
            a, b = nn.Parameter(torch.empty(L, m, r)), nn.Parameter(torch.empty(L, r, width))
            bound = math.sqrt(6.0 / float(3 * patch_area + (fan * r) ** 0.5))
            nn.init.uniform_(a, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
            setattr(self, f"learnable_tokens_a{suffix}", a)
            setattr(self, f"learnable_tokens_b{suffix}", b)

    def tokens2(self, layer: int) -> Tensor:
        """The high-frequency branch's tokens of one layer, ``(m, 3C/4)``."""
        if self.lora_dim is None:
            return self._of_layer("learnable_tokens2", layer)
        return self._of_layer("learnable_tokens_a2", layer) @ self._of_layer("learnable_tokens_b2", layer)

    def bands(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """The low- and high-frequency features, in the official sequence-first layout.

        Args:
            feats: patch features ``(B, N, C)``, ``N`` a square grid with an even side.
        Returns:
            ``f_low (N, B, C/4)`` (LL) and ``f_high (N, B, 3C/4)`` ([LH, HL, HH]).
        """
        batch, n, channels = feats.shape
        side = math.isqrt(n)
        if side * side != n or not fits_haar_split(side, side):
            raise ValueError(
                f"FADA needs a square token grid with an even side (as the official code), got {n} patch tokens"
            )
        # The official code reshapes (not permutes) its (N, B, C) tensor to (B, C, h, w).
        grid = feats.transpose(0, 1).reshape(batch, channels, side, side)
        ll, lh, hl, hh = self.wavepool(grid)  # (B, C, h/2, w/2) each
        c = channels // 4
        high = torch.cat([band.reshape(batch, n, c) for band in (lh, hl, hh)], dim=-1)
        return ll.reshape(n, batch, c), high.reshape(n, batch, 3 * c)

    def delta(self, feats: Tensor, layer: int) -> Tensor:
        """Both branches' refinement ``[delta_low, delta_high]`` before scaling, ``(B, N, C)``, for
        the patch features ``feats (B, N, C)`` of block ``layer`` (in place of Rein's delta)."""
        low, high = self.bands(feats)
        delta_low = super().delta(low, layer)  # Rein's refinement with the low-frequency tokens
        delta_high = self.token_delta(
            high, self.tokens2(layer), self.mlp_token2feat2, self.mlp_delta_f2, norm_attn=True
        )
        return torch.cat([delta_low, delta_high], dim=-1).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learn_wavelet={self.learn_wavelet}"
