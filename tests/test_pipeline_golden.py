"""reinseg's data pipelines against the official ones (mmseg 1.2.2 / mmcv 2.1 / opencv 4.11).

tests/data/pipeline_golden.npz is made by tests/golden/make_pipeline_golden.py, which runs the
official transforms and data preprocessor built from the official Rein configs. Training samples
replay the official random draws (each checked against the range reinseg asks for) and must give
the same model input and label bit for bit; evaluation samples must give the same model input
(SHA-256 of the float32 tensor) and keep the label at its own size.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fake_datasets import write_png
from golden.pipeline_inputs import block_label, sha256, smooth_image

from reinseg.config import load_config
from reinseg.data.datasets import read_pair
from reinseg.data.prepare import _write_half
from reinseg.data.transforms import Compose, RandomFlip, RandomResizeShortestEdge, eval_transform, train_transform
from reinseg.engine import prediction_at_size, validation_sets

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parents[1] / "configs"
GOLDEN = np.load(DATA / "pipeline_golden.npz")
META = json.loads(GOLDEN["meta"].tobytes())
TRAIN = {sample["name"]: sample for sample in META["train"]}
EVAL = {sample["name"]: sample for sample in META["eval"]}


class Replay:
    """Hands reinseg's transforms the official pipeline's draws, in order, and checks that each
    one is asked for with the same distribution (kind and range) the official code used."""

    def __init__(self, draws):
        self.draws = [tuple(d) for d in draws]

    def _next(self, kind, low, high):
        assert self.draws, f"reinseg draws more than the official pipeline: {kind}({low}, {high})"
        official = self.draws.pop(0)
        assert official[:3] == (kind, low, high), f"reinseg asks for {kind}({low}, {high}), official drew {official}"
        return official[3]

    def integers(self, low, high=None):
        return self._next("integers", *((0, low) if high is None else (low, high)))

    def uniform(self, low, high):
        return self._next("uniform", float(low), float(high))

    def random(self):
        # mmcv's RandomFlip draws np.random.choice(["horizontal", None], p=[prob, 1 - prob]);
        # reinseg compares random() with prob: 0 flips, anything just below 1 does not.
        flipped = self._next("flip", self.flip_prob, None)
        return 0.0 if flipped else 1.0 - 2.0**-53

    flip_prob = 0.5


def _train_inputs(tmp_path: Path, sample: dict):
    h, w = sample["size"]
    image = smooth_image(sample["seed"], h, w)
    label = block_label(sample["seed"], h, w, dominant=sample["dominant"])
    # The inputs are regenerated, not stored: first make sure they are the official run's.
    assert sha256(image) == sample["input_sha256"] and sha256(label) == sample["label_input_sha256"]
    return write_png(tmp_path / "image.png", image), write_png(tmp_path / "label.png", label)


def _recipe(sample: dict) -> Compose:
    crop = sample["crop"]
    transform = train_transform(crop_size=crop, base_size=crop, max_size=4 * crop)
    assert [t.prob for t in transform.transforms if isinstance(t, RandomFlip)] == [Replay.flip_prob]
    return transform


@pytest.mark.parametrize(
    "name",
    # The padded sample's output is also compared whole in the fast tier (test_padded_official_recipe...).
    [pytest.param(n, marks=pytest.mark.slow if n == "gtav_512_padded" else ()) for n in TRAIN],
)
def test_training_sample_is_bit_identical_to_the_official_pipeline(tmp_path, name):
    sample = TRAIN[name]
    image, label = read_pair(*map(str, _train_inputs(tmp_path, sample)))
    transform = _recipe(sample)
    # Before normalisation: the unpadded, flipped, photometrically distorted uint8 crop.
    steps = transform.transforms
    assert [type(t).__name__ for t in steps] == [
        "RandomResizeShortestEdge",
        "RandomCrop",
        "RandomFlip",
        "PhotoMetricDistortion",
        "Normalize",
        "Pad",
        "ToTensor",
    ]
    replay = Replay(sample["draws"])
    crop, crop_label = Compose(steps[:4])(image, label, rng=replay)
    assert not replay.draws, "the official pipeline drew more than reinseg"
    official_crop = cv2.imdecode(GOLDEN[f"train/{name}/crop_png"], cv2.IMREAD_COLOR)[..., ::-1]
    assert list(crop.shape[:2]) == sample["unpadded_crop"]
    assert np.array_equal(crop, official_crop), f"{np.mean(crop != official_crop):.4%} of the crop's values differ"
    # The model's input and target after the data preprocessor (normalise, pad 0 / 255).
    out_image, out_label = transform(image, label, rng=Replay(sample["draws"]))
    assert list(out_image.shape) == sample["image_shape"] and out_image.dtype == torch.float32
    assert sha256(out_image.numpy()) == sample["image_sha256"]
    assert torch.equal(out_label, torch.from_numpy(GOLDEN[f"train/{name}/label"].astype(np.int64)))
    assert crop_label.shape == crop.shape[:2]


# In the full suite (the fast tier is near its 60 s bound; the bit-identical sample test stays in it).
@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 4])
def test_training_sample_does_not_depend_on_the_thread_counts(tmp_path, threads):
    sample = TRAIN["gtav_512"]
    image, label = read_pair(*map(str, _train_inputs(tmp_path, sample)))
    before = cv2.getNumThreads(), torch.get_num_threads()
    try:
        cv2.setNumThreads(threads)
        torch.set_num_threads(threads)
        out_image, _ = _recipe(sample)(image, label, rng=Replay(sample["draws"]))
    finally:
        cv2.setNumThreads(before[0])
        torch.set_num_threads(before[1])
    assert sha256(out_image.numpy()) == sample["image_sha256"]


@pytest.mark.slow  # 0.8 s; the fast tier keeps the unpadded training sample's golden
def test_padded_official_recipe_crop_pads_after_normalisation(tmp_path):
    """The 512 recipe on a GTAV frame resized to a 256 short edge: the 256 x 466 crop is flipped and
    distorted unpadded, then padded with 0 (the mean colour) and label 255 at the bottom/right."""
    sample = TRAIN["gtav_512_padded"]
    image, label = read_pair(*map(str, _train_inputs(tmp_path, sample)))
    out_image, out_label = _recipe(sample)(image, label, rng=Replay(sample["draws"]))
    official = torch.from_numpy(GOLDEN["train/gtav_512_padded/image"])
    assert torch.equal(out_image, official)
    h, w = sample["unpadded_crop"]
    assert (h, w) == (256, 466)
    assert torch.all(out_image[:, h:] == 0) and torch.all(out_image[:, :, w:] == 0)
    assert torch.all(out_label[h:] == 255) and torch.all(out_label[:, w:] == 255)
    assert (out_label[:h, :w] != 255).float().mean() > 0.5


def test_training_resize_sizes_equal_the_official_ones_for_every_scale():
    """mmseg's ResizeShortestEdge then mmcv's imrescale, for each scale of the 512 and 1024 recipes
    on the datasets' image sizes (GTAV, Cityscapes, Synthia, ACDC, BDD100K, Mapillary)."""
    cases = META["resize_sizes"]
    assert len(cases) == 2 * 16 * 12
    for case in cases:
        resize = RandomResizeShortestEdge([case["short_edge"]], case["max_size"])
        assert list(resize.target_size(tuple(case["size"]), case["short_edge"])) == case["out"], case


