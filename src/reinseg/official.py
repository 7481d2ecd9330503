"""Loading the official Rein release checkpoints (mmseg configs and weights) into reinseg.

The official model is mmseg's ``EncoderDecoder`` with a Rein backbone (``ReinsDinoVisionTransformer``,
``ReinsEVA2``, ``ReinsResNetV1c``, ``ReinsConvNeXt``; :func:`backbone_from_official` alone) and a
``ReinMask2FormerHead``. :func:`official_model_config` reads every dimension from its
``model`` dict and refuses, naming the field, what reinseg cannot represent; :func:`from_official`
builds the :class:`~reinseg.segmentor.Segmentor` and loads the released weights
(``backbone.reins.*`` -> ``backbone.rein.*``, ``decode_head.*`` -> ``head.*``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from .build import build_configured_backbone, build_segmentor
from .checkpoints import atomic_write_bytes, checkpoint_state_dict, load_checkpoint_weights, save_checkpoint, vfm_record
from .cnn import REIN_PATCH_SIZE
from .config import BackboneConfig, ConfigError, HeadConfig, LossConfig, ModelConfig, ReinConfig, TestConfig, to_dict
from .pretrained import read_state_dict, state_dict_mismatches, unwrap_state_dict
from .segmentor import Segmentor
from .tuning import get_strategy

__all__ = [
    "official_model_config",
    "official_backbone",
    "backbone_from_official",
    "from_official",
    "convert_official",
    "read_official_model_config",
    "OFFICIAL_PREFIXES",
]

# Official name prefix -> reinseg name prefix.
OFFICIAL_PREFIXES = {"backbone.reins.": "backbone.rein.", "decode_head.": "head."}
_IMAGENET_MEAN = [123.675, 116.28, 103.53]
_IMAGENET_STD = [58.395, 57.12, 57.375]
# DINOv2 sizes timm knows by name: embed_dim -> (zoo name, depth, heads).
_DINOV2_SIZES = {
    384: ("dinov2_vits14", 12, 6),
    768: ("dinov2_vitb14", 12, 12),
    1024: ("dinov2_vitl14", 24, 16),
    1536: ("dinov2_vitg14", 40, 24),
}
_HEADS = ("ReinMask2FormerHead", "Mask2FormerHead")


class _Fields:
    """Reads an official config dict, naming ``model.<path>`` in every error."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a dict, got {type(data).__name__}")
        self.data = data
        self.path = path

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.data:
            return self.data[key]
        if default is ...:
            raise ConfigError(f"{self.path}.{key} is missing")
        return default

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key), f"{self.path}.{key}")

    def expect(self, key: str, allowed: Any, default: Any = ...) -> Any:
        """The value of ``key``, refused unless it is (one of) ``allowed``."""
        value = self.get(key, default)
        options = allowed if isinstance(allowed, (list, tuple, set)) else [allowed]
        if not any(_same(value, option) for option in options):
            raise ConfigError(
                f"{self.path}.{key}={value!r} is not supported by reinseg (supported: "
                f"{' or '.join(repr(o) for o in options)})"
            )
        return value

    def equal(self, key: str, expected: Any, why: str, default: Any = ...) -> Any:
        value = self.get(key, default)
        if not _same(value, expected):
            raise ConfigError(f"{self.path}.{key}={value!r} must equal {expected!r} ({why})")
        return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _type(fields: _Fields, allowed: tuple[str, ...]) -> str:
    """The ``type`` of an official module, with mmdet's ``mmdet.`` scope prefix removed."""
    value = str(fields.get("type")).split(".")[-1]
    if value not in allowed:
        raise ConfigError(
            f"{fields.path}.type={fields.get('type')!r} is not supported (supported: {', '.join(allowed)})"
        )
    return value


class OfficialBackbone(NamedTuple):
    """An official ``backbone=dict(...)`` in reinseg's terms."""

    config: BackboneConfig
    rein: ReinConfig | None  # None: no Rein (the plain backbone types)
    out_channels: list[int]  # channels of the maps it gives the head
    patch_unit: int  # inputs (and sliding-window crops) must be multiples of it


def official_backbone(bb: _Fields) -> OfficialBackbone:
    """Translate an official backbone dict; every field reinseg cannot represent is refused by name."""
    kind = _type(bb, tuple(_BACKBONE_READERS))
    return _BACKBONE_READERS[kind](bb, kind.startswith("Reins"))


