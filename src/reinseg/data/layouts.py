"""Where each dataset keeps its images and labels on disk, and how files pair up.

A split of a dataset is described by :class:`FolderPairs`: an image folder and suffix, and the
label files that may go with each image, in order of preference (the prepared train-ID file
first, the native file second, so a dataset reads the same before and after ``reinseg prepare``).
An image and a label pair up when their paths below their folders agree once suffix and prefix
are removed. The trees are drawn in docs/datasets.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .classes import CITYSCAPES_CLASSES, ClassList
from .encodings import (
    CITYSCAPES_IDS,
    GTAV_IDS,
    SYNTHIA_IDS,
    TRAIN_IDS,
    URBANSYN_IDS,
    LabelEncoding,
    mapillary_encoding,
)
from .io import walk_folder

__all__ = [
    "LabelSource",
    "FolderPairs",
    "Sample",
    "Discovery",
    "DatasetInfo",
    "DATASETS",
    "TEST_SCALES",
    "OFFICIAL_SCALES_BY_CROP",
    "official_test_scale",
    "eval_scale",
    "ACDC_CONDITIONS",
    "discover",
    "dataset_info",
    "dataset_classes",
    "config_classes",
    "register_dataset",
    "REQUIRED",
    "split_layout",
]

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@dataclass(frozen=True)
class LabelSource:
    """Label files ``<folder>/<dirs>/<prefix><name><suffix>`` read with ``encoding``.

    ``exclude`` names a suffix this source must not claim (a native ``.png`` source must not take
    the prepared ``*_labelTrainIds.png`` files that live next to it).
    """

    folder: str
    suffix: str
    encoding: LabelEncoding
    prefix: str = ""
    exclude: str | None = None

    def path_for(self, root: Path, key: str) -> Path:
        """The file of this source for a pairing key (``dirs/name``)."""
        directory, _, name = key.rpartition("/")
        return root / self.folder / directory / f"{self.prefix}{name}{self.suffix}"


@dataclass(frozen=True)
class FolderPairs:
    """Images ``<image_folder>/<dirs>/<image_prefix><name><image_suffix>`` and their labels.

    ``labels`` lists the label sources by preference; empty when the split has no labels.
    """

    image_folder: str
    image_suffix: str
    labels: tuple[LabelSource, ...]
    image_prefix: str = ""
    keys: frozenset[str] | None = None  # only these images (pairing keys), e.g. a split file's


@dataclass(frozen=True)
class Sample:
    """A pair: its image, its label file and encoding (None for unlabeled splits), and the pairing
    key (the path below the folders without prefix and suffix)."""

    image: str
    label: str | None
    encoding: LabelEncoding | None
    key: str


@dataclass
class Discovery:
    """The pairs found in one split, and the files without a partner as (path, reason)."""

    samples: list[Sample] = field(default_factory=list)
    unpaired: list[tuple[str, str]] = field(default_factory=list)


def _files(root: Path, folder: str, suffix: str, prefix: str = "", exclude: str | None = None) -> dict[str, Path]:
    """{key: path} of the files below ``root/folder`` named ``<prefix><name><suffix>``, recursively."""
    base = root / folder
    found = {}
    for directory, names in walk_folder(base):
        rel = directory.relative_to(base).as_posix()
        for name in names:
            if not (name.endswith(suffix) and name.startswith(prefix)) or (exclude and name.endswith(exclude)):
                continue
            if name.startswith("."):  # temporary files of an interrupted write
                continue
            stem = name[len(prefix) : len(name) - len(suffix)]
            found[stem if rel == "." else f"{rel}/{stem}"] = directory / name
    return found


def discover(root: Path, layout: FolderPairs) -> Discovery:
    """Pair the images of ``layout`` below ``root`` with their labels.

    Raises FileNotFoundError naming the folder when the image folder, or every label folder,
    is missing, and ValueError when the image folder holds no matching file.
    """
    image_dir = root / layout.image_folder
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    images = _files(root, layout.image_folder, layout.image_suffix, layout.image_prefix)
    if layout.keys is not None:
        missing = sorted(layout.keys - images.keys())
        if missing:
            raise ValueError(f"{len(missing)} images of the split are missing below {image_dir}, e.g. {missing[0]}")
        images = {key: path for key, path in images.items() if key in layout.keys}
    if not images:
        raise ValueError(f"no images '{layout.image_prefix}*{layout.image_suffix}' found below {image_dir}")
    result = Discovery()
    if not layout.labels:
        result.samples = [Sample(str(path), None, None, key) for key, path in images.items()]
        return result
    label_dirs = {source.folder for source in layout.labels}
    if not any((root / folder).is_dir() for folder in label_dirs):
        raise FileNotFoundError("label folder not found: " + " or ".join(str(root / f) for f in sorted(label_dirs)))

    chosen: dict[str, tuple[Path, LabelEncoding]] = {}  # per key, the first source that has it
    for source in layout.labels:
        for key, path in _files(root, source.folder, source.suffix, source.prefix, source.exclude).items():
            if layout.keys is None or key in layout.keys:
                chosen.setdefault(key, (path, source.encoding))
    for key, image in images.items():
        if key in chosen:
            label, encoding = chosen[key]
            result.samples.append(Sample(str(image), str(label), encoding, key))
        else:
            expected = " or ".join(sorted({str(source.path_for(root, key)) for source in layout.labels}))
            result.unpaired.append((str(image), f"image has no label (expected {expected})"))
    for key in sorted(chosen.keys() - images.keys()):
        expected = root / layout.image_folder / f"{layout.image_prefix}{key}{layout.image_suffix}"
        result.unpaired.append((str(chosen[key][0]), f"label has no image (expected {expected})"))
    return result


# --- the datasets ---------------------------------------------------------------------------


def _prepared_and_native(
    folder: str, native_suffix: str, native: LabelEncoding, prepared_suffix: str, prefix: str = ""
) -> tuple[LabelSource, LabelSource]:
    """A prepared train-ID source and the native source it is converted from, in one folder."""
    return (
        LabelSource(folder, prepared_suffix, TRAIN_IDS, prefix),
        LabelSource(folder, native_suffix, native, prefix, exclude=prepared_suffix),
    )


def _cityscapes(root: Path, split: str) -> FolderPairs:
    return FolderPairs(
        f"leftImg8bit/{split}",
        "_leftImg8bit.png",
        _prepared_and_native(f"gtFine/{split}", "_gtFine_labelIds.png", CITYSCAPES_IDS, "_gtFine_labelTrainIds.png"),
    )


def _gtav(root: Path, split: str) -> FolderPairs:
    keys = None if split == "train" else _gtav_split(root, split)
    labels = _prepared_and_native("labels", ".png", GTAV_IDS, "_labelTrainIds.png")
    return FolderPairs("images", ".png", labels, keys=keys)


def _gtav_split(root: Path, split: str) -> frozenset[str]:
    """The frames of GTAV's official ``val`` or ``test`` split: ``<root>/split.mat`` (the file of
    the dataset's download page: ``trainIds``, ``valIds``, ``testIds``, 1-based frame numbers),
    or ``<root>/<split>.txt`` (one frame name or number a line)."""
    listing, mat = root / f"{split}.txt", root / "split.mat"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        return frozenset(f"{int(n):05d}" if n.isdigit() else Path(n).stem for n in names)
    if not mat.is_file():
        raise FileNotFoundError(
            f"GTAV split '{split}' needs {mat} (the official split file) or {listing} (one frame a line)"
        )
    from scipy.io import loadmat

    try:
        ids = loadmat(str(mat))[f"{split}Ids"]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ValueError(f"{mat}: not GTAV's split file (trainIds, valIds, testIds): {err}") from None
    return frozenset(f"{int(i):05d}" for i in ids.ravel())


def _synthia(root: Path, split: str) -> FolderPairs:
    return FolderPairs("RGB", ".png", _prepared_and_native("GT/LABELS", ".png", SYNTHIA_IDS, "_labelTrainIds.png"))


def _urbansyn(root: Path, split: str) -> FolderPairs:
    return FolderPairs(
        "rgb",
        ".png",
        _prepared_and_native("ss", ".png", URBANSYN_IDS, "_labelTrainIds.png", prefix="ss_"),
        image_prefix="rgb_",
    )


def _bdd100k(root: Path, split: str) -> FolderPairs:
    labels = LabelSource(f"labels/sem_seg/masks/{split}", ".png", TRAIN_IDS)
    return FolderPairs(f"images/10k/{split}", ".jpg", (labels,))


def _mapillary_native(root: Path, split_folder: str) -> LabelSource:
    """Native labels of a Mapillary split: ``<split>/v1.2/labels`` (v2.0 package) or ``<split>/labels`` (v1.x)."""
    folder = f"{split_folder}/v1.2/labels"
    if not (root / folder).is_dir() and (root / split_folder / "labels").is_dir():
        folder = f"{split_folder}/labels"
    names = None
    for config in ("config_v1.2.json", "config.json"):
        if (root / config).is_file():
            try:
                names = [label["readable"] for label in json.loads((root / config).read_text())["labels"]]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{root / config}: not a Mapillary config ({err})") from None
            break
    return LabelSource(folder, ".png", mapillary_encoding(names))


def _mapillary_prepared(split: str) -> LabelSource:
    """The official converter's output: ``cityscapes_trainIdLabel/<split>/label/<name>.png``."""
    return LabelSource(f"cityscapes_trainIdLabel/{split}/label", ".png", TRAIN_IDS)


