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

Every strategy works on every family of the zoo. The families' differences: EVA and DINOv3 apply
rotary embeddings to the tokens after their prefix, so prompts join the prefix; SAM's blocks take
NHWC maps and attend within windows, so there the prompts join every window's keys and values
(which is what inserting them as tokens amounts to, since their outputs are dropped).
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
    """Deep VPT's prompt tokens, ``(L, n, C)``, and how a block runs with them.

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

    def run_block(
        self, block: nn.Module, x: Tensor, layer: int, num_prefix: int, sam: bool, block_kwargs: dict[str, Any]
    ) -> Tensor:
        """``block(x)`` with this layer's prompts: tokens ``(B, P + N, C)`` or SAM's ``(B, H, W, C)``."""
        prompts = self.tokens[layer].to(x.dtype)
        if sam:
            return sam_block_with_prompts(block, x, prompts)
        batch = x.shape[0]
        x = torch.cat([x[:, :num_prefix], prompts.expand(batch, -1, -1), x[:, num_prefix:]], dim=1)
        x = block(x, **block_kwargs)
        return torch.cat([x[:, :num_prefix], x[:, num_prefix + self.num_prompts :]], dim=1)


def sam_block_with_prompts(block: nn.Module, x: Tensor, prompts: Tensor) -> Tensor:
    """A timm SAM block whose (windowed or global) attention also attends to ``prompts (n, C)``.

    Follows ``timm.models.vision_transformer_sam.Block.forward``; the prompts pass the block's
    first norm, as tokens entering the block would, and take no relative-position bias.
    """
    from timm.models.vision_transformer_sam import window_partition, window_unpartition

    batch, height, width, _ = x.shape
    shortcut = x
    x = block.norm1(x)
    pad_hw = None
    if block.window_size > 0:
        x, pad_hw = window_partition(x, block.window_size)
    x = block.drop_path1(block.ls1(_sam_attention_with_prompts(block.attn, x, block.norm1(prompts))))
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, (height, width), pad_hw)
    x = shortcut + x
    x = x.reshape(batch, height * width, -1)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x.reshape(batch, height, width, -1)


def _sam_attention_with_prompts(attn: nn.Module, x: Tensor, prompts: Tensor) -> Tensor:
    """timm's SAM ``Attention.forward`` on ``x (B, H, W, C)`` with the prompts as extra keys/values."""
    batch, height, width, _ = x.shape
    n, heads = height * width, attn.num_heads
    tokens = torch.cat([x.reshape(batch, n, -1), prompts.expand(batch, -1, -1)], dim=1)
    total = tokens.shape[1]
    qkv = attn.qkv(tokens).view(batch, total, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, total, -1).unbind(0)
    q, k = attn.q_norm(q[:, :n]), attn.k_norm(k)  # the prompts' own outputs are dropped
    bias = None
    if attn.use_rel_pos:
        from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

        bias = get_decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (height, width), (height, width))
        bias = F.pad(bias, (0, total - n))  # no positional bias towards the prompts
    elif getattr(attn, "rope", None) is not None:
        raise NotImplementedError("VPT on SAM blocks with rotary embeddings is not supported")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.view(batch, heads, n, -1).transpose(1, 2).reshape(batch, height, width, -1)
    return attn.proj_drop(attn.proj(out))


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
        raise ValueError(f"model.lora.targets {list(targets)} match no attention projection of {backbone.family}")
    config = PeftLoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, target_modules=pattern
    )
    inject_adapter_in_model(config, backbone.vit)
    for name, param in backbone.vit.named_parameters():
        param.requires_grad = "lora_" in name


def add_visual_prompts(backbone, num_prompts: int = 150) -> None:
    """Deep VPT on every block; rotary families count the prompts among their prefix tokens."""
    backbone.prompts = VisualPrompts(backbone.depth, num_prompts, backbone.embed_dim, backbone.patch_size[0])
    if backbone.family == "eva":
        for block in backbone.vit.blocks:
            # Rotary embeddings apply to the tokens after the prefix: the patches only.
            block.attn.num_prefix_tokens += num_prompts


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