def test_the_official_draws_exercise_every_branch():
    """The goldens cover flips both ways, each photometric step on and off, and crop retries."""
    draws = [d for sample in META["train"] for d in sample["draws"]]
    assert {d[3] for d in draws if d[0] == "flip"} == {0, 1}
    assert {d[3] for d in draws if d[:3] == ["integers", 0, 2]} == {0, 1}
    assert any(d[:3] == ["integers", -18, 18] for d in draws)  # a hue shift
    assert len([d for d in TRAIN["small_dominant"]["draws"] if d[0] == "integers" and d[1] == 0]) > 6  # retries


# --- evaluation -----------------------------------------------------------------------------

# reinseg config -> the official config it reproduces (the comment at the top of each file).
PAPER_CONFIGS = {
    "rein_dinov2-l_gta_512.yaml": "gta_512",
    "rein_dinov2-l_cityscapes2acdc_1024.yaml": "citys2acdc_1024",
    "frozen_dinov2-l_gta_512.yaml": "gta_512",
    "full_dinov2-l_gta_512.yaml": "gta_512",
    "rein_clip-l_gta_512.yaml": "gta_512",
    "rein_eva02-l_gta_512.yaml": "gta_512",
    "rein_mae-l_gta_512.yaml": "gta_512",
    "rein_sam-h_gta_512.yaml": "gta_512",
    "rein_dinov2-l_gta+synthia+urbansyn_512.yaml": "gta_512",
}
# The two main settings run in the fast tier; the other GTAV configs repeat their validation sets.
CONFIG_PARAMS = [pytest.param(name, marks=() if i < 1 else pytest.mark.slow) for i, name in enumerate(PAPER_CONFIGS)]
# Where each official validation image folder lives in a reinseg dataset root, and the sample's name.
FOLDERS = {
    "leftImg8bit/val": (
        "cityscapes",
        "leftImg8bit/val/city/city_000000_000019_leftImg8bit.png",
        "gtFine/val/city/city_000000_000019_gtFine_labelTrainIds.png",
    ),
    "images/10k/val": ("bdd100k", "images/10k/val/b0.jpg", "labels/sem_seg/masks/val/b0.png"),
    "half/val_img": ("mapillary", "half/val_img/m0.jpg", "half/val_label/m0.png"),
}
for _condition in ("night", "snow", "fog", "rain"):
    FOLDERS[f"rgb_anon/{_condition}/val"] = (
        "acdc",
        f"rgb_anon/{_condition}/val/GOPR0000/GOPR0000_frame_000000_rgb_anon.png",
        f"gt/{_condition}/val/GOPR0000/GOPR0000_frame_000000_gt_labelTrainIds.png",
    )


