"""The data of a run, as a LightningDataModule: the training stream, the validation sets and
their classes, all from a configuration's ``data`` section.

- Training: an endless, reproducible stream of augmented crops (:class:`TrainingStream`): sample
  ``s`` of the run is always the same image with the same augmentation, so a resumed run (from
  ``start_step``) sees exactly the data an uninterrupted one would.
- Validation: one dataset per ``data.val`` entry, every file read up front; each DDP rank scores
  its share (:class:`ShardSampler`), batch size 1 (labels keep their own sizes); a rank left
  without an image (fewer images than ranks) validates one :class:`EmptyShard` batch.
- Entries are parsed once (:func:`reinseg.data.entries.parse_entries`); ``model.head.num_classes``
  must equal each dataset's number of classes (:func:`check_num_classes`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import Config, ConfigError
from .data.entries import DatasetEntry, parse_entries
from .data.layouts import DATASETS

__all__ = [
    "TrainingStream",
    "ShardSampler",
    "EmptyShard",
    "SegmentationDataModule",
    "training_set",
    "validation_sets",
    "check_num_classes",
    "label_root",
]

log = logging.getLogger("reinseg")


class TrainingStream(IterableDataset):
    """Batches of training samples for one DDP rank, from step ``start_step`` on, forever.

    Global sample ``s`` is item ``perm_e[s mod N]`` of epoch ``e = s // N`` (a seeded permutation
    per epoch), augmented with a generator seeded by ``(seed, e, item)``. Global batch ``b`` holds
    samples ``b * B * W ... (b + 1) * B * W - 1``; rank ``r`` takes its ``B`` consecutive ones, and
    data-loader worker ``w`` of ``n`` yields the rank's batches ``b`` with ``b mod n = w``, which
    the DataLoader interleaves back in order.

    ``start_sample``: the global sample step ``start_step`` begins at, where the run trained
    with another global batch ``B * W`` before (a resume on more devices or with another batch
    size); default ``start_step * B * W``.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_sample: int | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the training set {getattr(dataset, 'name', '')} is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.start_sample = start_sample
        self._epoch, self._order = -1, None

    def sample_index(self, sample: int) -> tuple[int, int]:
        """``(epoch, dataset index)`` of global sample ``sample``."""
        n = len(self.dataset)
        epoch = sample // n
        if epoch != self._epoch:  # one permutation per epoch, kept while the epoch lasts
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
        return epoch, int(self._order[sample % n])

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if worker is not None:
            import cv2

            # One OpenCV thread per data-loader worker, as mmengine sets it: the workers already
            # run in parallel. (cv2's results do not depend on its thread count.)
            cv2.setNumThreads(0)
        step = self.start_step
        start_sample = self.start_step * self.batch_size * self.world_size
        if self.start_sample is not None:
            start_sample = self.start_sample
        while True:
            # The loader takes the first batch from worker 0, then round-robin: counted from the
            # stream's start, not from step 0, or a resume at a step not a multiple of the
            # workers would swap neighbouring batches.
            if (step - self.start_step) % num_workers == worker_id:
                first = start_sample + ((step - self.start_step) * self.world_size + self.rank) * self.batch_size
                for sample in range(first, first + self.batch_size):
                    epoch, index = self.sample_index(sample)
                    self.dataset.set_epoch(epoch)
                    yield self.dataset[index]
            step += 1


