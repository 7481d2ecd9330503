"""``fada``: FADA after every block (:mod:`reinseg.fada`): Rein's refinement split by a Haar wavelet
into a low- and a high-frequency branch; the low-frequency tokens give the head's queries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .registry import TuningStrategy, register_strategy
from .rein import ReinConfig


@dataclass
class FadaConfig(ReinConfig):
    """FADA's arguments (:class:`reinseg.fada.Fada`): Rein's (the official FADA config keeps
    Rein's: 100 tokens of rank 16, 256-d queries) and whether the Haar filters train (they do in
    the official training)."""

    learn_wavelet: bool = True


@register_strategy("fada")
class FadaStrategy(TuningStrategy):
    options_class = FadaConfig
    # The official FADA configs keep Rein's custom_keys: "learnable_tokens" (both branches' tokens)
    # and "reins.scale" take no weight decay; the Haar filters and the MLPs do.
    no_decay_keys = ("learnable_tokens", "backbone.rein.scale")
    backbone_kinds = ("vit",)  # a square grid of patch tokens per block

    def check(self, options: FadaConfig | None) -> None:
        if options is None:
            raise ValueError("model.tuning is 'fada' but model.fada is null")

    def apply(self, backbone, options: FadaConfig) -> None:
        from ..fada import Fada

        self.check(options)
        backbone.add_rein(asdict(options), Fada)
