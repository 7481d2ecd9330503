"""The command line end to end: train, evaluate, score, predict, on a tiny model and fake Cityscapes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killed_writers_leftover, tiny_model_config
from fake_datasets import make_fake_cityscapes
from PIL import Image

from reinseg.cli import main
from reinseg.config import Config, DataConfig, TrainConfig, dump_config
from reinseg.config import to_dict as _to_dict


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
    # The validation's CSV row names its iteration (Lightning's step column counts from 0).
    import csv

    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("val/mean_mIoU")]
    assert [(float(r["iteration"]), int(r["step"])) for r in rows] == [(4.0, 3)]


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
    # Another evaluation's predictions never mix into a used folder (a failed one would leave both).
    args = ["eval", config, checkpoint, "--save-preds", str(trained / "preds"), "--json", str(trained / "eval2.json")]
    assert main(args) == 2
    assert "--save-preds" in capsys.readouterr().err and not (trained / "eval2.json").exists()
    assert evaluated["mean_mIoU"] == pytest.approx(round(scores["mIoU"], 2))  # the official mean of rounded mIoUs
    # Same numbers after a round trip through the checkpoint as in training's final validation.
    final = json.loads((trained / "run" / "metrics" / "val_step0000004.json").read_text())
    assert final["domains"]["cityscapes"]["mIoU"] == pytest.approx(scores["mIoU"], abs=1e-9)
    assert evaluated["step"] == final["step"] == 4  # the checkpoint's iteration

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
    from conftest import run_reinseg

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
    done = run_reinseg(["-m", "reinseg", "train", str(tmp_path / "config.yaml")])
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for banner in ("GPU available", "TPU available", "litlogger", "litmodels", "DataLoader"):
        assert banner not in output
    assert "validate cityscapes" in output and "validate second" in output


def _record_inference_sizes(monkeypatch) -> list:
    """The (H, W) of every input the segmentor is run on from now on."""
    from reinseg.segmentor import Segmentor

    sizes = []
    predict = Segmentor.predict

    def recording(self, x, *args, **kwargs):
        sizes.append(tuple(x.shape[-2:]))
        return predict(self, x, *args, **kwargs)

    monkeypatch.setattr(Segmentor, "predict", recording)
    return sizes


def test_predict_runs_at_the_checkpoints_test_scale(trained, tmp_path, monkeypatch, capsys):
    # The checkpoint's validation set is resized to fit 128 x 64: a 256 x 512 photo is segmented
    # at 64 x 128 (the old fixed 1024 x 512 would have upscaled it to 512 x 1024).
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 512, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    sizes = _record_inference_sizes(monkeypatch)
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    assert main(["predict", checkpoint, str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]) == 0
    assert sizes == [(64, 128)]
    assert "fit in 128x64 (the test scale of cityscapes" in capsys.readouterr().out
    prediction = np.asarray(Image.open(tmp_path / "out" / "a_labelTrainIds.png"))
    assert prediction.shape == (256, 512)
    # An explicit --scale still wins.
    assert (
        main(
            ["predict", checkpoint, str(tmp_path / "a.png"), "--output", str(tmp_path / "o2"), "--scale", "256", "128"]
        )
        == 0
    )
    assert sizes[-1] == (128, 256)


@pytest.mark.slow
def test_predict_flips_as_the_checkpoint_says_unless_told(tmp_path, monkeypatch):
    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
    from reinseg.segmentor import Segmentor

    model = tiny_model_config()
    model.test.flip = True
    checkpoint = save_checkpoint(
        tmp_path / "flip.ckpt", dict(model=_to_dict(model)), checkpoint_state_dict(build_segmentor(model))
    )
    Image.new("RGB", (64, 32)).save(tmp_path / "a.png")
    runs = []  # images run through the model per command: two with the mirrored one
    predict = Segmentor.predict

    def recording(self, x, *args, **kwargs):
        runs[-1] += len(x)
        return predict(self, x, *args, **kwargs)

    monkeypatch.setattr(Segmentor, "predict", recording)
    for option in ([], ["--flip"], ["--no-flip"]):
        runs.append(0)
        out = tmp_path / f"out{len(runs)}"
        assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--output", str(out), *option]) == 0
    assert runs == [2, 2, 1]


@pytest.mark.slow
def test_predict_stacks_windows_as_the_checkpoint_says_unless_told(tmp_path, monkeypatch):
    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
    from reinseg.segmentor import Segmentor

    model = tiny_model_config()
    model.test.mode, model.test.crop_size, model.test.stride = "slide", [32, 32], [16, 16]
    model.test.window_batch = 2
    checkpoint = save_checkpoint(
        tmp_path / "windows.ckpt", dict(model=_to_dict(model)), checkpoint_state_dict(build_segmentor(model))
    )
    Image.new("RGB", (96, 32)).save(tmp_path / "a.png")  # at its own size: five 32x32 windows
    forwards = []  # windows per forward, per command
    encode_decode = Segmentor.encode_decode

    def recording(self, x):
        forwards[-1].append(len(x))
        return encode_decode(self, x)

    monkeypatch.setattr(Segmentor, "encode_decode", recording)
    for option in ([], ["--window-batch", "5"], ["--window-batch", "1"]):
        forwards.append([])
        out = tmp_path / f"out{len(forwards)}"
        command = ["predict", str(checkpoint), str(tmp_path / "a.png"), "--output", str(out), "--scale", "96", "32"]
        assert main([*command, *option]) == 0
    assert forwards == [[2, 2, 1], [5], [1] * 5]


def test_predict_of_a_checkpoint_without_validation_sets_uses_the_cityscapes_scale():
    from reinseg.predict import checkpoint_scale

    assert checkpoint_scale({"model": {}})[0] == (1024, 512)
    # A converted release records its model only: the official scale of its training crop.
    assert checkpoint_scale({"model": {"backbone": {"img_size": 512}}})[0] == (1024, 512)
    assert checkpoint_scale({"model": {"backbone": {"img_size": 1024}}})[0] == (2048, 1024)
    assert checkpoint_scale({"model": {"backbone": {"img_size": [1024, 1024]}}})[0] == (2048, 1024)
    # A validation entry without a scale: its dataset's in the official configs of the crop.
    assert checkpoint_scale({"data": {"val": [{"name": "acdc", "root": "x"}]}})[0] == (960, 540)
    acdc_1024 = {"model": {"backbone": {"img_size": 1024}}, "data": {"val": [{"name": "acdc", "root": "x"}]}}
    assert checkpoint_scale(acdc_1024)[0] == (1920, 1080)
    assert checkpoint_scale({"data": {"val": [{"name": "synthetic", "root": "x"}]}})[0] is None


def _exif_rotated(stored: np.ndarray, path, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation; 6: the stored picture is shown turned 90 degrees clockwise
    Image.fromarray(stored).save(path, exif=exif)


def test_photos_are_read_upright(tmp_path):
    from reinseg.data.io import read_photo

    stored = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    _exif_rotated(stored, tmp_path / "turned.png")
    assert np.array_equal(read_photo(tmp_path / "turned.png"), np.rot90(stored, k=-1))
    _exif_rotated(stored, tmp_path / "turned.jpg")
    assert read_photo(tmp_path / "turned.jpg").shape == (30, 20, 3)


def test_grey_alpha_pngs_are_read_as_grey(tmp_path):
    from reinseg.data.io import read_photo

    grey = np.random.default_rng(2).integers(0, 255, (12, 16), dtype=np.uint8)
    alpha = np.full_like(grey, 128)
    Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert np.array_equal(read_photo(tmp_path / "la.png"), np.stack([grey] * 3, axis=-1))


def test_16_bit_and_bilevel_photos_read_as_evaluation_reads_them(tmp_path):
    """predict's reader gives what evaluation's OpenCV decoding gives: the high byte of 16-bit
    grey, 0 and 255 for a 1-bit PNG."""
    from reinseg.data.io import read_image, read_photo

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rng.random((20, 30)) > 0.5).save(tmp_path / "mask.png")
    for name in ("grey16.png", "mask.png"):
        assert np.array_equal(read_photo(tmp_path / name), read_image(tmp_path / name)), name


def test_predict_writes_upright_outputs_for_a_folder_with_progress(trained, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    _exif_rotated(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8), photos / "portrait.jpg")
    grey = rng.integers(0, 255, (64, 96), dtype=np.uint8)
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=-1), mode="LA").save(photos / "grey.png")
    Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(photos / "plain.png")
    (photos / "._plain.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS's AppleDouble file: no image
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(elsewhere / "linked.png")
    (photos / "album").symlink_to(elsewhere, target_is_directory=True)
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    leftover = killed_writers_leftover(tmp_path / "out", "plain_overlay.png")
    assert main(["predict", checkpoint, str(photos), "--output", str(tmp_path / "out")]) == 0
    assert not leftover.exists()  # a killed run's half-written file
    assert np.asarray(Image.open(tmp_path / "out" / "linked_labelTrainIds.png")).shape == (64, 64)
    assert np.asarray(Image.open(tmp_path / "out" / "portrait_labelTrainIds.png")).shape == (128, 64)
    assert np.asarray(Image.open(tmp_path / "out" / "portrait_overlay.png")).shape == (128, 64, 3)
    assert np.asarray(Image.open(tmp_path / "out" / "grey_labelTrainIds.png")).shape == (64, 96)
    err = capsys.readouterr().err
    assert "predict" in err and "4/4" in err


def test_an_image_given_as_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    image = next((trained / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    assert main(["predict", str(image), str(image), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(image) in err and "not a reinseg checkpoint" in err
    assert "weights_only" not in err
    assert not (tmp_path / "out").exists()


def test_predictions_of_native_labels_carry_train_id_names_and_score_once_prepared(trained, capsys):
    """Native Cityscapes (label IDs): the saved train-ID predictions are named as the prepared
    labels (they were *_gtFine_labelIds.png), and score against them once they are prepared."""
    make_fake_cityscapes(trained / "native", n=2, size=(64, 128), splits=("val",), prepared=False)
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    preds, result = trained / "native_preds", trained / "native.json"
    root = trained / "native"
    arguments = ["eval", str(trained / "config.yaml"), checkpoint, "--save-preds", str(preds), "--json", str(result)]
    assert main([*arguments, f"data.val=[{{name: cityscapes, root: {root}, split: val, scale: [128, 64]}}]"]) == 0
    assert "not train IDs: `reinseg prepare` them first" in capsys.readouterr().out
    names = sorted(p.name for p in (preds / "cityscapes").rglob("*.png"))
    assert len(names) == 2 and all(n.endswith("_gtFine_labelTrainIds.png") for n in names)
    assert main(["prepare", "cityscapes", str(root), "--workers", "1"]) == 0
    scored = trained / "native_score.json"
    assert main(["score", str(preds / "cityscapes"), str(root / "gtFine" / "val"), "--json", str(scored)]) == 0
    expected = json.loads(result.read_text())["domains"]["cityscapes"]["mIoU"]
    assert json.loads(scored.read_text())["mIoU"] == pytest.approx(expected, abs=1e-9)


def test_segment_image_names_what_it_takes():
    """A grey (H, W) array or float pixels failed with a numpy broadcast error."""
    from reinseg.build import build_segmentor
    from reinseg.predict import segment_image

    segmentor = build_segmentor(tiny_model_config()).eval()
    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    assert segment_image(segmentor, rgb, scale=None).shape == (32, 48)
    for bad in (rgb[..., 0], rgb.astype(np.float32)):
        with pytest.raises(ValueError, match=r"image 0 must be RGB \(H, W, 3\) uint8"):
            segment_image(segmentor, bad, scale=None)


def test_saved_predictions_of_acdc_score_with_the_printed_commands_and_stay_inside(trained, capsys):
    """ACDC's conditions share gt/, which also holds their train labels: the one printed command
    (score preds/acdc data/acdc/gt) failed on labels without predictions; one per condition now.
    A domain labelled '..' wrote its predictions into the folder above --save-preds."""
    from fake_datasets import make_fake_acdc

    root = trained / "acdc"
    make_fake_acdc(root, n=2, size=(64, 128), splits=("train", "val"))
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    preds, result = trained / "acdc_preds" / "inside", trained / "acdc.json"
    entry = f"{{name: acdc, root: {root}, split: val, scale: [128, 64], label: '..'}}"
    arguments = ["eval", str(trained / "config.yaml"), checkpoint, "--save-preds", str(preds), "--json", str(result)]
    assert main([*arguments, f"data.val=[{entry}]"]) == 0
    out = capsys.readouterr().out
    assert [p.name for p in (trained / "acdc_preds").iterdir()] == ["inside"]  # nothing above
    commands = [line.split()[2:] for line in out.splitlines() if line.strip().startswith("reinseg score")]
    conditions = [Path(labels).relative_to(root / "gt") for _, labels in commands]
    assert conditions == [Path(f"{condition}/val") for condition in ("fog", "night", "rain", "snow")]
    domains = json.loads(result.read_text())["domains"]
    for predicted, labels in commands:
        assert Path(predicted).is_relative_to(preds)
        assert main(["score", predicted, labels, "--json", str(trained / "s.json")]) == 0
        condition = Path(labels).parent.name
        scored = json.loads((trained / "s.json").read_text())
        assert scored["mIoU"] == pytest.approx(domains[f"../{condition}"]["mIoU"], abs=1e-9)


@pytest.mark.slow  # the printed command's oracle: prepare, then score
def test_saved_predictions_of_native_mapillary_score_with_the_printed_command_once_prepared(trained, capsys):
    """Mapillary's prepared labels live in their own folder (the layout's first label source),
    under the native labels' names: the printed command names that folder."""
    from fake_datasets import make_fake_mapillary

    root = trained / "mapillary"
    make_fake_mapillary(root, n=2, size=(64, 128))
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    preds, result = trained / "mapillary_preds", trained / "mapillary.json"
    entry = f"{{name: mapillary, root: {root}, split: val, half: false, scale: [128, 64]}}"
    arguments = ["eval", str(trained / "config.yaml"), checkpoint, "--save-preds", str(preds), "--json", str(result)]
    assert main([*arguments, f"data.val=[{entry}]"]) == 0
    out = capsys.readouterr().out
    assert f"`reinseg prepare mapillary {root}` first" in out
    [command] = [line.split()[2:] for line in out.splitlines() if line.strip().startswith("reinseg score")]
    assert command == [str(preds / "mapillary"), str(root / "cityscapes_trainIdLabel" / "val" / "label")]
    assert main(["prepare", "mapillary", str(root), "--workers", "1"]) == 0
    assert main(["score", *command, "--json", str(trained / "m.json")]) == 0
    scored = json.loads((trained / "m.json").read_text())
    assert scored["mIoU"] == pytest.approx(json.loads(result.read_text())["domains"]["mapillary"]["mIoU"], abs=1e-9)


