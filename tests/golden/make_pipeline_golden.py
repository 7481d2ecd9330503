"""Golden samples of the official training and evaluation data pipelines -> tests/data/pipeline_golden.npz.

Run manually in the official environment (mmcv-lite 2.1, mmseg 1.2.2, opencv 4.11, numpy 1.x)
from the repository root:

    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_pipeline_golden.py

It runs mmseg's own transforms, built from the official Rein configs (/work/official/configs), on
synthetic images written as PNG/JPEG files (tests/golden/pipeline_inputs.py makes the pixels;
JPEG inputs are stored as bytes, since encoders differ between library versions):

- training: ``train_pipeline`` of configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py and
  the model's ``SegDataPreProcessor`` (normalise, pad to the crop size with 0 / 255), on GTAV-sized
  images, once with a crop that needs padding; and the same pipeline at a 96 px crop (scales
  ``int(96 * x * 0.1)``, max size 384) on small images, for more draws. Every random number the
  official transforms draw (numpy's global generator) is recorded with its range, so that the
  test can hand reinseg's transforms the same numbers in the same order.
- evaluation: each validation set's test pipeline (LoadImageFromFile, Resize keep_ratio,
  LoadAnnotations, PackSegInputs) and the preprocessor in test mode, per official config; the
  model input's SHA-256, its size and the label's size; the sliding-window settings.
- Mapillary: tools/convert_datasets/mapillary_resize.py's half-resolution copies.
- predictions: mmseg's ``postprocess_result`` (logits resized to the original size, argmax).
- the training resize's output size for every scale of the 512 and 1024 recipes on the datasets'
  image sizes.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import types
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
OFFICIAL = Path("/work/official")
OUT = HERE.parent / "data" / "pipeline_golden.npz"
sys.path.insert(0, str(HERE))
from pipeline_inputs import block_label, sha256, smooth_image  # noqa: E402


def _stub_imports() -> None:
    """Compiled mmcv ops and the CLIP tokenizer (needs ftfy) are not needed for data transforms."""

    def ext_attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None

    ext = types.ModuleType("mmcv._ext")
    ext.__getattr__ = ext_attr
    sys.modules["mmcv._ext"] = ext
    tokenizer = types.ModuleType("mmseg.utils.tokenizer")
    tokenizer.tokenize = None
    sys.modules["mmseg.utils.tokenizer"] = tokenizer


_stub_imports()
import mmseg.datasets.transforms  # noqa: E402,F401  (registers the transforms)
from mmcv.transforms import Compose  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.models.data_preprocessor import SegDataPreProcessor  # noqa: E402
from mmseg.registry import TRANSFORMS  # noqa: E402

init_default_scope("mmseg")  # as the official runner: mmcv's RandomChoiceResize finds mmseg's ResizeShortestEdge

CONFIGS = OFFICIAL / "configs"
GTA_512 = CONFIGS / "dinov2/rein_dinov2_mask2former_512x512_bs1x4.py"
CITYS2ACDC_1024 = CONFIGS / "dinov2_citys2acdc/rein_dinov2_mask2former_1024x1024_bs4x2.py"
CITYS2ACDC_512 = CONFIGS / "dinov2_citys2acdc/rein_dinov2_mask2former_512x512_bs1x4.py"
GTAV_HW = (1052, 1914)


# --- recording numpy's global random draws ----------------------------------------------------


class Recorder:
    """Wraps numpy.random's module functions the official transforms call and logs each draw as
    (kind, low, high, value): kind "integers" (randint), "uniform", or "flip" (RandomFlip's
    np.random.choice of a direction; value 1 when flipped)."""

    def __init__(self):
        self.draws = []
        self._orig = {}

    def __enter__(self):
        nr = np.random
        self._orig = {name: getattr(nr, name) for name in ("randint", "uniform", "choice", "rand", "random")}
        orig = self._orig

        def randint(low, high=None, *args, **kwargs):
            assert not args and not kwargs, (args, kwargs)
            value = orig["randint"](low, high)
            lo, hi = (0, low) if high is None else (low, high)
            self.draws.append(("integers", int(lo), int(hi), int(value)))
            return value

        def uniform(low=0.0, high=1.0, *args, **kwargs):
            assert not args and not kwargs
            value = orig["uniform"](low, high)
            self.draws.append(("uniform", float(low), float(high), float(value)))
            return value

        def choice(options, *args, p=None, **kwargs):
            value = orig["choice"](options, *args, p=p, **kwargs)
            assert list(options) == ["horizontal", None], options
            self.draws.append(("flip", float(p[0]), None, int(value == "horizontal")))
            return value

        def unexpected(*args, **kwargs):
            raise AssertionError("an official transform drew with a function the golden does not record")

        nr.randint, nr.uniform, nr.choice, nr.rand, nr.random = randint, uniform, choice, unexpected, unexpected
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(np.random, name, fn)


# --- training -------------------------------------------------------------------------------


def train_recipe(crop: int):
    """The official 512 train pipeline and preprocessor, or the same at another crop size."""
    cfg = Config.fromfile(str(GTA_512))
    pipeline = [dict(step) for step in cfg.train_pipeline]
    pre = dict(cfg.model.data_preprocessor)
    pre.pop("type")
    if crop != 512:
        pipeline[2]["scales"] = [int(crop * x * 0.1) for x in range(5, 21)]
        pipeline[2]["max_size"] = crop * 4
        pipeline[3]["crop_size"] = (crop, crop)
        pre["size"] = (crop, crop)
    return pipeline, pre


def write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 else rgb)
    assert ok
    path.write_bytes(data.tobytes())


def run_train_sample(pipeline, pre, image_path, label_path, seed):
    np.random.seed(seed)
    with Recorder() as recorder:
        packed = Compose([TRANSFORMS.build(step) for step in pipeline])(
            dict(img_path=str(image_path), seg_map_path=str(label_path), reduce_zero_label=False, seg_fields=[])
        )
    crop_bgr = packed["inputs"].permute(1, 2, 0).numpy()  # uint8, what the preprocessor receives
    out = SegDataPreProcessor(**pre)({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, True)
    image = out["inputs"][0].numpy()
    label = out["data_samples"][0].gt_sem_seg.data[0].numpy().astype(np.uint8)
    return recorder.draws, crop_bgr, image, label


# name, crop, (h, w), image seed, label dominance, condition on the unpadded crop (h, w)
TRAIN_SAMPLES = [
    ("gtav_512", 512, GTAV_HW, 1, 0.0, lambda hw, crop: min(hw) == crop),
    ("gtav_512_padded", 512, GTAV_HW, 2, 0.0, lambda hw, crop: max(hw) < crop),
    ("small_landscape", 96, (150, 270), 3, 0.0, lambda hw, crop: True),
    ("small_dominant", 96, (160, 240), 4, 0.9, lambda hw, crop: True),
    ("small_portrait", 96, (250, 130), 5, 0.0, lambda hw, crop: min(hw) < crop),
    ("small_tiny", 96, (60, 110), 6, 0.3, lambda hw, crop: True),
]


def make_train(tmp: Path, arrays: dict, meta: dict) -> None:
    meta["train"] = []
    for name, crop, (h, w), seed, dominant, wanted in TRAIN_SAMPLES:
        pipeline, pre = train_recipe(crop)
        rgb, label = smooth_image(seed, h, w), block_label(seed, h, w, dominant=dominant)
        image_path, label_path = tmp / f"{name}.png", tmp / f"{name}_labelTrainIds.png"
        write_png(image_path, rgb)
        write_png(label_path, label)
        # The first seeds of numpy's global generator whose draws give the wanted case.
        for draw_seed in range(1000):
            draws, crop_bgr, image, out_label = run_train_sample(pipeline, pre, image_path, label_path, draw_seed)
            if wanted(crop_bgr.shape[:2], crop):
                break
        else:
            raise RuntimeError(f"{name}: no seed gives the wanted crop")
        ok, crop_png = cv2.imencode(".png", crop_bgr)
        arrays[f"train/{name}/crop_png"] = np.frombuffer(crop_png.tobytes(), np.uint8)
        arrays[f"train/{name}/label"] = out_label
        if name == "gtav_512_padded":  # the padded crop of an official-recipe sample, in full
            arrays[f"train/{name}/image"] = image
        meta["train"].append(
            dict(
                name=name,
                crop=crop,
                size=[h, w],
                seed=seed,
                dominant=dominant,
                input_sha256=sha256(rgb),
                label_input_sha256=sha256(label),
                draw_seed=draw_seed,
                draws=draws,
                unpadded_crop=list(crop_bgr.shape[:2]),
                image_shape=list(image.shape),
                image_sha256=sha256(image.astype(np.float32)),
                pipeline=repr(pipeline),
                preprocessor=repr(pre),
            )
        )
        print(f"train {name}: crop {crop_bgr.shape[:2]}, {len(draws)} draws (seed {draw_seed})")


# --- evaluation -----------------------------------------------------------------------------


def dataset_pipelines(config: Path) -> dict:
    """Validation pipeline per dataset of one official config, keyed by its image folder."""
    cfg = Config.fromfile(str(config))
    return {
        d["data_prefix"]["img_path"]: dict(pipeline=d["pipeline"], img_suffix=d.get("img_suffix", ".png"))
        for d in cfg.val_dataloader.dataset.datasets
    }


def configs() -> dict:
    out = {}
    for key, path in [("gta_512", GTA_512), ("citys2acdc_1024", CITYS2ACDC_1024), ("citys2acdc_512", CITYS2ACDC_512)]:
        cfg = Config.fromfile(str(path))
        test_cfg = dict(cfg.model.test_cfg)
        scales = {}
        for d in cfg.val_dataloader.dataset.datasets:
            resize = [step for step in d["pipeline"] if step["type"] == "Resize"]
            scales[d["data_prefix"]["img_path"]] = dict(
                scale=list(resize[0]["scale"]) if resize else None,
                keep_ratio=bool(resize[0].get("keep_ratio", False)) if resize else None,
                steps=[step["type"] for step in d["pipeline"]],
            )
        out[key] = dict(
            path=str(path.relative_to(OFFICIAL)),
            test_mode=test_cfg["mode"],
            crop_size=list(test_cfg["crop_size"]),
            stride=list(test_cfg["stride"]),
            val=scales,
            preprocessor_test_cfg=cfg.model.data_preprocessor.get("test_cfg"),
        )
    return out


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def mapillary_half(tmp: Path, arrays: dict, meta: dict) -> bytes:
    """The official half-resolution copy of a Mapillary validation pair; returns the half JPEG."""
    sys.path.insert(0, str(OFFICIAL / "tools/convert_datasets"))
    from mapillary_resize import resize_half

    h, w = 751, 1001  # odd sizes: the official (w // 2, h // 2) rounds down
    full = jpeg_bytes(smooth_image(40, h, w))
    src_img, src_lbl, dst_img, dst_lbl = (tmp / f"map_{k}" for k in ("img", "lbl", "half_img", "half_lbl"))
    for folder in (src_img, src_lbl, dst_img, dst_lbl):
        folder.mkdir()
    (src_img / "m0.jpg").write_bytes(full)
    label = block_label(40, h, w)
    write_png(src_lbl / "m0.png", label)
    resize_half(("m0", str(src_img), str(src_lbl), str(dst_img), str(dst_lbl)))
    half_jpeg = (dst_img / "m0.jpg").read_bytes()
    from PIL import Image

    half_label = np.asarray(Image.open(dst_lbl / "m0.png"))
    arrays["mapillary_half/full_jpeg"] = np.frombuffer(full, np.uint8)
    arrays["mapillary_half/half_jpeg"] = np.frombuffer(half_jpeg, np.uint8)
    meta["mapillary_half"] = dict(
        size=[h, w],
        label_input_sha256=sha256(label),
        half_size=list(half_label.shape),
        half_label_sha256=sha256(half_label),
        half_image_sha256=sha256(np.asarray(Image.open(io.BytesIO(half_jpeg)))),
    )
    return half_jpeg


CONFIG_PATHS = {"gta_512": GTA_512, "citys2acdc_1024": CITYS2ACDC_1024, "citys2acdc_512": CITYS2ACDC_512}
# Native (h, w) of each validation image folder's images (Mapillary's is the official half copy).
NATIVE_HW = {"leftImg8bit/val": (1024, 2048), "images/10k/val": (720, 1280), "half/val_img": None}
NATIVE_HW.update({f"rgb_anon/{c}/val": (1080, 1920) for c in ("night", "snow", "fog", "rain")})


def make_eval(tmp: Path, arrays: dict, meta: dict, half_jpeg: bytes) -> None:
    """One evaluation sample per validation set of each official config."""
    meta["eval"] = []
    samples = [(config, folder) for config in CONFIG_PATHS for folder in dataset_pipelines(CONFIG_PATHS[config])]
    for index, (config, folder) in enumerate(samples):
        name, hw, seed = f"{config}/{folder}", NATIVE_HW[folder], 11 + index
        cfg = Config.fromfile(str(CONFIG_PATHS[config]))
        spec = dataset_pipelines(CONFIG_PATHS[config])[folder]
        pre = dict(cfg.model.data_preprocessor)
        pre.pop("type")
        suffix = spec["img_suffix"]
        image_path = tmp / f"eval_{index}{suffix}"
        if folder == "half/val_img":
            image_path.write_bytes(half_jpeg)
            arrays[f"eval/{name}/input_jpeg"] = np.frombuffer(half_jpeg, np.uint8)
            from PIL import Image

            hw = Image.open(image_path).size[::-1]
            seed = 40
        elif suffix.endswith(".jpg"):
            data = jpeg_bytes(smooth_image(seed, *hw))
            image_path.write_bytes(data)
            arrays[f"eval/{name}/input_jpeg"] = np.frombuffer(data, np.uint8)
        else:
            write_png(image_path, smooth_image(seed, *hw))
        label = block_label(seed, *hw)
        label_path = tmp / f"eval_{index}_label.png"
        write_png(label_path, label)
        packed = Compose([TRANSFORMS.build(step) for step in spec["pipeline"]])(
            dict(img_path=str(image_path), seg_map_path=str(label_path), reduce_zero_label=False, seg_fields=[])
        )
        out = SegDataPreProcessor(**pre)(
            {"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, False
        )
        model_input = out["inputs"][0].numpy()
        sample = packed["data_samples"]
        gt = sample.gt_sem_seg.data[0].numpy()
        assert np.array_equal(gt, label), "labels are loaded at their own resolution"
        resized = packed["inputs"].permute(1, 2, 0).numpy()[..., ::-1]
        # A 64 x 64 patch of the resized image from its centre, to show where a mismatch lies.
        top, left = (resized.shape[0] - 64) // 2, (resized.shape[1] - 64) // 2
        arrays[f"eval/{name}/resized_patch"] = np.ascontiguousarray(resized[top : top + 64, left : left + 64])
        meta["eval"].append(
            dict(
                name=name,
                config=config,
                folder=folder,
                size=list(hw),
                seed=seed,
                input_sha256=None if suffix.endswith(".jpg") else sha256(smooth_image(seed, *hw)),
                label_input_sha256=sha256(label),
                resized_sha256=sha256(np.ascontiguousarray(resized)),
                model_input_shape=list(model_input.shape),
                model_input_sha256=sha256(model_input.astype(np.float32)),
                ori_shape=list(sample.ori_shape),
                label_shape=list(gt.shape),
                pipeline=repr(spec["pipeline"]),
            )
        )
        print(f"eval {name}: {hw} -> {model_input.shape}, label {gt.shape}")


# (h, w) of the training images of the datasets (GTAV, Cityscapes/UrbanSyn, Synthia, ACDC, BDD100K,
# Mapillary's common camera sizes, portrait too) and a few odd ones.
TRAIN_SIZES = [
    (1052, 1914),
    (1024, 2048),
    (760, 1280),
    (1080, 1920),
    (720, 1280),
    (3024, 4032),
    (2448, 3264),
    (4032, 3024),
    (1536, 2048),
    (333, 517),
    (517, 333),
    (1000, 1000),
]


def make_resize_sizes(meta: dict) -> None:
    """Output (h, w) of the official RandomChoiceResize(ResizeShortestEdge) for every scale of the
    512 and 1024 recipes on each of TRAIN_SIZES (mmseg's arithmetic, then mmcv's imrescale)."""
    meta["resize_sizes"] = []
    for crop, max_size in [(512, 2048), (1024, 4096)]:
        for short_edge in [int(crop * x * 0.1) for x in range(5, 21)]:
            resize = TRANSFORMS.build(dict(type="ResizeShortestEdge", scale=short_edge, max_size=max_size))
            for h, w in TRAIN_SIZES:
                out = resize(dict(img=np.zeros((h, w, 3), np.uint8)))["img"].shape[:2]
                meta["resize_sizes"].append(dict(size=[h, w], short_edge=short_edge, max_size=max_size, out=list(out)))


def make_resize_back(arrays: dict, meta: dict) -> None:
    """mmseg's postprocess_result: logits at the model input's size -> classes at the label's size."""
    import torch
    from mmseg.models.segmentors.base import BaseSegmentor
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    segmentor = types.SimpleNamespace(align_corners=Config.fromfile(str(GTA_512)).model.decode_head.align_corners)
    meta["resize_back"] = []
    for index, (input_hw, ori_hw) in enumerate([((24, 40), (17, 29)), ((20, 30), (45, 70))]):
        logits = torch.randn(1, 19, *input_hw)
        sample = SegDataSample(metainfo=dict(ori_shape=ori_hw, img_shape=input_hw))
        [out] = BaseSegmentor.postprocess_result(segmentor, logits, [sample])
        arrays[f"resize_back/{index}/logits"] = logits[0].numpy()
        arrays[f"resize_back/{index}/prediction"] = out.pred_sem_seg.data[0].numpy().astype(np.uint8)
        meta["resize_back"].append(dict(input=list(input_hw), ori_shape=list(ori_hw)))


def main() -> None:
    assert np.__version__.startswith("1."), "run in the official environment"
    cv2.setNumThreads(1)
    arrays, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_train(tmp, arrays, meta)
        half_jpeg = mapillary_half(tmp, arrays, meta)
        make_eval(tmp, arrays, meta, half_jpeg)
    make_resize_back(arrays, meta)
    make_resize_sizes(meta)
    meta["configs"] = configs()
    import mmcv
    import mmseg
    import PIL

    meta["versions"] = dict(
        mmcv=mmcv.__version__,
        mmseg=mmseg.__version__,
        cv2=cv2.__version__,
        numpy=np.__version__,
        pillow=PIL.__version__,
    )
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
