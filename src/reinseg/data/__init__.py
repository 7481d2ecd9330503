"""Datasets of domain-generalized segmentation, their preparation, transforms, and a synthetic benchmark.

Everything is scored in the 19 Cityscapes train classes (:data:`CLASSES`, ignore 255). Sources:
GTAV, Synthia, UrbanSyn; targets: Cityscapes, BDD100K, Mapillary, ACDC; and :mod:`.synthetic`,
procedural street scenes in several visual domains. See docs/datasets.md for the layouts.

    from reinseg.data import build_dataset, train_transform, eval_transform, TEST_SCALES, collate

    train = build_dataset("gtav", "data/gta", "train", transform=train_transform())
    val = build_dataset("cityscapes", "data/cityscapes", "val",
                        transform=eval_transform(TEST_SCALES["cityscapes"]))
"""

from .classes import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, colorize
from .datasets import (
    ConcatSegmentationDataset,
    SegmentationDataset,
    build_dataset,
    build_datasets,
    collate,
)
from .encodings import LabelEncoding
from .io import DataError
from .layouts import ACDC_CONDITIONS, DATASETS, TEST_SCALES
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TEST_SCALES",
    "DATASETS",
    "ACDC_CONDITIONS",
    "DataError",
    "LabelEncoding",
    "SegmentationDataset",
    "ConcatSegmentationDataset",
    "build_dataset",
    "build_datasets",
    "collate",
    "colorize",
    "train_transform",
    "eval_transform",
]
