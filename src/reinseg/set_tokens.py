"""SET: spectral-decomposed tokens, Rein's refinement on the phase and the amplitude of the features.

Yi et al., "Learning Spectral-Decomposed Tokens for Domain Generalized Semantic Segmentation",
ACM MM 2024 (official code: github JingjunYi/SET, a fork of the official Rein code whose
``Reins`` module it changes; head, segmentor and training recipe are Rein's).

For block ``i`` with patch features ``f`` (B x N x C), phase tokens ``T_i`` and amplitude tokens
``U_i`` (m x C each)::

    X        = FFT2(f) over the batch and channel axes (B x N x C, complex)        (decompose)
    amp      = sqrt(max'(|X|^2))           phase = atan2(Im X, max'(Re X))
    d_p      = mlp_delta_f (softmax(phase @ T_i^T / sqrt(C))[..., 1:] @ mlp_token2feat (T_i[1:]) + phase)
    d_a      = mlp_delta_f2(softmax(IN(amp @ U_i^T) / sqrt(C))[..., 1:] @ mlp_token2feat2(U_i[1:]) + amp)
    delta    = IRFFT2(d_a * exp(j d_p) / sqrt(2C)) over the batch and channel axes, size (B, C), ortho
    f       <- f + scale * delta                                                     (compose)

``max'(x)`` replaces values in ``(-1e-5, 1e-5)`` by ``1e-5`` (the official ``replace_denormals``);
``IN`` standardises each row of similarities over the ``m`` tokens (an instance norm without
affine, eps 1e-5: the paper's "attention optimisation" of the amplitude branch). The phase branch is
exactly Rein's refinement (:meth:`reinseg.rein.Rein.token_delta`), with Rein's tokens (low-rank
``A @ B`` in the official configuration) and MLPs; the amplitude branch has its own full-rank
tokens and MLPs (``learnable_tokens2``, ``mlp_token2feat2``, ``mlp_delta_f2``). The Mask2Former
queries come from the phase tokens only, as Rein's (:meth:`~reinseg.rein.Rein.queries`).

Where the paper writes a 2-D FFT over the spatial grid, the official code transforms the last two
axes of its ``(N, B, C)`` token layout: the *batch* and *channel* axes. reinseg follows the code:
a sample's refinement depends on the other samples of its batch (evaluation, batch 1 in the
official configs, reduces it to a 1-D FFT over the channels). The ``1 / sqrt(2C)`` is the official
division by the product of the last two sizes of its stacked ``(..., C, 2)`` real/imaginary tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .rein import Rein

__all__ = ["SpectralRein", "decompose", "compose"]

# The official replace_denormals threshold: |x| below it becomes +threshold.
DENORMAL = 1e-5


def _replace_small(x: Tensor) -> Tensor:
    """``x`` with the entries in ``(-1e-5, 1e-5)`` set to ``1e-5`` (their gradient is then 0)."""
    return torch.where((x < DENORMAL) & (x > -DENORMAL), torch.full_like(x, DENORMAL), x)


def _at_least_float32(x: Tensor) -> Tensor:
    """FFTs and complex numbers have no bfloat16 (mixed precision): those run in float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def decompose(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Phase and amplitude of the FFT of ``feats (B, N, C)`` over the batch and channel axes.

    Returns ``(phase, amplitude)``, both real ``(B, N, C)`` (float32 for half-precision input).
    """
    feats = _at_least_float32(feats)
    # The official code transforms the last two axes of (N, B, C); the same view keeps the FFT's
    # memory layout (and so the sign of its exact zeros, which atan2 turns into +-pi) identical.
    spectrum = torch.view_as_real(torch.fft.fft2(feats.transpose(0, 1), norm="backward"))  # (N, B, C, 2)
    real, imag = spectrum[..., 0], spectrum[..., 1]
    amplitude = torch.sqrt(_replace_small(spectrum.pow(2).sum(-1)))
    phase = torch.atan2(imag, _replace_small(real))
    return phase.transpose(0, 1), amplitude.transpose(0, 1)


def compose(phase: Tensor, amplitude: Tensor) -> Tensor:
    """The real inverse of :func:`decompose`'s transform for ``amplitude * exp(j phase)`` (both
    ``(B, N, C)``), scaled by ``1 / sqrt(2C)``: the last axis is read as a half spectrum
    (``irfft2`` with size ``(B, C)``, orthonormal). Returns ``(B, N, C)`` (at least float32)."""
    phase, amplitude = _at_least_float32(phase), _at_least_float32(amplitude)
    channels = phase.shape[-1]
    spectrum = torch.complex(torch.cos(phase) * amplitude, torch.sin(phase) * amplitude) / math.sqrt(2 * channels)
    spectrum = spectrum.transpose(0, 1)  # (N, B, C), the official layout
    return torch.fft.irfft2(spectrum, s=spectrum.shape[1:], norm="ortho").transpose(0, 1)


class SpectralRein(Rein):
    """SET: Rein's refinement of the FFT phase plus a token-refined amplitude, recomposed.

    Takes :class:`~reinseg.rein.Rein`'s arguments (``lora_dim`` makes the *phase* tokens low-rank,
    as the official ``LoRAReins``; the amplitude tokens are always full-rank) and adds, with the
    official names, ``learnable_tokens2 (L, m, C)``, ``mlp_token2feat2`` and ``mlp_delta_f2``
    (``C -> C``), drawn and initialised where the official code does, so that a seed gives the
    official initial weights. ``forward(x (B, P + N, C), layer)`` and ``queries()`` are Rein's.
    """

    refines_rows_alone = False  # its frequency transform mixes the tokens
    # The FFT runs over the batch axis: an image's scores depend on the others in its batch.
    mixes_batch = True

    def _create_more(self) -> None:
        L, m, C = self.num_layers, self.token_length, self.embed_dims
        self.learnable_tokens2 = nn.Parameter(torch.empty(L, m, C))
        self.mlp_token2feat2 = nn.Linear(C, C)
        self.mlp_delta_f2 = nn.Linear(C, C)

    def _init_more(self, bound: float) -> None:
        nn.init.uniform_(self.learnable_tokens2, -bound, bound)
        nn.init.kaiming_uniform_(self.mlp_delta_f2.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_token2feat2.weight, a=math.sqrt(5))
        if self.zero_mlp_delta_f:
            nn.init.zeros_(self.mlp_delta_f2.weight)
            nn.init.zeros_(self.mlp_delta_f2.bias)

    def amplitude_tokens(self, layer: int | None = None) -> Tensor:
        """The amplitude tokens of one layer, ``(m, C)``, or of all layers, ``(L, m, C)``."""
        return self.learnable_tokens2 if layer is None else self._of_layer("learnable_tokens2", layer)

    def delta(self, feats: Tensor, layer: int) -> Tensor:
        """``compose(d_phase, d_amplitude)`` for patch features ``(B, N, C)``; ``(B, N, C)``."""
        phase, amplitude = decompose(feats)
        phase_delta = super().delta(phase, layer)
        amplitude_delta = self.token_delta(
            amplitude, self.amplitude_tokens(layer), self.mlp_token2feat2, self.mlp_delta_f2, norm_attn=True
        )
        return compose(phase_delta, amplitude_delta).to(feats.dtype)
