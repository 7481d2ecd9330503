"""Your own dataset: images and label PNGs of class indices, with the class names in the config.

Layout (docs/datasets.md, "Your own dataset")::

    <root>/images/<split>/<dirs>/<name><image_suffix>     # RGB images (.png, .jpg, ...)
    <root>/labels/<split>/<dirs>/<name><label_suffix>     # single-channel PNGs: 0..N-1, 255 = ignore

A dataset entry names the classes (N >= 1; two for binary segmentation) and may give a palette::

    {name: custom, root: data/cracks, split: val, classes: [background, crack],
     palette: [[0, 0, 0], [255, 0, 0]], image_suffix: .jpg}

A label value >= N other than 255 is an error naming the file and the value.
"""

from __future__ import annotations

from pathlib import Path

from .classes import IGNORE_INDEX, ClassList
from .encodings import LabelEncoding
from .layouts import REQUIRED, DatasetInfo, FolderPairs, LabelSource

__all__ = ["CUSTOM", "custom_classes"]


def custom_classes(options: dict) -> ClassList:
    """The :class:`ClassList` of a custom dataset entry's ``classes`` and ``palette``."""
    classes = ClassList(options["classes"], options["palette"], what="custom dataset option 'classes'")
    if len(classes) > IGNORE_INDEX:
        raise ValueError(f"a custom dataset has at most {IGNORE_INDEX} classes (8-bit labels, 255 ignored)")
    return classes


def _parts(info: DatasetInfo, root: Path, split: str, options: dict) -> list[tuple[str, Path, FolderPairs]]:
    num_classes = len(custom_classes(options))
    # Values 0..N-1 and 255: anything else is reported with the file (LabelEncoding.decode).
    encoding = LabelEncoding(
        f"{num_classes} classes", {**{i: i for i in range(num_classes)}, IGNORE_INDEX: IGNORE_INDEX}
    )
    labels = LabelSource(f"{options['label_folder']}/{split}", options["label_suffix"], encoding)
    return [(info.name, root, FolderPairs(f"{options['image_folder']}/{split}", options["image_suffix"], (labels,)))]


CUSTOM = DatasetInfo(
    "custom",
    (),  # any split: a folder below images/ and labels/
    None,
    "your own images and class-index label PNGs, classes named in the config",
    _parts,
    {
        "classes": (None, REQUIRED),
        "palette": (None, None),
        "image_suffix": (None, ".png"),
        "label_suffix": (None, ".png"),
        "image_folder": (None, "images"),
        "label_folder": (None, "labels"),
    },
    custom_classes,
)
