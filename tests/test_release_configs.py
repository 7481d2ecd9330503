"""The configs of the official release settings build (on the meta device) with the Rein that
the official shapes give: one Rein over a ViT's blocks, one per stage on a CNN (distinct_cfgs)."""

from pathlib import Path

import pytest
from conftest import rein_parameters

from reinseg.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "config, depths, channels",
    [
        ("rein_dinov2-l_gta_512.yaml", [24], [1024]),
        # The other sizes of a family in the full suite only: the same check on another size.
        pytest.param("rein_dinov2-b_gta_512.yaml", [12], [768], marks=pytest.mark.slow),
        pytest.param("rein_dinov2-s_gta_512.yaml", [12], [384], marks=pytest.mark.slow),
        ("rein_eva02-l_gta_512.yaml", [24], [1024]),
        ("rein_resnet50_gta_512.yaml", [3, 4, 6, 3], [256, 512, 1024, 2048]),
        pytest.param("rein_resnet101_gta_512.yaml", [3, 4, 23, 3], [256, 512, 1024, 2048], marks=pytest.mark.slow),
        ("rein_convnext-l_gta_512.yaml", [3, 3, 27, 3], [192, 384, 768, 1536]),
    ],
)
def test_release_configs_build_with_the_official_rein_count(config, depths, channels, capsys):
    assert main(["params", str(CONFIGS / config)]) == 0
    rein_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Rein "))
    count = sum(rein_parameters(d, c) for d, c in zip(depths, channels, strict=False))
    assert rein_row.split()[1:3] == [f"{count:,}", f"{count:,}"]


def test_fada_config_builds_with_the_official_fada_count(capsys):
    """FADA's config (its official config is Rein's, the module aside): the official module's count
    at DINOv2-L (tests/data/fada_tiny.pt, made by running JingjunYi/FADA)."""
    from conftest import load_golden

    assert main(["params", str(CONFIGS / "fada_dinov2-l_gta_512.yaml")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FADA "))
    count = load_golden("fada_tiny.pt")["vitl_count"]["parameters"]
    assert row.split()[1:3] == [f"{count:,}", f"{count:,}"]


def test_the_set_config_builds_with_the_official_set_count(capsys):
    """SET's official config is Rein's with the spectral LoRAReins: Rein's count plus the
    amplitude tokens (24 x 100 x 1024) and their two 1024 -> 1024 MLPs."""
    assert main(["params", str(CONFIGS / "set_dinov2-l_gta_512.yaml")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("SET "))
    count = rein_parameters(24, 1024) + 24 * 100 * 1024 + 2 * (1024 * 1024 + 1024)
    assert row.split()[1:3] == [f"{count:,}", f"{count:,}"]


@pytest.mark.parametrize("method", ["fada", "set"])
def test_cityscapes_source_configs_are_the_gtav_recipe_on_cityscapes(method):
    """The forks' configs/my/citys_rein_dinov2_mask2former_512x512_bs1x4.py is their GTAV config
    with Cityscapes' training split as the source: the same model, pipeline, optimizer and schedule."""
    from reinseg.config import load_config, to_dict

    gtav = to_dict(load_config(CONFIGS / f"{method}_dinov2-l_gta_512.yaml"))
    citys = to_dict(load_config(CONFIGS / f"{method}_dinov2-l_cityscapes_512.yaml"))
    assert citys["model"] == gtav["model"]
    assert citys["data"]["train"] == [{"name": "cityscapes", "root": "data/cityscapes", "split": "train"}]
    assert {k: v for k, v in citys["data"].items() if k not in ("train", "val")} == {
        k: v for k, v in gtav["data"].items() if k not in ("train", "val")
    }
    differing = {k for k in gtav["train"] if citys["train"][k] != gtav["train"][k]}
    assert differing == {"output_dir", "val_interval"}
    # The source is reported apart; the three targets make the mean.
    in_mean = [(e["name"], e.get("split")) for e in citys["data"]["val"] if e.get("in_mean", True)]
    assert in_mean == [("bdd100k", "val"), ("mapillary", "val"), ("gtav", "train")]
