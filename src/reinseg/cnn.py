"""Rein on frozen CNNs (ResNet V1c, ConvNeXt), as the official ``ReinsResNetV1c`` / ``ReinsConvNeXt``.

A CNN has stages of different widths, so each stage has its own :class:`~reinseg.rein.Rein`
(``num_layers`` = the stage's blocks, ``embed_dims`` = its channels, no prefix token), applied after
every block on the flattened map: ``(B, C, H, W)`` -> ``(B, H*W, C)`` rows in row-major ``(h, w)``
order -> Rein -> back. Feature ``i`` is stage ``i``'s output (through the family's
:meth:`~reinseg.families.CNNFamily.feature`, ConvNeXt's ``norm<i>``), at strides 4, 8, 16, 32; the
head's object queries are the sum of the output stages' linked queries.

How a family's stem and stages run, and how its weights are named, is its adapter
(:class:`reinseg.families.CNNFamily`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .backbones import (
    BackboneMaps,
    BackboneOutput,
    BackboneSpec,
    FrozenBackbone,
    _download_pretrained,
    create_with_overrides,
    rein_arguments,
)
from .families import CNNFamily, get_family
from .pretrained import load_into, read_weights, weights_fingerprint
from .rein import Rein

__all__ = ["StageReins", "ReinCNNBackbone", "build_cnn_backbone", "REIN_PATCH_SIZE"]

# Rein reads the patch size only for its token initialisation bound; the official CNN
# configurations give 16.
REIN_PATCH_SIZE = 16


class StageReins(nn.ModuleList):
    """One :class:`~reinseg.rein.Rein` per stage (official ``reins.<i>``).

    All stages share ``token_length``, ``query_dims`` and ``link_token_to_query``: their linked
    queries are summed over ``out_indices`` (:meth:`queries`).
    """

    def __init__(self, reins: Sequence[Rein], out_indices: Sequence[int]) -> None:
        super().__init__(reins)
        for key in ("token_length", "query_dims", "link_token_to_query"):
            values = {getattr(rein, key) for rein in reins}
            if len(values) > 1:
                raise ValueError(f"the stages' Reins must share {key}, got {sorted(values)}")
        self.out_indices = list(out_indices)

    @property
    def token_length(self) -> int:
        return self[0].token_length

    @property
    def query_dims(self) -> int:
        return self[0].query_dims

    @property
    def link_token_to_query(self) -> bool:
        return self[0].link_token_to_query

    def refine(self, x: Tensor, stage: int, layer: int) -> Tensor:
        """Stage ``stage``'s Rein on the output ``x (B, C, H, W)`` of its block ``layer``; ``(B, C, H, W)``."""
        batch, channels, height, width = x.shape
        tokens = self[stage](x.flatten(2).transpose(1, 2), layer)  # (B, H*W, C)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)

    def queries(self) -> Tensor:
        """The sum of the output stages' linked queries, ``(token_length, query_dims)``."""
        return sum(self[i].queries() for i in self.out_indices)


