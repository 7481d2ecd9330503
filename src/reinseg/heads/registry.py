"""The head registry: segmentation heads registered by name (``model.head.type``).

A head is an ``nn.Module`` class constructed as ``Head(in_channels, num_classes=...,
num_queries=..., linked_queries=..., **hyper_parameters)``, where the hyper-parameters are the
``model.head`` keys its constructor names (:func:`reinseg.build.build_segmentor` passes those)
plus ``model.head.options``. ``forward(features, queries)`` returns per-prediction class logits
``(B, Q, K + 1)`` and mask logits ``(B, Q, h, w)``, a list over deep-supervision layers each.
Optionally, a head whose ``forward`` takes ``last_only`` returns the last prediction only (one
element each) when it is True: inference (:meth:`reinseg.Segmentor.encode_decode`) then asks
for that alone. A head whose ``forward`` takes ``scales`` receives the backbone's maps before
their resizing to strides 4, 8, 16, 32 and the factors to resize them by
(:class:`reinseg.backbones.BackboneMaps`), to resize after a first linear step (the Mask2Former
pixel decoder's 1x1 projections); other heads receive the resized maps.
Class attributes: ``criterion_class`` (the training loss, built as
``criterion_class(num_classes, **model.loss)``) and ``no_decay_keys`` (parameter-name substrings
that take no weight decay).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["HEADS", "register_head", "get_head"]

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a head class under ``name``."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = cls
        return cls

    return register


def get_head(name: str) -> type[nn.Module]:
    if name not in HEADS:
        raise ValueError(f"model.head.type={name!r} is not one of {', '.join(sorted(HEADS))}")
    return HEADS[name]