class ShardSampler(torch.utils.data.Sampler):
    """Items ``rank, rank + world, ...``: every item on exactly one rank. (A DistributedSampler
    pads with repeated items to even out the ranks, which would count them twice in the scores.)"""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EmptyShard(torch.utils.data.Dataset):
    """A rank's share of a validation set with fewer images than ranks: one batch holding no
    image (``batch["empty_shard"]``), which validation skips. Lightning refuses a rank without
    a batch, and every rank must reach the collectives that sum the scores."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return {"empty_shard": True, "image": None, "label": None}


def _entries(config: Config, section: str) -> list[DatasetEntry]:
    try:
        return parse_entries(getattr(config.data, section), section)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_num_classes(config: Config) -> None:
    """ConfigError naming both keys when the head predicts another number of classes than a
    dataset of ``data.train`` or ``data.val`` is labelled in (read from the entries, not the files)."""
    expected = config.model.head.num_classes
    for entry in _entries(config, "train") + _entries(config, "val"):
        try:
            classes = entry.classes()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if len(classes) != expected:
            shown = ", ".join(classes.names[:8]) + (", ..." if len(classes) > 8 else "")
            raise ConfigError(
                f"model.head.num_classes is {expected} but {entry.where} ({entry.name}) has "
                f"{len(classes)} classes ({shown}): set model.head.num_classes to {len(classes)}"
            )


def validation_sets(config: Config, raw: bool = False) -> list[tuple[str, object, DatasetEntry]]:
    """``(domain name, dataset, entry)`` per ``data.val`` entry (per corruption and severity of
    an entry with ``corruptions``), with the evaluation transform; ``raw``: images as read,
    (H, W, 3) uint8 tensors, which each test protocol resizes itself (:mod:`reinseg.protocols`)."""
    from .build import official_window
    from .data import eval_transform

    sets = []
    entries = [expanded for entry in _entries(config, "val") for expanded in entry.expanded()]
    crop, _ = official_window(config.model)  # the training crop, whose official configs set the default scales
    for entry in entries:
        transform = _raw_image if raw else eval_transform(entry.eval_scale(crop))
        dataset = entry.build(transform=transform, on_error=config.data.on_error)  # corrupted, if its entry is
        # Every file is read now: a bad one must stop the run before training, not at its first
        # validation hours later. With on_error=skip the bad pairs are dropped (skipping at load
        # time would score a replacement image twice).
        dataset.validate()
        if config.data.on_error == "skip" and dataset.skipped:
            log.warning(
                "%s: %d pairs left out of the evaluation (data.on_error=skip)", dataset.name, len(dataset.skipped)
            )
        sets.append((entry.label or dataset.name, dataset, entry))
    names = [name for name, _, _ in sets]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ConfigError(f"data.val has several domains named {sorted(duplicated)}: give them a 'label'")
    return sets


def worker_started(worker_id: int) -> None:
    """A DataLoader worker's start: seeded as Lightning seeds workers (``seed_everything(workers=
    True)``, which an explicit function replaces), and deaf to SIGTERM and SIGINT. ``timeout``,
    Slurm's ``scancel`` and Ctrl-C signal the whole process group: a worker ended by them made
    the main process's next batch fail before it could write ``last.ckpt`` at the end of its step.
    A worker still ends with its DataLoader, and with the main process."""
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_deaf_workers() -> None:
    """At the interpreter's exit multiprocessing ends its daemonic children with SIGTERM and then
    waits for them: data workers ignore SIGTERM (:func:`worker_started`), so a process whose
    DataLoader was not shut down (an error during a validation) waited for ever. They are
    killed first (the exit would end them anyway)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# Registered after multiprocessing's own exit handler (imported with torch): it runs first.
atexit.register(_kill_deaf_workers)


def _raw_image(image, label=None, rng=None):
    """The image as read, an (H, W, 3) uint8 tensor, and the label as ``ToTensor`` gives it."""
    return torch.from_numpy(np.ascontiguousarray(image)), None if label is None else torch.from_numpy(
        np.ascontiguousarray(label).astype(np.int64)
    )


def training_set(config: Config):
    """The training datasets of ``data.train`` with the training transform (concatenated if several)."""
    from .data import train_transform
    from .data.datasets import ConcatSegmentationDataset

    if not config.data.train:
        raise ConfigError("data.train lists no dataset")
    transform = train_transform(
        crop_size=config.data.crop_size,
        base_size=config.data.base_size,
        max_size=config.data.max_size,
        cat_max_ratio=config.data.cat_max_ratio,
    )
    datasets = [
        entry.build(transform=transform, on_error=config.data.on_error, seed=config.train.seed)
        for entry in _entries(config, "train")
    ]
    return datasets[0] if len(datasets) == 1 else ConcatSegmentationDataset(datasets)


def label_root(dataset) -> Path:
    """The folder all label files of ``dataset`` live under (predictions mirror it)."""
    labels = [label for _, label in dataset.pairs if label is not None]
    if not labels:
        raise ValueError(f"{dataset.name} has no labels")
    return _common_folder(labels)


def part_label_folders(dataset) -> list[Path]:
    """The folder of each part's labels (ACDC's conditions), or ``[label_root(dataset)]`` for a
    dataset of one part: the parts' common folder may also hold other splits' labels
    (``gt/<condition>/train``)."""
    by_part: dict[str, list[str]] = {}
    for image, label in dataset.pairs:
        if label is not None:
            by_part.setdefault(dataset.part_of.get(str(image), ""), []).append(label)
    if len(by_part) < 2:
        return [label_root(dataset)]
    return [_common_folder(labels) for _, labels in sorted(by_part.items())]


def _common_folder(labels) -> Path:
    return Path(os.path.commonpath([str(Path(p).parent) for p in labels]))


def native_labels(dataset) -> bool:
    """Whether some labels of ``dataset`` do not hold class indices (a native layout that
    ``reinseg prepare`` converts, such as Cityscapes' label IDs)."""
    return any(encoding is not None and not encoding.stores_class_ids for encoding in dataset.encodings)


def prepared_elsewhere(dataset) -> bool:
    """Whether ``reinseg prepare`` writes ``dataset``'s train-ID labels to another folder under
    the native labels' names (Mapillary: ``cityscapes_trainIdLabel/<split>/label``), not beside them."""
    info = DATASETS.get(dataset.name)
    return native_labels(dataset) and info is not None and info.labels_prepared_elsewhere