class ReinCNNBackbone(FrozenBackbone):
    """A frozen timm CNN with one Rein per stage, applied after every block.

    Args:
        model: the timm model (``ResNet``, ``ConvNeXt``); kept as ``vit``, the attribute every
            backbone holds its frozen model in (checkpoints, optimizer groups and strategies
            address both kinds alike).
        family: the family's name or adapter (:class:`reinseg.families.CNNFamily`).
        out_indices: the stages whose outputs feed the head (four for Mask2Former).

    ``forward(images (B, 3, H, W))`` (any H, W) returns a :class:`BackboneOutput`:
    maps of about ``(B, C_i, H / s_i, W / s_i)`` of the ``out_indices`` stages (strides 4, 8, 16, 32,
    channels :attr:`out_channels`) and the summed queries. The CNN stays frozen and in eval mode
    (BatchNorm running statistics, no drop path) when the module is put in train mode; only the
    Reins train.
    """

    def __init__(self, model: nn.Module, family: str | CNNFamily, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.family = get_family(family) if isinstance(family, str) else family
        stages = self.family.stages(model)
        out_indices = [int(i) for i in out_indices]
        if (
            not out_indices
            or sorted(set(out_indices)) != out_indices
            or not 0 <= out_indices[0] <= out_indices[-1] < len(stages)
        ):
            raise ValueError(f"out_indices must be increasing stage indices in [0, {len(stages)}), got {out_indices}")
        self.family.add_feature_norms(model, out_indices)
        self.vit = model
        self.out_indices = out_indices
        self.stage_channels = self.family.stage_channels(model)
        self.stage_depths = [len(blocks) for _, blocks in stages]
        self.rein: StageReins | None = None
        self.prompts = None  # token-based strategies (vpt) do not apply to CNNs
        # The coarsest stride: training crops and sliding windows are checked against it.
        self.patch_size = (self.family.reduction, self.family.reduction)
        self.freeze_backbone = True
        self.weights_source: str | None = None
        self.weights_fingerprint: str | None = None
        self.vit.requires_grad_(False)
        self.vit.eval()

    @property
    def out_channels(self) -> list[int]:
        """Channels of the maps :meth:`forward` returns."""
        return [self.stage_channels[i] for i in self.out_indices]

    def add_rein(self, rein: dict[str, Any], module: type[Rein] = Rein) -> StageReins:
        """Build one Rein (or ``module``, a subclass: SET) per stage from the shared arguments
        (:class:`reinseg.Rein`).

        ``num_layers`` and ``embed_dims`` come from each stage, ``num_prefix_tokens`` is 0;
        ``patch_size`` (the token initialisation bound only) defaults to the official 16.
        """
        if isinstance(rein, dict):
            for key in ("num_layers", "embed_dims"):
                if key in rein:
                    raise ValueError(
                        f"rein.{key}={rein[key]!r}: on a CNN each stage's Rein takes its own from the stage"
                    )
            rein = {"patch_size": REIN_PATCH_SIZE, **rein}
        reins = [
            module(
                **rein_arguments(
                    rein, dict(num_layers=depth, embed_dims=channels, num_prefix_tokens=0), f"stage {i}", module
                )
            )
            for i, (depth, channels) in enumerate(zip(self.stage_depths, self.stage_channels, strict=False))
        ]
        self.rein = StageReins(reins, self.out_indices)
        return self.rein

    @property
    def input_multiple(self) -> tuple[int, int]:
        """Any image size runs, as the official CNNs run it (mmseg pads nothing; the stages' maps
        are then a pixel larger or smaller than a quarter, eighth, ... of the image)."""
        return (1, 1)

    @property
    def smallest_input(self) -> tuple[int, int]:
        """Any image size runs (strided convolutions give maps of at least one pixel)."""
        return (1, 1)

    def forward(self, images: Tensor, resize: bool = True) -> BackboneOutput | BackboneMaps:
        """The four stage maps (strides 4, 8, 16, 32); ``resize=False``: the same maps as
        :class:`~reinseg.backbones.BackboneMaps` (scales 1)."""
        if images.dim() != 4:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        family = self.family
        x = family.stem(self.vit, images)
        features = []
        for index, (entry, blocks) in enumerate(family.stages(self.vit)):
            if entry is not None:
                x = entry(x)
            for layer, block in enumerate(blocks):
                x = block(x)
                if self.rein is not None:
                    x = self.rein.refine(x, index, layer)
            if index in self.out_indices:
                features.append(family.feature(self.vit, index, x))
        queries = self.rein.queries() if self.links_queries else None
        return BackboneOutput(features, queries) if resize else BackboneMaps(features, (1, 1, 1, 1), queries)

    def load_backbone_weights(self, weights: str | Path | dict[str, Tensor], resample: str = "official") -> None:
        """Load CNN weights (a file path or a state dict; timm, original or official mmseg /
        mmpretrain layout) into the frozen CNN. ``resample`` does not apply to CNNs."""
        state_dict, source = read_weights(weights)
        load_into(self.vit, self.family.fit_state_dict(state_dict, self.vit, source))
        self.weights_source = source
        self.weights_fingerprint = weights_fingerprint(self.vit)


def build_cnn_backbone(
    name: str,
    spec: BackboneSpec,
    family: CNNFamily,
    rein: dict[str, Any] | None,
    patch_size: int | None,
    out_indices: Sequence[int] | None,
    checkpoint: str | Path | None,
    pretrained: bool,
    timm_overrides: dict[str, Any],
) -> ReinCNNBackbone:
    """:func:`reinseg.build_backbone` for a CNN zoo entry (its arguments, checked there)."""
    if patch_size is not None:
        raise ValueError(f"{name} is a CNN: patch_size does not apply (set backbone.patch_size to null)")
    model = create_with_overrides(
        # family.create sets num_classes=0 itself: named here so that an override of it is refused
        lambda num_classes, **kwargs: family.create(spec.arch, **kwargs),
        name,
        {"num_classes": 0},
        timm_overrides,
    )
    indices = list(out_indices) if out_indices is not None else list(range(len(family.stages(model))))
    backbone = ReinCNNBackbone(model, family, indices)
    if rein is not None:
        backbone.add_rein(rein)
    if checkpoint is not None:
        backbone.load_backbone_weights(checkpoint)
    elif pretrained:
        backbone.load_backbone_weights(_download_pretrained(name, spec))
        backbone.weights_source = f"timm hub: {spec.timm_name}"
    return backbone
