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
    [
        "train",
        "eval",
        "predict",
        "export",
        "score",
        "report",
        "params",
        "backbones",
        "demo",
        "prepare",
        "check-data",
        "convert-official",
        "merge",
    ],
)
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


@pytest.mark.slow  # about 2 s (nine DINOv2-L builds / a fresh interpreter)
def test_params_compares_the_tuning_strategies(capsys):
    assert main(["params", "--backbone", "dinov2_vitl14", "--compare"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) >= {"rein", "frozen", "full", "lora", "vpt", "adaptformer", "soma"}
    assert "2,990,081 (   2.99 M)" in rows["rein"]
    assert "4,866,048 (   4.87 M)" in rows["soma"]  # the official count less the unused mask token (test_soma.py)
    assert "304,196,608" in rows["full"] and " 0 (   0.00 M)" in rows["frozen"]
    assert "2,061,825 (   2.06 M)" in rows["fada"]  # the official FADA module's count (test_fada.py)


def test_params_of_a_config(capsys):
    config = Path(__file__).parents[1] / "configs" / "rein_dinov2-l_gta_512.yaml"
    assert main(["params", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2,990,081" in out and "20,579,796" in out


def test_overrides_may_follow_options_and_a_leftover_is_the_subcommands_error(capsys):
    """argparse ends a nargs="*" positional at the first option: KEY=VALUE after one was refused."""
    config = Path(__file__).parents[1] / "configs" / "rein_dinov2-l_gta_512.yaml"
    assert main(["params", str(config), "--tuning", "rein", "model.head.num_classes=5", "model.rein.lora_dim=8"]) == 0
    out = capsys.readouterr().out
    assert "Mask2Former head for 5 classes" in out and "rank 8" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["params", str(config), "--tuning", "rein", "--bogus"])
    assert exit_info.value.code == 2
    assert "reinseg params: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_params_of_a_config_refuses_the_options_that_describe_a_model(capsys):
    config = Path(__file__).parents[1] / "configs" / "rein_dinov2-l_gta_512.yaml"
    assert main(["params", str(config), "--backbone", "dinov2_vitb14", "--img-size", "1024"]) == 2
    err = capsys.readouterr().err
    assert "--backbone, --img-size describe a model without a config" in err and "model.backbone.name=" in err

    assert main(["params", str(config), "--patch-size", "14"]) == 2
    assert "--patch-size describes a model without a config" in capsys.readouterr().err


def test_params_of_a_cnn_takes_no_patch_size(capsys):
    """--patch-size defaulted to 16 for every backbone: a CNN was refused ("patch_size does not apply")."""
    assert main(["params", "--backbone", "resnet50_v1c"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet50_v1c at 512 px, images of any size")
    assert main(["params", "--backbone", "dinov2_vits14"]) == 0
    assert capsys.readouterr().out.startswith("dinov2_vits14 at 512 px, patch 16")
    assert main(["params", "--backbone", "dinov2_vits14", "--patch-size", "0", "--img-size", "518"]) == 0
    assert capsys.readouterr().out.startswith("dinov2_vits14 at 518 px, patch 14")


ROOT = Path(__file__).parents[1]
SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _help_texts() -> dict[str, str]:
    """The --help text of the main parser and of every subcommand."""
    import argparse

    from reinseg.cli import build_parser

    parser = build_parser()
    texts = {"reinseg": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts.update({f"reinseg {name}": sub.format_help() for name, sub in action.choices.items()})
    return texts


def test_every_config_named_in_a_help_exists():
    import re

    named = {
        (command, path)
        for command, text in _help_texts().items()
        for path in re.findall(r"configs/[\w./+-]*\w", text)
        if path != "configs/"
    }
    assert any(command == "reinseg train" for command, _ in named)  # the examples do name configs
    missing = sorted(f"{command}: {path}" for command, path in named if not (ROOT / path).is_file())
    assert not missing, missing


def test_there_are_shipped_configs():
    assert len(SHIPPED_CONFIGS) >= 9


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_check_data_reports_every_missing_root_of_a_shipped_config(config, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)  # the configs' relative roots (data/...) do not exist here
    data = yaml.safe_load(config.read_text())["data"]
    entries = data["train"] + data["val"]
    assert main(["check-data", str(config)]) == 1
    out = capsys.readouterr().out.splitlines()
    missing = [line for line in out if "root not found" in line]
    assert len(missing) == len(entries)  # one line per dataset, in the config's order
    for line, entry in zip(missing, entries, strict=False):
        assert line.startswith(entry["name"]) and line.endswith(f"root not found: {entry['root']}")
    assert out[-1].startswith("problems in: ")


def test_check_data_of_a_config_checks_the_datasets_that_exist(tmp_path, capsys):
    from fake_datasets import make_fake_cityscapes

    make_fake_cityscapes(tmp_path / "cityscapes", n=2, size=(32, 64), prepared=True)
    (tmp_path / "config.yaml").write_text(
        f"""
data:
  train: [{{name: gtav, root: {tmp_path / "gta"}}}]
  val: [{{name: cityscapes, root: {tmp_path / "cityscapes"}, split: val, scale: [64, 32], in_mean: false}}]
  crop_size: 32
"""
    )
    assert main(["check-data", str(tmp_path / "config.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"gtav train: gtav root not found: {tmp_path / 'gta'}" in out
    assert "cityscapes val" in out and "2 pairs" in out  # the set that exists is still checked
    assert out.strip().splitlines()[-1] == "problems in: gtav train"


def test_check_data_names_a_typo_in_the_data_section(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("data:\n  crop_sise: 512\n  train: []\n")
    assert main(["check-data", str(tmp_path / "config.yaml")]) == 2
    assert "did you mean 'crop_size'" in capsys.readouterr().err


@pytest.mark.slow  # about 2 s (nine DINOv2-L builds / a fresh interpreter)
def test_params_compare_skips_lora_without_peft(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    assert main(["params", "--backbone", "dinov2_vitl14", "--compare"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines()[3:] if not line.startswith("skipped")}
    from reinseg.tuning import strategy_names

    assert rows == set(strategy_names()) - {"lora"}
    assert {"rein", "frozen", "full", "vpt", "adaptformer", "set"} <= rows
    assert "skipped lora: model.tuning 'lora' needs the peft library" in out


def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this checkout's reinseg; its stdout."""
    from conftest import run_reinseg

    done = run_reinseg(["-c", code])
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_imports_neither_torch_nor_lightning():
    commands = [name.split()[1] for name in _help_texts() if " " in name]
    out = _run_python(
        f"""
import contextlib, io, sys
from reinseg.cli import main
for argv in [["--help"]] + [[c, "--help"] for c in {commands!r}]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
print(sorted(m for m in ("torch", "lightning", "timm", "cv2") if m in sys.modules))
"""
    )
    assert out.strip() == "[]"
    assert len(commands) >= 10


@pytest.mark.slow  # about 2 s (nine DINOv2-L builds / a fresh interpreter)
def test_the_package_exports_its_public_names_lazily():
    out = _run_python(
        """
import sys
import reinseg, reinseg.data
before = "torch" in sys.modules
names = [n for n in reinseg.__all__ if not hasattr(reinseg, n)]
names += [n for n in reinseg.data.__all__ if not hasattr(reinseg.data, n)]
print(before, names, reinseg.config.ModelConfig.__name__, reinseg.data.synthetic.DOMAINS[0])
"""
    )
    assert out.split() == ["False", "[]", "ModelConfig", "game"]


def test_predict_names_the_device_option_it_cannot_use(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "x.ckpt"), str(tmp_path), "--output", str(tmp_path / "o"), "--device", "gpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --device: device 'gpu' is not usable here" in err.splitlines()[-1]


def test_params_refuses_reins_sizes_for_a_strategy_that_does_not_use_them(capsys):
    """They were ignored silently: the table of --tuning fada --token-length 10 was the default's."""
    assert main(["params", "--tuning", "fada", "--token-length", "10", "--lora-dim", "4"]) == 2
    err = capsys.readouterr().err
    assert "--lora-dim, --token-length describe Rein's tokens, which --tuning fada does not use" in err
    assert main(["params", "--tuning", "rein", "--token-length", "10"]) == 0
    assert "Rein: 10 tokens" in capsys.readouterr().out


def test_predictions_another_evaluation_is_writing_are_left_alone(tmp_path, capsys):
    """A --save-preds folder marked by a process that runs (or ran on another machine, where it
    cannot be seen) is refused; one marked by an ended evaluation is emptied, unless a folder in it
    holds a marker of its own (a predict writing there); one an interrupted `predict` left is
    refused and kept (it may hold other files than predictions)."""
    import os
    import subprocess
    import sys

    from reinseg.checkpoints import _HOST
    from reinseg.cli import _start_predictions_folder
    from reinseg.unfinished import MARKER

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "preds"
    folder.mkdir()
    (folder / "cityscapes").mkdir()
    (folder / "cityscapes" / "a.png").write_bytes(b"a prediction")
    for writer in (f"1@{_HOST}", f"{int(ended.stdout)}@{_HOST}x"):  # init runs; another machine
        (folder / MARKER).write_text(writer + "\n")
        with pytest.raises(ValueError, match=f"another `reinseg eval` \\({writer}\\) into {folder} is writing it"):
            _start_predictions_folder(folder)
        assert (folder / "cityscapes" / "a.png").exists()
    (folder / MARKER).write_text(f"{int(ended.stdout)}@{_HOST}\npredict\n")
    with pytest.raises(ValueError, match="unfinished outputs of an interrupted `reinseg predict`"):
        _start_predictions_folder(folder)
    assert (folder / "cityscapes" / "a.png").exists()
    (folder / MARKER).write_text(f"{int(ended.stdout)}@{_HOST}\n")  # an earlier release's evaluation
    (folder / "cityscapes" / MARKER).write_text(f"1@{_HOST}\npredict\n")  # a predict running inside it
    with pytest.raises(ValueError, match="marks a folder inside it .* which emptying it would delete"):
        _start_predictions_folder(folder)
    assert (folder / "cityscapes" / "a.png").exists()
    (folder / "cityscapes" / MARKER).unlink()
    _start_predictions_folder(folder)
    assert [p.name for p in folder.iterdir()] == [MARKER]
    assert (folder / MARKER).read_text() == f"{os.getpid()}@{_HOST}\neval\n"
    assert "removing the incomplete predictions" in capsys.readouterr().err


def test_predict_of_videos_too_refuses_a_folder_another_command_writes(tmp_path, capsys):
    """The marker check comes before any output, images' or videos': a video's overlay written
    into a folder a running evaluation writes would be deleted by its rerun."""
    from reinseg.checkpoints import _HOST
    from reinseg.unfinished import MARKER

    out = tmp_path / "preds"
    out.mkdir()
    (out / MARKER).write_text(f"1@{_HOST}\neval\n")
    status = main(["predict", str(tmp_path / "x.ckpt"), str(tmp_path / "clip.mp4"), "--output", str(out)])
    assert status != 0
    assert f"--output {out}: another `reinseg eval` (1@{_HOST}) into {out} is writing it" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [MARKER]
