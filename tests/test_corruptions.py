"""Cityscapes-C: the corruptions against the imagecorruptions package (the published
definitions), determinism by seed, the count of domains and their summary."""

import importlib.resources
import re
import sys
import types

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from fake_datasets import make_fake_cityscapes

from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
from reinseg.config import Config, ConfigError, DataConfig, TrainConfig, to_dict
from reinseg.data.corruptions import CORRUPTIONS, Corrupt, corrupt
from reinseg.data.entries import parse_entries
from reinseg.engine import evaluate

# Kamann & Rother (CVPR 2020): blur, noise, digital and weather, four each.
SIXTEEN = {
    "motion_blur", "defocus_blur", "glass_blur", "gaussian_blur",
    "gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise",
    "brightness", "contrast", "saturate", "jpeg_compression",
    "snow", "spatter", "fog", "frost",
}  # fmt: skip


@pytest.fixture(scope="module")
def package():
    """imagecorruptions 1.1.2, with what it needs of older NumPy, scikit-image and setuptools
    put back (names only: ``np.float_``, ``gaussian(multichannel=)``, ``pkg_resources``)."""
    pytest.importorskip("skimage")
    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = lambda package, name: str(importlib.resources.files(package.rpartition(".")[0]) / name)
    saved = sys.modules.get("pkg_resources")
    sys.modules["pkg_resources"] = shim
    had_float = hasattr(np, "float_")
    np.float_ = np.float64
    try:
        corruptions = pytest.importorskip("imagecorruptions.corruptions")
        import imagecorruptions
        from skimage.filters import gaussian

        def old_gaussian(image, sigma, multichannel=False, **kwargs):
            return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)

        corruptions.gaussian = old_gaussian
        yield imagecorruptions
    finally:
        if saved is None:
            sys.modules.pop("pkg_resources", None)
        if not had_float:
            del np.float_


def test_the_sixteen_corruptions_of_the_segmentation_benchmark():
    assert set(CORRUPTIONS) == SIXTEEN


@pytest.mark.parametrize("name", sorted(SIXTEEN - {"impulse_noise"}))
def test_corruptions_equal_the_imagecorruptions_package(package, name):
    image = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    image[:, :40] //= 3  # some structure: edges for the blurs, dark and light halves
    for severity in (1, 3, 5):
        np.random.seed(7)
        theirs = package.corrupt(image, corruption_name=name, severity=severity)
        ours = corrupt(image, name, severity, np.random.RandomState(7))
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} at severity {severity}")


def test_impulse_noise_flips_the_published_share_of_values():
    # The package draws impulse noise from a generator no seed reaches: its definition is the
    # share of values set to 0 or 255 (half each), 0.03 .. 0.27 by severity.
    image = np.full((200, 300, 3), 128, dtype=np.uint8)
    for severity, amount in zip((1, 2, 3, 4, 5), (0.03, 0.06, 0.09, 0.17, 0.27), strict=True):
        noisy = corrupt(image, "impulse_noise", severity, np.random.RandomState(0))
        salt, pepper = (noisy == 255).mean(), (noisy == 0).mean()
        assert abs(salt + pepper - amount) < 0.01 and abs(salt - pepper) < 0.01
        assert ((noisy == 128) | (noisy == 255) | (noisy == 0)).all()


def test_corrupted_images_are_deterministic_by_seed_and_change_the_image():
    image = np.random.default_rng(2).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    for name in sorted(SIXTEEN - {"frost"}):
        first = Corrupt(name, 3)(image, rng=[0, 0, 5])[0]
        assert np.array_equal(first, Corrupt(name, 3)(image, rng=[0, 0, 5])[0]), name
        assert not np.array_equal(first, image), name
    # Another image index, seed or severity draws other noise.
    noise = Corrupt("gaussian_noise", 3)
    assert not np.array_equal(noise(image, rng=[0, 0, 5])[0], noise(image, rng=[0, 0, 6])[0])
    assert not np.array_equal(noise(image, rng=[0, 0, 5])[0], noise(image, rng=[1, 0, 5])[0])


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "speckle_noise", "gaussian_blur", "contrast"])
def test_higher_severities_change_the_image_more(name):
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    change = [np.abs(corrupt(image, name, s, np.random.RandomState(0)).astype(int) - image).mean() for s in range(1, 6)]
    assert change == sorted(change) and change[0] < change[-1]


