"""``lora``: low-rank updates ``W + (alpha / r) B A`` of the attention's projections, through ``peft``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .registry import TuningStrategy, register_strategy


@dataclass
class LoraConfig:
    """LoRA on the attention projections (``tuning: lora``); ``alpha`` null means ``rank``."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "q_proj", "k_proj", "v_proj"])


@register_strategy("lora")
class Lora(TuningStrategy):
    options_class = LoraConfig
    backbone_kinds = ("vit",)  # low-rank updates of attention projections

    def apply(self, backbone, options: LoraConfig) -> None:
        add_lora(backbone, options.rank, options.alpha, options.dropout, tuple(options.targets))

    def merge(self, backbone) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(backbone.vit.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(backbone.vit.get_submodule(parent), child, module.get_base_layer())


def add_lora(
    backbone,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("qkv", "q_proj", "k_proj", "v_proj"),
) -> None:
    """LoRA (through ``peft``) on the attention projections named ``targets`` of every block."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError as err:
        raise RuntimeError("model.tuning 'lora' needs the peft library: pip install 'reinseg[lora]'") from err
    pattern = r".*blocks\.\d+\.attn\.(" + "|".join(targets) + r")$"
    found = [name for name, _ in backbone.vit.named_modules() if re.fullmatch(pattern, name)]
    if not found:
        raise ValueError(f"model.lora.targets {list(targets)} match no attention projection of {backbone.family.name}")
    config = PeftLoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, target_modules=pattern
    )
    inject_adapter_in_model(config, backbone.vit)
    for name, param in backbone.vit.named_parameters():
        param.requires_grad = "lora_" in name