def _dinov2_backbone(bb: _Fields, has_rein: bool) -> OfficialBackbone:
    """The official ``DinoVisionTransformer`` (``ReinsDinoVisionTransformer``,
    rein/models/backbones/dino_v2.py) -> timm's DINOv2 ``VisionTransformer``. Its module arguments
    (``embed_layer``, ``act_layer``, ``block_fn``) and fields of other backbones are refused;
    ``block_chunks`` only groups the blocks (FSDP wrapping) and is read as any value."""
    _check_keys(
        bb,
        {
            "img_size",
            "patch_size",
            "in_chans",
            "embed_dim",
            "depth",
            "num_heads",
            "mlp_ratio",
            "qkv_bias",
            "ffn_bias",
            "proj_bias",
            "drop_path_rate",
            "drop_path_uniform",
            "init_values",
            "ffn_layer",
            "block_chunks",
            "out_indices",
        },
    )
    bb.expect("in_chans", 3, default=3)
    # The official depth rule without drop_path_uniform (linear from 0 to the rate) is timm's.
    bb.expect("drop_path_uniform", False, default=False)
    embed_dim = bb.get("embed_dim", 768)
    depth = bb.get("depth", 12)
    num_heads = bb.get("num_heads", 12)
    patch_size = bb.get("patch_size", 16)
    for key in ("qkv_bias", "proj_bias", "ffn_bias"):
        bb.expect(key, True, default=True)
    ffn = bb.expect("ffn_layer", ("mlp", "swiglu", "swiglufused"), default="mlp")
    mlp_ratio = bb.get("mlp_ratio", 4.0)
    name, zoo_depth, zoo_heads = _DINOV2_SIZES.get(embed_dim, ("dinov2_vits14", None, None))
    timm_kwargs: dict[str, Any] = {}
    if (depth, num_heads) != (zoo_depth, zoo_heads):
        timm_kwargs.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    if ffn == "mlp":
        if name == "dinov2_vitg14":
            raise ConfigError(f"{bb.path}.ffn_layer='mlp' with embed_dim 1536: DINOv2-g uses 'swiglufused'")
        if mlp_ratio != 4:
            timm_kwargs["mlp_ratio"] = mlp_ratio
    else:
        if name != "dinov2_vitg14":
            raise ConfigError(f"{bb.path}.ffn_layer={ffn!r} is only supported for DINOv2-g (embed_dim 1536)")
        # DINOv2's fused SwiGLU hidden width, in timm's packed (2 x hidden) convention.
        hidden = (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8
        timm_kwargs["mlp_ratio"] = 2 * hidden / embed_dim
    init_values = bb.get("init_values", None)
    if init_values != 1e-5:
        timm_kwargs["init_values"] = init_values
    if bb.get("drop_path_rate", 0.0):
        timm_kwargs["drop_path_rate"] = bb.get("drop_path_rate")
    out_indices = list(bb.get("out_indices", [7, 11, 15, 23]))
    backbone = BackboneConfig(
        name=name,
        img_size=bb.get("img_size", 224),
        patch_size=patch_size,
        out_indices=out_indices,
        timm_kwargs=timm_kwargs,
    )
    return _vit_backbone(bb, backbone, has_rein, depth, embed_dim, patch_size)


def _eva2_backbone(bb: _Fields, has_rein: bool) -> OfficialBackbone:
    """The official ``EVA2`` (``ReinsEVA2``, rein/models/backbones/eva_02.py) -> timm's ``Eva`` (``eva02_vitl14``).

    The two compute the same function (checked to 1e-5 against the official code); what differs is
    named here: the official ``pt_hw_seq_len`` is timm's ``ref_feat_shape`` (the grid the rotary
    frequencies were trained at, interpolated to the image's grid: ``intp_freq``); the official
    ``q_bias``/``v_bias`` and SwiGLU ``w1``/``w2``/``ffn_ln``/``w3`` are timm's ``q_proj.bias``/
    ``v_proj.bias`` and ``fc1_g``/``fc1_x``/``norm``/``fc2`` (renamed on load by timm's filter);
    ``xattn`` (xformers' memory-efficient attention) computes the same softmax attention. The
    official rotary table and position embedding are fixed to ``img_size``; timm recomputes and
    resamples them for other image sizes (the same at ``img_size``).
    """
    _check_keys(
        bb,
        {
            "img_size",
            "patch_size",
            "in_chans",
            "num_classes",
            "embed_dim",
            "depth",
            "num_heads",
            "mlp_ratio",
            "qkv_bias",
            "qk_scale",
            "drop_rate",
            "attn_drop_rate",
            "drop_path_rate",
            "hybrid_backbone",
            "norm_layer",
            "init_values",
            "use_checkpoint",
            "use_abs_pos_emb",
            "use_rel_pos_bias",
            "use_shared_rel_pos_bias",
            "out_indices",
            "subln",
            "xattn",
            "naiveswiglu",
            "rope",
            "pt_hw_seq_len",
            "intp_freq",
        },
    )
    embed_dim, depth = bb.get("embed_dim", 768), bb.get("depth", 12)
    num_heads, patch_size = bb.get("num_heads", 12), bb.get("patch_size", 16)
    bb.expect("in_chans", 3, default=3)
    for key, value in (("use_abs_pos_emb", True), ("subln", True), ("naiveswiglu", True), ("rope", True)):
        bb.expect(key, value, default=True)
    for key in ("use_rel_pos_bias", "use_shared_rel_pos_bias"):
        bb.expect(key, False, default=False)
    for key in ("qk_scale", "hybrid_backbone"):
        bb.expect(key, None, default=None)
    # timm always resamples the rotary frequencies to the image's grid (the official intp_freq).
    bb.expect("intp_freq", True, default=True)
    norm = _Fields(bb.get("norm_layer"), f"{bb.path}.norm_layer")
    norm.expect("type", "LN")
    norm.expect("eps", 1e-6)
    timm_kwargs: dict[str, Any] = dict(drop_path_rate=bb.get("drop_path_rate", 0.0))
    if (embed_dim, depth, num_heads) != (1024, 24, 16):
        timm_kwargs.update(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    mlp_ratio = bb.get("mlp_ratio", 4 * 2 / 3)
    if not _same(mlp_ratio, 4 * 2 / 3):
        timm_kwargs["mlp_ratio"] = mlp_ratio
    reference = bb.get("pt_hw_seq_len", 16)
    if reference != 16:
        timm_kwargs["ref_feat_shape"] = (reference, reference)
    if not bb.get("qkv_bias", False):
        timm_kwargs["qkv_bias"] = False
    if bb.get("init_values", None) is not None:
        timm_kwargs["init_values"] = bb.get("init_values")
    backbone = BackboneConfig(
        name="eva02_vitl14",
        img_size=bb.get("img_size", 224),
        patch_size=patch_size,
        out_indices=list(bb.get("out_indices", [3, 5, 7, 11])),
        timm_kwargs=timm_kwargs,
    )
    return _vit_backbone(bb, backbone, has_rein, depth, embed_dim, patch_size)


def _vit_backbone(
    bb: _Fields, config: BackboneConfig, has_rein: bool, depth: int, embed_dim: int, patch_size: int
) -> OfficialBackbone:
    """A ViT's :class:`OfficialBackbone`: one Rein over its ``depth`` blocks, four maps of its width."""
    rein = None
    if has_rein:
        rc = bb.sub("reins_config")
        rc.equal("num_layers", depth, "the Rein layers are the backbone's blocks")
        rc.equal("embed_dims", embed_dim, "Rein works at the backbone's width")
        rc.equal("patch_size", patch_size, "Rein's initialisation uses the backbone's patch size", default=patch_size)
        rein = _rein_config(rc)
    return OfficialBackbone(config, rein, [embed_dim] * 4, patch_size)


def _rein_config(rc: _Fields) -> ReinConfig:
    """The shared Rein arguments of an official ``reins_config``."""
    lora = _type(rc, ("LoRAReins", "Reins")) == "LoRAReins"
    return ReinConfig(
        token_length=rc.get("token_length", 100),
        lora_dim=rc.get("lora_dim", 16) if lora else None,
        query_dims=rc.get("query_dims", 256),
        link_token_to_query=rc.get("link_token_to_query", True),
        scale_init=rc.get("scale_init", 0.001),
        use_softmax=rc.get("use_softmax", True),
        zero_mlp_delta_f=rc.get("zero_mlp_delta_f", False),
    )


def _stage_reins(bb: _Fields, depths: list[int], channels: list[int]) -> ReinConfig:
    """The Rein arguments of an official CNN: ``reins_config`` updated by each ``distinct_cfgs`` entry
    in turn (as the official constructor does), one per stage, ``num_layers`` = the stage's blocks
    and ``embed_dims`` = its channels; everything else must be shared by the stages."""
    distinct = bb.get("distinct_cfgs")
    if not isinstance(distinct, (list, tuple)) or len(distinct) != len(depths):
        raise ConfigError(f"{bb.path}.distinct_cfgs must hold one dict per stage ({len(depths)}), got {distinct!r}")
    merged = dict(bb.get("reins_config"))
    configs = []
    for stage, entry in enumerate(distinct):
        merged.update(_Fields(entry, f"{bb.path}.distinct_cfgs[{stage}]").data)
        rc = _Fields(dict(merged), f"{bb.path}.reins_config + distinct_cfgs[{stage}]")
        rc.equal("num_layers", depths[stage], f"the blocks of stage {stage}")
        rc.equal("embed_dims", channels[stage], f"the channels of stage {stage}")
        rc.equal(
            "patch_size", REIN_PATCH_SIZE, "reinseg initialises CNN Reins with patch size 16", default=REIN_PATCH_SIZE
        )
        configs.append(_rein_config(rc))
    for stage, config in enumerate(configs[1:], 1):
        if config != configs[0]:
            raise ConfigError(
                f"{bb.path}.distinct_cfgs[{stage}] gives stage {stage} other Rein arguments than stage 0 "
                f"({config} vs {configs[0]}): reinseg's stages share all but num_layers and embed_dims"
            )
    return configs[0]


def _check_keys(bb: _Fields, known: set[str]) -> None:
    unknown = sorted(set(bb.data) - known - {"type", "reins_config", "distinct_cfgs", "init_cfg", "pretrained"})
    if unknown:
        kind = f" for {bb.data['type']}" if "type" in bb.data else ""
        raise ConfigError(f"{bb.path}: {', '.join(unknown)} not supported by reinseg{kind}")


# mmseg ResNet depths: (timm block, blocks per stage).
_RESNET_DEPTHS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


def _resnet_backbone(bb: _Fields, has_rein: bool) -> OfficialBackbone:
    """mmseg ``ResNetV1c`` (``ReinsResNetV1c``) -> timm ``ResNet`` with the deep stem (``resnet_v1c``)."""
    _check_keys(
        bb,
        {
            "depth",
            "in_channels",
            "stem_channels",
            "base_channels",
            "num_stages",
            "strides",
            "dilations",
            "out_indices",
            "style",
            "norm_cfg",
            "norm_eval",
            "contract_dilation",
            "frozen_stages",
            "with_cp",
            "zero_init_residual",
            "dcn",
            "stage_with_dcn",
            "plugins",
            "multi_grid",
            "conv_cfg",
        },
    )
    depth = bb.expect("depth", tuple(_RESNET_DEPTHS))
    bb.expect("in_channels", 3, default=3)
    bb.expect("num_stages", 4, default=4)
    bb.expect("strides", [(1, 2, 2, 2)], default=(1, 2, 2, 2))
    bb.expect("dilations", [(1, 1, 1, 1)], default=(1, 1, 1, 1))
    bb.expect("style", "pytorch", default="pytorch")
    for key in ("dcn", "plugins", "multi_grid", "conv_cfg"):
        bb.expect(key, None, default=None)
    norm = _Fields(bb.get("norm_cfg", {"type": "BN"}), f"{bb.path}.norm_cfg")
    norm.expect("type", ("BN", "SyncBN"))
    norm.expect("eps", 1e-5, default=1e-5)
    stem, base = bb.get("stem_channels", 64), bb.get("base_channels", 64)
    block, layers = _RESNET_DEPTHS[depth]
    name = {50: "resnet50_v1c", 101: "resnet101_v1c"}.get(depth)
    timm_kwargs: dict[str, Any] = {}
    if name is None:
        name = "resnet50_v1c"
        timm_kwargs.update(block=block, layers=layers)
    if stem != 64:
        timm_kwargs["stem_width"] = stem // 2
    if base != 64:
        timm_kwargs["channels"] = [base, 2 * base, 4 * base, 8 * base]
    expansion = 4 if block == "bottleneck" else 1
    channels = [base * 2**i * expansion for i in range(4)]
    out_indices = _stage_indices(bb, (0, 1, 2, 3))
    rein = _stage_reins(bb, layers, channels) if has_rein else None
    config = BackboneConfig(name=name, patch_size=None, out_indices=out_indices, timm_kwargs=timm_kwargs)
    return OfficialBackbone(config, rein, [channels[i] for i in out_indices], 32)


# mmpretrain ConvNeXt architectures: (depths, channels).
_CONVNEXT_ARCHS = {
    "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
    "xlarge": ([3, 3, 27, 3], [256, 512, 1024, 2048]),
}


def _convnext_backbone(bb: _Fields, has_rein: bool) -> OfficialBackbone:
    """mmpretrain ``ConvNeXt`` (``ReinsConvNeXt``) -> timm ``ConvNeXt`` plus a LayerNorm per output stage."""
    _check_keys(
        bb,
        {
            "arch",
            "in_channels",
            "stem_patch_size",
            "norm_cfg",
            "act_cfg",
            "linear_pw_conv",
            "use_grn",
            "drop_path_rate",
            "layer_scale_init_value",
            "out_indices",
            "frozen_stages",
            "gap_before_final_norm",
            "with_cp",
        },
    )
    arch = bb.get("arch", "tiny")
    if isinstance(arch, str):
        if arch not in _CONVNEXT_ARCHS:
            raise ConfigError(
                f"{bb.path}.arch={arch!r} is not supported (supported: {', '.join(_CONVNEXT_ARCHS)} or a dict)"
            )
        depths, channels = _CONVNEXT_ARCHS[arch]
    else:
        arch_fields = bb.sub("arch")
        depths, channels = list(arch_fields.get("depths")), list(arch_fields.get("channels"))
        if len(depths) != 4 or len(channels) != 4:
            raise ConfigError(f"{bb.path}.arch must give 4 depths and 4 channels, got {depths} and {channels}")
    bb.expect("in_channels", 3, default=3)
    bb.expect("stem_patch_size", 4, default=4)
    norm = _Fields(bb.get("norm_cfg", {"type": "LN2d", "eps": 1e-6}), f"{bb.path}.norm_cfg")
    norm.expect("type", "LN2d")
    norm.expect("eps", 1e-6, default=1e-5)
    _Fields(bb.get("act_cfg", {"type": "GELU"}), f"{bb.path}.act_cfg").expect("type", "GELU")
    bb.expect("use_grn", False, default=False)
    bb.expect("gap_before_final_norm", False, default=True)
    scale = bb.get("layer_scale_init_value", 1e-6)
    timm_kwargs: dict[str, Any] = dict(
        conv_mlp=not bb.get("linear_pw_conv", True),
        ls_init_value=scale if scale > 0 else None,
        drop_path_rate=bb.get("drop_path_rate", 0.0),
    )
    if (depths, channels) != _CONVNEXT_ARCHS["large"]:
        timm_kwargs.update(depths=depths, dims=channels)
    out_indices = _stage_indices(bb, -1)
    rein = _stage_reins(bb, depths, channels) if has_rein else None
    config = BackboneConfig(name="convnext_large", patch_size=None, out_indices=out_indices, timm_kwargs=timm_kwargs)
    return OfficialBackbone(config, rein, [channels[i] for i in out_indices], 32)


def _stage_indices(bb: _Fields, default: Any) -> list[int]:
    """``out_indices`` as increasing stage indices (an int or negative ones count from the end)."""
    value = bb.get("out_indices", default)
    indices = [value] if isinstance(value, int) else list(value)
    indices = [i + 4 if i < 0 else i for i in indices]
    if not indices or sorted(set(indices)) != indices or not all(0 <= i < 4 for i in indices):
        raise ConfigError(f"{bb.path}.out_indices={value!r} must be increasing stage indices in 0..3")
    return indices


_BACKBONE_READERS = {
    "ReinsDinoVisionTransformer": _dinov2_backbone,
    "DinoVisionTransformer": _dinov2_backbone,
    "ReinsResNetV1c": _resnet_backbone,
    "ResNetV1c": _resnet_backbone,
    "ReinsConvNeXt": _convnext_backbone,
    "ConvNeXt": _convnext_backbone,
    "ReinsEVA2": _eva2_backbone,
    "EVA2": _eva2_backbone,
}


def official_model_config(model: dict[str, Any]) -> ModelConfig:
    """Translate the official mmseg ``model`` dict into reinseg's :class:`ModelConfig`."""
    root = _Fields(model, "model")
    root.expect("type", ("EncoderDecoder", "FrozenBackboneEncoderDecoder"))
    if "neck" in model and model["neck"] is not None:
        raise ConfigError("model.neck is not supported: the Rein backbones resize their own maps")
    pre = root.sub("data_preprocessor")
    pre.equal("mean", _IMAGENET_MEAN, "reinseg normalizes images with ImageNet's mean")
    pre.equal("std", _IMAGENET_STD, "reinseg normalizes images with ImageNet's std")
    pre.equal("bgr_to_rgb", True, "reinseg feeds RGB images")

    official = official_backbone(root.sub("backbone"))
    backbone, rein, patch_size = official.config, official.rein, official.patch_unit
    has_rein = rein is not None

    dh = root.sub("decode_head")
    head_type = _type(dh, _HEADS)
    linked = head_type == "ReinMask2FormerHead"
    if linked:
        dh.expect("replace_query_feat", True)
        if rein is None or not rein.link_token_to_query:
            raise ConfigError(
                "model.decode_head.type='ReinMask2FormerHead' needs a Rein backbone that links its tokens"
            )
    elif rein is not None and rein.link_token_to_query:
        raise ConfigError(f"model.decode_head.type={dh.get('type')!r} cannot take the queries Rein links")
    dh.equal("in_channels", official.out_channels, "the channels of the backbone's four maps")
    dh.equal("strides", [4, 8, 16, 32], "the backbone's maps are at strides 4, 8, 16, 32", default=[4, 8, 16, 32])
    dh.expect("align_corners", False, default=False)
    dh.expect("enforce_decoder_input_project", False, default=False)
    feat = dh.get("feat_channels")
    levels = dh.get("num_transformer_feat_level", 3)
    num_queries = dh.get("num_queries", 100)
    if linked:
        dh.equal("num_queries", rein.token_length, "the queries are Rein's tokens")
        if rein.query_dims != feat:
            raise ConfigError(
                f"model.backbone.reins_config.query_dims={rein.query_dims} must equal "
                f"model.decode_head.feat_channels={feat}"
            )
    _sine_encoding(dh.sub("positional_encoding"), feat)

    pd = dh.sub("pixel_decoder")
    _type(pd, ("MSDeformAttnPixelDecoder",))
    pd.equal("num_outs", levels, "model.decode_head.num_transformer_feat_level", default=3)
    norm = pd.sub("norm_cfg")
    norm.expect("type", "GN")
    pd.sub("act_cfg").expect("type", "ReLU")
    encoder = pd.sub("encoder")
    enc_attn = encoder.sub("layer_cfg").sub("self_attn_cfg")
    enc_attn.equal("embed_dims", feat, "model.decode_head.feat_channels")
    enc_attn.equal("num_levels", levels, "model.decode_head.num_transformer_feat_level")
    enc_ffn = encoder.sub("layer_cfg").sub("ffn_cfg")
    enc_ffn.equal("embed_dims", feat, "model.decode_head.feat_channels", default=feat)
    enc_ffn.expect("num_fcs", 2, default=2)
    _sine_encoding(pd.sub("positional_encoding"), feat)
    num_heads_head = enc_attn.get("num_heads", 8)

    decoder = dh.sub("transformer_decoder")
    dec_layer = decoder.sub("layer_cfg")
    for attn in ("self_attn_cfg", "cross_attn_cfg"):
        dec_layer.sub(attn).equal("num_heads", num_heads_head, "reinseg uses one head count for both transformers")
        dec_layer.sub(attn).equal("embed_dims", feat, "model.decode_head.feat_channels", default=feat)
    dec_ffn = dec_layer.sub("ffn_cfg")
    dec_ffn.expect("num_fcs", 2, default=2)
    head = HeadConfig(
        num_classes=dh.get("num_classes"),
        feat_channels=feat,
        out_channels=dh.get("out_channels"),
        num_queries=None if linked else num_queries,
        num_feature_levels=levels,
        num_heads=num_heads_head,
        num_decoder_layers=decoder.get("num_layers", 9),
        decoder_ffn_dims=dec_ffn.get("feedforward_channels", 2048),
        num_encoder_layers=encoder.get("num_layers", 6),
        encoder_ffn_dims=enc_ffn.get("feedforward_channels", 1024),
        num_points=enc_attn.get("num_points", 4),
        num_groups=norm.get("num_groups", 32),
    )
    loss = _official_loss(dh, head.num_classes)

    test = root.sub("test_cfg")
    mode = test.expect("mode", ("whole", "slide"), default="whole")
    crop = list(test.get("crop_size")) if mode == "slide" else None
    stride = list(test.get("stride")) if mode == "slide" else None
    if crop is not None and (crop[0] % patch_size or crop[1] % patch_size):
        unit = f"the patch size {patch_size}" if backbone.patch_size else f"{patch_size}, the CNN's coarsest stride"
        raise ConfigError(f"model.test_cfg.crop_size={tuple(crop)} is not divisible by {unit}")
    # A plain backbone under mmseg's EncoderDecoder trains whole (the official full fine-tuning
    # config); only FrozenBackboneEncoderDecoder freezes it (the frozen-VFM configs).
    tuning = "rein" if has_rein else ("frozen" if model["type"] == "FrozenBackboneEncoderDecoder" else "full")
    return ModelConfig(
        tuning=tuning,
        backbone=backbone,
        rein=rein,
        head=head,
        loss=loss,
        test=TestConfig(mode=mode, crop_size=crop, stride=stride),
    )


def _sine_encoding(encoding: _Fields, feat: int) -> None:
    """mmdet's ``SinePositionalEncoding`` as reinseg computes it (heads/position_encoding.py):
    normalized positions, its default temperature, scale, eps and offset."""
    _check_keys(encoding, {"num_feats", "normalize", "temperature", "scale", "eps", "offset"})
    encoding.equal("num_feats", feat // 2, "half the decoder width")
    encoding.expect("normalize", True)
    encoding.expect("temperature", 10000, default=10000)
    encoding.expect("scale", 2 * math.pi, default=2 * math.pi)
    encoding.expect("eps", 1e-6, default=1e-6)
    encoding.expect("offset", 0.0, default=0.0)


def _official_loss(dh: _Fields, num_classes: int) -> LossConfig:
    """The Mask2Former loss of an official head. A key left out takes mmdet 3.3's default, which
    for several keys is not the value the released configs set (loss weights 1.0, the mask loss's
    ``use_sigmoid=False``, the dice loss's ``naive_dice=False`` and ``eps=1e-3``, the dice cost's
    ``pred_act=False``): such a config is read as mmdet reads it, and refused where reinseg
    computes otherwise."""
    cls = dh.sub("loss_cls")
    _type(cls, ("CrossEntropyLoss",))
    cls.expect("use_sigmoid", False, default=False)
    class_weight = cls.get("class_weight", None) or [1.0] * (num_classes + 1)  # mmdet: None, no weighting
    if len(class_weight) != num_classes + 1 or any(w != 1.0 for w in class_weight[:-1]):
        raise ConfigError(
            "model.decode_head.loss_cls.class_weight must be [1.0] * num_classes + [no-object weight] "
            f"({num_classes + 1} values), got {len(class_weight)} values"
        )
    mask = dh.sub("loss_mask")
    _type(mask, ("CrossEntropyLoss",))
    mask.expect("use_sigmoid", True, default=False)
    dice = dh.sub("loss_dice")
    _type(dice, ("DiceLoss",))
    dice.expect("use_sigmoid", True, default=True)
    dice.expect("activate", True, default=True)
    dice.expect("naive_dice", True, default=False)
    dice.expect("eps", 1.0, default=1e-3)
    for loss in (cls, mask, dice):
        loss.expect("reduction", "mean", default="mean")
    weights = dict(
        class_weight=cls.get("loss_weight", 1.0),
        mask_weight=mask.get("loss_weight", 1.0),
        dice_weight=dice.get("loss_weight", 1.0),
    )
    train = dh.get("train_cfg", None)
    train = _Fields(train or {}, "model.decode_head.train_cfg")
    if "assigner" in train.data:
        _check_match_costs(train.sub("assigner"), weights)
    return LossConfig(
        **weights,
        no_object_weight=class_weight[-1],
        num_points=train.get("num_points", 12544),
        oversample_ratio=train.get("oversample_ratio", 3.0),
        importance_sample_ratio=train.get("importance_sample_ratio", 0.75),
    )


# The matching cost of each loss term: reinseg matches with the loss's own terms and weights.
_MATCH_COSTS = {"ClassificationCost": "class_weight", "CrossEntropyLossCost": "mask_weight", "DiceCost": "dice_weight"}


def _check_match_costs(assigner: _Fields, weights: dict[str, float]) -> None:
    """Refuse an official assigner whose costs are not the loss's terms at the loss's weights
    (each key left out read as mmdet 3.3's default)."""
    _type(assigner, ("HungarianAssigner",))
    costs = assigner.get("match_costs", [])
    found = []
    for index, cost_data in enumerate(costs):
        cost = _Fields(cost_data, f"{assigner.path}.match_costs[{index}]")
        kind = _type(cost, tuple(_MATCH_COSTS))
        found.append(kind)
        if kind == "CrossEntropyLossCost":
            cost.expect("use_sigmoid", True, default=True)
        elif kind == "DiceCost":
            cost.expect("pred_act", True, default=False)
            cost.expect("eps", 1.0, default=1e-3)
            cost.expect("naive_dice", True, default=True)
        weight = cost.get("weight", 1.0)
        if not _same(weight, weights[_MATCH_COSTS[kind]]):
            raise ConfigError(
                f"{cost.path}.weight {weight} differs from the matching loss weight {weights[_MATCH_COSTS[kind]]}: "
                "reinseg matches with the loss weights"
            )
    if sorted(found) != sorted(_MATCH_COSTS):
        raise ConfigError(f"{assigner.path}.match_costs must be one each of {', '.join(_MATCH_COSTS)}, got {found}")


def split_release_state_dict(release: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split released weights into reinseg-named trainable weights and any backbone (VFM) weights."""
    trainable, vfm = {}, {}
    for key, value in release.items():
        for official, ours in OFFICIAL_PREFIXES.items():
            if key.startswith(official):
                trainable[ours + key[len(official) :]] = value
                break
        else:
            if key.startswith("backbone."):
                vfm[key[len("backbone.") :]] = value
            else:
                trainable[key] = value  # reported as unexpected below
    return trainable, vfm


def to_official_name(name: str) -> str:
    for official, ours in OFFICIAL_PREFIXES.items():
        if name.startswith(ours):
            return official + name[len(ours) :]
    return name


def from_official(
    model_config: dict[str, Any],
    release_state_dict: dict[str, Tensor],
    backbone_state_dict: dict[str, Tensor] | None = None,
) -> Segmentor:
    """Build a :class:`Segmentor` from an official config and released weights.

    Args:
        model_config: the official mmseg ``model`` dict (as in the official configs and the
            ``config.py`` files published with the release checkpoints).
        release_state_dict: the released weights, keys ``backbone.reins.*`` and ``decode_head.*``
            (a whole released ``.pth`` dict with its ``state_dict`` is accepted too).
        backbone_state_dict: the frozen backbone's weights in the official layout (DINOv2 or
            EVA02 converted by the official scripts, mmseg's ResNetV1c, mmpretrain's ConvNeXt) or
            timm's; ``None`` when the release holds them under ``backbone.*``.
    """
    config = official_model_config(model_config)
    release = unwrap_state_dict(release_state_dict, "release state dict")
    trainable, vfm = split_release_state_dict(release)
    if vfm and backbone_state_dict is not None:
        # Its own VFM weights are those its model was trained (full fine-tuning) or evaluated with.
        raise ValueError(f"the release holds the VFM's weights ({len(vfm)} backbone.* tensors): omit the backbone file")
    if backbone_state_dict is None:
        if not vfm:
            raise ValueError(
                "no VFM weights: the release holds no backbone.* tensors; pass the VFM's weights "
                "(convert-official --backbone FILE; backbone_state_dict in Python)"
            )
        backbone_state_dict = vfm
    segmentor = build_segmentor(config, load_backbone_weights=False)
    segmentor.backbone.load_backbone_weights(backbone_state_dict)
    if vfm:
        # The VFM's weights a checkpoint holds (where they train, tuning "full") come from the
        # release's backbone.*, just fitted into the model.
        expected = checkpoint_state_dict(segmentor)
        fitted = {f"backbone.vit.{k}": v for k, v in segmentor.backbone.vit.state_dict().items()}
        trainable.update({k: v for k, v in fitted.items() if k in expected and k not in trainable})
    load_checkpoint_weights(segmentor, trainable, source="release checkpoint", names=to_official_name)
    return segmentor


def backbone_from_official(
    backbone_config: dict[str, Any],
    backbone_state_dict: dict[str, Tensor],
    reins_state_dict: dict[str, Tensor] | None = None,
):
    """A reinseg backbone from an official ``backbone=dict(...)`` and weights in the official layouts.

    Args:
        backbone_config: the official backbone dict (``type``: ``ReinsDinoVisionTransformer``,
            ``ReinsResNetV1c``, ``ReinsConvNeXt``, or their plain parents without Rein).
        backbone_state_dict: the frozen model's weights as the official code names them (DINOv2's
            original layout, mmseg's ``ResNetV1c``, mmpretrain's ``ConvNeXt``; timm's are accepted too).
        reins_state_dict: the Rein weights, ``reins.*`` (or ``backbone.reins.*``) as official
            checkpoints hold them; required when the type has Rein.
    Returns:
        A :class:`~reinseg.backbones.ReinBackbone` or :class:`~reinseg.cnn.ReinCNNBackbone` whose
        ``forward(images)`` gives the official ``(features, queries)``, in eval mode.

    An unknown type, a field reinseg cannot represent, or weights whose keys do not fit raise an
    error naming the type, the field or the keys.
    """
    official = official_backbone(_Fields(backbone_config, "backbone"))
    backbone = build_configured_backbone(official.config, load_weights=False)
    if official.rein is not None:
        get_strategy("rein").apply(backbone, official.rein)
    backbone.load_backbone_weights(backbone_state_dict)
    if official.rein is None:
        if reins_state_dict:
            raise ValueError(f"backbone.type={backbone_config.get('type')!r} has no Rein, but Rein weights were given")
        return backbone.eval()
    if reins_state_dict is None:
        raise ValueError(f"backbone.type={backbone_config.get('type')!r} has Rein: pass its weights (reins.*)")
    reins = unwrap_state_dict(reins_state_dict, "reins state dict")
    reins = {k[len("backbone.") :] if k.startswith("backbone.reins.") else k: v for k, v in reins.items()}
    wrong = [k for k in reins if not k.startswith("reins.")]
    ours = {"rein." + k[len("reins.") :]: v for k, v in reins.items() if k.startswith("reins.")}
    expected = {f"rein.{k}": v for k, v in backbone.rein.state_dict().items()}
    problems = state_dict_mismatches(expected, ours, name=lambda key: "reins." + key[len("rein.") :])
    if wrong:
        problems.append(f"keys outside reins.* ({len(wrong)}): {', '.join(wrong[:8])}")
    if problems:
        raise ValueError(f"the Rein weights do not fit {backbone_config.get('type')}: " + "; ".join(problems))
    backbone.rein.load_state_dict({k[len("rein.") :]: v for k, v in ours.items()})
    return backbone.eval()


def read_official_model_config(path: str | Path) -> dict[str, Any]:
    """The ``model`` dict of an official config file (read without executing it)."""
    from .official_config import read_official_config

    config = read_official_config(path)
    if "model" not in config:
        raise ConfigError(f"{path} defines no 'model'")
    return config["model"]


def convert_official(
    config_path: str | Path, checkpoint_path: str | Path, backbone_path: str | Path | None, output_dir: str | Path
) -> tuple[Path, Path]:
    """Convert an official release into ``output_dir/config.yaml`` and ``output_dir/checkpoint.pt``.

    The written configuration references the backbone file (absolute path) rather than copying
    it; only when the release itself holds the VFM weights (``backbone.*`` keys, as the official
    ``generate_full_weights.py`` writes them) are those saved as ``output_dir/backbone.safetensors``.
    Everything is read and checked before anything is written. The files are written in a
    staging folder inside ``output_dir`` and then renamed into place, one after another: a kill
    while they are written (gigabytes for a VFM) leaves an earlier conversion there as it was,
    and the next conversion removes the staging folder. Nothing else in ``output_dir`` is touched.
    """
    import shutil

    import yaml
    from safetensors.torch import save as safetensors_bytes

    from .checkpoints import moved_beside, signals_deferred, staging_folder, written_through

    model = read_official_model_config(config_path)
    release = read_state_dict(checkpoint_path)
    backbone = read_state_dict(backbone_path) if backbone_path is not None else None
    segmentor = from_official(model, release, backbone)
    config = official_model_config(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(output_dir / "config.yaml")  # and a killed conversion's, removed
    moves: list[tuple[Path, Path]] = []
    try:
        if backbone_path is not None:
            config.backbone.checkpoint = str(Path(backbone_path).resolve())
        else:
            vfm = {k: v.contiguous() for k, v in segmentor.backbone.vit.state_dict().items()}
            atomic_write_bytes(staging / "backbone.safetensors", safetensors_bytes(vfm))
            config.backbone.checkpoint = str(output_dir.resolve() / "backbone.safetensors")  # where it will be
        full_config = {"model": to_dict(config)}
        save_checkpoint(
            staging / "checkpoint.pt",
            full_config,
            checkpoint_state_dict(segmentor),
            source={"config": str(config_path), "checkpoint": str(checkpoint_path)},
            **vfm_record(segmentor),
        )
        atomic_write_bytes(staging / "config.yaml", yaml.safe_dump(full_config, sort_keys=False).encode())
        # Each file beside its destination first: a link is written through, as every atomic
        # write here (the link stays a link), and its target may be on another file system or
        # missing. Then the renames, the config (naming both) last, none of them able to fail
        # on a device, and without a signal between them.
        for name in ("backbone.safetensors", "checkpoint.pt", "config.yaml"):
            target = output_dir / name
            if (staging / name).exists():
                real = written_through(target)
                moves.append((moved_beside(staging / name, real) if real != target else staging / name, real))
        with signals_deferred():
            for source, destination in moves:
                os.replace(source, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for source, _ in moves:  # a link's moved file, where a later step failed
            source.unlink(missing_ok=True)
    return output_dir / "config.yaml", output_dir / "checkpoint.pt"
