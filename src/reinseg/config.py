"""Typed configuration, read from YAML: unknown keys and wrong types are errors that name the key.

Each section is a dataclass whose fields and defaults are the documentation of the YAML file;
:func:`from_dict` builds one from a plain dict, suggesting the closest key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.entries import EVAL_ENTRY_KEYS  # noqa: F401 (its old home)
from .safe_load import load_yaml
from .tuning import AdaptFormerConfig, FadaConfig, LoraConfig, ReinConfig, SetConfig, SomaConfig, VptConfig

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "BackboneConfig",
    "ReinConfig",
    "LoraConfig",
    "VptConfig",
    "AdaptFormerConfig",
    "FadaConfig",
    "SetConfig",
    "SomaConfig",
    "HeadConfig",
    "LossConfig",
    "TestConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "dump_config",
    "check_values",
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
class HeadConfig:
    """The head: ``type`` names a registered head (:mod:`reinseg.heads.registry`); the keys below
    are the Mask2Former head's (:class:`reinseg.heads.Mask2FormerHead`), and each head takes those
    its constructor names, plus ``options`` (other heads' own arguments)."""

    type: str = "mask2former"
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
    options: dict[str, Any] = field(default_factory=dict)


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
    # Sliding windows run through the model at once (stacked on the batch axis): fewer, larger
    # forwards, as a GPU prefers; 1 runs them one by one, as mmseg. The same scores up to float
    # rounding; a model whose images mix in a batch (SET, FADA) runs them one by one whatever this says.
    window_batch: int = 1
    # Named test protocols `reinseg eval` runs without --protocol (reinseg.protocols: config,
    # official, highres, ms-flip); empty: config (the settings above and the entries' scales).
    protocols: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """The ``model`` section: what :func:`reinseg.build_segmentor` builds (the frozen VFM, the
    tuning strategy and its options, the head, the loss, inference). Read from YAML with
    :func:`load_config` or :func:`from_dict`; :func:`to_dict` gives it back."""

    # What trains besides the head: a registered strategy (reinseg.tuning): "rein" (the
    # default), "frozen" (the head only), "full" (the whole VFM, at train.backbone_lr_mult x the
    # lr), "lora", "vpt", "adaptformer", "soma", "fada" or "set"; each built-in strategy reads its own section below.
    tuning: str = "rein"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rein: ReinConfig | None = field(default_factory=ReinConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    vpt: VptConfig = field(default_factory=VptConfig)
    adaptformer: AdaptFormerConfig = field(default_factory=AdaptFormerConfig)
    soma: SomaConfig = field(default_factory=SomaConfig)
    fada: FadaConfig = field(default_factory=FadaConfig)  # tuning: fada (reinseg.fada)
    set: SetConfig = field(default_factory=SetConfig)  # tuning: set (SET, reinseg.set_tokens)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # Options of strategies registered outside reinseg, by name: {name: {key: value}}.
    options: dict[str, Any] = field(default_factory=dict)

    def strategy_options(self) -> Any:
        """The options of the strategy ``tuning`` names, checked: its section, or ``options.<name>``."""
        from .tuning import get_strategy

        try:
            strategy = get_strategy(self.tuning)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if strategy.options_class is None:
            return None
        if any(f.name == self.tuning for f in dataclasses.fields(self)):
            options = getattr(self, self.tuning)
        else:
            options = from_dict(strategy.options_class, self.options.get(self.tuning), f"model.options.{self.tuning}")
        try:
            strategy.check(options)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return options


@dataclass
class DataConfig:
    """Datasets and the training pipeline. Each dataset entry is ``{name, root, split, ...}``
    with the options of :func:`reinseg.data.build_dataset` (e.g. ``condition`` for ACDC) and, for
    validation sets, an optional test ``scale: [long, short]`` (default: the dataset's own)."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    crop_size: int = 512
    base_size: int = 512  # random shortest-edge resize to base_size x {0.5, 0.6, ..., 2.0}
    max_size: int = 2048  # ... with the long side at most this
    cat_max_ratio: float = 0.75
    batch_size: int = 4  # per device
    num_workers: int = 4
    on_error: str = "raise"  # a bad image/label pair: "raise" or "skip" (counted and reported)


@dataclass
class TrainConfig:
    """Optimization and the run (AdamW with poly decay, as the official Rein)."""

    max_iters: int = 40000
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_iters: int = 0  # linear warm-up from warmup_start_factor * lr
    warmup_start_factor: float = 1e-6
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = None  # max gradient norm
    backbone_lr_mult: float = 0.1  # when the backbone itself trains (full fine-tuning)
    # No weight decay for parameters whose (reinseg) name contains one of these, besides norm
    # layers: the official paramwise_cfg custom keys. null: the keys the head and the tuning
    # strategy declare (the Rein configs').
    no_decay_keys: list[str] | None = None
    val_interval: int = 10000  # iterations between validations (and one at max_iters)
    checkpoint_interval: int = 4000  # iterations between checkpoints (iter_<N>.ckpt and last.ckpt)
    # How many iter_<N>.ckpt files are kept (the newest); -1 keeps all, 0 none. last.ckpt, which a
    # resume starts from, is always written.
    keep_checkpoints: int = 3
    log_interval: int = 50  # iterations between logged losses and learning rates
    # "auto": bf16 autocast on GPU, fp32 on CPU; or a Lightning precision ("32-true", "bf16-mixed")
    precision: str = "auto"
    # fp32 CUDA math on TF32 tensor cores: "conv" (cuDNN convolutions only, as the official runs), "all", "none"
    tf32: str = "conv"
    # cuDNN times its convolution algorithms on each new input shape and keeps the fastest
    # (torch.backends.cudnn.benchmark), as the official runs (env_cfg cudnn_benchmark=True):
    # faster GPU convolutions, whose sums may then differ in the last bits from run to run.
    cudnn_benchmark: bool = True
    # Speed and memory levers (reinseg.train_options; measured in benchmarks/RESULTS.md).
    # Recompute the frozen VFM blocks' activations in backward instead of keeping them: false,
    # true (every block), N (the first N blocks) or a list of block indices. fp32 gradients are
    # unchanged; ViT backbones only.
    activation_checkpointing: bool | int | list[int] = False
    # Sample the deformable attention again in backward instead of keeping its samples (less
    # memory, a few % more time; the same numbers either way).
    deformable_recompute: bool = True
    # The deformable attention's sampling: "auto" (sparse matrix products on the CPU, about twice
    # as fast there; grid_sample on a GPU), "csr" (CPU only) or "grid_sample" (the reference).
    # The same numbers up to float rounding. Validation and `reinseg eval` use this setting;
    # predict and export use "auto".
    deformable_kernel: str = "auto"
    # Recompute the pixel decoder's deformable encoder layers and FPN levels in backward instead
    # of keeping their activations (they hold most of a step's activations at ViT-S/B sizes).
    # fp32 gradients unchanged; the deformable attention's own recompute is then not needed.
    pixel_decoder_checkpointing: bool = False
    # Recompute the hidden activations of the pixel decoder's encoder FFNs (1024 wide) in
    # backward instead of keeping them: one more matrix product per encoder layer, for about a
    # quarter of the pixel decoder's activations (on the CPU no slower: its backward also skips
    # autograd's copies). fp32 only (under bf16 autocast the FFNs keep them); the same gradients
    # up to float rounding.
    encoder_ffn_recompute: bool = True
    # The frozen VFM's weights held (and its blocks run) in "float32" or "bfloat16"; Rein, the
    # head and every trainable parameter keep fp32. Changes numerics. Not with strategies that
    # train the VFM (model.tuning: full).
    frozen_dtype: str = "float32"
    # Hold the convolutions' weights in channels-last (NHWC) memory, so that their outputs
    # follow: timm's --channels-last. The same numbers up to float rounding
    # (the kernels sum in another order). On the CPU it pays under bf16 autocast on a CNN
    # backbone only (benchmarks/RESULTS.md).
    channels_last: bool = False
    # torch.compile of the backbone and the head: false, true (inductor) or a backend name.
    compile: bool | str = False
    # An exponential moving average of the trainable weights (reinseg.ema, mmengine's EMAHook:
    # average += momentum x (weights - average) after every step from ema_begin on, a copy
    # before), validated and saved as the checkpoint's weights; null: none. SoMA's official
    # runs: momentum 2e-4 from iteration 12000.
    ema_momentum: float | None = None
    ema_begin: int = 0
    accelerator: str = "auto"  # Lightning's: "auto" (a GPU when there is one), "cpu", "gpu", ...
    # One device unless told: data.batch_size is per device, so more devices (N, a list, or "auto"
    # and -1 for every visible one, DDP) multiply the recipe's batch. The paper trains on one GPU.
    devices: int | str = 1
    num_nodes: int = 1
    seed: int = 42
    output_dir: str = "work_dirs/run"


@dataclass
class Config:
    """A whole configuration (one YAML file under ``configs/``): ``model``, ``data``, ``train``.
    :func:`load_config` reads and checks one; every key is documented in the dataclasses."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML configuration, apply ``key.path=value`` overrides, and check it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except ValueError as err:  # an alias bomb
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with sections model, data, train")
    data = apply_overrides(data, overrides or [])
    try:
        return check_values(from_dict(Config, data))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` (value parsed as YAML; list items by index, ``data.val.0.root=...``)."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        try:
            value = load_yaml(raw, f"override {key}") if raw else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: the value is not valid YAML ({err})") from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key}: {'.'.join(parts[:i])} has no item {part}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is not a section")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def dump_config(config: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


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


def _convert(value: Any, hint: Any, path: str) -> Any:  # noqa: C901 - one branch per supported type
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
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint}")


# A number in exponent notation without a dot (1e-4), which YAML 1.1 leaves a string.
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))


# Numbers with a range: key -> (lowest allowed, "exclusive" if the bound itself is refused).
# A None value passes (the key is optional); lists are checked item by item.
_RANGES: dict[str, tuple[float, bool]] = {
    "model.backbone.img_size": (1, False),
    "model.backbone.patch_size": (1, False),
    "model.rein.token_length": (1, False),
    "model.rein.lora_dim": (1, False),
    "model.rein.query_dims": (1, False),
    "model.lora.rank": (1, False),
    "model.lora.dropout": (0, False),
    "model.vpt.num_prompts": (1, False),
    "model.adaptformer.bottleneck": (1, False),
    "model.fada.token_length": (2, False),
    "model.fada.lora_dim": (1, False),
    "model.fada.query_dims": (1, False),
    "model.set.token_length": (2, False),
    "model.set.lora_dim": (1, False),
    "model.set.query_dims": (1, False),
    "model.head.num_classes": (1, False),
    "model.head.feat_channels": (1, False),
    "model.head.out_channels": (1, False),
    "model.head.num_queries": (1, False),
    "model.head.num_feature_levels": (1, False),
    "model.head.num_heads": (1, False),
    "model.head.num_decoder_layers": (1, False),
    "model.head.decoder_ffn_dims": (1, False),
    "model.head.num_encoder_layers": (0, False),
    "model.head.encoder_ffn_dims": (1, False),
    "model.head.num_points": (1, False),
    "model.head.num_groups": (1, False),
    "model.loss.class_weight": (0, False),
    "model.loss.mask_weight": (0, False),
    "model.loss.dice_weight": (0, False),
    "model.loss.no_object_weight": (0, False),
    "model.loss.num_points": (1, False),
    "model.loss.oversample_ratio": (1, False),
    "model.loss.importance_sample_ratio": (0, False),
    "model.test.crop_size": (1, False),
    "model.test.stride": (1, False),
    "model.test.window_batch": (1, False),
    "data.crop_size": (1, False),
    "data.base_size": (1, False),
    "data.max_size": (1, False),
    "data.cat_max_ratio": (0, True),
    "data.batch_size": (1, False),
    "data.num_workers": (0, False),
    "train.max_iters": (1, False),
    "train.lr": (0, False),
    "train.weight_decay": (0, False),
    "train.betas": (0, False),
    "train.eps": (0, True),
    "train.warmup_iters": (0, False),
    "train.warmup_start_factor": (0, False),
    "train.poly_power": (0, False),
    "train.min_lr": (0, False),
    "train.seed": (0, False),
    "train.grad_clip": (0, True),
    "train.backbone_lr_mult": (0, False),
    "train.val_interval": (1, False),
    "train.checkpoint_interval": (1, False),
    "train.keep_checkpoints": (-1, False),
    "train.log_interval": (1, False),
    "train.devices": (1, False),
    "train.activation_checkpointing": (0, False),
    "train.num_nodes": (1, False),
    "train.ema_momentum": (0, True),
    "train.ema_begin": (0, False),
}


def _value_at(config: Config, key: str) -> Any:
    """The value of a dotted ``key`` (``train.lr``) of ``config``."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def check_values(config: Config) -> Config:
    """Refuse numbers out of range (``train.max_iters: 0``, ``data.batch_size: -1``, ...), and an
    unknown strategy, protocol or dataset entry, with a :class:`ConfigError` naming the key;
    returns ``config``. Strategies and protocols of your own are registered before a config
    naming them is loaded."""
    # Lightning expands "~" in the folder it writes checkpoints and logs to; reinseg writes the
    # rest there too and looks for the checkpoints to resume there.
    config.train.output_dir = os.path.expanduser(config.train.output_dir)
    for key, (low, exclusive) in _RANGES.items():
        value = _value_at(config, key)
        if key == "train.devices" and value == -1:
            continue  # Lightning's "every device"
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not _in_range(item, low, exclusive):
                bound = f"greater than {low}" if exclusive else f"at least {low}"
                raise ConfigError(f"{key} must be {bound}, got {value!r}")
    betas = config.train.betas  # each at least 0: _RANGES
    if betas is not None and (len(betas) != 2 or any(b >= 1 for b in betas)):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {config.train.betas!r}")
    if config.train.min_lr > config.train.lr:
        raise ConfigError(f"train.min_lr must be at most train.lr ({config.train.lr!r}), got {config.train.min_lr!r}")
    if config.train.ema_momentum is not None and config.train.ema_momentum > 1:
        raise ConfigError(f"train.ema_momentum must be in (0, 1], got {config.train.ema_momentum!r}")
    _check_levers(config.train)
    if not config.train.output_dir.strip():
        raise ConfigError(f"train.output_dir must be the run's folder, got {config.train.output_dir!r}")
    for key in ("data.cat_max_ratio", "model.loss.importance_sample_ratio", "train.warmup_start_factor"):
        value = _value_at(config, key)
        if value > 1:  # fractions (a warm-up starts below lr, as mmengine's LinearLR requires)
            raise ConfigError(f"{key} must be at most 1, got {value!r}")
    for section in ("train", "val"):
        for i, entry in enumerate(getattr(config.data, section)):
            scale = entry.get("scale") if isinstance(entry, dict) else None
            if scale is not None and (
                not isinstance(scale, (list, tuple))
                or len(scale) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in scale)
            ):
                raise ConfigError(
                    f"data.{section}[{i}].scale must be two positive integers [long, short], got {scale!r}"
                )
    _check_names(config)
    return config


def _check_names(config: Config) -> None:
    """Names that would fail only at build or evaluation time: the strategy, the protocols, the
    dataset entries (their name and root; the files are read later)."""
    from .data.entries import parse_entries
    from .protocols import parse_protocols
    from .tuning import strategy_names

    if config.model.tuning not in strategy_names():
        raise ConfigError(f"model.tuning={config.model.tuning!r} is not one of {', '.join(strategy_names())}")
    try:
        parse_protocols(config.model.test.protocols, "model.test.protocols")
        for section in ("train", "val"):
            parse_entries(getattr(config.data, section), section)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


FROZEN_DTYPES = ("float32", "bfloat16")


def _check_levers(train: TrainConfig) -> None:
    if train.frozen_dtype not in FROZEN_DTYPES:
        raise ConfigError(f"train.frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {train.frozen_dtype!r}")
    from .heads.deformable_attention import KERNELS
    from .optim import check_tf32_mode

    check_tf32_mode(train.tf32)
    if train.deformable_kernel not in KERNELS:
        raise ConfigError(
            f"train.deformable_kernel must be one of {', '.join(KERNELS)}, got {train.deformable_kernel!r}"
        )
    if isinstance(train.compile, str):
        from torch._dynamo import list_backends

        backends = list_backends(exclude_tags=())
        if train.compile not in backends:
            raise ConfigError(
                f"train.compile must be true, false or a torch.compile backend (inductor, aot_eager, eager, ...), "
                f"got {train.compile!r}"
            )


def _in_range(value: float, low: float, exclusive: bool) -> bool:
    return value > low if exclusive else value >= low
