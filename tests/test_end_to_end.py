"""The command line end to end: train, evaluate, score, predict, on a tiny model and fake Cityscapes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_config
from fake_datasets import make_fake_cityscapes
from reinseg.cli import main
from reinseg.config import Config, DataConfig, TrainConfig, dump_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few iterations through `reinseg train`."""
    tmp = tmp_path_factory.mktemp("e2e")
    make_fake_cityscapes(tmp / "cityscapes", n=3, size=(64, 128), prepared=True)
    config = Config(
        model=tiny_model_config(),
        data=DataConfig(
            train=[dict(name="cityscapes", root=str(tmp / "cityscapes"), split="train")],
            val=[dict(name="cityscapes", root=str(tmp / "cityscapes"), split="val", scale=[128, 64])],
            crop_size=64,
            base_size=64,
            max_size=256,
            batch_size=2,
            num_workers=0,
        ),
        train=TrainConfig(max_iters=4, val_interval=4, checkpoint_interval=4, lr=1e-3, output_dir=str(tmp / "run")),
    )
    (tmp / "config.yaml").write_text(dump_config(config))
    assert main(["train", str(tmp / "config.yaml")]) == 0
    return tmp


def test_train_writes_checkpoints_logs_and_metrics(trained):
    run = trained / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics" / "val_step0000004.json").read_text())
    assert set(metrics["domains"]) == {"cityscapes"} and metrics["mean_domains"] == ["cityscapes"]


def test_eval_score_and_predict_agree(trained, capsys):
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    config = str(trained / "config.yaml")
    assert (
        main(["eval", config, checkpoint, "--save-preds", str(trained / "preds"), "--json", str(trained / "eval.json")])
        == 0
    )
    evaluated = json.loads((trained / "eval.json").read_text())
    scores = evaluated["domains"]["cityscapes"]
    # The saved predictions, scored on their own, give the same numbers.
    labels = trained / "cityscapes" / "gtFine" / "val"
    assert main(["score", str(trained / "preds" / "cityscapes"), str(labels), "--json", str(trained / "s.json")]) == 0
    scored = json.loads((trained / "s.json").read_text())
    assert scored["mIoU"] == pytest.approx(scores["mIoU"], abs=1e-9)
    assert scored["IoU"] == pytest.approx(scores["IoU"], abs=1e-9)
    assert evaluated["mean_mIoU"] == pytest.approx(scores["mIoU"])
    # Same numbers after a round trip through the checkpoint as in training's final validation.
    final = json.loads((trained / "run" / "metrics" / "val_step0000004.json").read_text())
    assert final["domains"]["cityscapes"]["mIoU"] == pytest.approx(scores["mIoU"], abs=1e-9)

    images = trained / "cityscapes" / "leftImg8bit" / "val"
    assert main(["predict", checkpoint, str(images), "--output", str(trained / "out"), "--scale", "128", "64"]) == 0
    written = sorted(p.name for p in (trained / "out").iterdir())
    assert len(written) == 6 and sum(n.endswith("_labelTrainIds.png") for n in written) == 3
    one = next((trained / "out").glob("*_labelTrainIds.png"))
    prediction = np.asarray(Image.open(one))
    assert prediction.shape == (64, 128) and prediction.max() < 19


def test_predict_refuses_a_non_image_and_writes_nothing(trained, capsys):
    (trained / "notes.txt").write_text("not an image")
    image = next((trained / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    code = main(
        [
            "predict",
            str(trained / "run" / "checkpoints" / "last.ckpt"),
            str(image),
            str(trained / "notes.txt"),
            "--output",
            str(trained / "never"),
        ]
    )
    assert code == 2
    assert "notes.txt" in capsys.readouterr().err
    assert not (trained / "never").exists()


def test_checkpoint_from_another_config(trained, capsys):
    other = (trained / "config.yaml").read_text().replace("token_length: 8", "token_length: 6")
    (trained / "other.yaml").write_text(other)
    code = main(["eval", str(trained / "other.yaml"), str(trained / "run" / "checkpoints" / "last.ckpt")])
    assert code == 2
    assert "model.rein.token_length: 8 vs 6" in capsys.readouterr().err


def test_config_typo_is_named_with_a_suggestion(trained, capsys):
    typo = (trained / "config.yaml").read_text().replace("batch_size:", "batchsize:")
    (trained / "typo.yaml").write_text(typo)
    assert main(["train", str(trained / "typo.yaml")]) == 2
    assert "unknown config key 'data.batchsize'; did you mean 'batch_size'?" in capsys.readouterr().err
    assert main(["train", str(trained / "config.yaml"), "train.max_itres=3"]) == 2
    assert "did you mean 'max_iters'" in capsys.readouterr().err


def test_missing_dataset_root_is_named_and_nothing_is_written(trained, tmp_path, capsys):
    config = (trained / "config.yaml").read_text().replace(str(trained / "cityscapes"), str(tmp_path / "nowhere"))
    config = config.replace(str(trained / "run"), str(tmp_path / "run"))
    (tmp_path / "missing.yaml").write_text(config)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_not_a_checkpoint(trained, tmp_path, capsys):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "random.pth")
    assert main(["eval", str(trained / "config.yaml"), str(tmp_path / "random.pth")]) == 2
    assert "is not a reinseg checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_training_prints_no_banners_and_names_the_validation_domains(tmp_path):
    """What a user sees: no device banners or adverts, and each validation bar named after its domain."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    make_fake_cityscapes(tmp_path / "cityscapes", n=2, size=(64, 128), prepared=True)
    val = dict(name="cityscapes", root=str(tmp_path / "cityscapes"), split="val", scale=[128, 64])
    config = Config(
        model=tiny_model_config(),
        data=DataConfig(
            train=[dict(name="cityscapes", root=str(tmp_path / "cityscapes"), split="train")],
            val=[val, {**val, "label": "second"}],
            crop_size=64,
            base_size=64,
            max_size=256,
            batch_size=1,
            num_workers=0,
        ),
        train=TrainConfig(max_iters=1, val_interval=1, checkpoint_interval=1, output_dir=str(tmp_path / "run")),
    )
    (tmp_path / "config.yaml").write_text(dump_config(config))
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "reinseg", "train", str(tmp_path / "config.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for banner in ("GPU available", "TPU available", "litlogger", "litmodels", "DataLoader"):
        assert banner not in output
    assert "validate cityscapes" in output and "validate second" in output
