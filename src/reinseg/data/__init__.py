"""Datasets of domain-generalized segmentation, their preparation, transforms, and a synthetic benchmark.

The built-in datasets are scored in the 19 Cityscapes train classes (:data:`CLASSES`, ignore
255). Sources: GTAV, Synthia, UrbanSyn; targets: Cityscapes, BDD100K, Mapillary, ACDC;
:mod:`.synthetic`, procedural street scenes in several visual domains; and ``custom``, your own
images and labels in the classes its config entry names (a dataset's ``classes`` is a
:class:`ClassList`). See docs/datasets.md for the layouts.

    from reinseg.data import build_dataset, train_transform, eval_transform, TEST_SCALES, collate

    train = build_dataset("gtav", "data/gta", "train", transform=train_transform())
    val = build_dataset("cityscapes", "data/cityscapes", "val",
                        transform=eval_transform(TEST_SCALES["cityscapes"]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Public name -> the module defining it, imported on first use: the datasets and transforms
# import torch, which the data tools' command line (`reinseg prepare --help`) does not need.
_EXPORTS = {
    "CLASSES": ".classes",
    "PALETTE": ".classes",
    "IGNORE_INDEX": ".classes",
    "NUM_CLASSES": ".classes",
    "colorize": ".classes",
    "ClassList": ".classes",
    "CITYSCAPES_CLASSES": ".classes",
    "DatasetInfo": ".layouts",
    "register_dataset": ".layouts",
    "DatasetEntry": ".entries",
    "parse_entries": ".entries",
    "IMAGENET_MEAN": ".transforms",
    "IMAGENET_STD": ".transforms",
    "train_transform": ".transforms",
    "eval_transform": ".transforms",
    "TEST_SCALES": ".layouts",
    "eval_scale": ".layouts",
    "official_test_scale": ".layouts",
    "OFFICIAL_SCALES_BY_CROP": ".layouts",
    "DATASETS": ".layouts",
    "ACDC_CONDITIONS": ".layouts",
    "DataError": ".io",
    "LabelEncoding": ".encodings",
    "SegmentationDataset": ".datasets",
    "ConcatSegmentationDataset": ".datasets",
    "build_dataset": ".datasets",
    "build_datasets": ".datasets",
    "collate": ".datasets",
    "collate_training": ".datasets",
    "label_values": ".datasets",
}

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEST_SCALES",
    "eval_scale",
    "official_test_scale",
    "OFFICIAL_SCALES_BY_CROP",
    "DATASETS",
    "ACDC_CONDITIONS",
    "DataError",
    "LabelEncoding",
    "SegmentationDataset",
    "ConcatSegmentationDataset",
    "build_dataset",
    "build_datasets",
    "collate",
    "collate_training",
    "label_values",
    "colorize",
    "ClassList",
    "CITYSCAPES_CLASSES",
    "DatasetInfo",
    "register_dataset",
    "DatasetEntry",
    "parse_entries",
    "train_transform",
    "eval_transform",
]

if TYPE_CHECKING:
    from .classes import CITYSCAPES_CLASSES, CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, ClassList, colorize
    from .datasets import (
        ConcatSegmentationDataset,
        SegmentationDataset,
        build_dataset,
        build_datasets,
        collate,
        collate_training,
        label_values,
    )
    from .encodings import LabelEncoding
    from .entries import DatasetEntry, parse_entries
    from .io import DataError
    from .layouts import (
        ACDC_CONDITIONS,
        DATASETS,
        OFFICIAL_SCALES_BY_CROP,
        TEST_SCALES,
        DatasetInfo,
        eval_scale,
        official_test_scale,
        register_dataset,
    )
    from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