def _eval_sample(config: str, folder: str) -> dict:
    return EVAL[f"{config}/{folder}"]


def _official_folder(entry: dict) -> str:
    """The official config's image folder of a reinseg ``data.val`` entry."""
    folders = {"cityscapes": "leftImg8bit/val", "bdd100k": "images/10k/val", "mapillary": "half/val_img"}
    return folders.get(entry["name"]) or f"rgb_anon/{entry['condition']}/val"


def _write_eval_pair(root: Path, sample: dict) -> tuple[Path, Path]:
    """The golden sample's image and label, at their paths in a reinseg dataset ``root``."""
    _, image_rel, label_rel = FOLDERS[sample["folder"]]
    h, w = sample["size"]
    jpeg = f"eval/{sample['name']}/input_jpeg"
    if jpeg in GOLDEN:
        (root / image_rel).parent.mkdir(parents=True, exist_ok=True)
        (root / image_rel).write_bytes(GOLDEN[jpeg].tobytes())
    else:
        image = smooth_image(sample["seed"], h, w)
        assert sha256(image) == sample["input_sha256"]
        write_png(root / image_rel, image)
    label = block_label(sample["seed"], h, w)
    assert sha256(label) == sample["label_input_sha256"]
    write_png(root / label_rel, label)
    return root / image_rel, root / label_rel


def _assert_official_eval_item(item: dict, sample: dict, what: str) -> None:
    assert list(item["image"].shape) == sample["model_input_shape"], what
    assert sha256(item["image"].numpy()) == sample["model_input_sha256"], f"{what}: not the official model input"
    # Labels are never resized; predictions are resized back to the label's (= original) size.
    assert list(item["label"].shape) == sample["label_shape"] == sample["ori_shape"], what
    assert list(item["ori_size"]) == sample["ori_shape"], what