def domain_folder(domain: str) -> str:
    """The folder name of a validation domain's files (``--save-preds``, ``--save-examples``): its
    name with path separators as ``_`` (``acdc/night`` -> ``acdc_night``), never ``.`` or ``..``
    (a ``label: ..`` wrote predictions into the folder above)."""
    folder = domain.replace("/", "_").replace("\\", "_")
    return f"_{folder}" if folder in ("", ".", "..") else folder


def prediction_name(dataset, relative: Path) -> Path:
    """Where ``--save-preds`` writes the train-ID prediction for the label at ``relative`` (to
    :func:`label_root`): the same path where the labels are train IDs, else the name the dataset's
    ``reinseg prepare`` gives the train-ID label (``*_labelIds.png`` -> ``*_labelTrainIds.png``,
    ``name.png`` -> ``name_labelTrainIds.png``), so that train IDs never carry a label-ID name.
    Mapillary's prepared labels live in another folder under the same names: kept."""
    if not native_labels(dataset) or relative.name.endswith("labelTrainIds.png") or prepared_elsewhere(dataset):
        return relative
    if relative.name.endswith("labelIds.png"):
        return relative.with_name(relative.name[: -len("labelIds.png")] + "labelTrainIds.png")
    return relative.with_name(f"{relative.stem}_labelTrainIds.png")


class SegmentationDataModule(L.LightningDataModule):
    """The training stream and validation sets of a :class:`Config`, built on first use.

    ``start_step`` is the step a resumed run continues from and ``start_sample`` the number of
    training samples the run had taken by then (the task sets both from the checkpoint; None:
    ``start_step`` times this run's global batch); the DDP rank and world size come from the
    attached trainer.
    """

    def __init__(self, config: Config, raw_images: bool = False) -> None:
        super().__init__()
        self.config = config
        self.raw_images = raw_images  # validation images as read (see validation_sets)
        self.start_step = 0
        self.start_sample: int | None = None
        self._train_set = None
        self._val_sets: list[tuple[str, object, DatasetEntry]] | None = None

    def train_set(self):
        if self._train_set is None:
            self._train_set = training_set(self.config)
        return self._train_set

    def val_sets(self) -> list[tuple[str, object, DatasetEntry]]:
        """``(domain name, dataset, entry)`` per ``data.val`` entry."""
        if self._val_sets is None:
            self._val_sets = validation_sets(self.config, raw=self.raw_images)
        return self._val_sets

    def class_names(self) -> list[tuple[str, ...]]:
        """The class names of each validation set, in ``val_sets()`` order."""
        return [dataset.classes.names for _, dataset, _ in self.val_sets()]

    def global_batch(self) -> int:
        """The training samples of one step over all ranks: ``data.batch_size`` x the world size."""
        return self.config.data.batch_size * self._rank_and_world()[1]

    def samples_before(self, step: int) -> int:
        """The training samples (over all ranks) the run has taken before step ``step``."""
        start = self.start_step * self.global_batch() if self.start_sample is None else self.start_sample
        return start + (step - self.start_step) * self.global_batch()

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        from .data import collate_training

        data = self.config.data
        rank, world = self._rank_and_world()
        stream = TrainingStream(
            self.train_set(),
            data.batch_size,
            self.config.train.seed,
            start_step=self.start_step,
            rank=rank,
            world_size=world,
            start_sample=self.start_sample,
        )
        # Its own generator: creating the iterator must not draw from the global RNG, which the
        # loss's point sampling uses (a resumed run would otherwise draw different points).
        generator = torch.Generator().manual_seed(self.config.train.seed)
        return DataLoader(
            stream,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=collate_training,  # each label's values, for the loss (no read from a GPU)
            persistent_workers=data.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
            worker_init_fn=worker_started,
        )

    def val_dataloader(self) -> list[DataLoader]:
        from .data import collate

        rank, world = self._rank_and_world()
        # Their own generators: an iterator over a DataLoader without one draws its seed from the
        # global RNG, which the loss's point sampling uses.
        return [
            DataLoader(
                dataset,
                batch_size=1,
                sampler=ShardSampler(len(dataset), rank, world),
                num_workers=self.config.data.num_workers,
                collate_fn=collate,
                # A copy to a GPU from pageable memory first waits for everything queued before it:
                # the previous image's evaluation. From pinned memory it queues behind it instead.
                pin_memory=torch.cuda.is_available(),
                generator=torch.Generator().manual_seed(self.config.train.seed),
                worker_init_fn=worker_started,
            )
            if rank < len(dataset)
            else DataLoader(EmptyShard(), batch_size=None)  # the item as it is, no collation
            for _, dataset, _ in self.val_sets()
        ]
