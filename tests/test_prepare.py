import argparse
import json

import numpy as np
import pytest
import yaml
from conftest import killed_writers_leftover
from fake_datasets import FAKE_MAKERS, make_fake_cityscapes, make_fake_gtav, make_fake_mapillary, write_png
from PIL import Image

from reinseg.data import build_dataset
from reinseg.data.check import check, config_entries, detect_dataset
from reinseg.data.commands import register_commands
from reinseg.data.io import read_label
from reinseg.data.prepare import PREPARABLE, prepare

# The converters' outputs, as in the official tools and docs/datasets.md.
OUTPUT = {
    "gtav": ("labels/00001.png", "labels/00001_labelTrainIds.png"),
    "synthia": ("GT/LABELS/0000000.png", "GT/LABELS/0000000_labelTrainIds.png"),
    "urbansyn": ("ss/ss_0001.png", "ss/ss_0001_labelTrainIds.png"),
    "cityscapes": (
        "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png",
        "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
    ),
    "mapillary": (
        "training/v1.2/labels/t00Xy_Zz0123456789.png",
        "cityscapes_trainIdLabel/train/label/t00Xy_Zz0123456789.png",
    ),
}


@pytest.mark.parametrize("name", list(PREPARABLE))
def test_prepare_writes_train_id_labels_once(tmp_path, name):
    fake = FAKE_MAKERS[name](tmp_path)
    written = tmp_path / OUTPUT[name][1]
    leftover = killed_writers_leftover(written.parent, written.name)  # a killed preparation's
    summary = prepare(name, tmp_path, workers=1, progress=False)
    assert not leftover.exists()
    assert summary.ok and not summary.mismatched and not summary.skipped
    assert str(tmp_path / OUTPUT[name][1]) in summary.written
    assert (tmp_path / OUTPUT[name][0]).exists()  # the native label stays
    for split in ("train",) if name != "cityscapes" else ("train", "val"):
        dataset = build_dataset(name, tmp_path, split)
        assert all(
            label.endswith("_labelTrainIds.png") or "/cityscapes_trainIdLabel/" in label for _, label in dataset.pairs
        )
        for item in dataset:
            assert np.array_equal(item["label"].numpy(), fake.expected[item["image_path"]])
    again = prepare(name, tmp_path, workers=1, progress=False)
    assert not again.written and sorted(again.skipped) == sorted(summary.written)
    assert len(prepare(name, tmp_path, workers=1, overwrite=True, progress=False).written) == len(summary.written)


def test_prepare_runs_on_several_processes(tmp_path):
    fake = make_fake_gtav(tmp_path, n=4)
    summary = prepare("gtav", tmp_path, workers=2, progress=False)
    assert len(summary.written) == 4
    for image, expected in fake.expected.items():
        label = image.replace("images", "labels").replace(".png", "_labelTrainIds.png")
        assert np.array_equal(read_label(label), expected)


def test_prepare_mapillary_makes_the_half_resolution_validation_set(tmp_path):
    fake = make_fake_mapillary(tmp_path, n=2, size=(32, 64))
    with pytest.raises(FileNotFoundError, match=r"half/val_img .*`reinseg prepare mapillary .*` writes it; half=False"):
        build_dataset("mapillary", tmp_path, "val")
    summary = prepare("mapillary", tmp_path, workers=1, progress=False)
    # 2 train and 2 val labels, and the 2 val images and labels at half resolution: every file written
    assert summary.ok and len(summary.written) == 8
    assert sum("/half/" in path for path in summary.written) == 4
    half = build_dataset("mapillary", tmp_path, "val")  # the official evaluation set: half/
    assert all("/half/val_img/" in image and "/half/val_label/" in label for image, label in half.pairs)
    for item in half:
        assert item["image"].shape == (3, 16, 32) and item["ori_size"] == (16, 32)
        full = fake.expected[item["image_path"].replace("half/val_img", "validation/images")]
        assert np.array_equal(item["label"].numpy(), full[::2, ::2])  # nearest of the full labels


@pytest.mark.parametrize(
    "policy, written, action",
    [("resize", True, "label resized to the image (nearest)"), ("skip", False, "not converted")],
)
def test_prepare_handles_labels_whose_size_differs_from_their_image(tmp_path, policy, written, action):
    make_fake_gtav(tmp_path, n=2)
    write_png(tmp_path / "labels" / "00002.png", np.full((16, 32), 26, np.uint8), palette=True)
    summary = prepare("gtav", tmp_path, workers=1, on_mismatch=policy, progress=False)
    label = str(tmp_path / "labels" / "00002.png")
    assert summary.mismatched == [(label, "32x64", "16x32", action)]
    output = tmp_path / "labels" / "00002_labelTrainIds.png"
    assert output.exists() == written
    if written:
        assert read_label(output).shape == (32, 64) and np.all(read_label(output) == 13)
    assert "size mismatch" in str(summary) and label in str(summary)


