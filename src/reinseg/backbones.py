"""Frozen vision foundation models from timm with Rein after every block.

:func:`build_backbone` turns a zoo name (``dinov2_vitl14``, ``eva02_vitl14``, ``sam_vith16``, ...)
into a :class:`ReinBackbone`: the timm model's patch embedding and blocks, Rein refining the
tokens after every block, and the four feature maps the Mask2Former head reads, made as the
official code makes them (patch tokens of the ``out_indices`` blocks as stride-``patch`` maps,
resized x4, x2, x1 and x0.5).

How each family embeds images, runs its blocks and lays out its tokens is its adapter in
:mod:`reinseg.families`; :class:`ReinBackbone` itself is family-agnostic.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .families import BackboneFamily, CNNFamily, get_family
from .pretrained import RESAMPLE_METHODS, fit_state_dict, load_into, read_weights, weights_fingerprint
from .rein import Rein

__all__ = [
    "BackboneSpec",
    "BACKBONES",
    "BackboneMaps",
    "BackboneOutput",
    "FrozenBackbone",
    "ReinBackbone",
    "build_backbone",
    "list_backbones",
    "backbone_kind",
    "default_out_indices",
    "rein_arguments",
]


class BackboneOutput(NamedTuple):
    """What a backbone gives the head.

    ``features``: four maps ``(B, C, 4H/p, 4W/p)``, ``(B, C, 2H/p, 2W/p)``, ``(B, C, H/p, W/p)``,
    ``(B, C, H/2p, W/2p)``; ``queries``: ``(token_length, query_dims)`` object queries linked
    from Rein's tokens, or ``None`` when the head learns its own.
    """

    features: list[Tensor]
    queries: Tensor | None = None


class BackboneMaps(NamedTuple):
    """A backbone's four maps before they are brought to strides 4, 8, 16, 32
    (``backbone(images, resize=False)``).

    ``maps[i]`` resized bilinearly (align_corners False) by ``scales[i]`` is
    ``BackboneOutput.features[i]`` (:func:`resize_map`); ``queries`` as there. A ViT's maps are
    all at its patch stride (scales 4, 2, 1, 0.5); a CNN's are at their strides already (scales 1).
    A head whose first step on a map is linear per pixel (the pixel decoder's 1x1 convolutions)
    may resize after it: the same values up to float rounding, on fewer pixels.
    """

    maps: list[Tensor]
    scales: tuple[float, ...]
    queries: Tensor | None = None

    def output(self) -> BackboneOutput:
        """The maps resized: what ``backbone(images)`` returns."""
        return BackboneOutput([resize_map(m, s) for m, s in zip(self.maps, self.scales, strict=True)], self.queries)


def resize_map(x: Tensor, scale: float) -> Tensor:
    """``x (B, C, h, w)`` resized bilinearly by ``scale`` (align_corners False), or ``x`` itself at 1."""
    return x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class BackboneSpec:
    """A zoo entry: which timm architecture and pretrained tag, and which family it belongs to."""

    arch: str
    tag: str
    family: str
    title: str

    @property
    def timm_name(self) -> str:
        return f"{self.arch}.{self.tag}"


def _dinov2(size: str, arch: str, reg: bool) -> BackboneSpec:
    suffix = "_reg4" if reg else ""
    return BackboneSpec(
        f"vit_{arch}_patch14{suffix}_dinov2",
        "lvd142m",
        "dinov2",
        f"DINOv2 ViT-{size}/14{' + registers' if reg else ''}",
    )


def _dinov3(size: str, arch: str) -> BackboneSpec:
    return BackboneSpec(f"vit_{arch}_patch16_dinov3", "lvd1689m", "eva", f"DINOv3 ViT-{size}/16")


BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"dinov2_vit{s}14{'_reg' if reg else ''}": _dinov2(s.upper(), arch, reg)
        for reg in (False, True)
        for s, arch in [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")]
    },
    "dinov3_vits16": _dinov3("S", "small"),
    "dinov3_vits16plus": _dinov3("S+", "small_plus"),
    "dinov3_vitb16": _dinov3("B", "base"),
    "dinov3_vitl16": _dinov3("L", "large"),
    "dinov3_vith16plus": _dinov3("H+", "huge_plus"),
    "dinov3_vit7b16": _dinov3("7B", "7b"),
    "eva02_vitl14": BackboneSpec("eva02_large_patch14_224", "mim_m38m", "eva", "EVA02-L/14 (MIM, Merged-38M)"),
    "clip_vitl14": BackboneSpec("vit_large_patch14_clip_quickgelu_224", "openai", "vit", "OpenAI CLIP ViT-L/14"),
    "sam_vitb16": BackboneSpec("samvit_base_patch16", "sa1b", "sam", "SAM ViT-B/16 image encoder"),
    "sam_vitl16": BackboneSpec("samvit_large_patch16", "sa1b", "sam", "SAM ViT-L/16 image encoder"),
    "sam_vith16": BackboneSpec("samvit_huge_patch16", "sa1b", "sam", "SAM ViT-H/16 image encoder"),
    "mae_vitl16": BackboneSpec("vit_large_patch16_224", "mae", "vit", "MAE ViT-L/16"),
    # CNNs (one Rein per stage, reinseg.cnn): the official ReinsResNetV1c / ReinsConvNeXt.
    "resnet50_v1c": BackboneSpec("resnet50c", "gluon_in1k", "resnet_v1c", "ResNet-50 V1c (deep stem), ImageNet-1k"),
    "resnet101_v1c": BackboneSpec("resnet101c", "gluon_in1k", "resnet_v1c", "ResNet-101 V1c (deep stem), ImageNet-1k"),
    "convnext_large": BackboneSpec("convnext_large", "fb_in22k", "convnext", "ConvNeXt-L, ImageNet-22k"),
}


def backbone_kind(name: str) -> str:
    """``"vit"`` or ``"cnn"``: the kind of the zoo entry ``name`` (its family's ``kind``)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    return get_family(BACKBONES[name].family).kind


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(BACKBONES)


def default_out_indices(depth: int) -> list[int]:
    """Blocks whose outputs feed the head: at 1/3, 1/2, 2/3 and all of the depth.

    24 blocks give the official ``[7, 11, 15, 23]``, 12 give ``[3, 5, 7, 11]``.
    """
    indices = [math.floor(depth * k / 12 + 0.5) - 1 for k in (4, 6, 8, 12)]
    if depth < 4 or len(set(indices)) != 4:
        raise ValueError(f"cannot spread 4 out_indices over {depth} blocks; pass out_indices explicitly")
    return indices


class FrozenBackbone(nn.Module):
    """What both backbone classes share: the frozen model in ``vit``, Rein (or None) in ``rein``,
    ``freeze_backbone`` (off when the whole VFM trains)."""

    vit: Any  # the timm model: its blocks and embeddings are read as timm names them
    rein: Any  # a Rein module (or one per stage), or None
    freeze_backbone: bool
    patch_size: tuple[int, int]  # a ViT's patch; a CNN's coarsest stride

    @property
    def links_queries(self) -> bool:
        return self.rein is not None and bool(self.rein.link_token_to_query)

    @property
    def input_multiple(self) -> tuple[int, int]:
        """What the image sides must be multiples of (inference pads them to it): a ViT's patch."""
        return self.patch_size

    @property
    def smallest_input(self) -> tuple[int, int]:
        """The shortest image sides the backbone and head take (inference pads up to them): two
        patches for a ViT, whose map the head also takes at half its size (one patch gives none
        there; the official code fails on such an image)."""
        patches = math.ceil(1 / min(VIT_MAP_SCALES))
        return (patches * self.patch_size[0], patches * self.patch_size[1])

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        if self.freeze_backbone:
            # As the official train(): the frozen model stays in eval mode (no dropout or drop
            # path, BatchNorm running statistics); only Rein trains.
            self.vit.eval()
        return self


class ReinBackbone(FrozenBackbone):
    """A frozen timm ViT with an optional Rein after every block.

    Args:
        vit: the timm model (VisionTransformer, Eva or VisionTransformerSAM).
        family: the family's name or adapter (:mod:`reinseg.families`): how to embed, run blocks,
            and lay out tokens.
        out_indices: the four blocks whose outputs become the feature maps.
        rein: the Rein module, or None for the plain frozen backbone.

    ``forward(images (B, 3, H, W))`` returns a :class:`BackboneOutput`. The backbone stays frozen
    and in eval mode when the module is put in train mode; only Rein trains. The other tuning
    strategies of :mod:`reinseg.tuning` add their modules to a built backbone (``prompts`` here,
    LoRA and adapters inside ``vit``).
    """

    def __init__(
        self, vit: Any, family: str | BackboneFamily, out_indices: Sequence[int], rein: Rein | None = None
    ) -> None:
        super().__init__()
        adapter = get_family(family) if isinstance(family, str) else family
        if not isinstance(adapter, BackboneFamily):
            raise ValueError(f"{adapter.name} is a CNN family: its backbones are built by build_backbone")
        self.family: BackboneFamily = adapter
        depth = len(vit.blocks)
        out_indices = [int(i) for i in out_indices]
        if len(out_indices) != 4 or any(not 0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices must be 4 block indices in [0, {depth}), got {out_indices}")
        self.vit = vit
        self.out_indices = out_indices
        self.rein = rein
        self.prompts = None  # deep visual prompts (tuning: vpt), see reinseg.tuning
        self.embed_dim = int(vit.embed_dim)
        self.depth = depth
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.num_prefix_tokens = self.family.num_prefix_tokens(vit)
        self.freeze_backbone = True
        self.weights_source: str | None = None  # where the VFM weights came from; None: random init
        self.weights_fingerprint: str | None = None  # pretrained.weights_fingerprint of them, as loaded
        # Training levers (reinseg.train_options): blocks whose activations are recomputed in
        # backward, and the dtype the frozen VFM is held and run in (None: as built).
        self.checkpoint_blocks: frozenset[int] = frozenset()
        self.frozen_dtype: torch.dtype | None = None
        self.vit.requires_grad_(False)
        self.vit.eval()

    def add_rein(self, rein: dict[str, Any], module: type[Rein] = Rein) -> Rein:
        """Build Rein from its arguments (:class:`reinseg.Rein`) and run it after every block.

        ``num_layers``, ``embed_dims``, ``patch_size`` and ``num_prefix_tokens`` come from the
        backbone; given ones must agree. ``module``: Rein or a subclass taking its arguments (SET).
        """
        derived = dict(
            num_layers=self.depth,
            embed_dims=self.embed_dim,
            patch_size=int(self.patch_size[0]),
            num_prefix_tokens=self.num_prefix_tokens,
        )
        self.rein = module(**rein_arguments(rein, derived, module=module))
        return self.rein

    @property
    def out_channels(self) -> list[int]:
        """Channels of the four maps :meth:`forward` returns."""
        return [self.embed_dim] * 4

    def forward(self, images: Tensor, resize: bool = True) -> BackboneOutput | BackboneMaps:
        """The four maps at strides 4, 8, 16, 32 (:class:`BackboneOutput`), or with
        ``resize=False`` all four at the patch stride with the factors that bring them there
        (:class:`BackboneMaps`)."""
        if images.dim() != 4:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        ph, pw = self.patch_size
        height, width = images.shape[-2:]
        if height % ph or width % pw:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {ph}x{pw}; "
                f"pad or resize the images to a multiple of {ph}"
            )
        family = self.family
        frozen_dtype = self.frozen_dtype
        if frozen_dtype is not None:
            images = images.to(frozen_dtype)
        # The blocks' other inputs (DINOv3's and EVA02's rotary sines and cosines) stay fp32, as
        # timm keeps them under autocast: it casts the rotated queries and keys to the values' dtype.
        x, block_kwargs = family.embed(self.vit, images)
        maps = []
        with self.rein.one_forward() if self.rein is not None else contextlib.nullcontext():
            for index, block in enumerate(self.vit.blocks):
                x = self._run_block(index, block, x, block_kwargs)
                if frozen_dtype is not None:
                    # Rein, the prompts and the maps the head sees stay in fp32: only the frozen
                    # blocks run in frozen_dtype.
                    x = x.float()
                if self.rein is not None:
                    x = family.from_tokens(self.rein(family.to_tokens(x), index), x)
                if index in self.out_indices:
                    maps.append(family.patch_map(x, self.num_prefix_tokens, height // ph, width // pw))
        out = BackboneMaps(maps, VIT_MAP_SCALES, self.rein.queries() if self.links_queries else None)
        return out.output() if resize else out

    def _run_block(self, index: int, block: Any, x: Tensor, block_kwargs: dict[str, Any]) -> Tensor:
        """Block ``index`` on ``x`` (with its prompts, if any), checkpointed when it is one of
        ``checkpoint_blocks`` and a graph is being built."""
        if self.frozen_dtype is not None:
            x = x.to(self.frozen_dtype)
        if self.prompts is None:
            run, args = self.family.run_block, (block, x, block_kwargs)
        else:
            prompts = self.prompts.tokens[index].to(x.dtype)
            run = self.family.run_block_with_prompts
            args = (block, x, prompts, self.num_prefix_tokens, block_kwargs)
        if index in self.checkpoint_blocks and torch.is_grad_enabled():
            # Only the block's input is kept; its activations are computed again in backward
            # (a frozen VFM is in eval mode; one that trains replays its drop-path draws, as
            # checkpoint restores the RNG state).
            return checkpoint(run, *args, use_reentrant=False)
        return run(*args)

    def hold_frozen_in(self, dtype: torch.dtype) -> None:
        """Store the VFM's frozen parameters and floating buffers in ``dtype`` and run its blocks
        in it; parameters that train (LoRA, adapters, the VFM under full fine-tuning) keep their
        dtype, and Rein and the maps stay fp32. Non-persistent buffers (the rotary frequencies of
        DINOv3 and EVA02, tables computed rather than learned) stay fp32, as timm computes the
        rotary angles: in bf16 they are off by up to 0.4 %; timm casts the rotated queries and
        keys back to the values' dtype."""
        for param in self.vit.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
        for module in self.vit.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                    setattr(module, name, buffer.to(dtype))
        self.frozen_dtype = dtype

    def load_backbone_weights(self, weights: str | Path | dict[str, Tensor], resample: str = "official") -> None:
        """Load VFM weights (a file path or a state dict) into the frozen ViT, fitting patch size and grid."""
        state_dict, source = read_weights(weights)
        fitted = fit_state_dict(state_dict, self.vit, self.family.checkpoint_filter(), resample, source=source)
        load_into(self.vit, fitted)
        self.weights_source = source
        self.weights_fingerprint = weights_fingerprint(self.vit)


def rein_arguments(
    rein: dict[str, Any], derived: dict[str, Any], where: str = "the backbone", module: type[Rein] = Rein
) -> dict[str, Any]:
    """``rein`` (arguments of ``module``, :class:`reinseg.Rein` or a subclass) completed with the
    ``derived`` ones, which given values must equal; a ValueError naming the argument otherwise."""
    if not isinstance(rein, dict):
        raise ValueError(f"rein must be a dict of Rein arguments or None, got {type(rein).__name__}")
    for key, value in derived.items():
        if key in rein and rein[key] != value:
            raise ValueError(f"rein.{key}={rein[key]!r} does not match {where} ({value!r})")
    accepted = _init_arguments(module)
    unknown = set(rein) - set(accepted)
    if unknown:
        raise ValueError(f"unknown Rein arguments {sorted(unknown)}; expected some of {sorted(accepted)}")
    return {**rein, **derived}


def _init_arguments(module: type[Rein]) -> set[str]:
    """The named arguments of ``module``'s constructor; a subclass passing ``**rein`` on to its
    parent's (FADA) takes the parent's too."""
    names: set[str] = set()
    for cls in module.__mro__:
        if not (isinstance(cls, type) and issubclass(cls, Rein)):
            break
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair; a ValueError naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair, got {value!r}")
    return pair


# A ViT's four maps, all at its patch stride, are resized by these for the head (strides 4-32).
VIT_MAP_SCALES = (4, 2, 1, 0.5)


def create_with_overrides(create, name: str, fixed: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``create(**fixed, **overrides)``: timm's model of zoo entry ``name``. What timm refuses in
    ``overrides`` (an unknown argument, a width its heads do not divide, a negative size, ...) is
    an error naming ``model.backbone.timm_kwargs``, as is an argument reinseg sets itself."""
    taken = sorted(set(overrides) & set(fixed))
    if taken:
        raise ValueError(f"model.backbone.timm_kwargs: reinseg sets {', '.join(taken)} for {name} itself")
    if not overrides:
        return create(**fixed)
    try:
        return create(**fixed, **overrides)
    except Exception as err:  # timm's own checks are asserts, TypeErrors, KeyErrors, ...
        shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        reason = str(err) or type(err).__name__
        raise ValueError(f"model.backbone.timm_kwargs ({shown}): timm cannot build {name} with them: {reason}") from err


# timm.create_model arguments that load or fetch weights: refused in timm_kwargs.
TIMM_LOADING_KEYS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")


def build_backbone(
    name: str,
    *,
    rein: dict[str, Any] | None = None,
    img_size: int | Sequence[int] = 512,
    patch_size: int | None = None,
    out_indices: Sequence[int] | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    resample: str = "official",
    **timm_overrides: Any,
) -> FrozenBackbone:
    """Build a frozen VFM backbone from the zoo, with Rein after every block.

    CNN entries (``resnet50_v1c``, ``convnext_large``, ...) give a
    :class:`reinseg.cnn.ReinCNNBackbone` (one Rein per stage); they take any image size
    (``img_size`` and ``resample`` do not apply) and no ``patch_size``.

    Args:
        name: zoo name, see :func:`list_backbones` (e.g. ``"dinov2_vitl14"``).
        rein: Rein arguments (see :class:`reinseg.Rein`); ``num_layers``, ``embed_dims``,
            ``patch_size`` and ``num_prefix_tokens`` are filled from the backbone. ``None``: no Rein.
        img_size: training resolution (int or (H, W)); sets the stored position grid. Inputs of
            other sizes are accepted at run time (position embeddings are interpolated).
        patch_size: patch size; ``None`` keeps the model's own (14 for DINOv2). The paper runs
            every VFM at 16, converting the 14x14 kernels.
        out_indices: the 4 blocks feeding the head (default: :func:`default_out_indices`).
        checkpoint: local weights (``.pth``/``.pt``/``.bin``/``.safetensors``) in timm or the
            original release layout; patch size and grid are converted when they differ.
        pretrained: download timm's hub weights (needs network access).
        resample: how weights of another patch size / grid are fitted, ``"official"`` (bicubic,
            the official Rein conversion) or ``"timm"`` (timm's resampling).
        **timm_overrides: passed to ``timm.create_model`` (``embed_dim``, ``depth``,
            ``num_heads``, ``drop_path_rate``, ...).
    """
    import timm

    backbone_kind(name)  # an unknown name is an error naming the known ones
    loading = sorted(set(timm_overrides) & set(TIMM_LOADING_KEYS))
    if loading:
        # A config stored in a checkpoint reaches here too: weights load through reinseg's reader.
        raise ValueError(
            f"model.backbone.timm_kwargs: {', '.join(loading)} would have timm load or fetch weights itself; "
            "name them with model.backbone.checkpoint (a local file) or pretrained"
        )
    if checkpoint is not None and pretrained:
        raise ValueError("pass either checkpoint= or pretrained=True, not both")
    if resample not in RESAMPLE_METHODS:
        raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {resample!r}")
    spec = BACKBONES[name]
    img_hw = as_pair(img_size, "img_size")
    family = get_family(spec.family)
    if isinstance(family, CNNFamily):
        from .cnn import build_cnn_backbone

        return build_cnn_backbone(
            name, spec, family, rein, patch_size, out_indices, checkpoint, pretrained, timm_overrides
        )
    fixed = dict(img_size=img_hw, num_classes=0, **family.timm_kwargs())
    if patch_size is not None:
        fixed["patch_size"] = int(patch_size)
    vit: Any = create_with_overrides(
        lambda **kwargs: timm.create_model(spec.arch, pretrained=False, **kwargs), name, fixed, timm_overrides
    )
    ph, pw = vit.patch_embed.patch_size
    if img_hw[0] % ph or img_hw[1] % pw:
        raise ValueError(
            f"img_size {img_hw[0]}x{img_hw[1]} is not divisible by the patch size {ph} of {name}; "
            f"pass patch_size=16 (the paper's setting, kernels are converted) or a multiple of {ph} as img_size"
        )
    # The segmentation backbone never runs the final norm or the classifier: drop them so
    # that they neither count as parameters nor need to be in a checkpoint.
    for unused in ("norm", "fc_norm", "head", "neck"):
        if isinstance(getattr(vit, unused, None), nn.Module):
            setattr(vit, unused, nn.Identity())

    indices = list(out_indices) if out_indices is not None else default_out_indices(len(vit.blocks))
    backbone = ReinBackbone(vit, family, indices)
    if rein is not None:
        backbone.add_rein(rein)

    if checkpoint is not None:
        backbone.load_backbone_weights(checkpoint, resample=resample)
    elif pretrained:
        backbone.load_backbone_weights(_download_pretrained(name, spec), resample=resample)
        backbone.weights_source = f"timm hub: {spec.timm_name}"
    return backbone


def _download_pretrained(name: str, spec: BackboneSpec) -> dict[str, Tensor]:
    import timm
    from timm.models._hub import load_state_dict_from_hf

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        raise RuntimeError(f"timm has no hub weights for {spec.timm_name}; pass checkpoint=PATH")
    try:
        return load_state_dict_from_hf(hub_id)
    except Exception as err:  # the hub raises many kinds (offline, missing, network)
        raise RuntimeError(
            f"could not download the pretrained weights of {name} ({hub_id}): {err}\n"
            f"Without network access, download them elsewhere and pass checkpoint=PATH "
            f"(the original release file or timm's model.safetensors)."
        ) from err