@pytest.mark.parametrize("config_file", CONFIG_PARAMS)
def test_validation_sets_of_each_paper_config_equal_the_official_test_pipelines(tmp_path, config_file):
    key = PAPER_CONFIGS[config_file]
    official = META["configs"][key]
    config = load_config(CONFIGS / config_file)
    # Sliding-window inference as the official test_cfg, on unpadded test images.
    assert config.model.test.mode == official["test_mode"] == "slide"
    assert list(config.model.test.crop_size) == official["crop_size"]
    assert list(config.model.test.stride) == official["stride"]
    assert official["preprocessor_test_cfg"] is None
    samples = []
    for entry in config.data.val:
        folder = _official_folder(entry)
        assert folder in official["val"], f"{entry['name']} is not a validation set of {official['path']}"
        entry["root"] = str(tmp_path / folder.replace("/", "_"))
        samples.append(_eval_sample(key, folder))
        _write_eval_pair(Path(entry["root"]), samples[-1])
    sets = validation_sets(config)
    assert len(sets) == len(samples)
    for (domain, dataset, _), sample in zip(sets, samples, strict=False):
        _assert_official_eval_item(dataset[0], sample, f"{config_file}: {domain}")


def test_every_official_validation_set_has_a_golden_sample():
    for key, official in META["configs"].items():
        for folder, spec in official["val"].items():
            assert spec["keep_ratio"] is True and spec["steps"] == [
                "LoadImageFromFile",
                "Resize",
                "LoadAnnotations",  # after Resize: the label keeps its size
                "PackSegInputs",
            ]
            assert _eval_sample(key, folder)["folder"] == folder


@pytest.mark.parametrize(
    "folder",
    # The four ACDC conditions share the Cityscapes images' pipeline at another scale: the
    # Cityscapes folder in the fast tier, the conditions in the full suite.
    [
        pytest.param(f, marks=pytest.mark.slow if f.startswith("rgb_anon") else ())
        for f in META["configs"]["citys2acdc_512"]["val"]
    ],
)
def test_eval_transform_at_the_512_cityscapes_to_acdc_scales(tmp_path, folder):
    """configs/dinov2_citys2acdc/..._512x512 evaluates ACDC at (960, 540); reinseg has no config
    file for it: a ``data.val`` entry with ``scale: [960, 540]`` gives its pipeline."""
    sample = _eval_sample("citys2acdc_512", folder)
    image_path, label_path = _write_eval_pair(tmp_path, sample)
    image, label = read_pair(str(image_path), str(label_path))
    scale = META["configs"]["citys2acdc_512"]["val"][folder]["scale"]
    out_image, out_label = eval_transform(tuple(scale))(image, label)
    _assert_official_eval_item({"image": out_image, "label": out_label, "ori_size": label.shape}, sample, folder)


def test_mapillary_half_resolution_copies_equal_the_official_conversion(tmp_path):
    """reinseg's ``prepare`` writes the official tools/convert_datasets/mapillary_resize.py copies."""
    meta = META["mapillary_half"]
    h, w = meta["size"]
    full = tmp_path / "full.jpg"
    full.write_bytes(GOLDEN["mapillary_half/full_jpeg"].tobytes())
    label = block_label(40, h, w)
    assert sha256(label) == meta["label_input_sha256"]
    _write_half(str(full), label, str(tmp_path / "half.jpg"), str(tmp_path / "half.png"))
    from PIL import Image

    half_label = np.asarray(Image.open(tmp_path / "half.png"))
    assert list(half_label.shape) == meta["half_size"] == [h // 2, w // 2]
    assert sha256(half_label) == meta["half_label_sha256"]
    assert sha256(np.asarray(Image.open(tmp_path / "half.jpg"))) == meta["half_image_sha256"]


@pytest.mark.parametrize("index", range(len(META["resize_back"])))
def test_predictions_are_resized_back_to_the_label_size_as_mmseg(index):
    logits = torch.from_numpy(GOLDEN[f"resize_back/{index}/logits"])
    size = META["resize_back"][index]["ori_shape"]
    prediction = prediction_at_size(logits, size)
    assert torch.equal(prediction, torch.from_numpy(GOLDEN[f"resize_back/{index}/prediction"]).long())
