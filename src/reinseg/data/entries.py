"""The dataset entries of a configuration, parsed once: ``{name, root, split, **options}``.

Training, evaluation, ``check-data``, ``predict`` (the test scale and palette of a checkpoint's
data) and the tests read ``data.train`` and ``data.val`` through :func:`parse_entries`, so an
entry means the same everywhere. Validation entries may also hold the keys reinseg reads itself
(:data:`EVAL_ENTRY_KEYS`): ``scale`` (the test scale, default the dataset's in the official
configs of the training crop), ``label`` (the domain's name in results, default the dataset's),
``in_mean`` (whether the domain counts in the mean over target domains, default true) and
``corruptions`` / ``severities`` / ``corruption_seed`` (Cityscapes-C style corrupted copies,
:mod:`reinseg.data.corruptions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from .layouts import dataset_classes, eval_scale

if TYPE_CHECKING:
    from .classes import ClassList
    from .datasets import SegmentationDataset

__all__ = ["EVAL_ENTRY_KEYS", "DatasetEntry", "parse_entries"]

# Keys of a data.val entry that reinseg reads itself (the rest go to build_dataset).
EVAL_ENTRY_KEYS = ("scale", "label", "in_mean", "corruptions", "severities", "corruption_seed")


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of ``data.train`` or ``data.val``.

    ``options`` are the dataset's own (``condition``, ``classes``, ...), checked when the dataset
    is built; ``where`` names the entry in messages (``data.val[1]``).
    """

    name: str
    root: str
    split: str
    options: dict[str, Any] = field(default_factory=dict)
    scale: tuple[int, int] | None = None
    label: str | None = None
    in_mean: bool = True
    where: str = "dataset entry"
    section: str = ""  # "train" or "val" for entries of a config
    corruptions: tuple[str, ...] = ()  # evaluated as one domain per corruption and severity
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruption_seed: int = 0
    corruption: tuple[str, int] | None = None  # (name, severity) of one corrupted domain

    @classmethod
    def parse(
        cls, entry: Any, where: str, split: str = "train", evaluation: bool = False, section: str = ""
    ) -> DatasetEntry:
        """An entry from its config dict; ``split`` is the default split. Only evaluation entries
        take :data:`EVAL_ENTRY_KEYS` (elsewhere they are dataset options, refused by name when
        the dataset is built). ValueError naming ``where`` when the name or root is missing."""
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: a dataset entry is a mapping {{name, root, split, ...}}, got {entry!r}")
        for key in ("name", "root"):
            if key not in entry:
                raise ValueError(f"{where}: dataset entry {entry} lacks '{key}' (each needs a name and a root)")
        for key in ("name", "root", "split") + (("label",) if evaluation else ()):
            value = entry.get(key)
            required = key in ("name", "root")
            if (value is not None or required) and not (isinstance(value, (str, PurePath)) and str(value)):
                raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
        own = EVAL_ENTRY_KEYS if evaluation else ()
        scale = entry.get("scale") if evaluation else None
        corruptions, severities, corruption_seed = _corruption_keys(entry, where) if evaluation else ((), (), 0)
        in_mean = entry.get("in_mean", True)
        if evaluation and not isinstance(in_mean, bool):  # "false" as a string would count as true
            raise ValueError(f"{where}: in_mean must be true or false, got {in_mean!r}")
        return cls(
            corruptions=corruptions,
            severities=severities or (1, 2, 3, 4, 5),
            corruption_seed=corruption_seed,
            name=entry["name"],
            root=str(entry["root"]),
            split=entry.get("split", split),
            options={k: v for k, v in entry.items() if k not in ("name", "root", "split") + own},
            scale=None if scale is None else tuple(scale),
            label=entry.get("label") if evaluation else None,
            in_mean=in_mean if evaluation else True,
            where=where,
            section=section,
        )

    def classes(self) -> ClassList:
        """The classes the dataset is labelled in, from the entry alone (no file is read)."""
        try:
            return dataset_classes(self.name, self.options, self.split)
        except ValueError as err:
            raise ValueError(f"{self.where}: {err}") from None

    def expanded(self) -> list[DatasetEntry]:
        """The entry, or with ``corruptions`` one entry per corruption and severity, labelled
        ``<label>-c/<corruption>/<severity>`` and left out of the mean over target domains."""
        if not self.corruptions:
            return [self]
        base = f"{self.label or self.name}-c"
        return [
            replace(self, label=f"{base}/{name}/{severity}", in_mean=False, corruption=(name, severity))
            for name in self.corruptions
            for severity in self.severities
        ]

    def eval_scale(self, crop: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """The (long, short) scale images are resized to fit for evaluation: the entry's
        ``scale``, else its dataset's in the official configs of the training ``crop`` (h, w;
        :func:`~reinseg.data.layouts.eval_scale`); None keeps them as they are."""
        return eval_scale({"name": self.name, "scale": self.scale}, crop)

    def build(self, transform=None, **kwargs) -> SegmentationDataset:
        """The dataset (``transform`` and ``kwargs``: ``on_error``, ``seed`` of
        :func:`build_dataset`). An entry of :meth:`expanded` with a ``corruption`` corrupts each
        image before ``transform`` (seeded by ``corruption_seed`` unless ``seed`` is given)."""
        from .datasets import build_dataset

        if self.corruption is not None:
            from .corruptions import Corrupt
            from .transforms import Compose, eval_transform

            transform = Compose([Corrupt(*self.corruption), transform or eval_transform(None)])
            if kwargs.get("seed") is None:
                kwargs["seed"] = self.corruption_seed
        return build_dataset(self.name, self.root, self.split, transform=transform, **kwargs, **self.options)


def parse_entries(entries, section: str) -> list[DatasetEntry]:
    """The entries of ``data.<section>`` ("train" or "val": the default split, and whether the
    evaluation keys are read)."""
    return [
        DatasetEntry.parse(entry, f"data.{section}[{i}]", split=section, evaluation=section == "val", section=section)
        for i, entry in enumerate(entries)
    ]


def _corruption_keys(entry: dict, where: str) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """``corruptions`` ("all" or a list of names), ``severities`` (1..5) and ``corruption_seed``
    of an evaluation entry, checked (ValueError naming the key)."""
    from .corruptions import CORRUPTIONS, SEVERITIES

    names = entry.get("corruptions")
    if names is None:
        if "severities" in entry or "corruption_seed" in entry:
            raise ValueError(f"{where}: severities and corruption_seed need corruptions (a list of names or 'all')")
        return (), (), 0
    names = list(CORRUPTIONS) if names == "all" else names
    if not isinstance(names, list) or not names or any(n not in CORRUPTIONS for n in names):
        raise ValueError(
            f"{where}.corruptions must be 'all' or a list of corruption names, got {entry.get('corruptions')!r}; "
            f"known: {', '.join(CORRUPTIONS)}"
        )
    severities = entry.get("severities", list(SEVERITIES))
    if not isinstance(severities, list) or not severities or any(s not in SEVERITIES for s in severities):
        raise ValueError(f"{where}.severities must be a list of integers in 1..5, got {severities!r}")
    seed = entry.get("corruption_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{where}.corruption_seed must be a non-negative integer, got {seed!r}")
    return tuple(dict.fromkeys(names)), tuple(dict.fromkeys(severities)), seed
