"""``reinseg check-data``: what is in a dataset and what is wrong with it.

For every dataset split: the number of pairs, the files without a partner, unreadable files,
labels whose size differs from their image, label values outside the encoding (for train-ID
files: outside {0..18, 255}; for a custom dataset of N classes: outside {0..N-1, 255}) with the
files that hold them, and the histogram over the dataset's own classes.
The target is a dataset root (the dataset named or recognised by its layout) or a YAML config
whose ``data.train`` and ``data.val`` list datasets (a missing root is reported, one line per
dataset, and the others are still checked)::

    data:
      train:
        - {name: gtav, root: data/gta, split: train}
      val:
        - {name: cityscapes, root: data/cityscapes, split: val}
        - {name: acdc, root: data/acdc, split: val, condition: night}

Relative roots are relative to the working directory, as in the official configs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..safe_load import load_yaml
from .classes import CLASSES
from .datasets import Problem, SegmentationDataset, inspect_pair
from .entries import DatasetEntry, parse_entries
from .layouts import ACDC_CONDITIONS, dataset_info
from .parallel import parallel_map

log = logging.getLogger(__name__)

__all__ = ["DatasetReport", "check_dataset", "check", "detect_dataset", "config_entries", "config_dataset_entries"]


@dataclass
class DatasetReport:
    """The check of one dataset split. ``histogram`` counts pixels of classes 0..N-1 of
    ``class_names``, then ignore."""

    name: str
    split: str
    root: str
    pairs: int
    missing_partners: list[tuple[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    histogram: np.ndarray | None = None
    missing: str | None = None  # why the split could not be read at all (its root or a folder is missing)
    class_names: tuple[str, ...] = CLASSES

    def __post_init__(self):
        if self.histogram is None:
            self.histogram = np.zeros(len(self.class_names) + 1, dtype=np.int64)

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    @property
    def invalid_values(self) -> dict[str, list[int]]:
        """{label path: values outside the encoding}."""
        return {p.path: list(p.values) for p in self.of_kind("invalid values")}

    @property
    def ok(self) -> bool:
        return not (self.missing or self.missing_partners or self.problems)

    def to_dict(self) -> dict:
        names = list(self.class_names) + ["ignore"]
        return {
            "name": self.name,
            "split": self.split,
            "root": self.root,
            "pairs": self.pairs,
            "ok": self.ok,
            "missing": self.missing,
            "missing_partners": [{"path": p, "reason": r} for p, r in self.missing_partners],
            "unreadable": [{"path": p.path, "reason": p.reason} for p in self.of_kind("unreadable")],
            "size_mismatches": [{"path": p.path, "reason": p.reason} for p in self.of_kind("size mismatch")],
            "invalid_values": [
                {"path": p.path, "values": list(p.values), "reason": p.reason} for p in self.of_kind("invalid values")
            ],
            "histogram": dict(zip(names, self.histogram.tolist(), strict=False)),
        }

    def format(self, most: int = 10) -> str:
        if self.missing is not None:
            return f"{self.name} {self.split}: {self.missing}"
        lines = [f"{self.name} {self.split} ({self.root}): {self.pairs} pairs"]
        sections = [("missing partners", [f"{p}: {r}" for p, r in self.missing_partners])]
        for kind, title in (
            ("unreadable", "unreadable files"),
            ("size mismatch", "size mismatches"),
            ("invalid values", "labels with values outside the classes"),
        ):
            sections.append((title, [f"{p.path}: {p.reason}" for p in self.of_kind(kind)]))
        for title, rows in sections:
            lines.append(f"  {title}: {len(rows)}")
            lines += [f"    {row}" for row in rows[:most]]
            if len(rows) > most:
                lines.append(f"    ... and {len(rows) - most} more")
        total = int(self.histogram.sum())
        if total:
            shares = [
                f"{name} {100 * count / total:.1f}%"
                for name, count in zip(list(self.class_names) + ["ignore"], self.histogram.tolist(), strict=False)
                if count
            ]
            lines.append("  class histogram (share of label pixels): " + ", ".join(shares))
        return "\n".join(lines)


def _inspect(item):
    (image, label), encoding, num_classes = item
    return inspect_pair(image, label, encoding, num_classes)


def check_dataset(
    dataset: SegmentationDataset, split: str = "", root: str = "", workers: int | None = None, progress: bool = True
) -> DatasetReport:
    """Read every pair of ``dataset`` and report its problems and class histogram."""
    report = DatasetReport(
        dataset.name,
        split,
        str(root),
        len(dataset.pairs),
        missing_partners=list(dataset.skipped),
        class_names=dataset.classes.names,
    )
    items = [
        (pair, encoding, len(dataset.classes)) for pair, encoding in zip(dataset.pairs, dataset.encodings, strict=False)
    ]
    for pair_report in parallel_map(_inspect, items, workers, desc=f"check {dataset.name}", progress=progress):
        report.problems += pair_report.problems
        if pair_report.histogram is not None:
            report.histogram += pair_report.histogram
    return report


class OwnDatasetLayout(ValueError):
    """A root in the layout of a custom dataset, which needs its classes to be read."""


def detect_dataset(root) -> str:
    """The dataset whose layout ``root`` has; ValueError listing what was looked for otherwise."""
    root = Path(root)
    markers = [  # the first match wins: BDD100K also has images/ and labels/, like GTAV
        ("cityscapes", ("leftImg8bit", "gtFine")),
        ("acdc", ("rgb_anon",)),
        ("bdd100k", ("images/10k",)),
        ("synthia", ("RGB", "GT/LABELS")),
        ("urbansyn", ("rgb", "ss")),
        ("gtav", ("images", "labels")),
        ("mapillary", ("training/images",)),
        ("mapillary", ("half/val_img",)),
    ]
    for name, folders in markers:
        if all((root / folder).is_dir() for folder in folders):
            if name == "gtav" and not _holds_a_file(root / "images"):
                # GTAV keeps its frames directly in images/; your own dataset has split folders there.
                raise OwnDatasetLayout(
                    f"{root} has the layout of your own dataset (images/<split>/, labels/<split>/), not "
                    "GTAV's: check it with --dataset custom --split SPLIT and its classes (docs/datasets.md)"
                )
            return name
    # The synthetic benchmark's domains are Cityscapes layouts of one city, "synth" (a folder of
    # dataset roots, data/ holding cityscapes/, is not one).
    if root.is_dir() and any(next((child / "leftImg8bit").glob("*/synth"), None) for child in root.iterdir()):
        return "synthetic"
    looked_for = "; ".join(f"{name}: {' + '.join(folders)}" for name, folders in markers)
    raise ValueError(
        f"cannot tell which dataset {root} holds (looked for {looked_for}; "
        f"synthetic: <domain>/leftImg8bit); name it with --dataset"
    )


def _holds_a_file(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() for entry in entries)


_SPLIT_FOLDERS = ("train", "val", "test", "training", "validation", "testing")


def dataset_roots_below(folder: Path) -> list[Path]:
    """The dataset roots directly in ``folder`` (``data/`` holding ``cityscapes/``, ``gta/``, ...)
    when ``folder`` is none itself: empty otherwise."""
    try:
        detect_dataset(folder)
        return []
    except ValueError:
        pass
    roots = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            detect_dataset(child)
        except OwnDatasetLayout as err:  # not checkable without its classes: say so
            log.warning("skipping %s", err)
            continue
        except ValueError:
            continue
        if child.name.lower() in _SPLIT_FOLDERS:  # a split of one dataset (custom, Mapillary), not a root
            return []
        roots.append(child)
    return roots


def config_entries(path) -> list[dict]:
    """The dataset entries of a YAML config's ``data.train`` and ``data.val`` as dicts
    ``{section, name, root, split, **options}`` (see :func:`config_dataset_entries`)."""
    return [
        {"section": e.section, "name": e.name, "root": e.root, "split": e.split, **e.options}
        for e in config_dataset_entries(path)
    ]


def config_dataset_entries(path) -> list[DatasetEntry]:
    """The dataset entries of a YAML config's ``data.train`` and ``data.val``, parsed as training
    and evaluation parse them. The other keys of ``data`` (crop_size, batch_size, ...) are
    checked as :class:`~reinseg.config.DataConfig` checks them, and otherwise ignored."""
    from ..config import DataConfig, from_dict

    path = Path(path)
    try:
        config = load_yaml(path.read_text(), str(path))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: no 'data' section with train/val lists of datasets")
    try:
        checked = from_dict(DataConfig, data, "data")
        entries = parse_entries(checked.train, "train") + parse_entries(checked.val, "val")
    except ValueError as err:  # ConfigError included
        raise ValueError(f"{path}: {err}") from None
    if not entries:
        raise ValueError(f"{path}: data.train and data.val list no dataset")
    return entries


def _root_entries(root: Path, dataset: str | None, split: str | None, options: dict) -> list[tuple[DatasetEntry, bool]]:
    """(entry, optional) for every split of a dataset root: optional unless ``split`` is given (a
    root may hold only some splits)."""
    name = dataset or detect_dataset(root)
    info = dataset_info(name)
    # One entry per synthetic domain and ACDC condition, so a root holding some of them checks those.
    if name == "synthetic" and "domain" not in options:
        domains = sorted(p.name for p in root.iterdir() if (p / "leftImg8bit").is_dir())
        return [e for d in domains for e in _root_entries(root, name, split, {**options, "domain": d})]
    if name == "acdc" and "condition" not in options:
        return [e for c in ACDC_CONDITIONS for e in _root_entries(root, name, split, {**options, "condition": c})]
    if not (split or info.splits):
        raise ValueError(f"name the split of the {name} dataset to check (--split)")
    splits = [split] if split else list(info.splits)
    if name == "gtav" and not split:
        splits = ["train"]  # val and test (split.mat) are frames of train: checked once
    return [(DatasetEntry(name, str(root), s, options, where=str(root)), split is None) for s in splits]


def check(
    target,
    dataset: str | None = None,
    split: str | None = None,
    workers: int | None = None,
    on_error: str = "skip",
    progress: bool = True,
    **options,
) -> list[DatasetReport]:
    """Check a dataset root or every dataset of a YAML config (see the module docstring).

    With ``on_error="raise"`` the first problem raises a ValueError naming the file; with
    "skip" (default) every problem is collected into the reports.
    """
    target = Path(target)
    if not target.exists():
        raise FileNotFoundError(f"not found: {target}")
    from_config = target.is_file()
    if from_config:
        if dataset or split or options:
            raise ValueError("--dataset, --split and dataset options go with a dataset root, not a config")
        entries = [(entry, False) for entry in config_dataset_entries(target)]
    elif dataset is None and (roots := dataset_roots_below(target)):
        if split or options:
            raise ValueError(f"--split and dataset options go with one dataset root, not {target}, a folder of them")
        entries = [entry for root in roots for entry in _root_entries(root, None, None, {})]
    else:
        entries = _root_entries(target, dataset, split, options)
    reports = []
    for entry, optional in entries:
        try:
            data = entry.build(on_error=on_error)
        except FileNotFoundError as err:
            if optional:  # a root holding only some splits
                continue
            if not from_config:
                raise
            # A config names several datasets: report every missing one, not just the first.
            label = "/".join(
                [entry.name] + [str(entry.options[k]) for k in ("condition", "domain") if k in entry.options]
            )
            reports.append(DatasetReport(label, entry.split, entry.root, 0, missing=str(err)))
            continue
        if on_error == "raise":
            data.validate(workers or 1)
        reports.append(check_dataset(data, entry.split, entry.root, workers, progress))
    if not reports:
        raise FileNotFoundError(f"no split of {dataset or 'the dataset'} found in {target}")
    return reports
