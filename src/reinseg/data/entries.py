"""The dataset entries of a configuration, parsed once: ``{name, root, split, **options}``.

Training, evaluation, ``check-data``, ``predict`` (the test scale and palette of a checkpoint's
data) and the tests read ``data.train`` and ``data.val`` through :func:`parse_entries`, so an
entry means the same everywhere. Validation entries may also hold the keys reinseg reads itself
(:data:`EVAL_ENTRY_KEYS`): ``scale`` (the test scale, default the dataset's), ``label`` (the
domain's name in results, default the dataset's) and ``in_mean`` (whether the domain counts in
the mean over target domains, default true).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .layouts import dataset_classes, eval_scale

if TYPE_CHECKING:
    from .classes import ClassList
    from .datasets import SegmentationDataset

__all__ = ["EVAL_ENTRY_KEYS", "DatasetEntry", "parse_entries"]

# Keys of a data.val entry that reinseg reads itself (the rest go to build_dataset).
EVAL_ENTRY_KEYS = ("scale", "label", "in_mean")


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
        own = EVAL_ENTRY_KEYS if evaluation else ()
        scale = entry.get("scale") if evaluation else None
        return cls(
            name=entry["name"],
            root=str(entry["root"]),
            split=entry.get("split", split),
            options={k: v for k, v in entry.items() if k not in ("name", "root", "split") + own},
            scale=None if scale is None else tuple(scale),
            label=entry.get("label") if evaluation else None,
            in_mean=bool(entry.get("in_mean", True)) if evaluation else True,
            where=where,
            section=section,
        )

    def classes(self) -> ClassList:
        """The classes the dataset is labelled in, from the entry alone (no file is read)."""
        try:
            return dataset_classes(self.name, self.options, self.split)
        except ValueError as err:
            raise ValueError(f"{self.where}: {err}") from None

    def eval_scale(self) -> tuple[int, int] | None:
        """The (long, short) scale images are resized to fit for evaluation: the entry's
        ``scale``, else its dataset's; None keeps them as they are."""
        return eval_scale({"name": self.name, "scale": self.scale})

    def build(self, **kwargs) -> SegmentationDataset:
        """The dataset (``kwargs``: ``transform``, ``on_error``, ``seed`` of :func:`build_dataset`)."""
        from .datasets import build_dataset

        return build_dataset(self.name, self.root, self.split, **kwargs, **self.options)


def parse_entries(entries, section: str) -> list[DatasetEntry]:
    """The entries of ``data.<section>`` ("train" or "val": the default split, and whether the
    evaluation keys are read)."""
    return [
        DatasetEntry.parse(entry, f"data.{section}[{i}]", split=section, evaluation=section == "val", section=section)
        for i, entry in enumerate(entries)
    ]