def test_an_entry_with_every_corruption_is_sixteen_times_five_domains():
    (entry,) = parse_entries([dict(name="cityscapes", root="cs", corruptions="all")], "val")
    domains = entry.expanded()
    assert len(domains) == 80
    assert {d.label for d in domains} == {f"cityscapes-c/{n}/{s}" for n in SIXTEEN for s in range(1, 6)}
    assert not any(d.in_mean for d in domains)


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(corruptions=["fogg"]), "data.val[0].corruptions must be 'all' or a list"),
        (dict(corruptions="all", severities=[0, 6]), "data.val[0].severities must be a list of integers in 1..5"),
        (dict(severities=[1]), "severities and corruption_seed need corruptions"),
        (dict(corruptions="all", corruption_seed=-1), "corruption_seed must be a non-negative integer"),
    ],
)
def test_bad_corruption_keys_are_named(keys, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_entries([dict(name="cityscapes", root="cs", **keys)], "val")


def test_corrupted_domains_are_evaluated_with_the_mean_per_severity(tmp_path):
    torch.manual_seed(0)
    model = tiny_model_config()
    checkpoint = tmp_path / "tiny.ckpt"
    save_checkpoint(checkpoint, {"model": to_dict(model)}, checkpoint_state_dict(build_segmentor(model)))
    make_fake_cityscapes(tmp_path / "cs", n=2, size=(32, 64), splits=("val",), prepared=True)
    entry = dict(name="cityscapes", root=str(tmp_path / "cs"), scale=[64, 32])
    corrupted = dict(entry, corruptions=["gaussian_noise", "contrast"], severities=[1, 5], corruption_seed=3)
    config = Config(
        model=model,
        data=DataConfig(val=[entry, corrupted], num_workers=0),
        train=TrainConfig(output_dir=str(tmp_path / "run"), accelerator="cpu", devices=1),
    )
    results = evaluate(config, str(checkpoint)).last_results
    names = [f"cityscapes-c/{n}/{s}" for n in ("gaussian_noise", "contrast") for s in (1, 5)]
    assert list(results["domains"]) == ["cityscapes", *names]
    assert results["mean_domains"] == ["cityscapes"]
    summary = results["corruptions"]["cityscapes-c"]
    for severity in (1, 5):
        scores = [results["domains"][f"cityscapes-c/{n}/{severity}"]["mIoU"] for n in ("gaussian_noise", "contrast")]
        assert summary["per_severity"][str(severity)] == pytest.approx(np.mean(np.round(scores, 2)))
    again = evaluate(config, str(checkpoint)).last_results
    assert again["domains"] == results["domains"]  # the same corrupted images


def test_a_config_with_bad_corruptions_is_refused_by_evaluate(tmp_path):
    config = Config(
        model=tiny_model_config(),
        data=DataConfig(val=[dict(name="cityscapes", root=str(tmp_path), corruptions=["rainbow"])]),
    )
    with pytest.raises(ConfigError, match="corruptions must be 'all' or a list"):
        evaluate(config, str(tmp_path / "none.ckpt"))


def test_frost_without_the_package_pictures_is_refused_by_name(monkeypatch):
    import reinseg.data.corruptions as corruptions

    monkeypatch.setattr(corruptions.importlib.util, "find_spec", lambda name: None)
    image = np.zeros((40, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="frost corruption .* imagecorruptions package, which is not installed"):
        corrupt(image, "frost", 1, np.random.RandomState(0))
    with pytest.raises(ValueError, match="unknown corruption 'blizzard'"):
        corrupt(image, "blizzard", 1, np.random.RandomState(0))
    with pytest.raises(ValueError, match="at least 32x32"):
        corrupt(image[:8], "fog", 1, np.random.RandomState(0))


def test_the_image_as_seen_is_the_corrupted_one_the_model_was_given(tmp_path):
    """What --save-examples shows beside a Cityscapes-C prediction: the corrupted image, drawn as
    the evaluated item drew it (the clean file would misstate what was segmented)."""
    from reinseg.data import IMAGENET_MEAN, IMAGENET_STD
    from reinseg.data.io import read_image

    make_fake_cityscapes(tmp_path / "cs", n=2, size=(32, 64), splits=("val",), prepared=True)
    entry = dict(name="cityscapes", root=str(tmp_path / "cs"), scale=[64, 32])
    noise = dict(corruptions=["gaussian_noise"], severities=[5], corruption_seed=3)
    (corrupted,) = parse_entries([entry | noise], "val")[0].expanded()
    (clean,) = parse_entries([entry], "val")
    noisy, plain = corrupted.build(), clean.build()
    for index in range(2):
        seen = noisy.image_as_seen(index)
        given = noisy[index]["image"].permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
        assert np.abs(given - seen).max() < 1e-3  # at its own size: the normalised item is this image
        assert not np.array_equal(seen, read_image(noisy.pairs[index][0]))
        assert np.array_equal(plain.image_as_seen(index), read_image(plain.pairs[index][0]))


@pytest.mark.slow
def test_saved_examples_of_a_corrupted_domain_show_the_corrupted_image(tmp_path):
    import json

    from PIL import Image

    from reinseg.cli import main
    from reinseg.config import dump_config

    model = tiny_model_config()
    checkpoint = tmp_path / "tiny.ckpt"
    save_checkpoint(checkpoint, {"model": to_dict(model)}, checkpoint_state_dict(build_segmentor(model)))
    make_fake_cityscapes(tmp_path / "cs", n=2, size=(32, 64), splits=("val",), prepared=True)
    entry = dict(name="cityscapes", root=str(tmp_path / "cs"), scale=[64, 32])
    noisy = dict(entry, corruptions=["gaussian_noise"], severities=[5], corruption_seed=3)
    config = Config(
        model=model, data=DataConfig(val=[entry, noisy], num_workers=0), train=TrainConfig(accelerator="cpu")
    )
    (tmp_path / "config.yaml").write_text(dump_config(config))
    result = tmp_path / "results.json"
    assert (
        main(["eval", str(tmp_path / "config.yaml"), str(checkpoint), "--json", str(result), "--save-examples", "1"])
        == 0
    )
    domains = json.loads(result.read_text())["domains"]
    (dataset,) = parse_entries([noisy], "val")[0].expanded()
    noisy_set = dataset.build()
    for domain, built in (("cityscapes-c/gaussian_noise/5", noisy_set), ("cityscapes", None)):
        example = domains[domain]["examples"]["best"][0]
        shown = np.asarray(Image.open(tmp_path / example["files"]["image"]))
        index = [str(label) for _, label in (built or noisy_set).pairs].index(example["label"])
        expected = built.image_as_seen(index) if built else np.asarray(Image.open(example["image"]).convert("RGB"))
        assert np.array_equal(shown, expected), domain
