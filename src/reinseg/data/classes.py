"""The 19 Cityscapes train classes and how each dataset's native label IDs map onto them.

Every dataset in the field is scored in the 19 Cityscapes train classes: train ID ``i`` is
``CLASSES[i]``, and :data:`IGNORE_INDEX` (255) marks pixels that are neither trained on nor scored.
The tables below give, for each dataset's native label encoding, the train ID of every native ID
(255 for native classes outside the 19); a native ID missing from a table is an error, never a
silent 255.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CLASSES",
    "PALETTE",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "CITYSCAPES_LABEL_IDS",
    "cityscapes_id_to_train_id",
    "gtav_id_to_train_id",
    "synthia_id_to_train_id",
    "urbansyn_id_to_train_id",
    "MAPILLARY_V12_NAMES",
    "mapillary_to_train_id",
    "colorize",
    "ClassList",
    "CITYSCAPES_CLASSES",
    "default_palette",
]

CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255

# Cityscapes colours (cityscapesScripts labels.py), one RGB row per train ID.
PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)

# The Cityscapes label ID of each train ID (cityscapesScripts labels.py, `id` of the labels whose
# `trainId` is 0..18). Label IDs 0..33 exist; all others of them are void.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _table(known_ids: range, train_id_of: dict[int, int]) -> dict[int, int]:
    """Every ID in ``known_ids`` mapped to its train ID, 255 where ``train_id_of`` has none."""
    return {i: train_id_of.get(i, IGNORE_INDEX) for i in known_ids}


def cityscapes_id_to_train_id() -> dict[int, int]:
    """Cityscapes ``*_labelIds.png`` (IDs 0..33) to train IDs; ACDC's ``*_gt_labelIds.png`` too."""
    return _table(range(34), {label_id: t for t, label_id in enumerate(CITYSCAPES_LABEL_IDS)})


def gtav_id_to_train_id() -> dict[int, int]:
    """GTAV ("Playing for Data") label PNGs: palette indices that are Cityscapes label IDs.

    The official converter (tools/convert_datasets/gta.py, from DAFormer) keeps the 19 train
    classes and voids the rest. GTAV also uses ID 34 (void, as in other GTAV loaders).
    """
    return _table(range(35), {label_id: t for t, label_id in enumerate(CITYSCAPES_LABEL_IDS)})


# SYNTHIA RAND-CITYSCAPES README: 0 void, 1 sky, 2 building, 3 road, 4 sidewalk, 5 fence,
# 6 vegetation, 7 pole, 8 car, 9 traffic sign, 10 pedestrian, 11 bicycle, 12 motorcycle,
# 13 parking-slot, 14 road-work, 15 traffic light, 16 terrain, 17 rider, 18 truck, 19 bus,
# 20 train, 21 wall, 22 lanemarking. The field (DAFormer's synthia.py) keeps the 19 train
# classes and voids parking-slot, road-work and lanemarking.
_SYNTHIA_TRAIN_ID = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,
    19: 15,
    20: 16,
    12: 17,
    11: 18,
}


def synthia_id_to_train_id() -> dict[int, int]:
    """Synthia class IDs (first channel of the 16-bit ``GT/LABELS`` PNGs, 0..22) to train IDs."""
    return _table(range(23), _SYNTHIA_TRAIN_ID)


def urbansyn_id_to_train_id() -> dict[int, int]:
    """UrbanSyn ``ss/ss_*.png``: already Cityscapes train IDs 0..18, with 19 (and 255) unlabeled."""
    table = {i: i for i in range(NUM_CLASSES)}
    table.update({19: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX})
    return table


# Mapillary Vistas v1.2: the 66 classes of config_v1.2.json ("readable" names), in label-ID order.
MAPILLARY_V12_NAMES = (
    "Bird",
    "Ground Animal",
    "Curb",
    "Fence",
    "Guard Rail",
    "Barrier",
    "Wall",
    "Bike Lane",
    "Crosswalk - Plain",
    "Curb Cut",
    "Parking",
    "Pedestrian Area",
    "Rail Track",
    "Road",
    "Service Lane",
    "Sidewalk",
    "Bridge",
    "Building",
    "Tunnel",
    "Person",
    "Bicyclist",
    "Motorcyclist",
    "Other Rider",
    "Lane Marking - Crosswalk",
    "Lane Marking - General",
    "Mountain",
    "Sand",
    "Sky",
    "Snow",
    "Terrain",
    "Vegetation",
    "Water",
    "Banner",
    "Bench",
    "Bike Rack",
    "Billboard",
    "Catch Basin",
    "CCTV Camera",
    "Fire Hydrant",
    "Junction Box",
    "Mailbox",
    "Manhole",
    "Phone Booth",
    "Pothole",
    "Street Light",
    "Pole",
    "Traffic Sign Frame",
    "Utility Pole",
    "Traffic Light",
    "Traffic Sign (Back)",
    "Traffic Sign (Front)",
    "Trash Can",
    "Bicycle",
    "Boat",
    "Bus",
    "Car",
    "Caravan",
    "Motorcycle",
    "On Rails",
    "Other Vehicle",
    "Trailer",
    "Truck",
    "Wheeled Slow",
    "Car Mount",
    "Ego Vehicle",
    "Unlabeled",
)

