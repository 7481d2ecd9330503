"""``vpt``: deep visual prompt tuning: ``n`` learnable prompt tokens per block.

The prompts enter each block after the prefix tokens and are dropped after it, so every block sees
its own prompts; how they enter a family's blocks is its adapter's job
(:meth:`reinseg.families.BackboneFamily.run_block_with_prompts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .registry import TuningStrategy, register_strategy


@dataclass
class VptConfig:
    """Deep visual prompt tuning (``tuning: vpt``): prompt tokens per block."""

    num_prompts: int = 150


@register_strategy("vpt")
class DeepVisualPrompts(TuningStrategy):
    options_class = VptConfig
    no_decay_keys = ("backbone.prompts.tokens",)
    backbone_kinds = ("vit",)  # prompts are tokens among a ViT's tokens

    def apply(self, backbone, options: VptConfig) -> None:
        add_visual_prompts(backbone, options.num_prompts)


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


def add_visual_prompts(backbone, num_prompts: int = 150) -> None:
    """Deep VPT on every block; rotary families count the prompts among their prefix tokens."""
    backbone.prompts = VisualPrompts(backbone.depth, num_prompts, backbone.embed_dim, backbone.patch_size[0])
    backbone.family.prompts_added(backbone.vit, num_prompts)
