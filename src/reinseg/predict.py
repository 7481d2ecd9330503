"""Segmenting image files with a checkpoint: train-ID PNGs and colour overlays."""

from __future__ import annotations

import glob
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import as_pair
from .checkpoints import segmentor_from_checkpoint
from .segmentor import Segmentor

__all__ = [
    "IMAGE_SUFFIXES",
    "DEFAULT_SCALE",
    "collect_images",
    "checkpoint_scale",
    "segment_image",
    "segment_images",
    "padded_scores",
    "scores_at_sizes",
    "overlay",
    "predict_files",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_SCALE = (1024, 512)  # the Cityscapes test scale, for checkpoints that record no validation set


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (recursively, image suffixes) and glob patterns into image paths.

    Raises a ValueError naming any input that matches nothing, any file that is not a readable
    image, and any two inputs that would write the same output name.
    """
    from .data.io import files_below, read_photo

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            # macOS leaves "._name.jpg" resource files beside copied photos: dot files are no images
            found = [
                path / p for p in files_below(path) if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            ]
            if not found:
                raise ValueError(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"{item}: no such file, folder or matching pattern")
            paths += matches
    for path in paths:
        read_photo(path)  # a DataError (ValueError) naming the file if it is not an image
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems and stems[path.stem] != path:
            raise ValueError(f"{stems[path.stem]} and {path} would both be written as {path.stem}_*.png")
        stems[path.stem] = path
    return list(stems.values())


def checkpoint_scale(config: dict) -> tuple[tuple[int, int] | None, str]:
    """The test scale a checkpoint was evaluated at, from its configuration (a plain dict): that of
    its first ``data.val`` set, as ``reinseg eval`` resizes that set's images. A checkpoint that
    records none (a converted official release) gets Cityscapes' scale in the official configs of
    its training crop (``model.backbone.img_size``): 1024x512 below 1024 pixels (also
    :data:`DEFAULT_SCALE`), 2048x1024 from 1024. Returns ``(scale or None for the images' own
    size, where it comes from)``."""
    from .data import eval_scale
    from .protocols import official_test_scale

    val = (config.get("data") or {}).get("val") or []
    h, w = as_pair(((config.get("model") or {}).get("backbone") or {}).get("img_size", 512), "model.backbone.img_size")
    if not val or not isinstance(val[0], dict):
        scale = official_test_scale("cityscapes", (h, w), DEFAULT_SCALE)
        return scale, f"Cityscapes' test scale at {h}x{w} crops, as the official configs: no validation set recorded"
    first = val[0]
    domain = first.get("label") or first.get("name")
    return eval_scale(first, (h, w)), f"the test scale of {domain}, the checkpoint's first validation set"


@torch.no_grad()
def segment_image(
    segmentor: Segmentor,
    image: np.ndarray,
    scale: tuple[int, int] | None = (1024, 512),
    mode: str | None = None,
    flip: bool | None = None,
) -> np.ndarray:
    """Train IDs ``(H, W)`` of an RGB ``image (H, W, 3)`` uint8, at the image's resolution.

    The image is resized to fit ``scale`` keeping its ratio (as the test pipelines), padded to a
    multiple of the patch size if needed, segmented, and the scores resized back.
    """
    return segment_images(segmentor, [image], scale, mode, flip)[0]


@torch.no_grad()
def segment_images(
    segmentor: Segmentor,
    images: Sequence[np.ndarray],
    scale: tuple[int, int] | None = (1024, 512),
    mode: str | None = None,
    flip: bool | None = None,
) -> np.ndarray:
    """Train IDs ``(N, H, W)`` of RGB images ``(H, W, 3)`` uint8 of one size (video frames), run
    through the model as one batch; each as :func:`segment_image` (a model whose images mix in a
    batch, :attr:`Segmentor.mixes_batch`, runs them one at a time: :meth:`Segmentor.predict`)."""
    from .data.transforms import Normalize, rescale_size, resize_image

    height, width = images[0].shape[:2]
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image {i} must be RGB (H, W, 3) uint8 (as reinseg.data.io.read_photo reads files), "
                f"got {image.shape} {image.dtype}"
            )
        if image.shape[:2] != (height, width):  # one size per batch: else resized to the first's
            raise ValueError(f"image {i} of the batch is {image.shape[0]}x{image.shape[1]}, the first {height}x{width}")
    batch = []
    for image in images:
        if scale is not None:
            image = resize_image(image, rescale_size((height, width), tuple(scale)))
        batch.append(torch.from_numpy(Normalize()(image)[0]).permute(2, 0, 1))
    device = next(segmentor.parameters()).device
    scores = scores_at_sizes(segmentor, torch.stack(batch).to(device), [(height, width)] * len(batch), mode, flip=flip)
    return np.stack([score.argmax(0).to(torch.uint8).cpu().numpy() for score in scores])


def padded_scores(
    segmentor: Segmentor,
    images: torch.Tensor,
    mode: str | None = None,
    crop_size=None,
    stride=None,
    flip: bool | None = None,
) -> torch.Tensor:
    """``segmentor.predict`` of normalized ``(B, 3, h, w)`` images of any size; the scores
    ``(B, C, h, w)`` of the images themselves. A side is padded with zeros (the mean colour after
    normalization) where the model needs it: to a multiple of the patch size (at least two patches)
    in ``whole`` mode, and in sliding-window mode only where it is shorter than the crop, to the
    patch grid (every window of a longer side is a whole crop inside the image, and a shorter side
    is one smaller window: mmseg's ``slide_inference``)."""
    h, w = images.shape[-2:]
    patch = segmentor.backbone.input_multiple  # a ViT's patch; 1 for a CNN, which takes any size
    smallest = segmentor.backbone.smallest_input  # two patches for a ViT
    slide = (mode or segmentor.test_mode) == "slide"
    crop = (segmentor.crop_size if crop_size is None else as_pair(crop_size, "crop_size")) if slide else (0, 0)

    def padded_side(size: int, patch_side: int, smallest_side: int, crop_side: int) -> int:
        if slide and size >= crop_side:
            return size
        return max(-(-size // patch_side) * patch_side, smallest_side)

    target_h, target_w = (
        padded_side(size, p, m, c) for size, p, m, c in zip((h, w), patch, smallest, crop, strict=True)
    )
    padded = F.pad(images, (0, target_w - w, 0, target_h - h))
    return segmentor.predict(padded, mode=mode, crop_size=crop_size, stride=stride, flip=flip)[..., :h, :w]


def scores_at_sizes(
    segmentor: Segmentor,
    images: torch.Tensor,
    sizes,
    mode: str | None = None,
    crop_size=None,
    stride=None,
    flip: bool | None = None,
) -> list[torch.Tensor]:
    """Each image's class scores ``(C, H_i, W_i)`` at ``sizes[i]`` = (H_i, W_i), its label's size,
    from normalized ``images (B, 3, h, w)`` (:func:`padded_scores`), as mmseg tests: the scores
    resized bilinearly without corner alignment (``postprocess_result``). With ``flip`` (default:
    the segmentor's) the image's and its mirror's scores are each resized, then softmax-ed and
    averaged: the order of mmseg's ``SegTTAModel`` (averaging at the input size and resizing
    after gives other classes near edges). The argmax of each is the prediction."""
    from .protocols import scores_at_size

    flip = segmentor.flip if flip is None else flip

    def run(batch: torch.Tensor) -> torch.Tensor:
        return padded_scores(segmentor, batch, mode, crop_size, stride, flip=False)

    scores = run(images)
    if not flip:
        return [scores_at_size(score, size) for score, size in zip(scores, sizes, strict=True)]
    mirrored = run(images.flip(-1)).flip(-1)
    return [
        (scores_at_size(score, size).softmax(0) + scores_at_size(mirror, size).softmax(0)) / 2
        for score, mirror, size in zip(scores, mirrored, sizes, strict=True)
    ]


def overlay(image: np.ndarray, train_ids: np.ndarray, classes) -> np.ndarray:
    """The classes' colours over an RGB ``image (H, W, 3)`` uint8, half and half."""
    return (0.5 * image + 0.5 * classes.colorize(train_ids)).astype(np.uint8)


def load_for_prediction(
    checkpoint: str,
    scale: Sequence[int] | None | str = "checkpoint",
    device: str | None = None,
    backbone: str | None = None,
    window_batch: int | None = None,
):
    """A checkpoint's segmentor, in eval mode on ``device`` (default: cuda if available), with the
    classes of the data it was trained on (the overlays' colours) and the scale to run at (as
    :func:`predict_files` takes it); ``backbone``: the VFM weight file instead of the one the
    checkpoint references; ``window_batch``: sliding windows per forward instead of the
    checkpoint's ``model.test.window_batch``. Returns ``(segmentor, classes, scale, "the scale in
    words")``."""
    from .data.layouts import config_classes

    segmentor, payload = segmentor_from_checkpoint(checkpoint, backbone=backbone)
    if window_batch is not None:
        segmentor.window_batch = window_batch
    classes = config_classes(payload["config"])
    if isinstance(scale, str):
        if scale != "checkpoint":
            raise ValueError(f"scale must be (long, short), None or 'checkpoint', got {scale!r}")
        scale, source = checkpoint_scale(payload["config"])
    else:
        scale, source = (None, "the images' own size") if scale is None else (tuple(scale), "as asked")
    size = "each image's own size" if scale is None else f"fit in {scale[0]}x{scale[1]}"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return segmentor.to(device).eval(), classes, scale, f"{size} ({source})"


def predict_files(
    checkpoint: str,
    inputs: Sequence[str],
    output: str,
    scale: Sequence[int] | None | str = "checkpoint",
    mode: str | None = None,
    flip: bool | None = None,
    device: str | None = None,
    progress: bool = True,
    backbone: str | None = None,
    window_batch: int | None = None,
) -> list[Path]:
    """Segment every input image; writes ``<stem>_labelTrainIds.png`` and ``<stem>_overlay.png``.

    ``scale``: (long, short) to resize each image to fit before inference, None for the images'
    own size, or "checkpoint" (default) for the scale the checkpoint was evaluated at
    (:func:`checkpoint_scale`). Photos are turned upright as their EXIF orientation says, and the
    outputs have the upright size. ``progress`` shows a bar (on stderr) over the images.
    ``flip``: average with the mirrored image (True), never (False), or as the checkpoint's
    ``model.test.flip`` says (None, the default).
    ``backbone``: the VFM weight file, instead of the one the checkpoint references.
    ``window_batch``: sliding windows per forward, instead of the checkpoint's ``model.test.window_batch``.
    ``output`` holds ``.reinseg-incomplete`` until every file is written (:mod:`reinseg.unfinished`):
    a folder another command is writing, or an interrupted evaluation left, is refused. Taking
    over an interrupted predict's marker, a run on other images keeps it, listing the interrupted
    run's files it did not write.
    """
    from tqdm import tqdm

    from .checkpoints import remove_stale_temporaries
    from .data.io import read_photo, write_png
    from .unfinished import check_folder, claim_folder, describe_files, release_folder

    paths = collect_images(inputs)  # everything is checked before anything is written
    out = Path(output)
    interrupted = check_folder(out, "predict", "--output")  # before the model loads; claimed after
    segmentor, classes, scale, size = load_for_prediction(checkpoint, scale, device, backbone, window_batch)
    print(f"segmenting {len(paths)} image(s) at {size}", flush=True)
    # Marked until every file is written: a run killed midway into a folder of earlier
    # predictions leaves two models' files side by side, which `reinseg score` then refuses.
    suffixes = ("_labelTrainIds.png", "_overlay.png")
    names = [f"{path.stem}{suffix}" for path in paths for suffix in suffixes]
    claim_folder(out, "predict", "--output", owes=names)
    if interrupted:
        print(f"replacing the predictions an interrupted predict left in {out}", file=sys.stderr)
    remove_stale_temporaries(out)  # a killed run's half-written files
    written = []
    for path in tqdm(paths, desc="predict", unit="image", disable=not progress or len(paths) < 2):
        image = read_photo(path)
        train_ids = segment_image(segmentor, image, scale, mode, flip)
        for suffix, array in zip(suffixes, (train_ids, overlay(image, train_ids, classes)), strict=True):
            target = out / f"{path.stem}{suffix}"
            write_png(target, array, sync=True)
            written.append(target)
    owed = release_folder(out, names)
    if owed:
        print(
            f"note: {out} stays marked unfinished: the interrupted predict this run took over owes "
            f"{describe_files(owed)}, which this run did not write: predict those images there again",
            file=sys.stderr,
        )
    return written
