"""Named test protocols: at which size evaluation images are run through the model, and how.

In domain-generalized segmentation the test protocol moves the headline number as much as the
method does (evaluating the official Rein checkpoint at 2048x1024 instead of 1024x512 raises its
GTAV -> {Cityscapes, BDD, Mapillary} average by about two points), so every result records its
protocol, by name and parameters. ``reinseg eval CONFIG CHECKPOINT --protocol NAME[,NAME...]``
evaluates under one or several of them in one pass over the data (each image is read once).

=========  ==========================================================================================
name       what the model sees
=========  ==========================================================================================
config     the configuration as it is: each ``data.val`` entry's ``scale`` (else its dataset's test
           scale in the official configs of the training crop, as ``official``) and ``model.test``
           (mode, window, flip). The protocol of ``reinseg eval`` without ``--protocol``, and of
           validation during training.
official   the official Rein test pipelines (configs/_base_/datasets/*.py): keep-ratio resize to the
           dataset's test scale in the official configs of the training crop (512 crops:
           Cityscapes 1024x512, ACDC 960x540; 1024 crops: Cityscapes 2048x1024, ACDC 1920x1080;
           either: BDD100K 1280x720, Mapillary 1024x512, GTAV 1280x720; Synthia 1280x760 and
           UrbanSyn 1024x512, which have none), then sliding windows of the training crop every
           2/3 of it (the official ``test_cfg``: 512/341 for the 512 configs, 1024/683 for the
           1024 ones); no flip.
highres    the "2048x1024 class" re-evaluation: keep-ratio resize of every image to fit 2048x1024
           (Cityscapes at its full 2048x1024, Mapillary to fit 2048x1024, GTAV 1914x1052 ->
           1863x1024, BDD100K 1280x720 -> 1820x1024, ACDC 1920x1080 -> 1820x1024), the official
           windows.
ms-flip    mmseg's multi-scale + flip TTA (``img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]`` and a
           horizontal flip, configs/_base_/datasets/cityscapes.py of mmsegmentation): the image at
           the official size times each ratio, each run mirrored and not, with the official
           windows; the 12 score maps are resized to the label, softmax-ed and averaged, as
           mmseg's ``SegTTAModel`` does. (mmseg applies the ratios to the image as loaded, so
           its Cityscapes TTA is centred on 2048x1024; here on the official test scale.)
=========  ==========================================================================================

A protocol of your own is one :func:`register_protocol` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.layouts import OFFICIAL_SCALES_BY_CROP, eval_scale, official_test_scale

__all__ = [
    "Protocol",
    "ProtocolRun",
    "PROTOCOLS",
    "MS_RATIOS",
    "register_protocol",
    "get_protocols",
    "parse_protocols",
    "protocol_run",
    "input_sizes",
    "protocol_scores",
    "scores_at_size",
    "OFFICIAL_SCALES_BY_CROP",
    "official_test_scale",
]

# mmsegmentation's conventional TTA ratios (its configs/_base_/datasets/*.py: img_ratios).
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class Protocol:
    """A test protocol.

    Args:
        name: what ``--protocol`` and the results call it.
        description: one line for listings.
        scale: ``"config"`` (the entry's ``scale``, else the dataset's), ``"official"`` (the
            dataset's test scale in the official configs of the training crop,
            :func:`reinseg.data.official_test_scale`) or ``(long, short)`` for
            every dataset; images are resized keeping their aspect ratio to fit it.
        ratios: the image at that size is also resized by each factor (multi-scale).
        flip: each size is also run mirrored.
        window: ``"config"`` (``model.test``) or ``"official"`` (sliding windows of the training
            crop, ``model.backbone.img_size``, every 2/3 of it).
    """

    name: str
    description: str
    scale: str | tuple[int, int] = "official"
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: str = "official"


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    """Make ``protocol.name`` a name ``--protocol`` accepts."""
    if not (protocol.scale in ("config", "official") or _is_scale(protocol.scale)):
        raise ValueError(f"protocol {protocol.name}: scale must be 'config', 'official' or (long, short)")
    if protocol.window not in ("config", "official"):
        raise ValueError(f"protocol {protocol.name}: window must be 'config' or 'official'")
    if not protocol.ratios or min(protocol.ratios) <= 0:
        raise ValueError(f"protocol {protocol.name}: ratios must be positive")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def _is_scale(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


for _protocol in (
    Protocol("config", "the configuration's own test scales and model.test", scale="config", window="config"),
    Protocol("official", "the official Rein test pipeline: per-dataset resize, sliding windows 512/341"),
    Protocol("highres", "every image resized to fit 2048x1024, official sliding windows", scale=(2048, 1024)),
    Protocol("ms-flip", "official sizes x mmseg's ratios 0.5..1.75, with flip", ratios=MS_RATIOS, flip=True),
):
    register_protocol(_protocol)


def get_protocols(names: Sequence[str], option: str = "--protocol") -> list[Protocol]:
    """The protocols named (each once, in order); ValueError naming ``option`` and the known names."""
    chosen = []
    for name in names:
        if name not in PROTOCOLS:
            raise ValueError(f"{option}: unknown protocol '{name}'; known: {', '.join(PROTOCOLS)}")
        if PROTOCOLS[name] not in chosen:
            chosen.append(PROTOCOLS[name])
    return chosen


def parse_protocols(values: Sequence[str] | None, option: str = "--protocol") -> list[Protocol]:
    """Protocols from repeated and/or comma-separated names (``["official,highres", "ms-flip"]``);
    none given: ``[config]``."""
    names = [n.strip() for value in values or [] for n in value.split(",") if n.strip()]
    return get_protocols(names or ["config"], option)


@dataclass(frozen=True)
class ProtocolRun:
    """A protocol resolved for one model: what :func:`protocol_scores` runs.

    ``scales`` maps each domain to its (long, short) test scale (None: the image as it is);
    ``mode``/``crop``/``stride``/``flip`` are the segmentor's ``predict`` arguments (None: its own).
    """

    protocol: Protocol
    scales: dict[str, tuple[int, int] | None]
    mode: str | None
    crop: tuple[int, int] | None
    stride: tuple[int, int] | None

    @property
    def name(self) -> str:
        return self.protocol.name

    def parameters(self, segmentor=None) -> dict[str, Any]:
        """The protocol as results record it (the segmentor's own window where the config decides)."""
        mode, crop, stride, flip = self.mode, self.crop, self.stride, self.protocol.flip
        if segmentor is not None and self.protocol.window == "config":
            mode, crop, stride, flip = segmentor.test_mode, segmentor.crop_size, segmentor.stride, segmentor.flip
        return {
            "name": self.name,
            "scales": {domain: None if s is None else list(s) for domain, s in self.scales.items()},
            "ratios": list(self.protocol.ratios),
            "flip": bool(flip),
            "mode": mode,
            "crop_size": None if crop is None or mode == "whole" else list(crop),
            "stride": None if stride is None or mode == "whole" else list(stride),
        }


def protocol_run(protocol: Protocol, domains, model_config) -> ProtocolRun:
    """Resolve ``protocol`` for the ``(domain, entry)`` pairs of a run and its ``model`` config."""
    from .build import official_window

    crop, stride = official_window(model_config)
    scales = {}
    for domain, entry in domains:
        if protocol.scale == "config":
            scales[domain] = entry.eval_scale(crop)
        elif protocol.scale == "official":
            scales[domain] = eval_scale({"name": entry.name}, crop)
        else:
            scales[domain] = tuple(protocol.scale)
    if protocol.window == "config":
        return ProtocolRun(protocol, scales, None, None, None)
    return ProtocolRun(protocol, scales, "slide", crop, stride)


def input_sizes(run: ProtocolRun, domain: str, image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) the model is given for an image of ``image_size`` in ``domain``, one per ratio."""
    from .data.transforms import rescale_size

    scale = run.scales.get(domain)
    base = tuple(image_size) if scale is None else rescale_size(tuple(image_size), scale)
    # mmcv's Resize(scale_factor=r, keep_ratio=True): the size times r rounded half up, then the
    # image rescaled to fit that size (686x751 x 0.75: 515x563 fitted, 514x563).
    return [rescale_size(base, (int(base[0] * r + 0.5), int(base[1] * r + 0.5))) for r in run.protocol.ratios]


def protocol_scores(segmentor, run: ProtocolRun, domain: str, image: np.ndarray, out_size) -> torch.Tensor:
    """Class scores ``(C, H, W)`` at ``out_size`` = (H, W) of one (h, w, 3) uint8 RGB ``image``.

    Each size's scores, mirrored and not where the protocol flips (the ``config`` window: where
    the segmentor does), resized to ``out_size``; one unmirrored size: those scores (the argmax
    is the prediction), else their softmax averaged, as mmseg's ``SegTTAModel``.
    """
    from .data.transforms import eval_transform, resize_image
    from .predict import padded_scores

    device = next(segmentor.parameters()).device
    sizes = input_sizes(run, domain, image.shape[:2])
    flip = run.protocol.flip if run.protocol.window != "config" else segmentor.flip

    def run_at(size, mirrored: bool = False) -> torch.Tensor:
        tensor = eval_transform(None)(resize_image(image, size))[0][None].to(device)
        if mirrored:
            tensor = tensor.flip(-1)
        # A size off the patch grid (BDD100K x 0.5: 360x640) is padded to it; one below the crop is
        # a smaller window, as mmseg runs it.
        scores = padded_scores(segmentor, tensor, run.mode, run.crop, run.stride, False)[0]
        return scores.flip(-1) if mirrored else scores

    if len(sizes) == 1 and not flip:
        return scores_at_size(run_at(sizes[0]), out_size)
    total, count = None, 0
    for size in sizes:
        for mirrored in (False, True) if flip else (False,):
            probabilities = scores_at_size(run_at(size, mirrored), out_size).softmax(0)
            total = probabilities if total is None else total + probabilities
            count += 1
    return total / count


def scores_at_size(scores: torch.Tensor, size) -> torch.Tensor:
    """(C, h, w) -> (C, H, W): bilinear without corner alignment, as mmseg's postprocess_result."""
    return F.interpolate(scores[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
