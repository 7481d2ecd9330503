"""Backbone families: how each kind of timm ViT is run, one adapter per family.

:class:`reinseg.backbones.ReinBackbone` is family-agnostic: it asks its family how to embed the
images, run a block (with or without prompt tokens), see the block's output as tokens for Rein,
and turn it into a patch map. Adding a family is one subclass of :class:`BackboneFamily` and one
``@register_family("name")``; zoo entries (:data:`reinseg.backbones.BACKBONES`) name their family.

Families of the zoo:

- ``vit`` (timm ``VisionTransformer``: CLIP, MAE): ``(B, P + N, C)`` tokens, P prefix (CLS /
  register) tokens; positions resampled as timm does.
- ``dinov2``: the same, positions interpolated as the original DINOv2 code does.
- ``eva`` (timm ``Eva``: EVA02, DINOv3): the same tokens; blocks take the rotary embedding.
- ``sam`` (timm ``VisionTransformerSAM``): blocks take NHWC maps ``(B, H, W, C)``, no prefix.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BackboneFamily", "FAMILIES", "register_family", "get_family", "dinov2_interpolate_pos_embed"]

FAMILIES: dict[str, BackboneFamily] = {}


def register_family(name: str) -> Callable[[type[BackboneFamily]], type[BackboneFamily]]:
    """Class decorator: register a :class:`BackboneFamily` subclass under ``name``."""

    def register(cls: type[BackboneFamily]) -> type[BackboneFamily]:
        if name in FAMILIES:
            raise ValueError(f"backbone family {name!r} is already registered")
        cls.name = name
        FAMILIES[name] = cls()
        return cls

    return register


def get_family(name: str) -> BackboneFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; registered: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


class BackboneFamily:
    """The method contract of a family (defaults: timm ``VisionTransformer``-like token models).

    ``x`` is what flows between blocks: ``(B, P + N, C)`` tokens here, other layouts in subclasses.
    """

    name = "base"

    def timm_kwargs(self) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments the family needs."""
        return {"dynamic_img_size": True}

    def checkpoint_filter(self) -> Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]:
        """timm's filter converting the original releases' layouts to the model's."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn

    def num_prefix_tokens(self, vit: nn.Module) -> int:
        """Tokens before the patches (CLS, registers) that Rein leaves untouched."""
        return int(vit.num_prefix_tokens)

    def embed(self, vit: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Patch + position embedding of ``images (B, 3, H, W)``: ``x`` entering block 0 and the blocks' kwargs."""
        x = vit.patch_embed(images)  # (B, h, w, C): built with dynamic_img_size
        batch, h, w, channels = x.shape
        x = x.reshape(batch, h * w, channels)
        pos = self.position_embedding(vit, (h, w))
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(x))), {}

    def position_embedding(self, vit: nn.Module, grid: tuple[int, int]) -> Tensor:
        """The position embedding ``(1, [P +] h*w, C)`` for a ``grid`` of patches."""
        stored = tuple(vit.patch_embed.grid_size)
        if grid == stored:
            return vit.pos_embed
        from timm.layers import resample_abs_pos_embed

        num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        return resample_abs_pos_embed(vit.pos_embed, list(grid), list(stored), num_prefix_tokens=num_prefix)

    def run_block(self, block: nn.Module, x: Tensor, block_kwargs: dict[str, Any]) -> Tensor:
        return block(x, **block_kwargs)

    def run_block_with_prompts(
        self, block: nn.Module, x: Tensor, prompts: Tensor, num_prefix: int, block_kwargs: dict[str, Any]
    ) -> Tensor:
        """``block(x)`` with prompt tokens ``(n, C)`` inserted after the prefix and dropped after it."""
        batch, n = x.shape[0], prompts.shape[0]
        x = torch.cat([x[:, :num_prefix], prompts.expand(batch, -1, -1), x[:, num_prefix:]], dim=1)
        x = block(x, **block_kwargs)
        return torch.cat([x[:, :num_prefix], x[:, num_prefix + n :]], dim=1)

    def prompts_added(self, vit: nn.Module, num_prompts: int) -> None:
        """Called once when deep prompts are added to every block (see :mod:`reinseg.tuning`)."""

    def to_tokens(self, x: Tensor) -> Tensor:
        """``x`` as ``(B, T, C)`` tokens (prefix first) for Rein."""
        return x

    def from_tokens(self, tokens: Tensor, like: Tensor) -> Tensor:
        """Tokens ``(B, T, C)`` back in the layout of ``like``."""
        return tokens

    def patch_map(self, x: Tensor, num_prefix: int, h: int, w: int) -> Tensor:
        """The patch tokens of ``x`` as an NCHW map ``(B, C, h, w)``."""
        patches = x[:, num_prefix:]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()


