"""What ``reinseg eval --save-examples N`` adds for ``reinseg report``: per-image scores, the
confusion matrix, and the best, median and worst images of each domain saved as small PNGs.

Validation keeps only a few numbers per image (its own mIoU, pixel accuracy and scored pixels);
after it, the chosen images (at most ``3 N`` per domain) are segmented again, one at a time as
validation does, and written. No prediction is held in memory beyond the one being written.

The results JSON gains, per domain (``domains.<name>``; the JSON keys are a contract, see
docs/report.md):

- ``classes`` (names, in class-id order), ``palette`` (one ``[r, g, b]`` per class);
- ``confusion``: ``K`` rows (true class) of ``K + 1`` pixel counts (predicted class; the last
  column counts predictions outside the classes), ignored pixels left out;
- ``images``: one ``{"image", "label", "mIoU", "aAcc", "pixels"}`` per validation image
  (its files as the dataset names them; scores in percent, null where nothing is scored);
- ``examples``: ``{"best": [...], "median": [...], "worst": [...]}``, ``N`` entries each (fewer
  for a small set), and ``"also"``: the images ``--examples-like`` asked for (if any); each
  ``{"image", "label", "mIoU", "files": {"image", "label", "prediction"}}``,
  ``files`` being PNGs relative to the JSON's folder: the RGB image, the ground truth and the
  prediction in class ids (255: ignored), at most :data:`EXAMPLE_SIDE` pixels on the long side.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .metrics import scores_from_confusion

__all__ = ["EXAMPLE_SIDE", "image_scores", "choose_examples", "write_examples"]

EXAMPLE_SIDE = 512  # long side of the saved examples (small files; the report shows them smaller)


def image_scores(confusion: torch.Tensor) -> dict:
    """An image's own ``mIoU``, ``aAcc`` (percent, None where nothing is scored) and ``pixels``,
    from its ``(K, K + 1)`` confusion matrix; classes absent from its ground truth and prediction
    are left out of its mean, as for a whole domain."""
    scores = scores_from_confusion(confusion)
    return {"mIoU": scores["mIoU"], "aAcc": scores["aAcc"], "pixels": scores["pixels"]}


def choose_examples(scores: list[float | None], n: int) -> dict[str, list[int]]:
    """Indices of the ``n`` best (highest first), median and ``n`` worst (lowest first) of
    ``scores``; images without a score are never chosen, ties go to the earlier image. The
    groups overlap where there are fewer than ``3 n`` scored images."""
    order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (scores[i], i))
    start = max(0, (len(order) - n) // 2)
    return {
        "best": sorted(order, key=lambda i: (-scores[i], i))[:n],
        "median": order[start : start + n],
        "worst": order[:n],
    }


def _small(image: np.ndarray, label: np.ndarray, prediction: np.ndarray):
    """The three arrays with the long side at most :data:`EXAMPLE_SIDE` (area for the image,
    nearest for class maps, whose values must stay class ids)."""
    import cv2

    height, width = label.shape
    scale = EXAMPLE_SIDE / max(height, width)
    if scale >= 1:
        return image, label, prediction
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    label, prediction = (cv2.resize(a, size, interpolation=cv2.INTER_NEAREST) for a in (label, prediction))
    return image, label, prediction


_EXAMPLE_FILE = re.compile(r"\d{5,}_(image|label|prediction)\.png")
# What file browsers leave in a folder they showed.
BROWSER_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def holds_only(folder: Path, written: Callable[[str], object]) -> bool:
    """Whether ``folder`` is a folder (not a link to one) whose entries are all files that
    ``written`` accepts by name, or that a file browser left there."""
    return (
        folder.is_dir()
        and not folder.is_symlink()
        and all(f.is_file() and (written(f.name) or f.name in BROWSER_FILES) for f in folder.iterdir())
    )


def check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless it holds nothing or only what :func:`write_examples`
    writes (a folder per domain of ``<n>_image|label|prediction.png``): the examples of an earlier
    evaluation are replaced, anything else is a user's and stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in BROWSER_FILES:
            continue
        if not holds_only(entry, _EXAMPLE_FILE.fullmatch):
            raise ValueError(
                f"{folder} holds {entry.name}, which --save-examples did not write: it would replace the "
                "folder; choose another --json (the examples go beside it) or move the folder"
            )


def file_digest(data: bytes) -> str:
    """The SHA-256 of an example file as the results record it (``examples.<group>[].sha256``):
    the report checks that the files beside the results are the ones saved with them."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


@torch.no_grad()
def write_examples(task, n: int, folder: Path, relative_to: Path, also: dict[str, set[str]] | None = None) -> None:
    """Add ``images`` and ``examples`` to each domain of ``task.last_results`` and write the
    chosen images' PNGs into ``folder/<domain>/`` (``folder`` is written whole, then renamed:
    never half a folder). ``relative_to``: the results JSON's folder. ``also``: per domain, more
    images (files as the dataset names them) to save, listed under ``examples.also``."""
    from .checkpoints import atomic_directory
    from .data import collate
    from .data.io import write_png
    from .datamodule import domain_folder

    task.segmentor.eval()
    device = next(task.segmentor.parameters()).device
    folder = Path(folder)
    with atomic_directory(folder) as staging:
        for d, ((domain, dataset, _), records) in enumerate(zip(task.val_sets(), task.image_records, strict=True)):
            results = task.last_results["domains"][domain]
            results["classes"] = list(dataset.classes.names)
            results["palette"] = dataset.classes.palette.tolist()
            results["images"] = records
            index_of = {str(label): i for i, (_, label) in enumerate(dataset.pairs)}
            chosen = choose_examples([r["mIoU"] for r in records], n)
            wanted = (also or {}).get(domain, set())
            chosen["also"] = [i for i, r in enumerate(records) if r["image"] in wanted]
            written: dict[int, dict] = {}
            subfolder = domain_folder(domain)
            for group in chosen:
                for position in chosen[group]:
                    if position not in written:
                        record = records[position]
                        item = dataset[index_of[record["label"]]]
                        batch = collate([item])
                        batch["image"] = batch["image"].to(device)
                        # As validation predicted it (the first protocol's, if any).
                        prediction = task.predictions(batch, d, first_only=True)[0][0].cpu().numpy()
                        seen = dataset.image_as_seen(index_of[record["label"]])  # corrupted where it was
                        arrays = _small(seen, item["label"].numpy(), prediction.astype(np.uint8))
                        stem = f"{position:05d}"
                        files, digests = {}, {}
                        for name, array in zip(("image", "label", "prediction"), arrays, strict=True):
                            staged = staging / subfolder / f"{stem}_{name}.png"
                            write_png(staged, np.asarray(array, dtype=np.uint8))
                            files[name] = Path(
                                os.path.relpath(folder / subfolder / f"{stem}_{name}.png", relative_to)
                            ).as_posix()
                            digests[name] = file_digest(staged.read_bytes())
                        written[position] = {
                            "image": record["image"],
                            "label": record["label"],
                            "mIoU": record["mIoU"],
                            "files": files,
                            "sha256": digests,
                        }
            results["examples"] = {group: [written[p] for p in chosen[group]] for group in chosen if chosen[group]}
