"""The strategy registry: one object per tuning strategy, registered by name (timm-style).

A strategy says what its options are (a dataclass, the ``model.<name>`` section), what it adds to
a built backbone (:meth:`TuningStrategy.apply`), whether the VFM's own weights train, and which of
its parameters take no weight decay. The builder, the optimizer, checkpoints, the command line,
the benchmarks and the tests read this registry; none of them compares strategy names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

__all__ = ["TuningStrategy", "STRATEGIES", "register_strategy", "get_strategy", "strategy_names"]

STRATEGIES: dict[str, TuningStrategy] = {}


class TuningStrategy:
    """The contract of a tuning strategy.

    Attributes:
        name: the ``model.tuning`` value (set by :func:`register_strategy`).
        options_class: a dataclass of the strategy's options, or ``None`` for none. Built-in
            strategies read them from ``model.<name>``; strategies registered outside reinseg from
            ``model.options.<name>``.
        trains_vfm: the VFM's own weights train (at ``train.backbone_lr_mult`` x the lr).
        frozen_in_bf16: its model still runs with the frozen VFM weights held in bf16
            (``train.frozen_dtype``); False where trainable parameters sit inside the VFM's own
            layers (SoMA's biases and adapters) or the VFM trains.
        no_decay_keys: substrings of parameter names (relative to the segmentor, e.g.
            ``"backbone.rein.scale"``) that take no weight decay, as the official ``custom_keys``.
        links_queries: the head's object queries come from the strategy's module (Rein's tokens).
        backbone_kinds: the backbone kinds (family ``kind``: ``"vit"``, ``"cnn"``) it applies to.
    """

    name: ClassVar[str] = ""
    options_class: ClassVar[type | None] = None
    trains_vfm: ClassVar[bool] = False
    frozen_in_bf16: ClassVar[bool] = True
    no_decay_keys: ClassVar[tuple[str, ...]] = ()
    backbone_kinds: ClassVar[tuple[str, ...]] = ("vit", "cnn")

    def apply(self, backbone: nn.Module, options: Any) -> None:
        """Add the strategy's modules to a built :class:`~reinseg.backbones.ReinBackbone` (its
        VFM weights loaded) and set which parameters train; ``options``: an ``options_class``
        instance (or ``None``)."""

    def check(self, options: Any) -> None:
        """Refuse options that cannot be used, naming the key (``ValueError``)."""

    def merge(self, backbone: nn.Module) -> None:
        """Fold the strategy's modules into the VFM's own weights, leaving a plain VFM that computes
        the same features (``reinseg merge``); strategies whose modules cannot be folded do not
        override this."""
        mergeable = [name for name, s in STRATEGIES.items() if type(s).merge is not TuningStrategy.merge]
        raise NotImplementedError(
            f"model.tuning={self.name!r} cannot be merged into the VFM's weights (mergeable: {', '.join(mergeable)})"
        )

    def backbone_lr_mult(self, options: Any) -> float:
        """The lr multiplier of the strategy's parameters inside the VFM (``backbone.vit.*``) when
        the VFM itself does not train (``trains_vfm`` strategies use ``train.backbone_lr_mult``)."""
        return 1.0

    def weight_decay_schedule(self, options: Any, max_iters: int) -> Callable[[float, int], float] | None:
        """``decay(initial, step)``: a parameter group's weight decay during iteration ``step`` given
        its initial one, or ``None`` for a constant weight decay (the default)."""
        return None


def register_strategy(name: str) -> Callable[[type[TuningStrategy]], type[TuningStrategy]]:
    """Class decorator: register a :class:`TuningStrategy` subclass under ``name``."""

    def register(cls: type[TuningStrategy]) -> type[TuningStrategy]:
        if name in STRATEGIES:
            raise ValueError(f"tuning strategy {name!r} is already registered")
        cls.name = name
        STRATEGIES[name] = cls()
        return cls

    return register


def get_strategy(name: str) -> TuningStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"model.tuning={name!r} is not one of {', '.join(strategy_names())}")
    return STRATEGIES[name]


def strategy_names() -> tuple[str, ...]:
    """Registered strategies, in registration order."""
    return tuple(STRATEGIES)
