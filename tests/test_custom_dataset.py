"""Your own dataset (docs/datasets.md, "Your own dataset"): class names and palette from the config,
labels 0..N-1 and 255, any N including 2, trained and evaluated from the command line."""

import json
import re

import numpy as np
import pytest
from fake_datasets import make_custom, write_png
from PIL import Image

from reinseg.cli import main
from reinseg.config import ConfigError
from reinseg.data import DataError, build_dataset
from reinseg.data.check import check

CLASSES = ["background", "crack"]
PALETTE = [[0, 0, 0], [255, 0, 0]]


def binary_yaml(root, output, num_classes=2) -> str:
    """The whole configuration a user writes: a toy-size model, the dataset and the run."""
    entry = f"name: custom, root: {root}, classes: {CLASSES}, palette: {PALETTE}, image_suffix: .jpg"
    return f"""
model:
  backbone:
    name: dinov2_vits14
    img_size: 64
    patch_size: 16
    out_indices: [0, 1, 2, 3]
    pretrained: false
    timm_kwargs: {{embed_dim: 32, depth: 4, num_heads: 2}}
  rein: {{token_length: 8, lora_dim: 4, query_dims: 32}}
  head:
    num_classes: {num_classes}
    feat_channels: 32
    out_channels: 32
    num_heads: 4
    num_decoder_layers: 3
    decoder_ffn_dims: 64
    num_encoder_layers: 1
    encoder_ffn_dims: 64
    num_groups: 8
  loss: {{num_points: 256}}
  test: {{mode: whole}}
data:
  train:
    - {{{entry}, split: train}}
  val:
    - {{{entry}, split: val, scale: [128, 64]}}
  crop_size: 64
  base_size: 64
  max_size: 256
  batch_size: 2
  num_workers: 0
train:
  max_iters: 2
  val_interval: 2
  checkpoint_interval: 2
  lr: 0.001
  output_dir: {output}
"""


@pytest.mark.slow
def test_a_binary_dataset_trains_and_evaluates_from_the_command_line(tmp_path, capsys):
    fake = make_custom(tmp_path / "cracks", num_classes=2, n=2, size=(64, 128))
    config = tmp_path / "config.yaml"
    config.write_text(binary_yaml(tmp_path / "cracks", tmp_path / "run"))
    assert main(["train", str(config)]) == 0
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    preds, result = tmp_path / "preds", tmp_path / "eval.json"
    assert main(["eval", str(config), checkpoint, "--save-preds", str(preds), "--json", str(result)]) == 0
    scores = json.loads(result.read_text())["domains"]["custom"]
    assert list(scores["IoU"]) == CLASSES
    val_labels = [labels for image, labels in fake.expected.items() if "/images/val/" in image]
    assert scores["pixels"] == sum(int((labels != 255).sum()) for labels in val_labels)
    # The saved predictions are class indices 0..1 (the head predicts two classes), and scoring
    # them on their own in the config's classes gives the evaluation's numbers.
    saved = [np.asarray(Image.open(p)) for p in sorted(preds.rglob("*.png"))]
    assert len(saved) == len(val_labels) and all(set(np.unique(s)) <= {0, 1} for s in saved)
    assert "--config" in capsys.readouterr().out  # the score command it suggests reads the classes
    scored_json = tmp_path / "scored.json"
    labels = tmp_path / "cracks" / "labels" / "val"
    assert main(["score", str(preds / "custom"), str(labels), "--config", str(config), "--json", str(scored_json)]) == 0
    scored = json.loads(scored_json.read_text())
    assert scored["IoU"] == scores["IoU"] and scored["mIoU"] == scores["mIoU"]
    # Predict's overlays are drawn in the dataset's palette: black/red over the image, never Cityscapes' purple.
    image = next((tmp_path / "cracks" / "images" / "val").rglob("*.jpg"))
    assert main(["predict", checkpoint, str(image), "--output", str(tmp_path / "out")]) == 0
    ids = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_labelTrainIds.png"))
    overlay = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_overlay.png")).astype(int)
    photo = np.asarray(Image.open(image).convert("RGB")).astype(int)
    expected = (0.5 * photo + 0.5 * np.array(PALETTE)[ids]).astype(np.uint8)
    assert np.array_equal(overlay, expected)


