"""Segmenting image files with a checkpoint: train-ID PNGs and colour overlays."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import segmentor_from_checkpoint
from .segmentor import Segmentor

__all__ = ["IMAGE_SUFFIXES", "collect_images", "segment_image", "predict_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (recursively, image suffixes) and glob patterns into image paths.

    Raises a ValueError naming any input that matches nothing, any file that is not a readable
    image, and any two inputs that would write the same output name.
    """
    from .data.io import read_image

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
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
        read_image(path)  # a DataError (ValueError) naming the file if it is not an image
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems and stems[path.stem] != path:
            raise ValueError(f"{stems[path.stem]} and {path} would both be written as {path.stem}_*.png")
        stems[path.stem] = path
    return list(stems.values())


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
    from .data.transforms import Normalize, rescale_size, resize_image

    height, width = image.shape[:2]
    if scale is not None:
        image = resize_image(image, rescale_size((height, width), tuple(scale)))
    normalized, _ = Normalize()(image)
    device = next(segmentor.parameters()).device
    x = torch.from_numpy(normalized).permute(2, 0, 1)[None].to(device)
    h, w = x.shape[-2:]
    ph, pw = segmentor.backbone.patch_size
    crop = segmentor.crop_size if (mode or segmentor.test_mode) == "slide" else None
    min_h, min_w = crop if crop is not None else (0, 0)
    target_h, target_w = max(-(-h // ph) * ph, min_h), max(-(-w // pw) * pw, min_w)
    # Padding with zeros (the mean colour after normalization) keeps every window a full crop.
    x = F.pad(x, (0, target_w - w, 0, target_h - h))
    scores = segmentor.predict(x, mode=mode, flip=flip)[..., :h, :w]
    scores = F.interpolate(scores.float(), size=(height, width), mode="bilinear", align_corners=False)
    return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


def predict_files(
    checkpoint: str,
    inputs: Sequence[str],
    output: str,
    scale: Sequence[int] | None = (1024, 512),
    mode: str | None = None,
    flip: bool = False,
    device: str | None = None,
) -> list[Path]:
    """Segment every input image; writes ``<stem>_labelTrainIds.png`` and ``<stem>_overlay.png``."""
    from .data import colorize
    from .data.io import read_image, write_png

    paths = collect_images(inputs)  # everything is checked before anything is written
    segmentor, _ = segmentor_from_checkpoint(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    segmentor = segmentor.to(device).eval()
    out = Path(output)
    written = []
    for path in paths:
        image = read_image(path)
        train_ids = segment_image(segmentor, image, None if scale is None else tuple(scale), mode, flip or None)
        overlay = (0.5 * image + 0.5 * colorize(train_ids)).astype(np.uint8)
        for suffix, array in (("_labelTrainIds.png", train_ids), ("_overlay.png", overlay)):
            target = out / f"{path.stem}{suffix}"
            write_png(target, array, sync=True)
            written.append(target)
    return written