def test_ctrl_c_stops_an_evaluation_at_the_batch_with_130_and_writes_no_results(
    trained, tmp_path, monkeypatch, python_sigint_handler, capsys
):
    import os
    import signal

    from reinseg.engine import SegmentationTask

    batches = []
    step = SegmentationTask.validation_step

    def pressed_once(self, batch, *args):
        if not batches:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the first batch
        batches.append(len(batch["image"]))
        return step(self, batch, *args)

    monkeypatch.setattr(SegmentationTask, "validation_step", pressed_once)
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    result, preds = tmp_path / "eval.json", tmp_path / "preds"
    command = ["eval", str(trained / "config.yaml"), checkpoint, "--json", str(result), "--save-preds", str(preds)]
    assert main(command) == 130
    err = capsys.readouterr().err
    assert "reinseg eval: evaluation stopped by Ctrl-C (SIGINT): no results written; the predictions in" in err
    assert "Traceback" not in err
    assert batches == [1]  # the batch it came in finished; none after it (3 images)
    assert not result.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # The same command replaces the incomplete predictions: those of a whole evaluation, the
    # marker gone, as a first evaluation into a new folder writes them.
    written = sorted(p.relative_to(preds) for p in preds.rglob("*.png"))
    assert len(written) == 1 and (preds / ".reinseg-incomplete").is_file()
    monkeypatch.setattr(SegmentationTask, "validation_step", step)
    assert main(command) == 0
    assert "removing the incomplete predictions an interrupted evaluation left in" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main([*command[:3], "--json", str(tmp_path / "fresh.json"), "--save-preds", str(fresh)]) == 0
    assert sorted(p.relative_to(preds) for p in preds.rglob("*")) == sorted(
        p.relative_to(fresh) for p in fresh.rglob("*")
    )
    assert not (preds / ".reinseg-incomplete").exists()
    assert len(list(preds.rglob("*.png"))) == 3 and written[0] in [p.relative_to(preds) for p in preds.rglob("*.png")]
    assert json.loads(result.read_text())["domains"] == json.loads((tmp_path / "fresh.json").read_text())["domains"]


