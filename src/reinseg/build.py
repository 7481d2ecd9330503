"""Builders: the configuration (:mod:`reinseg.config`) mapped onto the model's constructors.

The model modules (backbones, Rein, strategies, heads, the segmentor) take plain arguments and
never read the configuration; this module is where a ``model`` section becomes a
:class:`~reinseg.segmentor.Segmentor`: the backbone from the zoo, the tuning strategy from its
registry (:mod:`reinseg.tuning`), the head from its registry (:mod:`reinseg.heads.registry`).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch.overrides import TorchFunctionMode

from .backbones import as_pair, backbone_kind, build_backbone
from .config import BackboneConfig, ConfigError, ModelConfig, to_dict
from .heads import get_head
from .segmentor import Segmentor
from .tuning import get_strategy

__all__ = ["build_segmentor", "build_configured_backbone", "official_window", "plan_segmentor"]


def build_segmentor(config: ModelConfig, *, load_backbone_weights: bool = True) -> Segmentor:
    """Build the segmentor a :class:`~reinseg.config.ModelConfig` describes.

    Args:
        config: the ``model`` section of a configuration.
        load_backbone_weights: load the VFM weights named by ``backbone.checkpoint`` /
            ``backbone.pretrained`` (off for a model whose weights come from elsewhere).
    """
    options = config.strategy_options()
    strategy = get_strategy(config.tuning)
    try:
        head_class = get_head(config.head.type)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    bb = config.backbone
    kind = backbone_kind(bb.name)
    if kind not in strategy.backbone_kinds:
        raise ConfigError(
            f"model.tuning={config.tuning!r} applies to {' and '.join(strategy.backbone_kinds)} backbones, "
            f"not to {bb.name} ({kind})"
        )
    backbone = build_configured_backbone(bb, load_backbone_weights)
    try:
        strategy.apply(backbone, options)
    except ValueError as err:
        raise ConfigError(f"model.{config.tuning}: {err}") from None

    head = head_class(
        backbone.out_channels,
        num_queries=_num_queries(config, backbone),
        linked_queries=backbone.links_queries,
        **_head_hyper_parameters(config, head_class),
    )
    criterion = None
    if getattr(head_class, "criterion_class", None) is not None:
        criterion = head_class.criterion_class(config.head.num_classes, **to_dict(config.loss))
    test = config.test
    crop, stride = official_window(config, test.crop_size, test.stride)
    try:
        segmentor = Segmentor(backbone, head, criterion, test.mode, crop, stride, test.flip, test.window_batch)
    except ValueError as err:
        raise ConfigError(f"model.test: {err}") from err
    # Official paramwise_cfg: the segmentor holds the norm and head keys; the strategy adds its own.
    segmentor.no_decay_keys += strategy.no_decay_keys
    return segmentor


def plan_segmentor(config: ModelConfig) -> Segmentor:
    """The segmentor ``config`` describes, built on the meta device: every parameter's and
    buffer's name, shape, dtype and trainability, without memory, weights or initialisation
    (what ``reinseg params`` counts, and what a checkpoint is checked against before loading)."""
    with torch.device("meta"), _MetaInitialisationSkipped():
        return build_segmentor(config, load_backbone_weights=False)


# The in-place writes of weight initialisation. None changes a tensor's shape, dtype, device or
# trainability, so on the meta device, which holds no values, each leaves its tensor as it was.
_INITIALISATION_WRITES = frozenset(
    [getattr(torch.nn.init, name) for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    + [
        getattr(torch.Tensor, name)
        for name in (
            "zero_", "fill_", "copy_", "uniform_", "normal_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_",
        )
    ]
)  # fmt: skip


class _MetaInitialisationSkipped(TorchFunctionMode):
    """Weight initialisation as a no-op on meta tensors. Each write otherwise runs through a
    Python meta decomposition: they took 70 % of planning DINOv2-L (0.19 -> 0.06 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISATION_WRITES:
            # torch.nn.init's functions hand their tensor over as a keyword
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_configured_backbone(bb: BackboneConfig, load_weights: bool = True):
    """The backbone a ``model.backbone`` section describes (without tuning), its VFM weights loaded
    from ``checkpoint`` / ``pretrained`` when ``load_weights``."""
    own = sorted(set(bb.timm_kwargs) & {"rein", *(f.name for f in dataclasses.fields(BackboneConfig))})
    if own:
        raise ConfigError(
            f"model.backbone.timm_kwargs: set {', '.join(f'model.backbone.{k}' for k in own)} instead "
            "(reinseg builds the model and fits its weights to them)"
        )
    return build_backbone(
        bb.name,
        img_size=bb.img_size,
        patch_size=bb.patch_size,
        out_indices=bb.out_indices,
        checkpoint=bb.checkpoint if load_weights else None,
        pretrained=bb.pretrained and load_weights,
        resample=bb.resample,
        **bb.timm_kwargs,
    )


def _num_queries(config: ModelConfig, backbone) -> int:
    """The head's object queries: Rein's tokens when linked, else ``head.num_queries`` (100)."""
    requested = config.head.num_queries
    if not backbone.links_queries:
        return requested or 100
    rein = backbone.rein
    section = f"model.{config.tuning}"  # rein, or a strategy built on it (fada)
    if requested is not None and requested != rein.token_length:
        raise ConfigError(
            f"model.head.num_queries={requested} must equal {section}.token_length="
            f"{rein.token_length}: the queries are Rein's tokens"
        )
    if rein.query_dims != config.head.feat_channels:
        raise ConfigError(
            f"{section}.query_dims={rein.query_dims} must equal model.head.feat_channels={config.head.feat_channels}"
        )
    return rein.token_length


def _head_hyper_parameters(config: ModelConfig, head_class: type) -> dict:
    """The ``model.head`` keys the head's constructor takes, plus ``model.head.options``."""
    accepted = inspect.signature(head_class.__init__).parameters
    fields = {f.name: getattr(config.head, f.name) for f in dataclasses.fields(config.head)}
    given = {k: v for k, v in fields.items() if k in accepted and k not in ("num_queries", "linked_queries")}
    unknown = set(config.head.options) - set(accepted)
    if unknown:
        raise ConfigError(f"model.head.options: {sorted(unknown)} are not arguments of the {config.head.type} head")
    # The model.head keys and what the builder passes (in_channels, the queries) are set there.
    named = sorted(set(config.head.options) & (set(fields) | {"in_channels", "linked_queries"}))
    if named:
        raise ConfigError(
            "; ".join(
                f"model.head.options.{k}: "
                + (f"set model.head.{k} instead" if k in fields else "set from the backbone")
                for k in named
            )
        )
    return {**given, **config.head.options}


def official_window(config: ModelConfig, crop_size=None, stride=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Sliding-window ``(crop, stride)`` as (h, w): ``crop_size`` or the training size
    (``model.backbone.img_size``), ``stride`` or 2/3 of the crop (the official 341 at 512, 683 at 1024)."""
    img_size = config.backbone.img_size
    img_size = img_size if isinstance(img_size, int) else tuple(img_size)
    crop = as_pair(crop_size if crop_size is not None else img_size, "model.test.crop_size")
    step = as_pair(stride, "model.test.stride") if stride is not None else tuple(round(c * 2 / 3) for c in crop)
    return crop, step
