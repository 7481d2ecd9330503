"""Tiny fake copies of the segmentation datasets, in their real on-disk layouts.

Each ``make_fake_<dataset>(root, n=2, size=(32, 64))`` writes ``n`` image/label pairs per split
with the file names, folders, formats and label encodings of the real dataset (including files
the loaders must ignore, such as colour-coded labels), and returns a :class:`Fake`: the root and,
for every image path, the train-ID map its label must decode to. The native-to-train-ID tables
here are written out from the datasets' own documentation and the official converters, on
purpose independently of reinseg's tables, so reading a fake dataset checks the mappings.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Native label value -> train ID, a subset of each dataset's classes (255: a void class).
CITYSCAPES_NATIVE = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
    0: 255,
    4: 255,
    9: 255,
    14: 255,
    29: 255,
}
GTAV_NATIVE = {**CITYSCAPES_NATIVE, 34: 255}
SYNTHIA_NATIVE = {
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
    0: 255,
    13: 255,
    22: 255,
}
# Mapillary v1.2 IDs: 13 Road, 2 Curb, 15 Sidewalk, 17 Building, 6 Wall, 3 Fence, 45 Pole, 48 Traffic
# Light, 50 Traffic Sign (Front), 30 Vegetation, 29 Terrain, 27 Sky, 19 Person, 20 Bicyclist, 55 Car,
# 61 Truck, 54 Bus, 58 On Rails, 57 Motorcycle, 52 Bicycle; void: 0 Bird, 35 Billboard, 65 Unlabeled.
MAPILLARY_NATIVE = {
    13: 0,
    2: 1,
    15: 1,
    17: 2,
    6: 3,
    3: 4,
    45: 5,
    48: 6,
    50: 7,
    30: 8,
    29: 9,
    27: 10,
    19: 11,
    20: 12,
    55: 13,
    61: 14,
    54: 15,
    58: 16,
    57: 17,
    52: 18,
    0: 255,
    35: 255,
    65: 255,
}
URBANSYN_NATIVE = {**{i: i for i in range(19)}, 19: 255}
TRAIN_ID_NATIVE = {**{i: i for i in range(19)}, 255: 255}

MAPILLARY_V12_CLASSES = (
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


@dataclass
class Fake:
    """A fake dataset: its root and, per image path (str), the train IDs its label decodes to."""

    root: Path
    expected: dict[str, np.ndarray] = field(default_factory=dict)


# --- file writers ---------------------------------------------------------------------------


def write_png(path, array: np.ndarray, palette: bool = False) -> Path:
    """An 8-bit PNG: RGB for (H, W, 3), grayscale for (H, W), or palette indices with ``palette``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if palette:
        image = image.convert("P")
        image.putpalette([(7 * i) % 256 for i in range(768)])
        image.frombytes(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    # Level 1: the pixels are what matters, and level 6 took seconds on the full-size golden images.
    image.save(path, compress_level=1)
    return path


def write_png16_rgb(path, array: np.ndarray) -> Path:
    """A 16-bit RGB PNG (what Synthia's GT/LABELS holds), written by hand: Pillow cannot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + np.ascontiguousarray(array[y], dtype=">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def write_jpeg(path, array: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, quality=95)
    return path


def random_image(rng: np.random.Generator, size) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def random_native(rng: np.random.Generator, size, table: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A blocky map of native values from ``table``, and the train IDs it stands for."""
    values = np.array(sorted(table))
    blocks = rng.integers(0, len(values), (max(size[0] // 4, 1), max(size[1] // 4, 1)))
    native = values[np.kron(blocks, np.ones((4, 4), dtype=np.int64))[: size[0], : size[1]]]
    native = np.pad(native, ((0, size[0] - native.shape[0]), (0, size[1] - native.shape[1])), mode="edge")
    lut = np.zeros(values.max() + 1, dtype=np.uint8)
    for value, train_id in table.items():
        lut[value] = train_id
    return native, lut[native]


# --- the datasets ---------------------------------------------------------------------------


def make_fake_cityscapes(
    root, n: int = 2, size=(32, 64), splits=("train", "val"), prepared: bool = False, seed: int = 0
) -> Fake:
    """leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and gtFine/... with
    *_gtFine_labelIds.png (native), *_gtFine_color.png, *_gtFine_polygons.json, and with
    ``prepared`` the converter's *_gtFine_labelTrainIds.png."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    for split in splits:
        for i in range(n):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            image = write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", random_image(rng, size))
            native, train_ids = random_native(rng, size, CITYSCAPES_NATIVE)
            gt = root / "gtFine" / split / city
            write_png(gt / f"{stem}_gtFine_labelIds.png", native)
            write_png(gt / f"{stem}_gtFine_color.png", random_image(rng, size))
            (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": size[0], "objects": []}))
            if prepared:
                write_png(gt / f"{stem}_gtFine_labelTrainIds.png", train_ids)
            fake.expected[str(image)] = train_ids
    return fake


def make_fake_gtav(root, n: int = 2, size=(32, 64), prepared: bool = False, seed: int = 0) -> Fake:
    """images/00001.png and labels/00001.png: palette PNGs whose indices are Cityscapes label IDs."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    for i in range(1, n + 1):
        image = write_png(root / "images" / f"{i:05d}.png", random_image(rng, size))
        native, train_ids = random_native(rng, size, GTAV_NATIVE)
        write_png(root / "labels" / f"{i:05d}.png", native, palette=True)
        if prepared:
            write_png(root / "labels" / f"{i:05d}_labelTrainIds.png", train_ids)
        fake.expected[str(image)] = train_ids
    return fake


def make_fake_synthia(root, n: int = 2, size=(32, 64), seed: int = 0) -> Fake:
    """RAND_CITYSCAPES: RGB/0000000.png and GT/LABELS/0000000.png, 16-bit RGB PNGs with the class
    in the first channel and an instance ID (above 255, to exercise both bytes) in the second."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    for i in range(n):
        image = write_png(root / "RGB" / f"{i:07d}.png", random_image(rng, size))
        native, train_ids = random_native(rng, size, SYNTHIA_NATIVE)
        instance = rng.integers(0, 1000, size)
        write_png16_rgb(root / "GT" / "LABELS" / f"{i:07d}.png", np.stack([native, instance, 0 * native], -1))
        write_png(root / "GT" / "COLOR" / f"{i:07d}.png", random_image(rng, size))
        fake.expected[str(image)] = train_ids
    return fake


def make_fake_urbansyn(root, n: int = 2, size=(32, 64), seed: int = 0) -> Fake:
    """rgb/rgb_0001.png and ss/ss_0001.png (train IDs, 19 unlabeled), plus ss_color/ and depth/."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    for i in range(1, n + 1):
        image = write_png(root / "rgb" / f"rgb_{i:04d}.png", random_image(rng, size))
        native, train_ids = random_native(rng, size, URBANSYN_NATIVE)
        write_png(root / "ss" / f"ss_{i:04d}.png", native)
        write_png(root / "ss_color" / f"ss_{i:04d}.png", random_image(rng, size))
        fake.expected[str(image)] = train_ids
    return fake


def make_fake_bdd100k(root, n: int = 2, size=(32, 64), splits=("train", "val"), seed: int = 0) -> Fake:
    """images/10k/<split>/<id>.jpg and labels/sem_seg/masks/<split>/<id>.png (train IDs), plus the
    colormaps the download also holds."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    for split in splits:
        for i in range(n):
            stem = f"{split[0]}{i:03d}a1b2c3-d4e5f6g7"
            image = write_jpeg(root / "images" / "10k" / split / f"{stem}.jpg", random_image(rng, size))
            _, train_ids = random_native(rng, size, TRAIN_ID_NATIVE)
            write_png(root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", train_ids)
            write_png(root / "labels" / "sem_seg" / "colormaps" / split / f"{stem}.png", random_image(rng, size))
            fake.expected[str(image)] = train_ids
    return fake


def make_fake_mapillary(root, n: int = 2, size=(32, 64), seed: int = 0, package: str = "v2.0") -> Fake:
    """Mapillary Vistas with config_v1.2.json and {training,validation}/images/*.jpg, labels as
    palette PNGs of v1.2 label IDs in <split>/v1.2/labels (the v2.0 package) or, with
    ``package="v1.2"``, in <split>/labels next to config.json."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    config = {
        "labels": [
            {
                "name": name.lower().replace(" ", "-"),
                "readable": name,
                "color": [0, 0, 0],
                "instances": False,
                "evaluate": True,
            }
            for name in MAPILLARY_V12_CLASSES
        ]
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / ("config_v1.2.json" if package == "v2.0" else "config.json")).write_text(json.dumps(config))
    for folder in ("training", "validation"):
        labels = root / folder / ("v1.2/labels" if package == "v2.0" else "labels")
        for i in range(n):
            stem = f"{folder[0]}{i:02d}Xy_Zz0123456789"
            image = write_jpeg(root / folder / "images" / f"{stem}.jpg", random_image(rng, size))
            native, train_ids = random_native(rng, size, MAPILLARY_NATIVE)
            write_png(labels / f"{stem}.png", native, palette=True)
            fake.expected[str(image)] = train_ids
    return fake


def make_fake_acdc(
    root,
    n: int = 2,
    size=(32, 64),
    conditions=("fog", "night", "rain", "snow"),
    splits=("train", "val", "test"),
    seed: int = 0,
) -> Fake:
    """rgb_anon/<condition>/<split>/<sequence>/<frame>_rgb_anon.png (and <split>_ref/ reference
    frames), gt/<condition>/<split>/<sequence>/<frame>_gt_labelTrainIds.png with the
    _gt_labelIds, _gt_labelColor and _gt_invIds files beside it; test has no gt."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    for condition in conditions:
        for split in splits:
            for i in range(n):
                sequence, stem = f"GOPR{i % 2:04d}", f"GOPR{i % 2:04d}_frame_{i:06d}"
                image = write_png(
                    root / "rgb_anon" / condition / split / sequence / f"{stem}_rgb_anon.png", random_image(rng, size)
                )
                write_png(
                    root / "rgb_anon" / condition / f"{split}_ref" / sequence / f"{stem}_ref_rgb_anon.png",
                    random_image(rng, size),
                )
                if split == "test":
                    fake.expected[str(image)] = None
                    continue
                native, train_ids = random_native(rng, size, CITYSCAPES_NATIVE)
                gt = root / "gt" / condition / split / sequence
                write_png(gt / f"{stem}_gt_labelTrainIds.png", train_ids)
                write_png(gt / f"{stem}_gt_labelIds.png", native)
                write_png(gt / f"{stem}_gt_labelColor.png", random_image(rng, size))
                write_png(gt / f"{stem}_gt_invIds.png", np.zeros(size, np.uint8))
                fake.expected[str(image)] = train_ids
    return fake


FAKE_MAKERS = {
    "gtav": make_fake_gtav,
    "synthia": make_fake_synthia,
    "urbansyn": make_fake_urbansyn,
    "cityscapes": make_fake_cityscapes,
    "bdd100k": make_fake_bdd100k,
    "mapillary": make_fake_mapillary,
    "acdc": make_fake_acdc,
}


def make_custom(
    root, num_classes: int, n: int = 2, size=(32, 64), splits=("train", "val"), image_suffix=".jpg", seed: int = 0
) -> Fake:
    """The custom layout of docs/datasets.md: images/<split>/<dir>/<name><image_suffix> and
    labels/<split>/<dir>/<name>.png holding class indices 0..num_classes-1 and some 255."""
    root, rng = Path(root), np.random.default_rng(seed)
    fake = Fake(root)
    table = {i: i for i in range(num_classes)} | {num_classes: 255}  # the extra value: ignored pixels
    for split in splits:
        for i in range(n):
            name = f"scene{i % 2}/frame_{i:03d}"
            writer = write_png if image_suffix == ".png" else write_jpeg
            image = writer(root / "images" / split / f"{name}{image_suffix}", random_image(rng, size))
            _, labels = random_native(rng, size, table)
            write_png(root / "labels" / split / f"{name}.png", labels)
            fake.expected[str(image)] = labels
    return fake