def test_prepare_reports_mismatches_as_errors_when_asked(tmp_path):
    make_fake_gtav(tmp_path, n=1)
    write_png(tmp_path / "labels" / "00001.png", np.zeros((8, 8), np.uint8), palette=True)
    summary = prepare("gtav", tmp_path, workers=1, on_mismatch="raise", progress=False)
    assert not summary.ok and summary.errors[0][0] == str(tmp_path / "labels" / "00001.png")
    assert not (tmp_path / "labels" / "00001_labelTrainIds.png").exists()


def test_prepare_never_converts_unknown_values(tmp_path):
    make_fake_gtav(tmp_path, n=2)
    write_png(tmp_path / "labels" / "00002.png", np.full((32, 64), 200, np.uint8), palette=True)
    summary = prepare("gtav", tmp_path, workers=1, progress=False)
    assert summary.errors == [
        (str(tmp_path / "labels" / "00002.png"), "label values outside the GTAV label IDs {0..34}: {200}")
    ]
    assert len(summary.written) == 1 and not (tmp_path / "labels" / "00002_labelTrainIds.png").exists()


def test_prepare_rejects_what_needs_no_preparation(tmp_path):
    with pytest.raises(ValueError, match="bdd100k needs no preparation"):
        prepare("bdd100k", tmp_path)
    with pytest.raises(ValueError, match="valid: gtav, synthia, urbansyn, cityscapes, mapillary"):
        prepare("kitti", tmp_path)
    with pytest.raises(ValueError, match="on_mismatch"):
        prepare("gtav", tmp_path, on_mismatch="crop")
    with pytest.raises(FileNotFoundError, match="no gtav labels to convert"):
        prepare("gtav", tmp_path)


# --- check-data -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAKE_MAKERS))
def test_detect_dataset_by_layout(tmp_path, name):
    FAKE_MAKERS[name](tmp_path)
    assert detect_dataset(tmp_path) == name


def test_check_of_a_folder_of_dataset_roots_checks_each(tmp_path):
    """data/ holding cityscapes/ and gta/ was taken for a synthetic benchmark of one domain, and
    GTAV was never looked at."""
    make_fake_cityscapes(tmp_path / "cityscapes", n=2, splits=("val",))
    make_fake_gtav(tmp_path / "gta", n=3)
    write_png(next((tmp_path / "gta" / "labels").glob("*.png")), np.full((32, 64), 200, np.uint8))
    reports = check(tmp_path, workers=1, progress=False)
    assert sorted((r.name, r.split, r.pairs, r.ok) for r in reports) == [
        ("cityscapes", "val", 2, True),
        ("gtav", "train", 3, False),
    ]
    with pytest.raises(ValueError, match="a folder of them"):
        check(tmp_path, split="val", progress=False)


def test_a_folder_of_splits_is_not_taken_for_dataset_roots(tmp_path):
    """A custom dataset's train/ and val/ (each images/ + labels/, GTAV's folders) are one dataset
    to name, not two GTAV roots."""
    for split in ("train", "val"):
        make_fake_gtav(tmp_path / split, n=1)
    with pytest.raises(ValueError, match="cannot tell which dataset"):
        check(tmp_path, progress=False)


def test_a_scratch_folder_named_like_a_split_beside_dataset_roots_is_skipped(tmp_path):
    make_fake_cityscapes(tmp_path / "cityscapes", n=1, splits=("val",))
    (tmp_path / "test").mkdir()
    assert [r.name for r in check(tmp_path, workers=1, progress=False)] == ["cityscapes"]


def test_check_reports_every_problem_with_its_file(tmp_path):
    make_fake_cityscapes(tmp_path, n=3, splits=("val",))
    val = tmp_path / "gtFine" / "val"
    labels = sorted(val.rglob("*_labelIds.png"))
    write_png(labels[0], np.full((32, 64), 99, np.uint8))  # Cityscapes IDs stop at 33
    write_png(labels[1], np.full((16, 64), 7, np.uint8))  # wrong size
    labels[2].unlink()  # an image without its label
    (report,) = check(tmp_path, workers=1, progress=False)
    assert (report.name, report.split, report.pairs, report.ok) == ("cityscapes", "val", 2, False)
    assert [p for p, _ in report.missing_partners] == [
        str(labels[2]).replace("_gtFine_labelIds", "_leftImg8bit").replace("/gtFine/", "/leftImg8bit/")
    ]
    assert report.invalid_values == {str(labels[0]): [99]}
    assert [p.path for p in report.of_kind("size mismatch")] == [str(labels[1])]
    # Only the valid labels count: one of 16x64 pixels, all road.
    assert report.histogram.sum() == 16 * 64 and report.histogram[0] == 16 * 64
    text = report.format()
    assert "label values outside" in text and str(labels[0]) in text and "road 100.0%" in text


