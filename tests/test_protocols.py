"""Named test protocols: the sizes the model sees, one pass over the data for several protocols,
the protocol recorded in every result, ACDC per condition and its test-server submission."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from fake_datasets import CITYSCAPES_NATIVE, make_fake_acdc, make_fake_cityscapes
from PIL import Image

from reinseg.build import build_segmentor, official_window
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
from reinseg.cli import main
from reinseg.config import Config, DataConfig, TrainConfig, dump_config, to_dict
from reinseg.engine import SegmentationTask, build_trainer, evaluate
from reinseg.protocols import PROTOCOLS, Protocol, get_protocols, parse_protocols, register_protocol
from reinseg.segmentor import Segmentor

# Train ID -> Cityscapes label ID, written out from the dataset's documentation (fake_datasets).
LABEL_ID_OF_TRAIN_ID = {train_id: native for native, train_id in CITYSCAPES_NATIVE.items() if train_id != 255}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny model as a reinseg checkpoint."""
    torch.manual_seed(0)
    model = tiny_model_config()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_checkpoint(path, {"model": to_dict(model)}, checkpoint_state_dict(build_segmentor(model)))
    return str(path)


def eval_config(tmp_path, val, **test) -> Config:
    model = tiny_model_config()
    for key, value in test.items():
        setattr(model.test, key, value)
    return Config(
        model=model,
        data=DataConfig(val=val, num_workers=0),
        train=TrainConfig(output_dir=str(tmp_path / "run"), accelerator="cpu", devices=1),
    )


@pytest.fixture
def seen(monkeypatch):
    """Replace the model by one recording each call's input size and window: it predicts class 0."""
    calls = []

    def predict(self, images, mode=None, crop_size=None, stride=None, flip=None):
        calls.append(
            dict(
                size=tuple(images.shape[-2:]),
                mode=mode,
                crop=None if crop_size is None else tuple(crop_size),
                stride=None if stride is None else tuple(stride),
                flip=flip,
            )
        )
        return torch.zeros(images.shape[0], self.num_classes, *images.shape[-2:])

    monkeypatch.setattr(Segmentor, "predict", predict)
    return calls


def test_protocol_names_set_the_sizes_the_model_sees(tmp_path, checkpoint, seen):
    # Cityscapes images of 64x32: official test scale 1024x512 -> x16 -> 1024x512; highres
    # 2048x1024 -> x32; ms-flip: the official size x 0.5 .. 1.75, each plain and mirrored.
    make_fake_cityscapes(tmp_path / "cs", n=1, size=(32, 64), splits=("val",), prepared=True)
    config = eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"))])
    evaluate(config, checkpoint, protocols=get_protocols(["official", "highres", "ms-flip"]))
    sizes = [call["size"] for call in seen]
    ms = [(256, 512), (384, 768), (512, 1024), (640, 1280), (768, 1536), (896, 1792)]
    assert sizes == [(512, 1024), (1024, 2048)] + [s for s in ms for _ in range(2)]
    # The official windows: the training crop (64 for this tiny model) every 2/3 of it; no flip
    # inside the model (ms-flip mirrors the input itself).
    assert {(c["mode"], c["crop"], c["stride"], c["flip"]) for c in seen} == {("slide", (64, 64), (43, 43), False)}


def test_official_windows_are_those_of_the_official_configs():
    # configs/_base_/models/rein_dinov2_mask2former.py: 512/341; dinov2_citys2acdc/*1024x1024*: 1024/683.
    model = tiny_model_config()
    model.backbone.img_size = 512
    assert official_window(model) == ((512, 512), (341, 341))
    model.backbone.img_size = 1024
    assert official_window(model) == ((1024, 1024), (683, 683))


