"""``set``: SET (ACM MM 2024), Rein's tokens refining the FFT phase and amplitude of the features
after every block (:mod:`reinseg.set_tokens`), the phase tokens linked to the head's queries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..set_tokens import SpectralRein
from .registry import TuningStrategy, register_strategy
from .rein import ReinConfig, ReinStrategy


@dataclass
class SetConfig(ReinConfig):
    """SET's arguments (:class:`reinseg.set_tokens.SpectralRein`): Rein's, as the official
    configuration is Rein's (``LoRAReins``, 100 tokens, rank ``lora_dim`` 16 for the phase tokens;
    the amplitude tokens are full-rank). Layers, widths and prefix tokens come from the backbone."""


@register_strategy("set")
class SetStrategy(TuningStrategy):
    options_class = SetConfig
    # The official custom_keys are Rein's: "learnable_tokens" also matches the amplitude tokens
    # (learnable_tokens2), so neither token set is decayed; the amplitude MLPs are.
    no_decay_keys = ReinStrategy.no_decay_keys

    def check(self, options: SetConfig | None) -> None:
        if options is None:
            raise ValueError("model.tuning is 'set' but model.set is null")
        for key, low in (("token_length", 2), ("lora_dim", 1), ("query_dims", 1)):
            value = getattr(options, key)
            if value is not None and value < low:
                # token_length 1 would be the sink token alone: no refinement at all.
                raise ValueError(f"model.set.{key} must be at least {low}, got {value!r}")

    def apply(self, backbone, options: SetConfig) -> None:
        self.check(options)
        backbone.add_rein(asdict(options), SpectralRein)
