"""The speed and memory levers of ``train`` applied to a built segmentor.

``train.activation_checkpointing`` (the frozen blocks recompute their activations in backward),
``train.deformable_recompute`` (the deformable attention samples again in backward),
``train.deformable_kernel`` (its sampling as sparse products or ``grid_sample``),
``train.pixel_decoder_checkpointing`` (the pixel decoder's encoder layers and FPN levels
recompute their activations in backward), ``train.encoder_ffn_recompute`` (its encoder FFNs
recompute their hidden activations),
``train.frozen_dtype`` (the frozen VFM held and run in bf16), ``train.channels_last`` (the
convolutions' weights, hence their outputs, in NHWC memory) and ``train.compile``
(``torch.compile`` of backbone and head). The model modules hold the switches
(:class:`~reinseg.backbones.ReinBackbone`,
:class:`~reinseg.heads.deformable_attention.MultiScaleDeformableAttention`); this is where the
configuration sets them. Effects on time, memory and numbers: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbones import ReinBackbone
from .config import ConfigError
from .heads.deformable_attention import MultiScaleDeformableAttention
from .heads.pixel_decoder import PixelDecoder
from .tuning import get_strategy

if TYPE_CHECKING:
    from .config import Config
    from .segmentor import Segmentor

__all__ = ["apply_train_options", "checkpointed_blocks", "convolutions_channels_last"]


def checkpointed_blocks(value: bool | int | list[int], depth: int) -> frozenset[int]:
    """The block indices ``train.activation_checkpointing`` names in a VFM of ``depth`` blocks:
    none (false), all (true), the first N (an int) or the listed ones."""
    if value is True:
        return frozenset(range(depth))
    if value is False:
        return frozenset()
    if isinstance(value, int):
        if value > depth:
            raise ConfigError(f"train.activation_checkpointing={value} is more than the VFM's {depth} blocks")
        return frozenset(range(value))
    outside = [i for i in value if not 0 <= i < depth]
    if outside:
        raise ConfigError(f"train.activation_checkpointing: blocks {outside} are not in [0, {depth})")
    return frozenset(value)


def apply_train_options(segmentor: Segmentor, config: Config) -> Segmentor:
    """Set ``config.train``'s levers on ``segmentor`` (built from ``config.model``, VFM weights
    loaded); returns it. Defaults change nothing."""
    tc = config.train
    backbone = segmentor.backbone
    for module in segmentor.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            # Inside a recomputed encoder layer the samples are freed with the layer's other
            # activations; sampling a third time in backward would buy nothing.
            module.recompute = tc.deformable_recompute and not tc.pixel_decoder_checkpointing
            module.kernel = tc.deformable_kernel
        if isinstance(module, PixelDecoder):
            module.checkpointing = tc.pixel_decoder_checkpointing
            for layer in module.encoder.layers:
                # Inside recomputed encoder layers the hidden activations are not kept anyway.
                layer.ffn.recompute_hidden = tc.encoder_ffn_recompute and not tc.pixel_decoder_checkpointing
    uses_vit = isinstance(backbone, ReinBackbone)
    if tc.activation_checkpointing not in (False, 0, []):
        if not uses_vit:
            raise ConfigError(f"train.activation_checkpointing applies to ViT backbones, not {type(backbone).__name__}")
        backbone.checkpoint_blocks = checkpointed_blocks(tc.activation_checkpointing, backbone.depth)
    if tc.frozen_dtype != "float32":
        strategy = get_strategy(config.model.tuning)
        if strategy.trains_vfm or not strategy.frozen_in_bf16:
            what = "trains it" if strategy.trains_vfm else "trains parameters inside its layers"
            raise ConfigError(
                f"train.frozen_dtype={tc.frozen_dtype} holds a frozen VFM, but model.tuning={config.model.tuning} "
                f"{what}: use train.frozen_dtype=float32"
            )
        if not uses_vit:
            raise ConfigError(
                f"train.frozen_dtype={tc.frozen_dtype} applies to ViT backbones, not {type(backbone).__name__}"
            )
        backbone.hold_frozen_in(getattr(torch, tc.frozen_dtype))
    if tc.channels_last:
        # After frozen_dtype's cast, which keeps each tensor's memory format either way.
        convolutions_channels_last(segmentor)
    if tc.compile is not False:
        backend = "inductor" if tc.compile is True else tc.compile
        # In place (nn.Module.compile): parameter names, hence checkpoints, stay as they are.
        segmentor.backbone.compile(backend=backend)
        segmentor.head.compile(backend=backend)
    return segmentor


def convolutions_channels_last(module: nn.Module) -> None:
    """Every 2-D convolution's weight ``(out, in, kh, kw)`` held in channels-last (NHWC) memory,
    in place, so that its output is NHWC too. Only convolutions: ``Module.to(memory_format=...)``
    would also reorder other 4-D tensors, such as SAM's ``(1, H, W, C)`` position embedding,
    whose last axis is already its channels."""
    for conv in module.modules():
        if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
