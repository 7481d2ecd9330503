"""One parser for the dataset entries of a config: training, evaluation and check-data read
``data.train`` / ``data.val`` the same way."""

import pytest
from fake_datasets import make_custom, make_fake_cityscapes

from reinseg.config import Config, ConfigError, DataConfig
from reinseg.data.check import check, config_dataset_entries
from reinseg.data.entries import DatasetEntry, parse_entries
from reinseg.datamodule import check_num_classes, validation_sets


def test_evaluation_keys_are_read_only_in_validation_entries():
    [val] = parse_entries(
        [{"name": "acdc", "root": "r", "condition": "night", "scale": [960, 540], "label": "n"}], "val"
    )
    assert (val.split, val.options, val.scale, val.label, val.in_mean) == (
        "val",
        {"condition": "night"},
        (960, 540),
        "n",
        True,
    )
    assert val.eval_scale() == (960, 540) and val.where == "data.val[0]"
    [plain] = parse_entries([{"name": "acdc", "root": "r"}], "val")
    assert plain.eval_scale() == (1920, 1080)  # the dataset's own test scale
    [train] = parse_entries([{"name": "gtav", "root": "r", "scale": [1, 1]}], "train")
    assert train.split == "train" and train.options == {"scale": [1, 1]} and train.scale is None


def test_a_bad_entry_is_named_by_its_place(tmp_path):
    with pytest.raises(ValueError, match=r"data.val\[1\]: dataset entry \{'name': 'acdc'\} lacks 'root'"):
        parse_entries([{"name": "gtav", "root": "r"}, {"name": "acdc"}], "val")
    with pytest.raises(ValueError, match=r"data.train\[0\]: a dataset entry is a mapping"):
        parse_entries(["gtav"], "train")
    config = Config(data=DataConfig(val=[{"name": "cityscapes"}]))
    with pytest.raises(ConfigError, match=r"data.val\[0\]: .* lacks 'root'"):
        validation_sets(config)
    config = Config(data=DataConfig(val=[{"name": "custom", "root": "r", "classes": ["a", "a"]}]))
    with pytest.raises(ConfigError, match=r"data.val\[0\]: custom dataset option 'classes': class names repeat"):
        check_num_classes(config)


def test_check_data_reads_a_config_as_evaluation_does(tmp_path):
    """A validation entry without a split is the val split for check-data as for evaluation."""
    make_fake_cityscapes(tmp_path / "cs", n=1, splits=("val",), prepared=True)
    make_custom(tmp_path / "mine", num_classes=2, n=1, splits=("val",))
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"data:\n  val:\n    - {{name: cityscapes, root: {tmp_path / 'cs'}, scale: [128, 64]}}\n"
        f"    - {{name: custom, root: {tmp_path / 'mine'}, classes: [a, b], image_suffix: .jpg, label: mine}}\n"
    )
    entries = config_dataset_entries(config_file)
    assert [(e.name, e.split, e.where, e.section) for e in entries] == [
        ("cityscapes", "val", "data.val[0]", "val"),
        ("custom", "val", "data.val[1]", "val"),
    ]
    config = Config(
        model=Config().model, data=DataConfig(val=[dict(e.options, name=e.name, root=e.root) for e in entries])
    )
    assert [d.name for _, d, _ in validation_sets(config)] == [r.name for r in check(config_file, progress=False)]
    assert isinstance(entries[1], DatasetEntry) and entries[1].classes().names == ("a", "b")


@pytest.mark.parametrize("crop, size", [(512, (512, 1024)), (1024, (1024, 2048)), ([1024, 512], (1024, 2048))])
def test_validation_scales_an_entry_without_scale_as_the_official_configs_of_its_crop(tmp_path, crop, size):
    """Cityscapes in configs/_base_/datasets/cityscapes_512x512.py is tested at 1024x512, in
    cityscapes_1024x1024.py at 2048x1024: validation during training follows the crop."""
    make_fake_cityscapes(tmp_path / "cs", n=1, size=(16, 32), splits=("val",), prepared=True)
    config = Config(data=DataConfig(val=[{"name": "cityscapes", "root": str(tmp_path / "cs")}]))
    config.model.backbone.img_size = crop
    [(_, dataset, _)] = validation_sets(config)
    assert tuple(dataset[0]["image"].shape[-2:]) == size


def test_a_corrupted_entry_builds_corrupted_images_and_val_lists_build_as_evaluation_reads_them(tmp_path):
    """entry.expanded()[k].build() gave the clean images under a Cityscapes-C label; build_datasets
    refused a data.val list's own keys (scale, in_mean, ...)."""
    import torch

    from reinseg.data import build_datasets

    make_fake_cityscapes(tmp_path / "cs", n=1, splits=("val",), prepared=True)
    entry = {"name": "cityscapes", "root": str(tmp_path / "cs"), "scale": [32, 16], "in_mean": False}
    corrupted = dict(entry, corruptions=["gaussian_noise"], severities=[5])
    [noisy] = parse_entries([corrupted], "val")[0].expanded()
    [clean] = parse_entries([entry], "val")
    assert noisy.label == "cityscapes-c/gaussian_noise/5"
    noisy_image, clean_image = noisy.build()[0]["image"], clean.build()[0]["image"]
    assert noisy_image.shape == clean_image.shape and not torch.equal(noisy_image, clean_image)
    assert torch.equal(noisy.build()[0]["image"], noisy_image)  # seeded by corruption_seed
    assert torch.equal(noisy.build(seed=None)[0]["image"], noisy_image)
    # The evaluation's own datasets are the same (validation_sets builds through entry.build).
    config = Config(data=DataConfig(val=[corrupted]))
    [(domain, _, _)] = validation_sets(config)
    assert domain == "cityscapes-c/gaussian_noise/5"
    datasets = build_datasets([entry, corrupted], section="val")
    assert [d.name for d in datasets] == ["cityscapes", "cityscapes-c/gaussian_noise/5"]
    # Each at its entry's scale (the fake images are 32 x 64: fit in 32 x 16 -> 16 x 32), as
    # validation_sets builds them.
    assert [tuple(d[0]["image"].shape) for d in datasets] == [(3, 16, 32)] * 2
    [(_, validated, _)] = validation_sets(Config(data=DataConfig(val=[corrupted])))
    assert torch.equal(datasets[1][0]["image"], validated[0]["image"])
    with pytest.raises(ValueError, match=r"scale, in_mean are keys of data.val entries: .*section='val'"):
        build_datasets([entry])


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(name=["cityscapes"], root="data/cs"), r"val\[0\]: name must be a non-empty string, got \['cityscapes'\]"),
        (dict(name="cityscapes", root=None), r"val\[0\]: root must be a non-empty string, got None"),
        (dict(name="cityscapes", root=""), r"val\[0\]: root must be a non-empty string, got ''"),
        (dict(name="cityscapes", root="data/cs", split=1), r"val\[0\]: split must be a non-empty string, got 1"),
        (dict(name="cityscapes", root="data/cs", label=1), r"val\[0\]: label must be a non-empty string, got 1"),
        (dict(name="cityscapes", root="data/cs", label=["a"]), r"label must be a non-empty string, got \['a'\]"),
    ],
)
def test_entry_names_roots_splits_and_labels_are_strings(entry, message):
    """A list or a number there failed deep in the run (a label after the first validation)."""
    with pytest.raises(ValueError, match=message):
        parse_entries([entry], "val")