@pytest.mark.parametrize(
    "crop, expected",
    [
        # configs/_base_/datasets/{cityscapes,*-acdc}_512x512.py, bdd100k_512x512.py, mapillary_512x512.py
        (512, {"cs": (1024, 512), "acdc": (960, 540), "bdd": (1280, 720), "map": (1024, 512)}),
        # configs/_base_/datasets/{cityscapes,*-acdc}_1024x1024.py (the Cityscapes -> ACDC 1024 setting)
        (1024, {"cs": (2048, 1024), "acdc": (1920, 1080), "bdd": (1280, 720), "map": (1024, 512)}),
    ],
)
def test_official_scales_are_those_of_the_official_configs_of_the_crop(crop, expected):
    from reinseg.data.entries import DatasetEntry
    from reinseg.protocols import protocol_run

    model = tiny_model_config()
    model.backbone.img_size = crop
    names = {"cs": "cityscapes", "acdc": "acdc", "bdd": "bdd100k", "map": "mapillary"}
    domains = [(domain, DatasetEntry(name, "root", "val")) for domain, name in names.items()]
    # An entry without a scale of its own gets the official scale under the config protocol too.
    for name in ("official", "ms-flip", "config"):
        run = protocol_run(get_protocols([name])[0], domains, model)
        assert run.scales == expected, name
    # The config protocol keeps an entry's own scale, whatever the crop; official does not.
    own = [("acdc", DatasetEntry("acdc", "root", "val", scale=(1000, 500)))]
    assert protocol_run(get_protocols(["config"])[0], own, model).scales == {"acdc": (1000, 500)}
    assert protocol_run(get_protocols(["official"])[0], own, model).scales == {"acdc": expected["acdc"]}


def test_sizes_off_the_patch_grid_are_padded_and_below_the_crop_run_as_a_smaller_window():
    """ms-flip at 0.5 takes BDD100K's 1280x720 to 640x360 (below a 512 crop, 360 off the 16 grid).
    Off the grid: the scores of the image padded to it. On the grid below the crop: one smaller
    window, as mmseg's slide_inference runs it (no padding to the crop). Above the crop, on the
    grid or off it (ACDC's 1080 rows at 1024 crops): the windows of the image itself, unpadded
    (padding to the grid moved the last window onto 8 rows of padding)."""
    import torch.nn.functional as F

    from reinseg.data.transforms import eval_transform
    from reinseg.protocols import ProtocolRun, protocol_scores

    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config(), load_backbone_weights=False).eval()
    rng = np.random.default_rng(0)
    for mode, crop, stride in (("slide", (64, 64), (43, 43)), ("whole", None, None)):
        run = ProtocolRun(get_protocols(["official"])[0], {"d": None}, mode, crop, stride)
        # On the grid; 27 off it; 70 off it and above the 64 crop (whole mode: padded to 80).
        for height, padded_height in ((32, 32), (27, 32), (70, 70 if mode == "slide" else 80)):
            image = rng.integers(0, 255, (height, 48, 3), dtype=np.uint8)
            tensor = eval_transform(None)(image)[0][None]
            with torch.no_grad():
                scores = protocol_scores(segmentor, run, "d", image, (height, 48))
                padded = F.pad(tensor, (0, 0, 0, padded_height - height))
                expected = segmentor.predict(padded, mode, crop, stride, False)[0, :, :height]
            assert scores.shape == (19, height, 48), (mode, height)
            torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