def test_head_classes_must_match_the_dataset_classes(tmp_path):
    make_custom(tmp_path / "cracks", num_classes=2, n=1, size=(32, 64))
    config = tmp_path / "config.yaml"
    config.write_text(binary_yaml(tmp_path / "cracks", tmp_path / "run", num_classes=19))
    from reinseg.config import load_config
    from reinseg.engine import train

    with pytest.raises(ConfigError, match=r"model.head.num_classes is 19 but data.train\[0\] \(custom\) has 2 classes"):
        train(load_config(str(config), []), resume="never")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_label_value_outside_the_classes_is_named_with_its_file(tmp_path):
    make_custom(tmp_path / "d", num_classes=3, n=2, size=(32, 64), splits=("val",))
    bad = tmp_path / "d" / "labels" / "val" / "scene1" / "frame_001.png"
    labels = np.zeros((32, 64), dtype=np.uint8)
    labels[3, 5] = 7
    write_png(bad, labels)
    dataset = build_dataset("custom", tmp_path / "d", "val", classes=["a", "b", "c"], image_suffix=".jpg")
    with pytest.raises(DataError, match=re.escape(f"{bad}: label values outside the 3 classes {{0..2, 255}}: {{7}}")):
        dataset.validate()
    [report] = check(tmp_path / "d", dataset="custom", split="val", classes=["a", "b", "c"], image_suffix=".jpg")
    assert report.invalid_values == {str(bad): [7]}
    # 255 is ignore, whatever N: labels of 0, 1 and 255 are a valid binary dataset.
    make_custom(tmp_path / "b", num_classes=2, n=2, size=(32, 64), splits=("val",))
    binary = build_dataset("custom", tmp_path / "b", "val", classes=["a", "b"], image_suffix=".jpg")
    assert binary.validate() == []


def test_check_data_reports_the_histogram_in_the_dataset_classes(tmp_path):
    fake = make_custom(tmp_path / "cracks", num_classes=2, n=2, size=(32, 64))
    config = tmp_path / "config.yaml"
    config.write_text(binary_yaml(tmp_path / "cracks", tmp_path / "run"))
    reports = check(config, progress=False)
    assert [r.name for r in reports] == ["custom", "custom"] and all(r.ok for r in reports)
    val = reports[1].to_dict()["histogram"]
    labels = np.concatenate([v.ravel() for k, v in fake.expected.items() if "/images/val/" in k])
    assert val == {
        "background": int((labels == 0).sum()),
        "crack": int((labels == 1).sum()),
        "ignore": int((labels == 255).sum()),
    }


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "custom needs the option 'classes'"),
        ({"classes": "road"}, "a list of one or more class names"),
        ({"classes": ["a", "a"]}, "class names repeat: \\['a'\\]"),
        ({"classes": ["a", "b"], "palette": [[0, 0, 0]]}, "the palette needs one \\[r, g, b\\] per class \\(2\\)"),
        ({"classes": ["a"], "colours": [[0, 0, 0]]}, "custom takes no option colours"),
    ],
)
def test_bad_class_options_are_named(tmp_path, options, message):
    make_custom(tmp_path / "d", num_classes=2, n=1, size=(32, 64), splits=("val",))
    with pytest.raises(ValueError, match=message):
        build_dataset("custom", tmp_path / "d", "val", image_suffix=".jpg", **options)


def test_check_data_does_not_take_your_own_dataset_for_gtav(tmp_path, caplog):
    """Both keep images/ and labels/; GTAV's frames lie directly in images/ (read with GTAV's
    label IDs, your own labels would be counted as the wrong classes)."""
    from fake_datasets import make_fake_gtav

    make_custom(tmp_path / "data" / "cracks", num_classes=2, n=1, size=(32, 64), splits=("val",))
    make_fake_gtav(tmp_path / "data" / "gta", n=1, prepared=True)
    with pytest.raises(ValueError, match=r"cracks has the layout of your own dataset .* --dataset custom"):
        check(tmp_path / "data" / "cracks", progress=False)
    with caplog.at_level("WARNING"):
        reports = check(tmp_path / "data", progress=False)
    assert [(r.name, r.root) for r in reports] == [("gtav", str(tmp_path / "data" / "gta"))]
    assert "skipping" in caplog.text and "cracks has the layout of your own dataset" in caplog.text
    reports = check(tmp_path / "data" / "cracks", dataset="custom", split="val", classes=CLASSES, image_suffix=".jpg")
    assert [r.name for r in reports] == ["custom"] and reports[0].ok


@pytest.mark.parametrize(
    "text, message",
    [
        ("3\n", "must hold a mapping"),
        ("data:\n\tval: []\n", "is not valid YAML"),
        ("data:\n  vall: []\n", "vall"),
        ("data:\n  val:\n    - {name: custom, root: r, classes: 3}\n", "classes"),
    ],
)
def test_score_names_a_malformed_config(tmp_path, capsys, text, message):
    (tmp_path / "p").mkdir()
    (tmp_path / "config.yaml").write_text(text)
    assert main(["score", str(tmp_path / "p"), str(tmp_path / "p"), "--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and message in err and "Traceback" not in err
