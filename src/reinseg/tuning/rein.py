"""``rein``: Rein after every block (:mod:`reinseg.rein`), its tokens linked to the head's queries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .registry import TuningStrategy, register_strategy


@dataclass
class ReinConfig:
    """Rein's arguments (:class:`reinseg.Rein`); layers, widths and prefix tokens come from the backbone."""

    token_length: int = 100
    lora_dim: int | None = 16
    query_dims: int = 256
    link_token_to_query: bool = True
    scale_init: float = 1e-3
    use_softmax: bool = True
    zero_mlp_delta_f: bool = False


@register_strategy("rein")
class ReinStrategy(TuningStrategy):
    options_class = ReinConfig
    # The official paramwise_cfg custom_keys "learnable_tokens" and "reins.scale": no weight decay
    # for the tokens and the scale. On CNNs (one Rein per stage, backbone.rein.<i>.*) the official
    # "reins.scale" matches no name, so their scales are decayed, as in the official training.
    no_decay_keys = ("learnable_tokens", "backbone.rein.scale")

    def check(self, options: ReinConfig | None) -> None:
        if options is None:
            raise ValueError("model.tuning is 'rein' but model.rein is null (use tuning: frozen for the plain VFM)")

    def apply(self, backbone, options: ReinConfig) -> None:
        self.check(options)
        backbone.add_rein(asdict(options))
