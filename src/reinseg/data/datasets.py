"""Segmentation datasets: image/label pairs read, checked and transformed per item.

``build_dataset(name, root, split)`` finds the pairs of a dataset in its native or prepared
layout (see :mod:`reinseg.data.layouts`) and returns a :class:`SegmentationDataset`. Each item is
checked when it is loaded: a missing, unreadable or mismatched file, or a label value outside
the encoding, raises a ValueError naming the file, or with ``on_error="skip"`` is left out,
recorded in ``dataset.skipped`` as (path, reason) and logged.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from .classes import CITYSCAPES_CLASSES, IGNORE_INDEX, NUM_CLASSES, ClassList
from .encodings import TRAIN_IDS, LabelEncoding
from .io import DataError, read_image, read_label, size_mismatch
from .layouts import dataset_classes, discover, split_layout
from .transforms import eval_transform

__all__ = [
    "SegmentationDataset",
    "ConcatSegmentationDataset",
    "build_dataset",
    "build_datasets",
    "collate",
    "collate_training",
    "label_values",
    "read_pair",
    "inspect_pair",
    "Problem",
    "PairReport",
]

log = logging.getLogger("reinseg.data")

ON_ERROR = ("raise", "skip")


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
    return on_error


def read_pair(image_path: str, label_path: str | None, encoding: LabelEncoding | None = TRAIN_IDS):
    """(image (H, W, 3) uint8 RGB, label (H, W) uint8 train IDs or None); DataError on any problem."""
    image = read_image(image_path)
    if label_path is None:
        return image, None
    encoding = encoding or TRAIN_IDS
    label = encoding.read(label_path)
    if label.shape != image.shape[:2]:
        raise size_mismatch(image_path, image.shape[:2], label_path, label.shape, not encoding.stores_class_ids)
    return image, label


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pair: ``kind`` is "unreadable", "size mismatch" or "invalid values"
    (then ``values`` lists the offending label values); ``path`` is the file at fault."""

    kind: str
    path: str
    reason: str
    values: tuple[int, ...] = ()


@dataclass
class PairReport:
    problems: list[Problem] = field(default_factory=list)
    histogram: np.ndarray | None = None  # pixels per class 0..N-1, then ignore (N + 1,)


def inspect_pair(
    image_path: str,
    label_path: str | None,
    encoding: LabelEncoding | None = TRAIN_IDS,
    num_classes: int = NUM_CLASSES,
) -> PairReport:
    """Every problem of one pair (not just the first), and its histogram over ``num_classes``
    classes and ignore when the label is valid."""
    report = PairReport()
    image_hw = None
    try:
        image_hw = read_image(image_path).shape[:2]
    except DataError as err:
        report.problems.append(Problem("unreadable", err.path, err.reason))
    if label_path is None:
        return report
    encoding = encoding or TRAIN_IDS
    try:
        raw = read_label(label_path, first_channel=encoding.first_channel)
    except DataError as err:
        report.problems.append(Problem("unreadable", err.path, err.reason))
        return report
    if image_hw is not None and raw.shape != image_hw:
        err = size_mismatch(image_path, image_hw, label_path, raw.shape, not encoding.stores_class_ids)
        report.problems.append(Problem("size mismatch", err.path, err.reason))
    bad = encoding.invalid_values(raw)
    if bad:
        report.problems.append(Problem("invalid values", label_path, encoding.invalid_message(bad), tuple(bad)))
        return report
    label = encoding.decode(raw, label_path)
    counts = np.bincount(label.ravel(), minlength=256)
    report.histogram = np.append(counts[:num_classes], counts[IGNORE_INDEX]).astype(np.int64)
    return report