def _mapillary(root: Path, split: str, half: bool = True) -> FolderPairs:
    if split == "val" and half:
        if not (root / "half" / "val_img").is_dir():
            raise FileNotFoundError(
                f"image folder not found: {root / 'half' / 'val_img'} (the official evaluation's "
                f"half-resolution copy: `reinseg prepare mapillary {root}` writes it; half=False reads "
                "the full-size validation set)"
            )
        return FolderPairs("half/val_img", ".jpg", (LabelSource("half/val_label", ".png", TRAIN_IDS),))
    folder = {"train": "training", "val": "validation"}[split]
    return FolderPairs(f"{folder}/images", ".jpg", (_mapillary_prepared(split), _mapillary_native(root, folder)))


def _acdc(root: Path, split: str, condition: str) -> FolderPairs:
    labels = (
        ()
        if split == "test"
        else _prepared_and_native(
            f"gt/{condition}/{split}", "_gt_labelIds.png", CITYSCAPES_IDS, "_gt_labelTrainIds.png"
        )
    )
    return FolderPairs(f"rgb_anon/{condition}/{split}", "_rgb_anon.png", labels)


def _single(layout):
    """A layout function ``layout(root, split)`` of a dataset in one part, named after the dataset."""

    def parts(info: DatasetInfo, root: Path, split: str, options: dict) -> list[tuple[str, Path, FolderPairs]]:
        return [(info.name, root, layout(root, split))]

    return parts


