"""The builders: :func:`reinseg.build.plan_segmentor` against a plain meta-device build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reinseg.backbones import backbone_kind
from reinseg.build import _MetaInitialisationSkipped, build_segmentor, plan_segmentor
from reinseg.config import BackboneConfig, ModelConfig, load_config

# One config per architecture and strategy (the others repeat one: other sizes, other data).
CONFIGS = [
    Path(__file__).parents[1] / "configs" / name
    for name in (
        "rein_dinov2-l_gta_512.yaml",
        "fada_dinov2-l_gta_512.yaml",
        "set_dinov2-l_gta_512.yaml",
        "soma_dinov2-l_gta_512.yaml",
        "frozen_dinov2-l_gta_512.yaml",
        "full_dinov2-l_gta_512.yaml",
        "rein_clip-l_gta_512.yaml",
        "rein_convnext-l_gta_512.yaml",
        "rein_eva02-l_gta_512.yaml",
        "rein_mae-l_gta_512.yaml",
        "rein_resnet50_gta_512.yaml",
        "rein_sam-h_gta_512.yaml",
    )
]


def signature(model: torch.nn.Module) -> list[tuple]:
    """Every parameter's and buffer's name, shape, dtype, device and trainability."""
    params = [(n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()]
    return params + [(n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers()]


def assert_plan_is_the_meta_build(config: ModelConfig) -> None:
    with torch.device("meta"):
        built = build_segmentor(config, load_backbone_weights=False)
    planned = plan_segmentor(config)
    assert signature(planned) == signature(built)
    assert planned.no_decay_keys == built.no_decay_keys


@pytest.mark.parametrize(
    "config_file",
    [pytest.param(f, marks=() if f.name == "rein_dinov2-l_gta_512.yaml" else pytest.mark.slow) for f in CONFIGS],
    ids=lambda f: f.name,
)
def test_a_plan_is_the_meta_build_of_each_config(config_file):
    assert_plan_is_the_meta_build(load_config(str(config_file)).model)


# The zoo's architectures no config builds, with Rein; the strategies no config names, on DINOv2.
ZOO = [
    pytest.param(name, tuning, marks=pytest.mark.slow)
    for name, tuning in [
        *((name, "rein") for name in ("dinov2_vits14_reg", "dinov2_vitg14", "dinov3_vits16", "dinov3_vit7b16")),
        *(("dinov2_vitl14", tuning) for tuning in ("lora", "vpt", "adaptformer")),
    ]
]


@pytest.mark.parametrize(("name", "tuning"), ZOO)
def test_a_plan_is_the_meta_build_of_every_zoo_backbone_and_strategy(name, tuning):
    if tuning == "lora":
        pytest.importorskip("peft")
    patch_size = 16 if backbone_kind(name) == "vit" else None
    assert_plan_is_the_meta_build(
        ModelConfig(tuning=tuning, backbone=BackboneConfig(name=name, img_size=512, patch_size=patch_size))
    )


def test_planning_skips_initialisation_on_meta_tensors_only():
    on_cpu = torch.zeros(64)
    with torch.device("meta"), _MetaInitialisationSkipped():
        on_meta = torch.empty(3, 4)
        assert torch.nn.init.trunc_normal_(on_meta) is on_meta
        assert torch.nn.init.normal_(on_meta, std=-1.0) is on_meta  # raises where it runs: skipped
        assert on_meta.normal_(0.0, -1.0) is on_meta
        assert on_meta.uniform_().erfinv_().mul_(2.0).add_(1.0).clamp_(-1, 1) is on_meta
        torch.nn.init.normal_(on_cpu)
        on_cpu.add_(1.0)
        frozen = torch.empty(2).requires_grad_(False)  # not an initialisation: still applied
        trainable = torch.empty(2).requires_grad_()
    assert on_cpu.std() > 0.5 and abs(on_cpu.mean() - 1.0) < 0.5
    assert trainable.requires_grad and not frozen.requires_grad and trainable.is_meta
