"""Typed configuration, read from YAML: unknown keys and wrong types are errors that name the key.

Each section is a dataclass whose fields and defaults are the documentation of the YAML file;
:func:`from_dict` builds one from a plain dict, suggesting the closest key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "BackboneConfig",
    "ReinConfig",
    "HeadConfig",
    "LossConfig",
    "TestConfig",
    "ModelConfig",
]


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it."""


@dataclass
class BackboneConfig:
    """The frozen VFM (:func:`reinseg.build_backbone`)."""

    name: str = "dinov2_vitl14"
    img_size: int | list[int] = 512
    patch_size: int | None = 16  # the paper runs every VFM at patch 16; null keeps the model's own
    out_indices: list[int] | None = None  # default: 1/3, 1/2, 2/3 and all of the depth
    checkpoint: str | None = None  # local VFM weights (original release or timm layout)
    pretrained: bool = False  # timm hub weights (needs network access)
    resample: str = "official"  # fitting weights of another patch size/grid: "official" or "timm"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


@dataclass
class ReinConfig:
    """Rein's arguments (:class:`reinseg.Rein`); layers, widths and prefix tokens come from the backbone."""

    token_length: int = 100
    lora_dim: int | None = 16
    query_dims: int = 256
    link_token_to_query: bool = True
    scale_init: float = 1e-3
    use_softmax: bool = True
    zero_mlp_delta_f: bool = False


@dataclass
class HeadConfig:
    """The Mask2Former head (:class:`reinseg.heads.Mask2FormerHead`)."""

    num_classes: int = 19
    feat_channels: int = 256
    out_channels: int = 256
    num_queries: int | None = None  # default: Rein's token_length when linked, else 100
    num_feature_levels: int = 3
    num_heads: int = 8
    num_decoder_layers: int = 9
    decoder_ffn_dims: int = 2048
    num_encoder_layers: int = 6
    encoder_ffn_dims: int = 1024
    num_points: int = 4
    num_groups: int = 32


@dataclass
class LossConfig:
    """Mask2Former's loss (:class:`reinseg.heads.criterion.Mask2FormerLoss`)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class TestConfig:
    """Inference: ``slide`` windows of ``crop_size`` (default: the training size) every ``stride``
    (default: 2/3 of the crop, the official 341 at 512 and 683 at 1024), or ``whole`` images."""

    mode: str = "slide"
    crop_size: int | list[int] | None = None
    stride: int | list[int] | None = None
    flip: bool = False


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rein: ReinConfig | None = field(default_factory=ReinConfig)  # null: the plain frozen backbone
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build the dataclass ``cls`` from ``data``; ``where`` is the key path for error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        values[key] = _convert(value, hints[key], path)
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """A dataclass configuration as plain dicts and lists (for YAML and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against the type ``hint`` (building nested dataclasses)."""
    origin = typing.get_origin(hint)
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{path} may not be null")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint}")


def _type_name(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))
