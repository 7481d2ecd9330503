"""``adaptformer``: a bottleneck adapter ``up(relu(down(x)))`` beside each block's MLP, added to the
MLP's output with a fixed scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import TuningStrategy, register_strategy


@dataclass
class AdaptFormerConfig:
    """AdaptFormer (``tuning: adaptformer``): a bottleneck adapter beside every block's MLP."""

    bottleneck: int = 64
    scale: float = 0.1


@register_strategy("adaptformer")
class AdaptFormer(TuningStrategy):
    options_class = AdaptFormerConfig
    backbone_kinds = ("vit",)  # adapters beside the MLPs of transformer blocks

    def apply(self, backbone, options: AdaptFormerConfig) -> None:
        add_adaptformer(backbone, options.bottleneck, options.scale)


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
        # In the adapter's dtype: the frozen MLP may run in bf16 (train.frozen_dtype).
        adapted = self.adapter(inputs[0].to(self.adapter.up.weight.dtype))
        return output + adapted.to(output.dtype)


def add_adaptformer(backbone, bottleneck: int = 64, scale: float = 0.1) -> None:
    """An adapter beside every block's MLP (inside its layer scale, where the block has one).

    The adapters are registered as ``blocks.N.adaptformer`` so the VFM's own names stay unchanged.
    """
    for block in backbone.vit.blocks:
        block.adaptformer = BottleneckAdapter(backbone.embed_dim, bottleneck, scale)
        block.mlp.register_forward_hook(_AddAdapterOutput(block.adaptformer))