def test_check_counts_classes_of_clean_data(tmp_path):
    fake = make_fake_gtav(tmp_path, n=2)
    (report,) = check(tmp_path, "gtav", workers=2, progress=False)
    assert report.ok and report.pairs == 2
    expected = np.concatenate([e.ravel() for e in fake.expected.values()])
    assert report.histogram.tolist() == np.bincount(np.where(expected == 255, 19, expected), minlength=20).tolist()


def test_check_reads_a_yaml_config(tmp_path):
    make_fake_gtav(tmp_path / "gta")
    FAKE_MAKERS["acdc"](tmp_path / "acdc", conditions=("night",))
    config = {
        "data": {
            "train": [{"name": "gtav", "root": str(tmp_path / "gta"), "split": "train"}],
            "val": [{"name": "acdc", "root": str(tmp_path / "acdc"), "split": "val", "condition": "night"}],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert [e["section"] for e in config_entries(path)] == ["train", "val"]
    reports = check(path, workers=1, progress=False)
    assert [(r.name, r.split, r.pairs) for r in reports] == [("gtav", "train", 2), ("acdc/night", "val", 2)]
    path.write_text("model: {}\n")
    with pytest.raises(ValueError, match="no 'data' section"):
        check(path)


def test_check_raises_on_the_first_problem_when_asked(tmp_path):
    make_fake_gtav(tmp_path, n=2)
    (tmp_path / "images" / "00002.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="00002.png: unreadable"):
        check(tmp_path, on_error="raise", workers=1, progress=False)


# --- the commands ---------------------------------------------------------------------------


@pytest.fixture
def parser():
    parser = argparse.ArgumentParser(prog="reinseg")
    register_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("command", ["prepare", "check-data"])
def test_commands_have_help_with_an_example(parser, capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "--workers" in out


def test_prepare_command(parser, tmp_path, capsys):
    make_fake_gtav(tmp_path, n=2)
    args = parser.parse_args(["prepare", "gtav", str(tmp_path), "--workers", "1"])
    assert args.func(args) == 0
    assert "2 files written, 0 skipped" in capsys.readouterr().out
    args = parser.parse_args(["prepare", "gtav", str(tmp_path), "--workers", "1"])
    assert args.func(args) == 0
    assert "0 files written, 2 skipped" in capsys.readouterr().out
    write_png(tmp_path / "labels" / "00002.png", np.full((32, 64), 250, np.uint8), palette=True)
    args = parser.parse_args(["prepare", "gtav", str(tmp_path), "--workers", "1", "--overwrite"])
    assert args.func(args) == 1
    assert "{250}" in capsys.readouterr().out


def test_check_data_command(parser, tmp_path, capsys):
    make_fake_cityscapes(tmp_path, n=2)
    out_json = tmp_path / "report.json"
    args = parser.parse_args(["check-data", str(tmp_path), "--workers", "1", "--json", str(out_json)])
    assert args.func(args) == 0
    assert "all datasets are clean" in capsys.readouterr().out
    reports = json.loads(out_json.read_text())
    assert [(r["split"], r["pairs"], r["ok"]) for r in reports] == [("train", 2, True), ("val", 2, True)]
    assert sum(reports[0]["histogram"].values()) == 2 * 32 * 64
    Image.new("RGB", (64, 30)).save(next((tmp_path / "leftImg8bit" / "val").rglob("*.png")))
    args = parser.parse_args(["check-data", str(tmp_path), "--split", "val", "--workers", "1"])
    assert args.func(args) == 1
    assert "size mismatches: 1" in capsys.readouterr().out
    args = parser.parse_args(["check-data", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="missing"):
        args.func(args)


def test_the_command_says_a_dataset_needs_no_preparation_and_succeeds(tmp_path, capsys):
    """A script preparing every dataset must not stop at BDD100K or ACDC."""
    from reinseg.cli import main

    assert main(["prepare", "acdc", str(tmp_path)]) == 0
    assert "acdc needs no preparation: its labels are already train IDs" in capsys.readouterr().out
