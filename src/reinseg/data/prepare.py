"""``reinseg prepare DATASET ROOT``: convert native labels to train-ID PNGs, as the field does.

- gtav: ``labels/X.png`` (Cityscapes label IDs) -> ``labels/X_labelTrainIds.png``
- synthia: ``GT/LABELS/X.png`` (16-bit, class in channel 1) -> ``GT/LABELS/X_labelTrainIds.png``
- urbansyn: ``ss/ss_X.png`` -> ``ss/ss_X_labelTrainIds.png`` (19 -> 255)
- cityscapes: ``*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (train and val)
- mapillary: ``<split>/v1.2/labels/X.png`` (66 classes) -> ``cityscapes_trainIdLabel/<split>/label/X.png``,
  and the half-resolution validation set of the official evaluation: ``half/val_img/X.jpg``
  (bicubic) and ``half/val_label/X.png`` (nearest).

Outputs are written atomically and skipped when present and intact (they decode, at the
image's size; unless ``overwrite``), so a run can be interrupted and resumed. A label whose size
differs from its image's is resized to the image
(nearest), skipped, or reported as an error, per ``on_mismatch``. Nothing is ever written from a
label with values outside its encoding: that file is reported as an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from .encodings import LabelEncoding
from .io import DataError, _open, image_size, read_image, read_label, size_mismatch, write_jpeg, write_png
from .layouts import FolderPairs, discover, split_layout
from .parallel import parallel_map

__all__ = ["PREPARABLE", "ON_MISMATCH", "PrepareSummary", "prepare"]

PREPARABLE = {
    "gtav": ("train",),
    "synthia": ("train",),
    "urbansyn": ("train",),
    "cityscapes": ("train", "val"),
    "mapillary": ("train", "val"),
}
ON_MISMATCH = ("resize", "skip", "raise")


@dataclass(frozen=True)
class _Job:
    label: str
    output: str
    image: str | None
    encoding: LabelEncoding
    half_image: str | None = None  # Mapillary validation: half-resolution copies of image ...
    half_label: str | None = None  # ... and of the converted label

    def outputs(self) -> list[str]:
        return [path for path in (self.output, self.half_image, self.half_label) if path]


@dataclass
class PrepareSummary:
    """What a preparation did. ``mismatched`` rows are (label, image HxW, label HxW, action)."""

    dataset: str
    root: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already prepared
    mismatched: list[tuple[str, str, str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"prepared {self.dataset} in {self.root}: {len(self.written)} files written, "
            f"{len(self.skipped)} skipped (already done), {len(self.mismatched)} size mismatches, "
            f"{len(self.errors)} errors"
        ]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [
            f"  size mismatch: {label}: label {label_hw} vs image {image_hw}: {action}"
            for label, image_hw, label_hw, action in self.mismatched
        ]
        lines += [f"  error: {path}: {reason}" for path, reason in self.errors]
        return "\n".join(lines)


def _hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def _intact(job: _Job) -> bool:
    """Whether every output of ``job`` exists, decodes and has its image's size (a file that an
    earlier run, a copy or a full disk left empty or truncated is redone)."""
    if not all(Path(p).exists() for p in job.outputs()):
        return False
    try:
        sizes = [read_label(job.output).shape]
        if job.half_image:
            sizes += [read_image(job.half_image).shape[:2], read_label(job.half_label).shape]
        if job.image is not None:
            height, width = image_size(job.image)
            expected = [(height, width)] + [(height // 2, width // 2)] * (len(sizes) - 1)
            return sizes == expected
    except DataError:
        return False
    return True


def _convert(job: _Job, overwrite: bool, on_mismatch: str) -> dict:
    """Convert one label; returns {"status": written|exists|skipped|error, ...} (picklable)."""
    if not overwrite and _intact(job):
        return {"status": "exists", "path": job.output, "paths": job.outputs()}
    try:
        train_ids = job.encoding.decode(read_label(job.label, job.encoding.first_channel), job.label)
        mismatch = None
        if job.image is not None:
            image_hw = image_size(job.image)
            if train_ids.shape != image_hw:
                action = {"resize": "label resized to the image (nearest)", "skip": "not converted", "raise": "error"}[
                    on_mismatch
                ]
                mismatch = (job.label, _hw(image_hw), _hw(train_ids.shape), action)
                if on_mismatch == "raise":
                    raise size_mismatch(job.image, image_hw, job.label, train_ids.shape)
                if on_mismatch == "skip":
                    return {"status": "skipped", "path": job.output, "mismatch": mismatch}
                from .transforms import resize_label  # imports torch: only when needed (fast --help)

                train_ids = resize_label(train_ids, image_hw)
        write_png(job.output, train_ids)
        if job.half_image:
            _write_half(job.image, train_ids, job.half_image, job.half_label)
    except DataError as err:
        return {"status": "error", "path": err.path, "reason": err.reason}
    # Every file written: Mapillary's validation labels come with their half-resolution copies.
    return {"status": "written", "path": job.output, "paths": job.outputs(), "mismatch": mismatch}


def _write_half(image_path: str, train_ids, image_out: str, label_out: str) -> None:
    """The official Mapillary evaluation copies (tools/convert_datasets/mapillary_resize.py):
    (w // 2, h // 2), image bicubic, label nearest, all with Pillow as the official script."""
    image = _open(image_path)
    half = (image.width // 2, image.height // 2)
    write_jpeg(image_out, image.resize(half, resample=Image.BICUBIC))
    write_png(label_out, np.asarray(Image.fromarray(train_ids).resize(half, resample=Image.NEAREST)))


def _jobs(dataset: str, root: Path, split: str) -> tuple[list[_Job], list[tuple[str, str]]]:
    """The conversions of one split, and its files without a partner."""
    options = {"half": False} if dataset == "mapillary" else {}
    [(_, _, layout)] = split_layout(dataset, root, split, options)
    prepared, native = layout.labels[0], layout.labels[1]
    found = discover(root, FolderPairs(layout.image_folder, layout.image_suffix, (native,), layout.image_prefix))
    jobs = []
    for sample in found.samples:
        half = {}
        if dataset == "mapillary" and split == "val":
            half = dict(
                half_image=str(root / "half/val_img" / f"{sample.key}.jpg"),
                half_label=str(root / "half/val_label" / f"{sample.key}.png"),
            )
        jobs.append(_Job(sample.label, str(prepared.path_for(root, sample.key)), sample.image, sample.encoding, **half))
    return jobs, found.unpaired


# Datasets whose labels ship as train IDs.
NO_PREPARATION = ("bdd100k", "acdc")
NO_PREPARATION_MESSAGE = (
    "{dataset} needs no preparation: its labels are already train IDs; `reinseg check-data` verifies them"
)


def prepare(
    dataset: str,
    root,
    workers: int | None = None,
    overwrite: bool = False,
    on_mismatch: str = "resize",
    progress: bool = True,
) -> PrepareSummary:
    """Convert a dataset's native labels to train-ID PNGs (see the module docstring).

    Args:
        dataset: gtav, synthia, urbansyn, cityscapes or mapillary.
        root: the dataset's root folder, laid out as in docs/datasets.md.
        workers: processes (default: the cores, up to 8).
        overwrite: redo outputs that exist.
        on_mismatch: for a label whose size differs from its image: "resize" it to the image
            (nearest neighbour), "skip" it, or "raise" (report it as an error).
    """
    if dataset not in PREPARABLE:
        if dataset in NO_PREPARATION:
            raise ValueError(NO_PREPARATION_MESSAGE.format(dataset=dataset))
        raise ValueError(f"cannot prepare '{dataset}'; valid: {', '.join(PREPARABLE)}")
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got '{on_mismatch}'")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root not found: {root}")
    summary = PrepareSummary(dataset, str(root))
    jobs = []
    for split in PREPARABLE[dataset]:
        try:
            split_jobs, unpaired = _jobs(dataset, root, split)
        except FileNotFoundError as err:
            summary.notes.append(f"{split}: nothing to convert ({err})")
            continue
        jobs += split_jobs
        summary.notes += [f"no partner: {path}: {reason}" for path, reason in unpaired]
    if not jobs:
        raise FileNotFoundError(f"no {dataset} labels to convert below {root}: " + "; ".join(summary.notes))
    from ..checkpoints import remove_stale_temporaries  # here: that module imports torch

    for folder in {Path(path).parent for job in jobs for path in job.outputs()}:
        remove_stale_temporaries(folder)  # half-written labels of a killed preparation
    convert = partial(_convert, overwrite=overwrite, on_mismatch=on_mismatch)
    for result in parallel_map(convert, jobs, workers, desc=f"prepare {dataset}", progress=progress):
        status = result["status"]
        if status == "error":
            summary.errors.append((result["path"], result["reason"]))
        elif status == "exists":
            summary.skipped.extend(result["paths"])
        elif status == "written":
            summary.written.extend(result["paths"])
        if result.get("mismatch"):
            summary.mismatched.append(result["mismatch"])
    return summary