@pytest.mark.slow  # ms-flip: 12 passes at up to 1792x896 per image
def test_several_protocols_read_each_image_once_and_record_themselves(tmp_path, checkpoint, seen, monkeypatch):
    import reinseg.data.datasets as datasets

    fake = make_fake_cityscapes(tmp_path / "cs", n=3, size=(32, 64), splits=("val",), prepared=True)
    reads = []
    real_read_pair = datasets.read_pair
    monkeypatch.setattr(datasets, "read_pair", lambda image, *a: reads.append(image) or real_read_pair(image, *a))
    config = eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"), label="cs")])
    results = evaluate(config, checkpoint, protocols=parse_protocols(["official,highres", "ms-flip"])).last_results
    assert sorted(reads) == sorted(fake.expected)  # each image once, for three protocols
    assert list(results["protocols"]) == ["official", "highres", "ms-flip"]
    assert results["protocol"]["name"] == "official"  # the first protocol's results at the top
    recorded = {name: r["protocol"] for name, r in results["protocols"].items()}
    assert recorded["official"]["scales"] == {"cs": [1024, 512]}
    assert recorded["highres"]["scales"] == {"cs": [2048, 1024]}
    assert recorded["ms-flip"]["ratios"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert recorded["ms-flip"]["flip"] is True and recorded["official"]["flip"] is False
    assert {r["mode"] for r in recorded.values()} == {"slide"}
    assert {tuple(r["crop_size"]) for r in recorded.values()} == {(64, 64)}


@pytest.mark.parametrize("scale", [[96, 48], [90, 45]])  # 45 x 90: off the patch grid, one side below the crop
def test_the_config_protocol_gives_what_validation_during_training_gives(tmp_path, checkpoint, scale):
    """Evaluation resizes the images itself (once per protocol): the same numbers as validation,
    where the datasets resize them; another protocol in the same pass changes nothing of it."""
    make_fake_cityscapes(tmp_path / "cs", n=2, size=(32, 64), splits=("val",), prepared=True)
    config = eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"), scale=scale)])
    small = register_protocol(Protocol("small-flip", "test", scale=(64, 32), flip=True))
    try:
        evaluated = evaluate(config, checkpoint, protocols=[PROTOCOLS["config"], small]).last_results
    finally:
        PROTOCOLS.pop("small-flip")
    task = SegmentationTask(config, segmentor=evaluate(config, checkpoint).segmentor, write_metrics=False)
    build_trainer(config, logging=False).validate(task, datamodule=task.data, verbose=False)
    assert evaluated["protocols"]["config"]["domains"] == task.last_results["domains"]
    # The checkpoint records no iteration: neither do the results (not the trainer's 0).
    assert evaluated["step"] is None and evaluated["protocols"]["small-flip"]["step"] is None
    assert evaluated["protocol"] == task.last_results["protocol"]
    assert evaluated["protocol"]["scales"] == {"cityscapes": scale}
    assert evaluated["protocol"]["mode"] == "whole" and evaluated["protocol"]["crop_size"] is None
    assert evaluated["protocols"]["small-flip"]["protocol"]["flip"] is True


def test_unknown_protocols_are_named_with_the_known_ones(tmp_path, checkpoint, capsys):
    make_fake_cityscapes(tmp_path / "cs", n=1, size=(32, 64), splits=("val",), prepared=True)
    config = eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"))])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    assert main(["eval", str(config_file), checkpoint, "--protocol", "official,hires"]) == 2
    err = capsys.readouterr().err
    assert "--protocol: unknown protocol 'hires'" in err and "config, official, highres, ms-flip" in err
    assert main(["eval", str(config_file), checkpoint, "model.test.protocols=[offical]"]) == 2
    assert "model.test.protocols: unknown protocol 'offical'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_acdc_results_per_condition_and_overall(tmp_path, checkpoint):
    fake = make_fake_acdc(tmp_path / "acdc", n=2, size=(32, 64), splits=("val",))
    config = eval_config(tmp_path, [dict(name="acdc", root=str(tmp_path / "acdc"), split="val", scale=[64, 32])])
    results = evaluate(config, checkpoint).last_results
    conditions = ["acdc/fog", "acdc/night", "acdc/rain", "acdc/snow"]
    assert results["subdomains"] == {"acdc": conditions}
    assert results["mean_domains"] == ["acdc"]  # the conditions are parts of it, not more domains
    for condition in conditions:
        labels = [v for k, v in fake.expected.items() if f"/{condition.split('/')[1]}/" in k]
        assert results["domains"][condition]["pixels"] == sum(int((lb != 255).sum()) for lb in labels)
    assert results["domains"]["acdc"]["pixels"] == sum(results["domains"][c]["pixels"] for c in conditions)


@pytest.mark.parametrize("conditions", [[None], ["night", "snow", "fog", "rain"]])
def test_acdc_submission_has_the_server_layout_and_label_ids(tmp_path, checkpoint, monkeypatch, capsys, conditions):
    """Every condition's test images, also from a config evaluating the conditions one entry
    each (the Cityscapes -> ACDC config, night first)."""
    fake = make_fake_acdc(tmp_path / "acdc", n=2, size=(32, 64))
    entries = [
        dict(name="acdc", root=str(tmp_path / "acdc"), split="val", scale=[64, 32])
        | ({"condition": condition} if condition else {})
        for condition in conditions
    ]
    config = eval_config(tmp_path, entries)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))

    def predict(self, images, *args, **kwargs):  # train ID (x mod 19) at column x
        columns = torch.arange(images.shape[-1]) % 19
        return (
            torch.nn.functional.one_hot(columns, 19)
            .T[None, :, None, :]
            .float()
            .expand(images.shape[0], 19, images.shape[-2], -1)
        )

    monkeypatch.setattr(Segmentor, "predict", predict)
    target = tmp_path / "submission"
    assert main(["eval", str(config_file), checkpoint, "--submission", str(target)]) == 0
    test_images = sorted(Path(p) for p, labels in fake.expected.items() if labels is None)
    assert len(test_images) == 8
    expected = sorted(p.relative_to(tmp_path / "acdc" / "rgb_anon") for p in test_images)
    assert expected[0].as_posix() == "fog/test/GOPR0000/GOPR0000_frame_000000_rgb_anon.png"
    written = sorted(p.relative_to(target) for p in target.rglob("*.png"))
    assert written == expected
    columns = np.arange(64) % 19
    for relative in written:
        prediction = np.asarray(Image.open(target / relative))
        assert prediction.shape == (32, 64) and prediction.dtype == np.uint8
        assert (prediction == np.array([LABEL_ID_OF_TRAIN_ID[c] for c in columns])[None]).all()
    with zipfile.ZipFile(target / "submission.zip") as archive:
        assert sorted(archive.namelist()) == [p.as_posix() for p in written]
        assert archive.read(written[0].as_posix()) == (target / written[0]).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_submission_leaves_nothing_and_a_used_folder_is_refused(tmp_path, checkpoint, monkeypatch, capsys):
    import reinseg.data.io as io

    make_fake_acdc(tmp_path / "acdc", n=2, size=(32, 64))
    config = eval_config(tmp_path, [dict(name="acdc", root=str(tmp_path / "acdc"), split="val", scale=[64, 32])])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    used = tmp_path / "used"
    used.mkdir()
    (used / "old.png").write_bytes(b"x")
    assert main(["eval", str(config_file), checkpoint, "--submission", str(used)]) == 2
    assert "--submission: " in capsys.readouterr().err and not (tmp_path / "run" / "eval_metrics.json").exists()

    real_write_png, written = io.write_png, []

    def failing_write_png(path, array, **kwargs):
        if len(written) == 3:
            raise OSError(28, "No space left on device", str(path))
        written.append(path)
        real_write_png(path, array, **kwargs)

    monkeypatch.setattr(io, "write_png", failing_write_png)
    target = tmp_path / "submission"
    assert main(["eval", str(config_file), checkpoint, "--submission", str(target)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".submission")]