class SegmentationDataset(Dataset):
    """Image/label pairs of one dataset split.

    Args:
        name: what the data is, e.g. "cityscapes" or "acdc/night".
        pairs: (image path, label path or None) per item.
        encodings: the :class:`LabelEncoding` of each label (default: train-ID PNGs).
        transform: ``t(image, label, rng=...) -> (image tensor, label tensor)`` (default: ImageNet
            normalization only); see :mod:`reinseg.data.transforms`.
        on_error: "raise" (a ValueError naming the file) or "skip" (the item is replaced by the
            next loadable one, and (path, reason) is appended to ``skipped`` and logged).
        skipped: problems found before loading, e.g. files without a partner.
        seed: None draws fresh randomness per item; an int makes item ``i`` of epoch ``e``
            reproducible (see :meth:`set_epoch`).
        classes: the :class:`ClassList` the labels are in (default: the 19 Cityscapes classes).

    An item is a dict: ``image`` float32 (3, H, W), ``label`` int64 (H, W) with 255 = ignore
    (None for unlabeled splits), ``image_path``, ``label_path`` (str or None) and ``ori_size``
    (H0, W0) of the label (or of the image when unlabeled). Evaluation transforms resize the
    image only: the label keeps its resolution, and predictions are resized back to it.
    """

    def __init__(
        self,
        name: str,
        pairs,
        encodings=None,
        *,
        transform=None,
        on_error: str = "raise",
        skipped=None,
        seed: int | None = None,
        classes: ClassList = CITYSCAPES_CLASSES,
    ):
        self.name = name
        self.classes = classes
        self.pairs = [(str(image), None if label is None else str(label)) for image, label in pairs]
        self.encodings = list(encodings) if encodings is not None else [TRAIN_IDS] * len(self.pairs)
        if len(self.encodings) != len(self.pairs):
            raise ValueError(f"{len(self.pairs)} pairs but {len(self.encodings)} encodings")
        self.transform = transform if transform is not None else eval_transform(None)
        self.on_error = _check_on_error(on_error)
        self.skipped = list(skipped or [])
        self.seed = seed
        self.epoch = 0
        # Which of the datasets trained together this is (ConcatSegmentationDataset sets it; 0:
        # the first or only one): item i of each draws its own augmentations.
        self.seed_stream = 0
        # The part (e.g. "acdc/fog") of each image of a dataset read in several parts; else empty.
        self.part_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """With a ``seed``, draw other (still reproducible) augmentations in each epoch."""
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        key = [self.seed, self.epoch, index] + ([self.seed_stream] if self.seed_stream else [])
        return np.random.default_rng(key)

    def load(self, index: int) -> dict:
        """Item ``index`` without the skip policy: DataError on any problem."""
        image_path, label_path = self.pairs[index]
        image, label = read_pair(image_path, label_path, self.encodings[index])
        ori_size = tuple(label.shape) if label is not None else tuple(image.shape[:2])
        image, label = self.transform(image, label, rng=self._rng(index))
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{self.name}: the transform must end with ToTensor(), got {type(image).__name__}")
        return {
            "image": image,
            "label": label,
            "image_path": image_path,
            "label_path": label_path,
            "ori_size": ori_size,
        }

    def image_as_seen(self, index: int) -> np.ndarray:
        """Image ``index`` as the model sees it before resizing and normalisation, (H, W, 3)
        uint8 RGB: the file's pixels after the transform's leading pixel-only steps (a
        Cityscapes-C corruption), drawn as :meth:`load` draws them."""
        from .transforms import as_generator

        image = read_image(self.pairs[index][0])
        rng = as_generator(self._rng(index))
        for step in getattr(self.transform, "transforms", ()):
            if not getattr(step, "pixels_only", False):
                break
            image, _ = step(image, None, rng=rng)
        return image

    def __getitem__(self, index: int) -> dict:
        if not -len(self.pairs) <= index < len(self.pairs):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self.pairs)} pairs")
        index %= len(self.pairs)
        for attempt in range(len(self.pairs)):
            position = (index + attempt) % len(self.pairs)
            try:
                return self.load(position)
            except DataError as err:
                if self.on_error == "raise":
                    raise
                self._skip(err.path, err.reason)
        raise DataError(self.name, f"none of its {len(self.pairs)} pairs could be loaded")

    def _skip(self, path: str, reason: str) -> None:
        if (path, reason) not in self.skipped:
            self.skipped.append((path, reason))
            log.warning("%s: skipped %s: %s", self.name, path, reason)

    def validate(self, workers: int = 4) -> list[Problem]:
        """Read every pair now; raise on the first problem, or with ``on_error="skip"`` drop the
        bad pairs (recorded in ``skipped``). Returns the problems found."""
        with ThreadPoolExecutor(max(1, workers)) as pool:
            reports = list(
                pool.map(
                    lambda p: inspect_pair(p[0][0], p[0][1], p[1], len(self.classes)),
                    zip(self.pairs, self.encodings, strict=False),
                )
            )
        problems = [problem for report in reports for problem in report.problems]
        if problems and self.on_error == "raise":
            first = problems[0]
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DataError(first.path, first.reason + more)
        keep = [not report.problems for report in reports]
        for problem in problems:
            self._skip(problem.path, problem.reason)
        self.pairs = [p for p, k in zip(self.pairs, keep, strict=False) if k]
        self.encodings = [e for e, k in zip(self.encodings, keep, strict=False) if k]
        return problems

    def __repr__(self):
        return f"SegmentationDataset({self.name!r}, {len(self)} pairs, {len(self.skipped)} skipped)"