@register_family("vit")
class ViTFamily(BackboneFamily):
    """timm ``VisionTransformer`` (CLIP, MAE): the contract's defaults."""


@register_family("dinov2")
class DINOv2Family(BackboneFamily):
    """DINOv2: positions interpolated as the original code does (the released heads saw those)."""

    def position_embedding(self, vit: nn.Module, grid: tuple[int, int]) -> Tensor:
        stored = tuple(vit.patch_embed.grid_size)
        if grid == stored:
            return vit.pos_embed
        num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        return dinov2_interpolate_pos_embed(vit.pos_embed, num_prefix, stored, grid)


@register_family("eva")
class EvaFamily(BackboneFamily):
    """timm ``Eva`` (EVA02, DINOv3): blocks take the rotary embedding of the patches."""

    def checkpoint_filter(self):
        from timm.models.eva import checkpoint_filter_fn

        return checkpoint_filter_fn

    def embed(self, vit: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        x, rope = vit._pos_embed(vit.patch_embed(images))
        return vit.norm_pre(x), {"rope": rope}

    def prompts_added(self, vit: nn.Module, num_prompts: int) -> None:
        # Rotary embeddings apply to the tokens after the prefix: prompts join the prefix.
        for block in vit.blocks:
            block.attn.num_prefix_tokens += num_prompts


@register_family("sam")
class SamFamily(BackboneFamily):
    """timm ``VisionTransformerSAM``: NHWC maps ``(B, H, W, C)`` between blocks, no prefix tokens."""

    def timm_kwargs(self) -> dict[str, Any]:
        return {}

    def checkpoint_filter(self):
        from timm.models.vision_transformer_sam import checkpoint_filter_fn

        return checkpoint_filter_fn

    def num_prefix_tokens(self, vit: nn.Module) -> int:
        return 0

    def embed(self, vit: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        from timm.layers import resample_abs_pos_embed_nhwc

        x = vit.patch_embed(images)
        if vit.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(vit.pos_embed, list(x.shape[1:3]))
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(x))), {}

    def run_block_with_prompts(
        self, block: nn.Module, x: Tensor, prompts: Tensor, num_prefix: int, block_kwargs: dict[str, Any]
    ) -> Tensor:
        return sam_block_with_prompts(block, x, prompts)

    def to_tokens(self, x: Tensor) -> Tensor:
        batch, h, w, channels = x.shape
        return x.reshape(batch, h * w, channels)

    def from_tokens(self, tokens: Tensor, like: Tensor) -> Tensor:
        return tokens.reshape(like.shape)

    def patch_map(self, x: Tensor, num_prefix: int, h: int, w: int) -> Tensor:
        return x.permute(0, 3, 1, 2).contiguous()


def sam_block_with_prompts(block: nn.Module, x: Tensor, prompts: Tensor) -> Tensor:
    """A timm SAM block whose (windowed or global) attention also attends to ``prompts (n, C)``.

    Inserting prompts as tokens and dropping their outputs amounts to this on SAM's windowed
    maps: every window's keys and values gain the prompts. Follows
    ``timm.models.vision_transformer_sam.Block.forward``; the prompts pass the block's first norm,
    as tokens entering the block would, and take no relative-position bias.
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


def dinov2_interpolate_pos_embed(
    pos_embed: Tensor, num_prefix_tokens: int, stored_grid: tuple[int, int], grid: tuple[int, int]
) -> Tensor:
    """Position embeddings for another grid, as the original DINOv2 code interpolates them.

    Bicubic with scale factors ``(grid + 0.1) / stored_grid``: the 0.1 guards the output size
    against floating-point floor errors (facebookresearch/dino#8), and because it also shifts the
    sampling positions slightly, it is kept to match the released models exactly.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = patches.shape[-1]
    patches = patches.float().reshape(1, *stored_grid, channels).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / stored_grid[0], (grid[1] + 0.1) / stored_grid[1])
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"position interpolation produced {tuple(patches.shape[-2:])}, expected {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
