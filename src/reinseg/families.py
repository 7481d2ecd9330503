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

CNN families (:class:`CNNFamily`, run by :class:`reinseg.cnn.ReinCNNBackbone`, one Rein per stage):

- ``resnet_v1c`` (timm ``ResNet`` with the deep stem: mmseg's ``ResNetV1c``).
- ``convnext`` (timm ``ConvNeXt``: mmpretrain's ``ConvNeXt``), a channel LayerNorm per output stage.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BackboneFamily",
    "CNNFamily",
    "FAMILIES",
    "register_family",
    "get_family",
    "dinov2_interpolate_pos_embed",
    "has_registers",
]

FAMILIES: dict[str, BackboneFamily | CNNFamily] = {}


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`BackboneFamily` or :class:`CNNFamily` subclass under ``name``."""

    def register(cls: Any) -> Any:
        if name in FAMILIES:
            raise ValueError(f"backbone family {name!r} is already registered")
        cls.name = name
        FAMILIES[name] = cls()
        return cls

    return register


def get_family(name: str) -> BackboneFamily | CNNFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; registered: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


class BackboneFamily:
    """The method contract of a family (defaults: timm ``VisionTransformer``-like token models).

    ``x`` is what flows between blocks: ``(B, P + N, C)`` tokens here, other layouts in subclasses.
    """

    name = "base"
    kind = "vit"  # run by reinseg.backbones.ReinBackbone
    # Whether torch's ONNX exporter converts the family's blocks (reinseg export refuses otherwise).
    onnx_exportable = True

    def timm_kwargs(self) -> dict[str, Any]:
        """Extra ``timm.create_model`` arguments the family needs."""
        return {"dynamic_img_size": True}

    def checkpoint_filter(self) -> Callable[..., dict[str, Tensor]]:
        """timm's filter converting the original releases' layouts to the model's."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn

    def num_prefix_tokens(self, vit: Any) -> int:
        """Tokens before the patches (CLS, registers) that Rein leaves untouched."""
        return int(vit.num_prefix_tokens)

    def embed(self, vit: Any, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
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

    def position_embedding(self, vit: Any, grid: tuple[int, int]) -> Tensor:
        """The position embedding ``(1, [P +] h*w, C)`` for a ``grid`` of patches."""
        stored = tuple(vit.patch_embed.grid_size)
        if grid == stored:
            return vit.pos_embed
        from timm.layers import resample_abs_pos_embed

        num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        return resample_abs_pos_embed(vit.pos_embed, list(grid), list(stored), num_prefix_tokens=num_prefix)

    def run_block(self, block: Any, x: Tensor, block_kwargs: dict[str, Any]) -> Tensor:
        return block(x, **block_kwargs)

    def run_block_with_prompts(
        self, block: Any, x: Tensor, prompts: Tensor, num_prefix: int, block_kwargs: dict[str, Any]
    ) -> Tensor:
        """``block(x)`` with prompt tokens ``(n, C)`` inserted after the prefix and dropped after it."""
        batch, n = x.shape[0], prompts.shape[0]
        x = torch.cat([x[:, :num_prefix], prompts.expand(batch, -1, -1), x[:, num_prefix:]], dim=1)
        x = block(x, **block_kwargs)
        return torch.cat([x[:, :num_prefix], x[:, num_prefix + n :]], dim=1)

    def prompts_added(self, vit: Any, num_prompts: int) -> None:
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

    def position_embedding(self, vit: Any, grid: tuple[int, int]) -> Tensor:
        stored = tuple(vit.patch_embed.grid_size)
        if grid == stored:
            return vit.pos_embed
        num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        antialias = has_registers(vit)
        return dinov2_interpolate_pos_embed(vit.pos_embed, num_prefix, stored, grid, antialias=antialias)


def _zero_qkv_biases_dropped(state_dict: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    """DINOv3's releases hold ``blocks.N.attn.qkv.bias`` (the key part masked off by
    ``bias_mask``), all zero in the distilled S to H+ models, which timm builds without biases.
    Zero biases are dropped here (timm's filter would print a line per block); a file whose
    query or value biases are not zero (a model trained further) does not fit the bias-free
    architecture and is refused by name instead of losing them silently."""
    if not any(k.endswith(".bias_mask") for k in state_dict):
        return state_dict  # no masked attention biases: not a DINOv3 release of this kind
    params = dict(model.named_parameters())
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.qkv.bias") and key.replace("qkv.bias", "q_bias") not in params:
            query, _, value_bias = value.float().chunk(3, dim=-1)
            if query.count_nonzero() or value_bias.count_nonzero():
                raise ValueError(
                    f"{key} holds non-zero query and value biases, which {type(model).__name__} "
                    "(timm's DINOv3 without attention biases) has no parameters for"
                )
            continue
        out[key] = value
    return out


def has_registers(vit: Any) -> bool:
    """Whether a timm DINOv2 is a "with registers" model. Their original code interpolates
    positions antialiased to the grid's size, without the 0.1 offset (facebookresearch/dinov2,
    hub/backbones.py: ``interpolate_antialias=True, interpolate_offset=0.0``)."""
    return getattr(vit, "reg_token", None) is not None


@register_family("eva")
class EvaFamily(BackboneFamily):
    """timm ``Eva`` (EVA02, DINOv3): blocks take the rotary embedding of the patches."""

    def checkpoint_filter(self):
        from timm.models.eva import checkpoint_filter_fn

        def dinov3_biases_checked(state_dict: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
            return checkpoint_filter_fn(_zero_qkv_biases_dropped(state_dict, model), model)

        return dinov3_biases_checked

    def embed(self, vit: Any, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        x, rope = vit._pos_embed(vit.patch_embed(images))
        return vit.norm_pre(x), {"rope": rope}

    def prompts_added(self, vit: Any, num_prompts: int) -> None:
        # Rotary embeddings apply to the tokens after the prefix: prompts join the prefix.
        for block in vit.blocks:
            block.attn.num_prefix_tokens += num_prompts


@register_family("sam")
class SamFamily(BackboneFamily):
    """timm ``VisionTransformerSAM``: NHWC maps ``(B, H, W, C)`` between blocks, no prefix tokens."""

    onnx_exportable = False  # torch 2.14's exporter fails on its windowed attention, even at a fixed size

    def timm_kwargs(self) -> dict[str, Any]:
        return {}

    def checkpoint_filter(self):
        from timm.models.vision_transformer_sam import checkpoint_filter_fn

        return checkpoint_filter_fn

    def num_prefix_tokens(self, vit: Any) -> int:
        return 0

    def embed(self, vit: Any, images: Tensor) -> tuple[Tensor, dict[str, Any]]:
        from timm.layers import resample_abs_pos_embed_nhwc

        x = vit.patch_embed(images)
        if vit.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(vit.pos_embed, list(x.shape[1:3]))
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(x))), {}

    def run_block_with_prompts(
        self, block: Any, x: Tensor, prompts: Tensor, num_prefix: int, block_kwargs: dict[str, Any]
    ) -> Tensor:
        return sam_block_with_prompts(block, x, prompts)

    def to_tokens(self, x: Tensor) -> Tensor:
        batch, h, w, channels = x.shape
        return x.reshape(batch, h * w, channels)

    def from_tokens(self, tokens: Tensor, like: Tensor) -> Tensor:
        return tokens.reshape(like.shape)

    def patch_map(self, x: Tensor, num_prefix: int, h: int, w: int) -> Tensor:
        return x.permute(0, 3, 1, 2).contiguous()


def sam_block_with_prompts(block: Any, x: Tensor, prompts: Tensor) -> Tensor:
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


def _sam_attention_with_prompts(attn: Any, x: Tensor, prompts: Tensor) -> Tensor:
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
    pos_embed: Tensor,
    num_prefix_tokens: int,
    stored_grid: tuple[int, int],
    grid: tuple[int, int],
    antialias: bool = False,
) -> Tensor:
    """Position embeddings for another grid, as the original DINOv2 code interpolates them.

    Bicubic with scale factors ``(grid + 0.1) / stored_grid``: the 0.1 guards the output size
    against floating-point floor errors (facebookresearch/dino#8), and because it also shifts the
    sampling positions slightly, it is kept to match the released models exactly. With
    ``antialias`` (the models with registers), antialiased bicubic to the grid's size.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = patches.shape[-1]
    patches = patches.float().reshape(1, *stored_grid, channels).permute(0, 3, 1, 2)
    if antialias:
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=True)
    else:
        scale = ((grid[0] + 0.1) / stored_grid[0], (grid[1] + 0.1) / stored_grid[1])
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"position interpolation produced {tuple(patches.shape[-2:])}, expected {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class CNNFamily:
    """The contract of a CNN family: a timm CNN run stage by stage (:class:`reinseg.cnn.ReinCNNBackbone`).

    ``x`` flows between blocks as an NCHW map ``(B, C, H, W)``; each stage has its own Rein,
    applied after every block of the stage (the official ``ReinsResNetV1c`` / ``ReinsConvNeXt``).
    """

    name = "cnn"
    kind = "cnn"
    reduction = 32  # the stride of the coarsest stage: sliding windows and exported sizes are multiples of it
    # Classifier parts of checkpoints that the segmentation backbone never runs.
    unused_prefixes: tuple[str, ...] = ("fc.", "head.")

    def create(self, arch: str, **overrides: Any) -> nn.Module:
        """The timm model of ``arch`` (``overrides`` go to ``timm.create_model``), without classifier."""
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0, **overrides)

    def stem(self, model: Any, images: Tensor) -> Tensor:
        """``images (B, 3, H, W)`` -> the map entering stage 0."""
        raise NotImplementedError

    def stages(self, model: Any) -> list[tuple[nn.Module | None, list[nn.Module]]]:
        """Per stage: the module entering it (a downsampling, or None) and its blocks."""
        raise NotImplementedError

    def stage_channels(self, model: Any) -> list[int]:
        """The output channels of every stage."""
        raise NotImplementedError

    def add_feature_norms(self, model: Any, out_indices: list[int]) -> None:
        """Add the modules :meth:`feature` needs to ``model`` (they are frozen with it)."""

    def feature(self, model: Any, index: int, x: Tensor) -> Tensor:
        """The map of stage ``index`` handed to the head (the un-normed ``x`` goes on)."""
        return x

    def to_timm_layout(self, state_dict: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
        """Weights of the timm or the official (mmseg / mmpretrain) layout in the model's names."""
        return state_dict

    def fit_state_dict(self, state_dict: dict[str, Tensor], model: Any, source: str) -> dict[str, Tensor]:
        """``state_dict`` converted to ``model``'s names, classifier dropped; a ValueError naming
        ``source`` and the keys when it does not fit."""
        from .pretrained import backbone_part, state_dict_mismatches

        fitted = self.to_timm_layout(backbone_part(state_dict), model)
        # PyTorch's own loading fills in BatchNorm counters a file leaves out; they count
        # training steps and change no output.
        for key, buffer in model.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in fitted:
                fitted[key] = torch.zeros((), dtype=buffer.dtype)
        fitted = {k: v for k, v in fitted.items() if not k.startswith(self.unused_prefixes)}
        problems = state_dict_mismatches(model.state_dict(), fitted)
        if problems:
            raise ValueError(
                f"{source} does not fit the {self.name} backbone {type(model).__name__}: " + "; ".join(problems)
            )
        return fitted


@register_family("resnet_v1c")
class ResNetV1cFamily(CNNFamily):
    """timm ``ResNet`` with the deep stem (three 3x3 convs) and strided-conv shortcuts: mmseg's ``ResNetV1c``.

    timm's ``resnet*c`` models are this variant; ``resnet*d`` (average-pool shortcuts) are V1d.
    ``block`` may be given by name, ``"basic"`` or ``"bottleneck"`` (configuration files).
    """

    def create(self, arch: str, **overrides: Any) -> nn.Module:
        from timm.models.resnet import BasicBlock, Bottleneck

        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        block = overrides.get("block")
        if isinstance(block, str):
            if block not in blocks:
                raise ValueError(f"block={block!r} is not one of {sorted(blocks)}")
            overrides["block"] = blocks[block]
        for key in ("layers", "channels"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        model: Any = super().create(arch, **overrides)
        if not isinstance(model.conv1, nn.Sequential) or any(
            isinstance(layer[0].downsample, nn.Sequential) and not isinstance(layer[0].downsample[0], nn.Conv2d)
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
        ):
            raise ValueError(f"{arch} is not a V1c ResNet (deep stem, strided 1x1 conv shortcuts)")
        return model

    def stem(self, model: Any, images: Tensor) -> Tensor:
        return model.maxpool(model.act1(model.bn1(model.conv1(images))))

    def stages(self, model: Any) -> list[tuple[nn.Module | None, list[nn.Module]]]:
        return [(None, list(getattr(model, f"layer{i}"))) for i in range(1, 5)]

    def stage_channels(self, model: Any) -> list[int]:
        return [info["num_chs"] for info in model.feature_info if info["module"].startswith("layer")]

    def to_timm_layout(self, state_dict: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
        # mmseg's deep stem ``stem.0/1/3/4/6/7`` is timm's ``conv1.0/1/3/4/6`` and ``bn1``;
        # every ``layer*`` key is the same.
        renamed = {}
        for key, value in state_dict.items():
            if key.startswith("stem.7."):
                key = "bn1." + key[len("stem.7.") :]
            elif key.startswith("stem."):
                key = "conv1." + key[len("stem.") :]
            renamed[key] = value
        return renamed


@register_family("convnext")
class ConvNeXtFamily(CNNFamily):
    """timm ``ConvNeXt``: mmpretrain's ``ConvNeXt`` with a channel LayerNorm (eps 1e-6) ``norm<i>``
    on every output stage's map, as the official ``ReinsConvNeXt`` adds them."""

    def create(self, arch: str, **overrides: Any) -> nn.Module:
        for key in ("depths", "dims"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        model = super().create(arch, **overrides)
        model.head = nn.Identity()  # the classifier (its norm is the last stage's norm<i>, see below)
        return model

    def stem(self, model: Any, images: Tensor) -> Tensor:
        return model.stem(images)

    def stages(self, model: Any) -> list[tuple[nn.Module | None, list[nn.Module]]]:
        return [(stage.downsample, list(stage.blocks)) for stage in model.stages]

    def stage_channels(self, model: Any) -> list[int]:
        return [info["num_chs"] for info in model.feature_info if info["module"].startswith("stages.")]

    def add_feature_norms(self, model: Any, out_indices: list[int]) -> None:
        from timm.layers import LayerNorm2d

        channels = self.stage_channels(model)
        for index in out_indices:
            model.add_module(f"norm{index}", LayerNorm2d(channels[index], eps=1e-6))

    def feature(self, model: Any, index: int, x: Tensor) -> Tensor:
        return getattr(model, f"norm{index}")(x).contiguous()

    def to_timm_layout(self, state_dict: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
        if any(".depthwise_conv." in k for k in state_dict):
            state_dict = _mmpretrain_convnext_to_timm(state_dict)
        else:
            if "downsample_layers.0.0.weight" in state_dict:  # the original (Facebook) release layout
                from timm.models.convnext import checkpoint_filter_fn

                state_dict = dict(checkpoint_filter_fn(state_dict, model))
            # The classifier's norm is the final norm of the original model, which mmpretrain
            # calls ``norm3``: the last stage's feature norm.
            last = len(model.stages) - 1
            for name in ("weight", "bias"):
                if f"head.norm.{name}" in state_dict and hasattr(model, f"norm{last}"):
                    state_dict.setdefault(f"norm{last}.{name}", state_dict[f"head.norm.{name}"])
        # Feature norms the weights do not hold start as the official ones do: weight 1, bias 0.
        own = model.state_dict()
        for key, value in own.items():
            if re.fullmatch(r"norm\d+\.(weight|bias)", key) and key not in state_dict:
                state_dict[key] = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        # timm models with conv_mlp hold the MLP as 1x1 convs.
        for key, value in state_dict.items():
            if key in own and value.dim() == 2 and own[key].dim() == 4:
                state_dict[key] = value.reshape(own[key].shape)
        return state_dict


def _mmpretrain_convnext_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """mmpretrain ``ConvNeXt`` names -> timm ``ConvNeXt`` names (``norm<i>`` kept)."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
        key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        key = key.replace(".depthwise_conv.", ".conv_dw.")
        key = key.replace(".pointwise_conv1.", ".mlp.fc1.").replace(".pointwise_conv2.", ".mlp.fc2.")
        renamed[key] = value
    return renamed