# The official Rein converter (tools/convert_datasets/mapillary2cityscape.py) matches names with
# spaces and hyphens removed: first a Cityscapes class of the same name, then these substring
# rules in this order, and voids everything else.
_MAPILLARY_RULES = (
    (("trafficsign", "front", "back"), "traffic sign"),
    (("onrail",), "train"),
    (("cyclist", "rider"), "rider"),
    (("pole", "streetlight"), "pole"),
    (("curb", "pedestrianarea"), "sidewalk"),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
)


def _squash(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "")


def _mapillary_rule(squashed: str) -> int:
    for keys, target in _MAPILLARY_RULES:
        if any(key in squashed for key in keys):
            return CLASSES.index(target)
    return IGNORE_INDEX


def mapillary_to_train_id(names: tuple[str, ...] | list[str] = MAPILLARY_V12_NAMES) -> dict[int, int]:
    """Mapillary label IDs to train IDs, from the dataset's class names (``config_v1.2.json``)."""
    train_id_of = {_squash(name): t for t, name in enumerate(CLASSES)}
    return {
        label_id: train_id_of.get(_squash(name), _mapillary_rule(_squash(name))) for label_id, name in enumerate(names)
    }


def default_palette(num_classes: int) -> np.ndarray:
    """(N, 3) uint8 colours for classes without a palette: Cityscapes' first, then evenly spread
    hues (a binary dataset gets Cityscapes' road purple and sidewalk pink)."""
    if num_classes <= NUM_CLASSES:
        return PALETTE[:num_classes].copy()
    import colorsys

    extra = [colorsys.hsv_to_rgb(i / (num_classes - NUM_CLASSES), 0.8, 0.9) for i in range(num_classes - NUM_CLASSES)]
    return np.concatenate([PALETTE, np.round(np.array(extra) * 255).astype(np.uint8)])


@dataclass(frozen=True)
class ClassList:
    """The classes a dataset is labelled in: class ``i`` is ``names[i]``, drawn in ``palette[i]``.

    Args:
        names: one name per class (N >= 1; a binary dataset has two).
        palette: (N, 3) RGB colours in 0..255; None takes :func:`default_palette`.
    Raises ValueError naming ``what`` for an empty list, repeated names or a palette of another shape.
    """

    names: tuple[str, ...]
    palette: np.ndarray | None = field(default=None, compare=False)
    what: str = field(default="classes", compare=False, repr=False)

    def __post_init__(self):
        names = self.names
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{self.what}: a list of one or more class names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.what}: class names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        object.__setattr__(self, "names", tuple(names))
        if self.palette is None:
            palette = default_palette(len(names))
        else:
            palette = np.asarray(self.palette)
            if palette.shape != (len(names), 3) or not np.issubdtype(palette.dtype, np.integer):
                raise ValueError(
                    f"{self.what}: the palette needs one [r, g, b] per class ({len(names)}), got {self.palette!r}"
                )
            if palette.min() < 0 or palette.max() > 255:
                raise ValueError(f"{self.what}: palette colours are 0..255, got {self.palette!r}")
        object.__setattr__(self, "palette", np.asarray(palette, dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.names)

    def colorize(self, label: np.ndarray) -> np.ndarray:
        """A class map (H, W) -> (H, W, 3) uint8 in this palette; 255 and unknown values are black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(self.names)] = self.palette[:256]
        return lut[np.asarray(label, dtype=np.uint8)]


CITYSCAPES_CLASSES = ClassList(CLASSES, PALETTE, "Cityscapes")


def colorize(label: np.ndarray, classes: ClassList | None = None) -> np.ndarray:
    """Colours for a class map: (H, W) -> (H, W, 3) uint8 in ``classes``' palette (default the
    Cityscapes one); 255 and unknown values are black."""
    return (classes or CITYSCAPES_CLASSES).colorize(label)
