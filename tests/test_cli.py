from pathlib import Path

import pytest

from reinseg.cli import main


def test_params_prints_the_papers_rein_count(capsys):
    assert main(["params", "--backbone", "dinov2_vitl14"]) == 0
    out = capsys.readouterr().out
    rein_row = next(line for line in out.splitlines() if line.startswith("Rein"))
    assert "2,990,081" in rein_row
    assert "304,196,608" in out  # the frozen DINOv2-L at patch 16, 512 px
    head_row = next(line for line in out.splitlines() if line.startswith("head"))
    assert "20,579,796" in head_row  # the paper's Mask2Former head: 256 channels, 100 queries, 19 classes


def test_backbones_lists_the_zoo(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("dinov2_vitl14", "eva02_vitl14", "clip_vitl14", "sam_vith16", "mae_vitl16", "dinov3_vitl16"):
        assert name in out


def test_unknown_backbone_is_a_clear_error(capsys):
    assert main(["params", "--backbone", "dinov2_vitq14"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'dinov2_vitq14'" in err and "dinov2_vitl14" in err


@pytest.mark.parametrize(
    "command",
    ["train", "eval", "predict", "score", "params", "backbones", "demo", "prepare", "check-data", "convert-official"],
)
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_params_compares_the_tuning_strategies(capsys):
    assert main(["params", "--backbone", "dinov2_vitl14", "--compare"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) >= {"rein", "frozen", "full", "lora", "vpt", "adaptformer"}
    assert "2,990,081 (   2.99 M)" in rows["rein"]
    assert "304,196,608" in rows["full"] and " 0 (   0.00 M)" in rows["frozen"]


def test_params_of_a_config(capsys):
    config = Path(__file__).parents[1] / "configs" / "rein_dinov2-l_gta_512.yaml"
    assert main(["params", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2,990,081" in out and "20,579,796" in out