def _acdc_parts(info, root: Path, split: str, options: dict):
    conditions = ACDC_CONDITIONS if options["condition"] == "all" else (options["condition"],)
    return [(f"acdc/{c}", root, _acdc(root, split, c)) for c in conditions]


def _mapillary_parts(info, root: Path, split: str, options: dict):
    return [("mapillary", root, _mapillary(root, split, options["half"]))]


def _synthetic_parts(info, root: Path, split: str, options: dict):
    domain_root = _synthetic_domain(root, options["domain"])
    return [(f"synthetic/{domain_root.name}", domain_root, _cityscapes(domain_root, split))]


REQUIRED = object()  # an option default: the option must be given


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset reinseg reads.

    Args:
        name: the ``name`` of a config's dataset entry.
        splits: the splits it has; empty: any split name (a custom dataset's folders).
        test_scale: the (long, short) scale it is evaluated at, None: the images' own size.
        description: one line for listings.
        parts: ``parts(info, root, split, options) -> [(display name, root, FolderPairs)]``, one
            per part of a split (ACDC's conditions), with the options checked and defaulted.
        options: option -> (allowed values or None, default or :data:`REQUIRED`).
        classes: the class list its labels are in, or ``classes(options) -> ClassList`` where the
            dataset entry gives them.
        labels_prepared_elsewhere: ``reinseg prepare`` writes the train-ID labels to another
            folder under the native labels' names (Mapillary: ``cityscapes_trainIdLabel/<split>/label``),
            not beside them under a ``*_labelTrainIds.png`` name.
    """

    name: str
    splits: tuple[str, ...]
    test_scale: tuple[int, int] | None
    description: str
    parts: Callable[..., list[tuple[str, Path, FolderPairs]]]
    options: dict = field(default_factory=dict)
    classes: ClassList | Callable[[dict], ClassList] = CITYSCAPES_CLASSES
    labels_prepared_elsewhere: bool = False

    def class_list(self, options: dict) -> ClassList:
        """The classes of a split read with ``options`` (already resolved)."""
        return self.classes(options) if callable(self.classes) else self.classes


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Make ``info.name`` a dataset every config, ``check-data`` and evaluation can name."""
    DATASETS[info.name] = info
    return info


for _info in (
    DatasetInfo(
        "gtav",
        ("train", "val", "test"),
        (1280, 720),
        "GTAV 'Playing for Data' (train: all 24,966 frames; val / test: split.mat's 6,382 / 6,181)",
        _single(_gtav),
    ),
    DatasetInfo(
        "synthia", ("train",), (1280, 760), "SYNTHIA RAND-CITYSCAPES (9,400 frames), source", _single(_synthia)
    ),
    DatasetInfo("urbansyn", ("train",), (1024, 512), "UrbanSyn (about 7,500 frames), source", _single(_urbansyn)),
    DatasetInfo(
        "cityscapes", ("train", "val"), (1024, 512), "Cityscapes (2,975 train / 500 val)", _single(_cityscapes)
    ),
    DatasetInfo(
        "bdd100k",
        ("train", "val"),
        (1280, 720),
        "BDD100K 10k semantic segmentation (7,000 / 1,000)",
        _single(_bdd100k),
    ),
    DatasetInfo(
        "mapillary",
        ("train", "val"),
        (1024, 512),
        "Mapillary Vistas v1.2 in the 19 classes (18,000 / 2,000; val at half resolution)",
        _mapillary_parts,
        {"half": ((True, False), True)},
        labels_prepared_elsewhere=True,
    ),
    DatasetInfo(
        "acdc",
        ("train", "val", "test"),
        (1920, 1080),
        "ACDC fog/night/rain/snow (1,600 / 406 / 2,000; test unlabeled)",
        _acdc_parts,
        {"condition": (ACDC_CONDITIONS + ("all",), "all")},
    ),
    DatasetInfo(
        "synthetic",
        ("train", "val"),
        None,
        "reinseg's procedural domain-shift benchmark (Cityscapes layout per domain)",
        _synthetic_parts,
        {"domain": (None, "game")},
    ),
):
    register_dataset(_info)

# Evaluation scales of the official test pipelines, written (w, h) there: the image is resized
# keeping its ratio to fit (long, short); the label stays at its resolution. Without a training crop ACDC follows the
# official 1024x1024 configs (night-acdc_1024x1024.py and siblings; the 512x512 ones use (960, 540):
# OFFICIAL_SCALES_BY_CROP, which eval_scale reads given the crop). Synthia and UrbanSyn have no
# official test pipeline: their native sizes. None: the image as it is.
TEST_SCALES = {name: info.test_scale for name, info in DATASETS.items()}


# The official test scales that depend on the training crop (configs/_base_/datasets/
# {cityscapes,*-acdc}_{512x512,1024x1024}.py); every other dataset's is the same at both crops.
OFFICIAL_SCALES_BY_CROP = {
    512: {"cityscapes": (1024, 512), "acdc": (960, 540)},
    1024: {"cityscapes": (2048, 1024), "acdc": (1920, 1080)},
}


def official_test_scale(dataset: str, crop: tuple[int, int], default):
    """The (long, short) scale the official configs of the training ``crop`` (h, w) evaluate
    ``dataset`` at: the 1024 configs' for crops of 1024 and more, else the 512 configs'; ``default``
    for a dataset whose scale does not depend on the crop."""
    by_dataset = OFFICIAL_SCALES_BY_CROP[1024 if max(crop) >= 1024 else 512]
    return by_dataset.get(dataset, default)


def eval_scale(entry: dict, crop: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The (long, short) scale a ``data.val`` entry's images are resized to fit for evaluation: the
    entry's own ``scale``, else its dataset's test scale in the official configs of the training
    ``crop`` (h, w; Cityscapes and ACDC depend on it, :func:`official_test_scale`), else, without a
    crop, :data:`TEST_SCALES`'; None keeps the images as they are."""
    scale = entry.get("scale")
    if not scale:
        info = DATASETS.get(entry.get("name"))
        default = info.test_scale if info is not None else None
        scale = default if crop is None else official_test_scale(entry.get("name"), tuple(crop), default)
    if scale is not None and max(scale) > MAX_TEST_SIDE:
        # A shared checkpoint's config names it: 40000x40000 made a 64x128 photo 8.9 GiB of scores.
        raise ValueError(
            f"test scale {scale[0]}x{scale[1]} of {entry.get('label') or entry.get('name')}: "
            f"more than {MAX_TEST_SIDE} pixels a side"
        )
    return None if scale is None else tuple(scale)


# Larger than any camera's frames (8K video: 7680x4320), and ms-flip's 1.75 x 4096.
MAX_TEST_SIDE = 16384


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ValueError listing the valid names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_options(info: DatasetInfo, split: str, options: dict) -> dict:
    """Check a split and options against a dataset and fill in the defaults."""
    if info.splits and split not in info.splits:
        raise ValueError(f"{info.name} has no split '{split}'; valid: {', '.join(info.splits)}")
    unknown = set(options) - set(info.options)
    if unknown:
        valid = ", ".join(info.options) or "none"
        raise ValueError(f"{info.name} takes no option {', '.join(sorted(unknown))}; valid options: {valid}")
    resolved = {}
    for option, (allowed, default) in info.options.items():
        value = options.get(option, default)
        if value is REQUIRED:
            raise ValueError(f"{info.name} needs the option '{option}'")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{info.name}: unknown {option} '{value}'; valid: {', '.join(map(str, allowed))}")
        resolved[option] = value
    return resolved


def split_layout(name: str, root: Path, split: str, options: dict) -> list[tuple[str, Path, FolderPairs]]:
    """The parts of a dataset split as (display name, root, layout): one part, or one per ACDC
    condition with ``condition="all"``."""
    info = dataset_info(name)
    return info.parts(info, root, split, resolve_options(info, split, options))


def dataset_classes(name: str, options: dict, split: str | None = None) -> ClassList:
    """The class list of dataset ``name`` read with ``options`` (ValueError on a bad option)."""
    info = dataset_info(name)
    return info.class_list(resolve_options(info, split or (info.splits[0] if info.splits else ""), options))


def _synthetic_domain(root: Path, domain: str) -> Path:
    domains = sorted(p.name for p in root.iterdir() if (p / "leftImg8bit").is_dir())
    if domain not in domains:
        raise ValueError(f"no synthetic domain '{domain}' in {root}; found: {', '.join(domains) or 'none'}")
    return root / domain


def config_classes(config: dict) -> ClassList:
    """The classes a configuration (a plain dict, e.g. a checkpoint's) predicts: those of its first
    ``data.val`` entry, else of its first ``data.train`` entry; the Cityscapes classes where it
    names no dataset, or numbered ones ("class 0", ...) where its head predicts another number."""
    from .entries import parse_entries

    data = config.get("data") or {}
    for section in ("val", "train"):
        for entry in parse_entries(data.get(section) or [], section):
            if entry.name in DATASETS:
                return entry.classes()
    num_classes = ((config.get("model") or {}).get("head") or {}).get("num_classes", len(CITYSCAPES_CLASSES))
    if num_classes == len(CITYSCAPES_CLASSES):
        return CITYSCAPES_CLASSES
    return ClassList(tuple(f"class {i}" for i in range(num_classes)))


# Datasets defined in their own module: one import and one registration each.
from .custom import CUSTOM  # noqa: E402

register_dataset(CUSTOM)