def test_ctrl_c_in_another_command_is_one_line_and_status_130(trained, tmp_path, monkeypatch, capsys):
    import reinseg.predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reinseg.predict, "predict_files", interrupted)
    images = trained / "cityscapes" / "leftImg8bit" / "val"
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    assert main(["predict", checkpoint, str(images), "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "reinseg predict: stopped by Ctrl-C\n"


def test_a_predict_stopped_midway_leaves_its_folder_marked_and_score_refuses_it(trained, tmp_path, monkeypatch, capsys):
    """A predict into a folder of earlier predictions, stopped after its first file, left two
    models' files side by side with nothing to tell: the folder now holds `.reinseg-incomplete`
    until a run finishes, `reinseg score` refuses what is under it; a rerun on one image keeps it
    (listing the other's files), and the same command replaces the outputs and removes it."""
    import reinseg.data.io as io
    from reinseg.metrics import score_directories
    from reinseg.unfinished import MARKER

    photos, labels, out = tmp_path / "photos", tmp_path / "labels", tmp_path / "out"
    photos.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)).save(photos / f"{name}.png")
        Image.fromarray(rng.integers(0, 19, (64, 128), dtype=np.uint8)).save(labels / f"{name}_labelTrainIds.png")
    checkpoint = str(trained / "run" / "checkpoints" / "last.ckpt")
    command = ["predict", checkpoint, str(photos), "--output", str(out)]
    write_png = io.write_png
    calls = []

    def stopped_at_the_second_file(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_png(*args, **kwargs)

    monkeypatch.setattr(io, "write_png", stopped_at_the_second_file)
    assert main(command) == 130
    assert (out / MARKER).read_text().splitlines()[1] == "predict"
    with pytest.raises(ValueError, match=r"unfinished: the `reinseg predict` \(.*\) into .* was interrupted"):
        score_directories(out, labels, [str(i) for i in range(19)])
    monkeypatch.setattr(io, "write_png", write_png)
    capsys.readouterr()
    # A rerun on one of the images writes it and keeps the marker, owing the other's files.
    assert main(["predict", checkpoint, str(photos / "b.png"), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "replacing the predictions an interrupted predict left in" in err
    assert "stays marked unfinished" in err and "owes 2 file(s) (a_labelTrainIds.png, a_overlay.png)" in err
    with pytest.raises(ValueError, match=r"2 file\(s\) \(a_labelTrainIds.png, a_overlay.png\) it owes are missing"):
        score_directories(out, labels, [str(i) for i in range(19)])
    assert main(command) == 0
    assert "replacing the predictions an interrupted predict left in" in capsys.readouterr().err
    assert not (out / MARKER).exists()
    assert sorted(p.name for p in out.glob("*.png")) == [
        "a_labelTrainIds.png",
        "a_overlay.png",
        "b_labelTrainIds.png",
        "b_overlay.png",
    ]
