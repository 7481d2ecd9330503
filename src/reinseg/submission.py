"""The ACDC test-server submission (``reinseg eval CONFIG CHECKPOINT --submission DIR``).

The 2,000 unlabeled test images of ACDC (``rgb_anon/<condition>/test/<sequence>/<name>_rgb_anon.png``,
read from the root of the config's ``acdc`` entry in ``data.val``) are segmented under the first
test protocol and written as the benchmark asks for semantic segmentation: one 8-bit PNG per test
image, holding Cityscapes label IDs (7 road, 8 sidewalk, ..., 33 bicycle; not train IDs), at the
image's resolution and under the image's own name, in folders mirroring ``rgb_anon/``::

    DIR/fog/test/GOPR0476/GOPR0476_frame_000854_rgb_anon.png
    DIR/night/test/...
    DIR/submission.zip        # the same tree (fog/, night/, rain/, snow/), to upload

DIR is written in a temporary folder beside it and renamed at the end: a failed or interrupted
run leaves no half-written DIR (and an existing, non-empty DIR is refused before anything runs).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["check_submission_target", "acdc_test_set", "write_acdc_submission", "train_ids_to_label_ids"]


def _acdc_entry(config):
    from .datamodule import _entries

    for entry in _entries(config, "val"):
        if entry.name == "acdc":
            return entry
    raise ValueError("--submission: data.val has no acdc entry (the ACDC test images are read from its root)")


def acdc_test_set(config):
    """The ACDC test split of every condition (the server scores the four together, whichever
    condition the config's entry evaluates), images as read; an error naming a condition's
    missing test folder."""
    from .data.datasets import build_dataset
    from .datamodule import _raw_image

    entry = _acdc_entry(config)
    options = {**entry.options, "condition": "all"}
    try:
        return entry, build_dataset("acdc", entry.root, "test", transform=_raw_image, **options)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--submission needs the test images of all four ACDC conditions: {err}") from None


def check_submission_target(config, target: Path) -> None:
    """Refuse, before the evaluation runs, a target that exists and is not empty, an unwritable
    parent folder, or a config whose ACDC root holds no test images."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"--submission: {target} exists and is not an empty folder; choose a new one")
    acdc_test_set(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise PermissionError(13, "Permission denied", str(target.parent))


def train_ids_to_label_ids(prediction: np.ndarray) -> np.ndarray:
    """(H, W) train IDs 0..18 -> Cityscapes label IDs (uint8)."""
    from .data.classes import CITYSCAPES_LABEL_IDS

    return np.asarray(CITYSCAPES_LABEL_IDS, dtype=np.uint8)[prediction]


def write_acdc_submission(task, target: Path, protocol) -> int:
    """Segment the ACDC test images with ``task.segmentor`` under ``protocol`` and write ``target``
    (see the module's docstring); returns the number of predictions."""
    import torch

    from .checkpoints import atomic_directory
    from .data.io import write_png
    from .protocols import protocol_run, protocol_scores

    entry, dataset = acdc_test_set(task.config)
    images_root = Path(entry.root) / "rgb_anon"
    run = protocol_run(protocol, [("acdc", entry)], task.config.model)
    segmentor = task.segmentor.eval()
    files = []
    # Staged beside ``target`` and renamed over it (empty or absent, checked before) when complete.
    with atomic_directory(target) as staging:
        for index in range(len(dataset)):
            item = dataset[index]
            with torch.no_grad():
                scores = protocol_scores(segmentor, run, "acdc", item["image"].numpy(), item["ori_size"])
            relative = Path(item["image_path"]).relative_to(images_root)
            write_png(staging / relative, train_ids_to_label_ids(scores.argmax(0).cpu().numpy()))
            files.append(relative)
        with zipfile.ZipFile(staging / "submission.zip.part", "w", zipfile.ZIP_DEFLATED) as archive:
            for relative in files:
                archive.write(staging / relative, relative.as_posix())
        (staging / "submission.zip.part").rename(staging / "submission.zip")
    return len(files)
