"""Backbone families are adapters registered by name; a new one is one class and one registration."""

import pytest
import torch
from conftest import tiny_overrides

from reinseg import build_backbone
from reinseg.backbones import BACKBONES, BackboneSpec, ReinBackbone
from reinseg.families import FAMILIES, ViTFamily, get_family

TINY_REIN = dict(token_length=4, lora_dim=2, query_dims=16)


class CountingFamily(ViTFamily):
    """A toy family: a plain ViT that counts the blocks it runs."""

    name = "counting"

    def __init__(self) -> None:
        self.blocks_run = 0

    def run_block(self, block, x, block_kwargs):
        self.blocks_run += 1
        return super().run_block(block, x, block_kwargs)


def test_a_family_defined_outside_the_package_runs_the_backbone(monkeypatch):
    family = CountingFamily()
    monkeypatch.setitem(FAMILIES, "counting", family)
    reference = BACKBONES["mae_vitl16"]
    monkeypatch.setitem(BACKBONES, "toy_vit", BackboneSpec(reference.arch, reference.tag, "counting", "toy"))
    overrides = tiny_overrides("mae_vitl16")
    torch.manual_seed(0)
    toy = build_backbone("toy_vit", img_size=32, patch_size=16, rein=TINY_REIN, **overrides).eval()
    torch.manual_seed(0)
    plain = build_backbone("mae_vitl16", img_size=32, patch_size=16, rein=TINY_REIN, **overrides).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ours, theirs = toy(images), plain(images)
    assert family.blocks_run == len(toy.vit.blocks) == 4
    assert all(torch.equal(a, b) for a, b in zip(ours.features, theirs.features, strict=False))
    assert torch.equal(ours.queries, theirs.queries)


def test_every_zoo_entry_names_a_registered_family():
    assert {spec.family for spec in BACKBONES.values()} <= set(FAMILIES)


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown backbone family 'nope'.*registered: ") as err:
        get_family("nope")
    assert all(name in str(err.value) for name in ("convnext", "dinov2", "eva", "resnet_v1c", "sam", "vit"))
    vit = build_backbone("mae_vitl16", img_size=32, patch_size=16, **tiny_overrides("mae_vitl16")).vit
    with pytest.raises(ValueError, match="'nope'"):
        ReinBackbone(vit, "nope", [0, 1, 2, 3])
