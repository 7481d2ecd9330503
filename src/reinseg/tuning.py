"""Tuning strategies: what learns in the backbone besides the head (the paper's comparisons).

- ``frozen``: nothing; the head learns its own queries.
- ``full``: the whole VFM (at ``train.backbone_lr_mult`` x the learning rate).
- ``rein``: Rein after every block (:mod:`reinseg.rein`), its tokens linked to the head's queries.
- ``lora``: low-rank updates ``W + (alpha / r) B A`` of the attention's query/key/value
  projections, injected with the ``peft`` library.
- ``vpt``: deep visual prompt tuning: ``n`` learnable prompt tokens per block, inserted after the
  prefix tokens before the block and dropped after it (so every block sees its own prompts).
- ``adaptformer``: a bottleneck adapter ``up(relu(down(x)))`` beside each block's MLP, added to the
  MLP's output with a fixed scale.

Every strategy works on every family of the zoo; where families differ (how prompts enter a
block: EVA's rotary prefix, SAM's windows) their adapters in :mod:`reinseg.families` say how.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TUNINGS",
    "VisualPrompts",
    "BottleneckAdapter",
    "apply_tuning",
    "add_lora",
    "add_adaptformer",
    "add_visual_prompts",
]

TUNINGS = ("rein", "frozen", "full", "lora", "vpt", "adaptformer")


class VisualPrompts(nn.Module):
    """Deep VPT's prompt tokens, ``(L, n, C)``; the backbone's family inserts them into each block.

    Initialised uniformly with VPT's bound ``sqrt(6 / (3 p^2 + C))`` (the one Rein's tokens use).
    """

    def __init__(self, num_layers: int, num_prompts: int, embed_dims: int, patch_size: int) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"vpt.num_prompts must be at least 1, got {num_prompts}")
        self.num_prompts = num_prompts
        self.tokens = nn.Parameter(torch.empty(num_layers, num_prompts, embed_dims))
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + embed_dims))
        nn.init.uniform_(self.tokens, -bound, bound)


class BottleneckAdapter(nn.Module):
    """AdaptFormer's adapter: ``scale * up(relu(down(x)))``, ``up`` starting at zero (identity)."""

    def __init__(self, embed_dims: int, bottleneck: int = 64, scale: float = 0.1) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(embed_dims, bottleneck)
        self.up = nn.Linear(bottleneck, embed_dims)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


class _AddAdapterOutput:
    """Forward hook of a block's MLP: its output plus the adapter's, on the MLP's input."""

    def __init__(self, adapter: BottleneckAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + self.adapter(inputs[0])


def add_adaptformer(backbone, bottleneck: int = 64, scale: float = 0.1) -> None:
    """An adapter beside every block's MLP (inside its layer scale, where the block has one).

    The adapters are registered as ``blocks.N.adaptformer`` so the VFM's own names stay unchanged.
    """
    for block in backbone.vit.blocks:
        block.adaptformer = BottleneckAdapter(backbone.embed_dim, bottleneck, scale)
        block.mlp.register_forward_hook(_AddAdapterOutput(block.adaptformer))


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


def add_visual_prompts(backbone, num_prompts: int = 150) -> None:
    """Deep VPT on every block; rotary families count the prompts among their prefix tokens."""
    backbone.prompts = VisualPrompts(backbone.depth, num_prompts, backbone.embed_dim, backbone.patch_size[0])
    backbone.family.prompts_added(backbone.vit, num_prompts)


def apply_tuning(backbone, config) -> None:
    """Add the strategy's modules to a built backbone (with its VFM weights already loaded).

    Args:
        backbone: a :class:`reinseg.backbones.ReinBackbone` (Rein itself is built with it).
        config: the :class:`reinseg.config.ModelConfig`.
    """
    tuning = config.tuning
    if tuning == "full":
        backbone.freeze_backbone = False
        backbone.vit.requires_grad_(True)
    elif tuning == "lora":
        lora = config.lora
        add_lora(backbone, lora.rank, lora.alpha, lora.dropout, tuple(lora.targets))
    elif tuning == "vpt":
        add_visual_prompts(backbone, config.vpt.num_prompts)
    elif tuning == "adaptformer":
        add_adaptformer(backbone, config.adaptformer.bottleneck, config.adaptformer.scale)
