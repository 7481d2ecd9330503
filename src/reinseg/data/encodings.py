"""Label encodings: how the pixel values of a label file become Cityscapes train IDs.

A :class:`LabelEncoding` is a lookup table from every native value a dataset may store to its
train ID. Values the table does not know are reported with the file's path, so a wrong or
corrupted label can never pass into training as a plausible class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .classes import (
    IGNORE_INDEX,
    NUM_CLASSES,
    cityscapes_id_to_train_id,
    gtav_id_to_train_id,
    mapillary_to_train_id,
    synthia_id_to_train_id,
    urbansyn_id_to_train_id,
)
from .io import DataError, read_label

__all__ = [
    "LabelEncoding",
    "TRAIN_IDS",
    "CITYSCAPES_IDS",
    "GTAV_IDS",
    "SYNTHIA_IDS",
    "URBANSYN_IDS",
    "MAPILLARY_V12_IDS",
    "mapillary_encoding",
]

_INVALID = -1


@dataclass(frozen=True)
class LabelEncoding:
    """A label file format: native value -> train ID (0..18 or 255).

    Args:
        name: what the files are, for messages (e.g. "Cityscapes label IDs").
        table: every native value the format may hold, with its train ID.
        first_channel: the labels are RGB PNGs (8- or 16-bit) with the class in the first channel
            (Synthia); otherwise they are single-channel PNGs (grayscale or palette indices).
    """

    name: str
    table: dict[int, int]
    first_channel: bool = False
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        lut = np.full(max(self.table) + 1, _INVALID, dtype=np.int16)
        for value, train_id in self.table.items():
            lut[value] = train_id
        object.__setattr__(self, "lut", lut)

    def decode(self, raw: np.ndarray, path: str = "<array>") -> np.ndarray:
        """Native values (H, W) -> train IDs (H, W) uint8; DataError naming ``path`` on unknown values."""
        raw = np.asarray(raw)
        if raw.dtype.kind == "b":
            raw = raw.astype(np.uint8)
        elif raw.dtype.kind not in "iu":
            raise DataError(path, f"label values must be integers, got {raw.dtype} values")
        if raw.size and raw.max() < len(self.lut) and raw.min() >= 0:
            mapped = self.lut[raw]
            if mapped.min() >= 0:
                return mapped.astype(np.uint8)
        raise DataError(path, self.invalid_message(self.invalid_values(raw)))

    @property
    def stores_class_ids(self) -> bool:
        """Whether the files hold the class indices themselves (train IDs, a custom dataset's
        0..N-1 and 255): every value maps to itself, nothing to prepare."""
        return all(value == train_id for value, train_id in self.table.items())

    def invalid_values(self, raw: np.ndarray) -> list[int]:
        """The distinct values of ``raw`` that this encoding does not know."""
        values = np.unique(raw)
        known = (values >= 0) & (values < len(self.lut))
        known[known] = self.lut[values[known]] >= 0
        return [int(v) for v in values[~known]]

    def invalid_message(self, values: list[int]) -> str:
        return f"label values outside the {self.name} {_format_values(sorted(self.table))}: {_format_values(values)}"

    def read(self, path: str) -> np.ndarray:
        """Read and decode a label file: (H, W) uint8 train IDs."""
        return self.decode(read_label(path, first_channel=self.first_channel), path)


def _format_values(values: list[int]) -> str:
    """[0, 1, 2, 3, 7, 255] -> '{0..3, 7, 255}'."""
    runs, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            runs.append(str(v) if v == start else f"{start}..{v}")
            start = None
    shown = runs[:12] + (["..."] if len(runs) > 12 else [])
    return "{" + ", ".join(shown) + "}"


TRAIN_IDS = LabelEncoding("train IDs", {**{i: i for i in range(NUM_CLASSES)}, IGNORE_INDEX: IGNORE_INDEX})
CITYSCAPES_IDS = LabelEncoding("Cityscapes label IDs", cityscapes_id_to_train_id())
GTAV_IDS = LabelEncoding("GTAV label IDs", gtav_id_to_train_id())
SYNTHIA_IDS = LabelEncoding("Synthia class IDs", synthia_id_to_train_id(), first_channel=True)
URBANSYN_IDS = LabelEncoding("UrbanSyn class IDs", urbansyn_id_to_train_id())
MAPILLARY_V12_IDS = LabelEncoding("Mapillary v1.2 label IDs", mapillary_to_train_id())


def mapillary_encoding(class_names: list[str] | None) -> LabelEncoding:
    """The Mapillary encoding for a dataset's own class list (``config*.json``), or v1.2's."""
    if class_names is None:
        return MAPILLARY_V12_IDS
    return LabelEncoding(f"Mapillary label IDs ({len(class_names)} classes)", mapillary_to_train_id(class_names))