def test_a_submission_missing_a_condition_is_refused(tmp_path, checkpoint, capsys):
    import shutil

    make_fake_acdc(tmp_path / "acdc", n=2, size=(32, 64))
    shutil.rmtree(tmp_path / "acdc" / "rgb_anon" / "rain" / "test")
    entry = dict(name="acdc", root=str(tmp_path / "acdc"), split="val", scale=[64, 32], condition="night")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(eval_config(tmp_path, [entry])))
    assert main(["eval", str(config_file), checkpoint, "--submission", str(tmp_path / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--submission needs the test images of all four ACDC conditions" in err and "rain/test" in err
    assert not (tmp_path / "sub").exists()


def test_submission_without_an_acdc_entry_is_refused(tmp_path, checkpoint, capsys):
    make_fake_cityscapes(tmp_path / "cs", n=1, size=(32, 64), splits=("val",), prepared=True)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"))])))
    assert main(["eval", str(config_file), checkpoint, "--submission", str(tmp_path / "sub")]) == 2
    assert "--submission: data.val has no acdc entry" in capsys.readouterr().err
    assert not (tmp_path / "sub").exists()


def test_cli_eval_writes_every_protocol(tmp_path, checkpoint, seen):
    make_fake_cityscapes(tmp_path / "cs", n=1, size=(32, 64), splits=("val",), prepared=True)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"))])))
    out = tmp_path / "results.json"
    args = ["eval", str(config_file), checkpoint, "--json", str(out), "--protocol", "official", "--protocol", "highres"]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert [r["protocol"]["name"] for r in results["protocols"].values()] == ["official", "highres"]
    assert [c["size"] for c in seen] == [(512, 1024), (1024, 2048)]


def test_examples_are_those_of_the_first_protocol(tmp_path, checkpoint, seen):
    """``--save-examples`` with several protocols: the per-image records and the re-made example
    predictions are the first protocol's (here highres: the image at 2048x1024)."""
    make_fake_cityscapes(tmp_path / "cs", n=1, size=(32, 64), splits=("val",), prepared=True)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(eval_config(tmp_path, [dict(name="cityscapes", root=str(tmp_path / "cs"))])))
    out = tmp_path / "results.json"
    args = ["eval", str(config_file), checkpoint, "--json", str(out), "--protocol", "highres,official"]
    assert main(args + ["--save-examples", "1"]) == 0
    # Validation: highres then official; the example (the one image) predicted again under highres.
    assert [c["size"] for c in seen] == [(1024, 2048), (512, 1024), (1024, 2048)]
    results = json.loads(out.read_text())
    domain = results["domains"]["cityscapes"]
    assert results["protocol"]["name"] == "highres"
    assert len(domain["images"]) == 1 and domain["examples"]["best"][0]["mIoU"] == domain["images"][0]["mIoU"]
    assert (tmp_path / domain["examples"]["best"][0]["files"]["prediction"]).is_file()


# mmcv 2.1's Resize(scale_factor=r, keep_ratio=True) on images of these (h, w), run in the
# official environment: the size times r rounded, then the image rescaled to fit it.
MMCV_RATIO_SIZES = {
    (686, 751): [(343, 376), (514, 563), (686, 751), (858, 939), (1029, 1127), (1200, 1314)],
    (512, 1024): [(256, 512), (384, 768), (512, 1024), (640, 1280), (768, 1536), (896, 1792)],
    (91, 133): [(46, 67), (68, 99), (91, 133), (114, 166), (137, 200), (159, 232)],
    (333, 517): [(167, 259), (250, 388), (333, 517), (416, 646), (500, 776), (583, 905)],
}


def test_ms_flip_sizes_are_those_of_mmcvs_resize_by_a_factor():
    from reinseg.protocols import ProtocolRun, input_sizes

    run = ProtocolRun(get_protocols(["ms-flip"])[0], {"d": None}, None, None, None)
    for size, expected in MMCV_RATIO_SIZES.items():
        assert input_sizes(run, "d", size) == expected, size


def test_flip_averages_softmax_after_resizing_to_the_label_as_mmseg_tta():
    """mmseg's SegTTAModel: each augmentation's scores resized to the original size, then softmax,
    then the mean. Averaging at the input size first gives other classes near edges."""
    import torch.nn.functional as F

    from reinseg.data.transforms import eval_transform
    from reinseg.predict import scores_at_sizes
    from reinseg.protocols import ProtocolRun, protocol_scores

    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config(), load_backbone_weights=False).eval()
    # Sharp scores that vary from pixel to pixel and are not mirror-symmetric (a random head's are
    # nearly flat): a 1x1 projection of the pixels plus a ramp across the width.
    weight, ramp = 3 * torch.randn(19, 3), torch.randn(19, 1, 1)
    segmentor.encode_decode = lambda x: (
        torch.einsum("kc,bchw->bkhw", weight, x) + ramp * torch.linspace(0, 4, x.shape[-1])
    )
    images = torch.randn(2, 3, 32, 48)
    size = (77, 101)  # the labels: larger than the input, as a test scale below the image's own

    def resized(scores):
        return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        plain = segmentor.predict(images, "whole", flip=False)
        mirrored = segmentor.predict(images.flip(-1), "whole", flip=False).flip(-1)
        expected = (resized(plain).softmax(1) + resized(mirrored).softmax(1)) / 2
        got = torch.stack(scores_at_sizes(segmentor, images, [size, size], "whole", flip=True))
        averaged_first = resized(segmentor.predict(images, "whole", flip=True))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (averaged_first.argmax(1) != expected.argmax(1)).any()  # the other order: other classes
        segmentor.flip = True  # the config protocol flips where the model does
        run = ProtocolRun(get_protocols(["config"])[0], {"d": None}, "whole", None, None)
        image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
        tensor = eval_transform(None)(image)[0][None]
        one = protocol_scores(segmentor, run, "d", image, size)
        torch.testing.assert_close(
            one, scores_at_sizes(segmentor, tensor, [size], "whole", flip=True)[0], rtol=0, atol=1e-6
        )