class ConcatSegmentationDataset(ConcatDataset):
    """Several datasets as one (e.g. GTAV + Synthia + UrbanSyn), with their pairs and skips."""

    def __init__(self, datasets):
        super().__init__(datasets)
        self.name = "+".join(d.name for d in self.datasets)
        for k, d in enumerate(self.datasets):
            if isinstance(d, SegmentationDataset):
                d.seed_stream = k  # else item i of every dataset would be cropped and flipped alike
        self.classes = self.datasets[0].classes
        for d in self.datasets[1:]:
            if d.classes != self.classes:
                raise ValueError(
                    f"{d.name} is labelled in other classes than {self.datasets[0].name} "
                    f"({len(d.classes)}: {', '.join(d.classes.names)} vs {len(self.classes)}: "
                    f"{', '.join(self.classes.names)}); one training set has one class list"
                )

    @property
    def pairs(self):
        return [pair for d in self.datasets for pair in d.pairs]

    @property
    def skipped(self):
        return [skip for d in self.datasets for skip in d.skipped]

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)


def build_dataset(
    name: str,
    root,
    split: str = "train",
    *,
    transform=None,
    on_error: str = "raise",
    seed: int | None = None,
    **options,
) -> SegmentationDataset:
    """Read a dataset split from its native or prepared layout.

    Names: gtav, synthia, urbansyn, cityscapes, bdd100k, mapillary (option ``half``, default
    True: the official half-resolution validation set), acdc (option ``condition``: fog, night,
    rain, snow or all), synthetic (option ``domain``) and custom (options ``classes``, ``palette``,
    ``image_suffix``, ``label_suffix``: see :mod:`reinseg.data.custom`); the dataset's class list
    is its ``classes``. Files without a partner raise a
    ValueError naming the file, or with ``on_error="skip"`` are left out and listed in ``skipped``.
    """
    _check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root not found: {root}")
    parts = split_layout(name, root, split, options)
    classes = dataset_classes(name, options, split)
    pairs, encodings, unpaired, part_of = [], [], [], {}
    for part_name, part_root, layout in parts:
        try:
            found = discover(part_root, layout)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{part_name} {split}: {err} (layouts: docs/datasets.md)") from None
        pairs += [(s.image, s.label) for s in found.samples]
        part_of.update({s.image: part_name for s in found.samples})
        encodings += [s.encoding for s in found.samples]
        unpaired += found.unpaired
    display_name = parts[0][0] if len(parts) == 1 else name
    if unpaired and on_error == "raise":
        path, reason = unpaired[0]
        more = f"; {len(unpaired)} files without a partner in all" if len(unpaired) > 1 else ""
        raise DataError(path, f"{reason}{more} (on_error='skip' leaves them out)")
    for path, reason in unpaired:
        log.warning("%s: skipped %s: %s", display_name, path, reason)
    dataset = SegmentationDataset(
        display_name,
        pairs,
        encodings,
        transform=transform,
        on_error=on_error,
        skipped=unpaired,
        seed=seed,
        classes=classes,
    )
    if len(parts) > 1:
        dataset.part_of = part_of
    return dataset


