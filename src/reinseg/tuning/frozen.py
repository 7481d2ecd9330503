"""``frozen`` and ``full``: nothing in the VFM learns, or all of it does."""

from __future__ import annotations

from typing import Any

from .registry import TuningStrategy, register_strategy


@register_strategy("frozen")
class Frozen(TuningStrategy):
    """The VFM stays as it is; the head learns its own queries."""

    # The official frozen-VFM configs' custom_keys: the head's own queries take no decay.
    no_decay_keys = ("query_feat",)


@register_strategy("full")
class FullFineTuning(TuningStrategy):
    """The whole VFM trains (at ``train.backbone_lr_mult`` x the learning rate), dropout and drop-path on."""

    trains_vfm = True

    def apply(self, backbone, options: Any) -> None:
        backbone.freeze_backbone = False
        backbone.vit.requires_grad_(True)