def build_datasets(
    entries, *, transform=None, on_error: str = "raise", seed: int | None = None, section: str = "train"
):
    """Datasets from config entries ``{name, root, split, **options}`` (a YAML ``data.train`` list,
    or with ``section="val"`` a ``data.val`` list: its ``scale``, ``label``, ``in_mean`` keys
    read, one dataset per corruption and severity of an entry with ``corruptions``)."""
    from .entries import EVAL_ENTRY_KEYS, parse_entries

    if section not in ("train", "val"):
        raise ValueError(f"section must be 'train' or 'val', got {section!r}")
    if section == "train":
        for i, entry in enumerate(entries):
            own = [k for k in EVAL_ENTRY_KEYS if isinstance(entry, dict) and k in entry]
            if own:
                raise ValueError(
                    f"dataset entry {i}: {', '.join(own)} are keys of data.val entries: "
                    "build_datasets(entries, section='val')"
                )
    parsed = [expanded for entry in parse_entries(entries, section) for expanded in entry.expanded()]
    kwargs = {} if seed is None else {"seed": seed}
    datasets = []
    for entry in parsed:
        # A data.val entry's own scale (else its dataset's) unless a transform is given.
        own = eval_transform(entry.eval_scale()) if transform is None and section == "val" else transform
        dataset = entry.build(transform=own, on_error=on_error, **kwargs)
        if entry.label is not None:  # its domain's name in results (Cityscapes-C: one per corruption)
            dataset.name = entry.label
        datasets.append(dataset)
    return datasets


def collate(items: list[dict]) -> dict:
    """Stack items of equal size: ``image`` (B, 3, H, W), ``label`` (B, H, W) or None, and lists
    of ``image_path``, ``label_path``, ``ori_size``."""
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(shapes)}; use crops of one size or batch_size=1"
        )
    labels = [item["label"] for item in items]
    if any(label is None for label in labels):
        label = None
    else:
        label_shapes = {tuple(lb.shape) for lb in labels}
        if len(label_shapes) > 1:
            raise ValueError(f"cannot batch labels of different sizes {sorted(label_shapes)}; use batch_size=1")
        label = torch.stack(labels)
    return {
        "image": torch.stack([item["image"] for item in items]),
        "label": label,
        "image_path": [item["image_path"] for item in items],
        "label_path": [item["label_path"] for item in items],
        "ori_size": [item["ori_size"] for item in items],
    }


def collate_training(items: list[dict]) -> dict:
    """:func:`collate`, and ``label_values``: each label's distinct values (:func:`label_values`).

    Found here, in a data worker, the loss takes each image's classes from them
    (``Segmentor.loss(..., label_values=)``) instead of reading them back from a GPU: that read
    makes the host wait for the forward, and the device then idles while the host queues the
    matching's operations."""
    batch = collate(items)
    batch["label_values"] = None if batch["label"] is None else [label_values(label) for label in batch["label"]]
    return batch


def label_values(label: torch.Tensor) -> list[int]:
    """The distinct values of an integer label map (any shape), ascending, as Python ints."""
    flat = label.reshape(-1)
    if not flat.numel():
        return []
    low, high = (int(v) for v in torch.aminmax(flat))
    if low >= 0 and high < 1 << 16:  # a count per value: ~25x faster than unique's sort here
        return torch.bincount(flat, minlength=high + 1).nonzero().view(-1).tolist()
    return torch.unique(flat).tolist()
