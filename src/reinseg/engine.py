"""Training and evaluation with Lightning: a thin LightningModule around the plain Segmentor.

- Optimizer as the official Rein: AdamW (lr 1e-4, weight decay 0.05) without weight decay for
  norm layers, Rein's tokens and scale, query and level embeddings; poly decay (power 0.9) to 0
  over ``max_iters`` after an optional linear warm-up.
- Data: an endless, reproducible stream of augmented crops (:class:`TrainingStream`): sample ``s``
  of the run is always the same image with the same augmentation, so a resumed run sees exactly
  the data an uninterrupted one would.
- Checkpoints hold the trainable weights (Rein + head), optimizer, schedule, step, every rank's
  RNG state, and the configuration; the frozen VFM is referenced by the configuration, not
  copied. They are written atomically, and ``train`` resumes from the newest intact checkpoint in
  ``<output_dir>/checkpoints``, bit for bit: validation never draws from the RNG the loss uses.
- A run stopped by SIGTERM writes ``last.ckpt`` and raises :class:`TrainingInterrupted`
  (``reinseg train`` exits with status 143); logs are appended to across resumes.
- Validation: one confusion matrix per domain, summed over DDP ranks; per-domain mIoU and the
  mean over target domains are logged, printed and written as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .checkpoints import (
    CHECKPOINT_FORMAT,
    atomic_write,
    atomic_write_bytes,
    check_same_model,
    checkpoint_state_dict,
    remove_stale_temporaries,
)
from .config import EVAL_ENTRY_KEYS, Config, ConfigError, check_values, to_dict
from .metrics import ConfusionMatrix, format_scores_table, mean_over_domains
from .safe_load import UnsafeFileError, load_torch_file
from .build import build_segmentor
from .segmentor import Segmentor
from .tuning import get_strategy

__all__ = [
    "TrainingStream",
    "ShardSampler",
    "parameter_groups",
    "lr_factor",
    "set_tf32",
    "SegmentationTask",
    "build_trainer",
    "train",
    "evaluate",
    "validation_sets",
    "prediction_at_size",
    "EVAL_ENTRY_KEYS",
    "TrainingInterrupted",
    "latest_checkpoint",
]

log = logging.getLogger("reinseg")

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)
TF32_MODES = ("conv", "all", "none")


class TrainingStream(IterableDataset):
    """Batches of training samples for one DDP rank, from step ``start_step`` on, forever.

    Global sample ``s`` is item ``perm_e[s mod N]`` of epoch ``e = s // N`` (a seeded permutation
    per epoch), augmented with a generator seeded by ``(seed, e, item)``. Global batch ``b`` holds
    samples ``b * B * W ... (b + 1) * B * W - 1``; rank ``r`` takes its ``B`` consecutive ones, and
    data-loader worker ``w`` of ``n`` yields the rank's batches ``b`` with ``b mod n = w``, which
    the DataLoader interleaves back in order.
    """

    def __init__(
        self, dataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the training set {getattr(dataset, 'name', '')} is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
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
        while True:
            if step % num_workers == worker_id:
                first = (step * self.world_size + self.rank) * self.batch_size
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


def parameter_groups(
    segmentor: Segmentor,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float,
    no_decay_keys: Sequence[str] | None = None,
) -> list[dict]:
    """AdamW groups of the trainable parameters, as mmengine's constructor with the official ``paramwise_cfg``.

    No weight decay for a parameter of a norm layer (``norm_decay_mult=0``) or whose name contains
    one of ``no_decay_keys`` (the ``custom_keys``, all with ``decay_mult=0`` and ``lr_mult=1``;
    default ``segmentor.no_decay_keys``, which the head and the tuning strategy declare);
    ``lr x backbone_lr_mult`` for the VFM's own weights.
    """
    no_decay_keys = segmentor.no_decay_keys if no_decay_keys is None else tuple(no_decay_keys)
    groups: dict[tuple[float, float], list] = {}
    for module_name, module in segmentor.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            no_decay = isinstance(module, NORM_LAYERS) or any(k in full for k in no_decay_keys)
            decay = 0.0 if no_decay else weight_decay
            group_lr = lr * backbone_lr_mult if full.startswith("backbone.vit.") else lr
            groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": params, "lr": group_lr, "weight_decay": decay} for (group_lr, decay), params in groups.items()]


def lr_factor(
    step: int,
    max_iters: int,
    warmup_iters: int = 0,
    warmup_start_factor: float = 1e-6,
    power: float = 0.9,
    min_factor: float = 0.0,
) -> float:
    """Learning-rate multiplier during iteration ``step`` (from 0): linear warm-up, then poly decay.

    Equal to mmengine's ``LinearLR(start_factor, begin=0, end=warmup_iters)`` followed by
    ``PolyLR(eta_min, power, begin=warmup_iters, end=max_iters)``, stepped after every iteration
    (pinned against mmengine by ``tests/test_optimizer_golden.py``). mmengine's schedulers act on
    iterations ``begin .. end - 1`` and reach their end value at the last of them, so the spans
    are ``warmup_iters - 1`` and ``max_iters - warmup_iters - 1``: the warm-up reaches 1 at
    iteration ``warmup_iters - 1`` and the lr is ``min_factor`` at iteration ``max_iters - 1``.
    """
    if step < warmup_iters:
        span = warmup_iters - 1
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / span if span else warmup_start_factor
    # mmengine's PolyLR is chained: it decays whatever lr the warm-up left (start_factor after a
    # one-iteration warm-up).
    start = warmup_start_factor if warmup_iters == 1 else 1.0
    span = max_iters - warmup_iters - 1
    if span <= 0:
        return start
    progress = min(step - warmup_iters, span) / span
    return (start - min_factor) * (1.0 - progress) ** power + min_factor


def set_tf32(mode: str) -> None:
    """Where fp32 CUDA math may run on TF32 tensor cores (process-wide PyTorch flags).

    ``"conv"``: cuDNN convolutions only, matmuls (linear layers, attention) in IEEE fp32. These are
    PyTorch's defaults since 1.12, and the official Rein runs trained with them (PyTorch 2.0.1, fp32
    ``OptimWrapper``; neither mmengine nor the official code touches the flags). ``"all"``: matmuls
    too (faster on Ampere and Hopper GPUs, about 10 mantissa bits). ``"none"``: IEEE fp32 everywhere.
    """
    if mode not in TF32_MODES:
        raise ConfigError(f"train.tf32 must be one of {', '.join(TF32_MODES)}, got {mode!r}")
    torch.backends.cuda.matmul.allow_tf32 = mode == "all"
    torch.backends.cudnn.allow_tf32 = mode != "none"


def prediction_at_size(scores: torch.Tensor, size) -> torch.Tensor:
    """(C, h, w) class scores of one image -> (H, W) int64 classes at ``size`` = (H, W), its label's
    (original) size: bilinear resize without corner alignment, then argmax, as mmseg's
    ``postprocess_result``."""
    scores = F.interpolate(scores[None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return scores.argmax(1)[0]


def validation_sets(config: Config) -> list[tuple[str, Any, dict]]:
    """``(domain name, dataset, entry)`` per ``data.val`` entry, with the evaluation transform."""
    from .data import build_dataset, eval_scale, eval_transform

    sets = []
    for entry in config.data.val:
        entry = dict(entry)
        options = {k: v for k, v in entry.items() if k not in EVAL_ENTRY_KEYS + ("name", "root", "split")}
        if "name" not in entry or "root" not in entry:
            raise ConfigError(f"data.val entry {entry} needs a name and a root")
        dataset = build_dataset(
            entry["name"],
            entry["root"],
            entry.get("split", "val"),
            transform=eval_transform(eval_scale(entry)),
            on_error=config.data.on_error,
            **options,
        )
        # Every file is read now: a bad one must stop the run before training, not at its first
        # validation hours later. With on_error=skip the bad pairs are dropped (skipping at load
        # time would score a replacement image twice).
        dataset.validate()
        if config.data.on_error == "skip":
            if dataset.skipped:
                log.warning(
                    "%s: %d pairs left out of the evaluation (data.on_error=skip)", dataset.name, len(dataset.skipped)
                )
        sets.append((entry.get("label", dataset.name), dataset, entry))
    names = [name for name, _, _ in sets]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ConfigError(f"data.val has several domains named {sorted(duplicated)}: give them a 'label'")
    return sets


def check_num_classes(config: Config) -> None:
    """ConfigError naming both keys when the head predicts another number of classes than a
    dataset of ``data.train`` or ``data.val`` is labelled in (read from the entries, not the files)."""
    from .data.layouts import dataset_classes

    expected = config.model.head.num_classes
    for section in ("train", "val"):
        for index, entry in enumerate(getattr(config.data, section)):
            if not isinstance(entry, dict) or "name" not in entry:
                continue  # reported with the dataset's other problems when it is built
            options = {k: v for k, v in entry.items() if k not in EVAL_ENTRY_KEYS + ("name", "root", "split")}
            try:
                classes = dataset_classes(entry["name"], options)
            except ValueError as err:
                raise ConfigError(f"data.{section}[{index}]: {err}") from None
            if len(classes) != expected:
                shown = ", ".join(classes.names[:8]) + (", ..." if len(classes) > 8 else "")
                raise ConfigError(
                    f"model.head.num_classes is {expected} but data.{section}[{index}] ({entry['name']}) has "
                    f"{len(classes)} classes ({shown}): set model.head.num_classes to {len(classes)}"
                )


def training_set(config: Config):
    from .data import build_dataset, train_transform
    from .data.datasets import ConcatSegmentationDataset

    if not config.data.train:
        raise ConfigError("data.train lists no dataset")
    transform = train_transform(
        crop_size=config.data.crop_size,
        base_size=config.data.base_size,
        max_size=config.data.max_size,
        cat_max_ratio=config.data.cat_max_ratio,
    )
    datasets = []
    for entry in config.data.train:
        entry = dict(entry)
        if "name" not in entry or "root" not in entry:
            raise ConfigError(f"data.train entry {entry} needs a name and a root")
        name, root, split = entry.pop("name"), entry.pop("root"), entry.pop("split", "train")
        dataset = build_dataset(
            name, root, split, transform=transform, on_error=config.data.on_error, seed=config.train.seed, **entry
        )
        datasets.append(dataset)
    return datasets[0] if len(datasets) == 1 else ConcatSegmentationDataset(datasets)


class SegmentationTask(L.LightningModule):
    """Trains and validates a :class:`Segmentor` as a :class:`Config` describes."""

    def __init__(
        self,
        config: Config,
        segmentor: Segmentor | None = None,
        save_predictions: str | None = None,
        write_metrics: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        # Validation results go to <output_dir>/metrics/ (training); evaluate() writes elsewhere.
        self.write_metrics = write_metrics
        self.segmentor = segmentor if segmentor is not None else build_segmentor(config.model)
        self.save_predictions = None if save_predictions is None else Path(save_predictions)
        # Checkpoints hold only the trainable weights; on_load_checkpoint checks they are all there.
        self.strict_loading = False
        self._resume_step = 0
        self._train_set = None
        self._val_sets: list[tuple[str, Any, dict]] | None = None
        self._confusions: list[ConfusionMatrix] = []
        self._label_roots: dict[int, Path] = {}
        self.last_results: dict[str, Any] | None = None
        self._rng_after_step: dict | None = None
        # Set by train() when the run had already reached train.max_iters: nothing was done.
        self.already_finished: int | None = None

    # -- data -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        data = self.config.data
        stream = TrainingStream(
            self.train_set(),
            data.batch_size,
            self.config.train.seed,
            start_step=self._resume_step,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
        )
        from .data import collate

        # Its own generator: creating the iterator must not draw from the global RNG, which the
        # loss's point sampling uses (a resumed run would otherwise draw different points).
        generator = torch.Generator().manual_seed(self.config.train.seed)
        return DataLoader(
            stream,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=collate,
            persistent_workers=data.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_set(self):
        if self._train_set is None:
            self._train_set = training_set(self.config)
        return self._train_set

    def val_sets(self) -> list[tuple[str, Any, dict]]:
        if self._val_sets is None:
            self._val_sets = validation_sets(self.config)
        return self._val_sets

    def val_dataloader(self) -> list[DataLoader]:
        from .data import collate

        rank, world = self.global_rank, self.trainer.world_size
        # Their own generators: an iterator over a DataLoader without one draws its seed from the
        # global RNG, which the loss's point sampling uses.
        return [
            DataLoader(
                dataset,
                batch_size=1,
                sampler=ShardSampler(len(dataset), rank, world),
                num_workers=self.config.data.num_workers,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(self.config.train.seed),
            )
            for _, dataset, _ in self.val_sets()
        ]

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.segmentor.loss(batch["image"], batch["label"])
        self.log("loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if not k.startswith("d")})
        self.log("iteration", float(self.global_step + 1))
        return losses["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The RNG state checkpoints of this step hold; validation, which may follow, puts it back.
        self._rng_after_step = rng_state()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit" and self._rng_after_step is not None:
            set_rng_state(self._rng_after_step)

    def configure_optimizers(self):
        tc = self.config.train
        # The multiplier is for the VFM's own weights when they fine-tune, not for modules added
        # inside it (LoRA, adapters).
        backbone_lr_mult = tc.backbone_lr_mult if get_strategy(self.config.model.tuning).trains_vfm else 1.0
        groups = parameter_groups(self.segmentor, tc.lr, tc.weight_decay, backbone_lr_mult, tc.no_decay_keys)
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
        min_factor = tc.min_lr / tc.lr if tc.lr else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(
                step, tc.max_iters, tc.warmup_iters, tc.warmup_start_factor, tc.poly_power, min_factor
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._confusions = [
            ConfusionMatrix(len(dataset.classes), device=self.device) for _, dataset, _ in self.val_sets()
        ]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch["label"] is None:
            raise ValueError(f"validation set {self.val_sets()[dataloader_idx][0]} has no labels")
        scores = self.segmentor.predict(batch["image"])
        for i, size in enumerate(batch["ori_size"]):
            prediction = prediction_at_size(scores[i], size)
            self._confusions[dataloader_idx].update(prediction, batch["label"][i])
            if self.save_predictions is not None:
                self._write_prediction(dataloader_idx, batch["label_path"][i], prediction)

    def _write_prediction(self, dataloader_idx: int, label_path: str, prediction: torch.Tensor) -> None:
        from .data.io import write_png

        domain, dataset, _ = self.val_sets()[dataloader_idx]
        if dataloader_idx not in self._label_roots:
            self._label_roots[dataloader_idx] = label_root(dataset)
        relative = Path(label_path).relative_to(self._label_roots[dataloader_idx])
        target = self.save_predictions / domain.replace("/", "_") / relative
        write_png(target, prediction.to(torch.uint8).cpu().numpy(), sync=True)

    def on_validation_epoch_end(self) -> None:
        results, tables = {}, {}
        for (domain, dataset, _), confusion in zip(self.val_sets(), self._confusions):
            confusion.reduce()
            results[domain] = confusion.scores(dataset.classes.names)
            tables.setdefault(dataset.classes.names, {})[domain] = results[domain]
        in_mean = [domain for domain, _, entry in self.val_sets() if entry.get("in_mean", True)]
        summary = {
            "step": int(self.global_step),
            "domains": results,
            "mean_mIoU": mean_over_domains(results, in_mean) if in_mean else None,
            "mean_domains": in_mean,
        }
        self.last_results = summary
        # The scores are already summed over ranks: rank 0 logs them.
        for domain, scores in results.items():
            if scores["mIoU"] is not None:
                self.log(f"val/{domain}/mIoU", scores["mIoU"], rank_zero_only=True)
        if summary["mean_mIoU"] is not None:
            self.log("val/mean_mIoU", summary["mean_mIoU"], prog_bar=True, rank_zero_only=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for names, table in tables.items():  # one table per class list
                print("\n" + format_scores_table(table, names))
            if summary["mean_mIoU"] is not None:
                print(f"mean mIoU over {', '.join(in_mean)}: {summary['mean_mIoU']:.2f}")
            if self.write_metrics:
                out = Path(self.config.train.output_dir)
                payload = json.dumps(summary, indent=2).encode()
                atomic_write_bytes(out / "metrics" / f"val_step{self.global_step:07d}.json", payload)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"segmentor.{k}" for k in checkpoint_state_dict(self.segmentor)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["format"] = CHECKPOINT_FORMAT
        checkpoint["config"] = to_dict(self.config)
        # The loss samples points with torch's generator (the data has its own seeded ones). Each
        # DDP rank draws its own points: every rank's state is kept, rank r's at ranks[r].
        state = rng_state()
        ranks = [state]
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, state)
        checkpoint["rng"] = {"ranks": ranks}

    def check_resumable(self, checkpoint: dict, name: str = "the checkpoint") -> None:
        """Refuse a checkpoint this task cannot continue from (another model, missing weights)."""
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{name} is not a reinseg training checkpoint")
        check_same_model(checkpoint.get("config", {}).get("model"), to_dict(self.config.model), name)
        expected = {f"segmentor.{k}" for k in checkpoint_state_dict(self.segmentor)}
        missing = sorted(expected - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(f"{name} lacks {len(missing)} trainable weights, e.g. {', '.join(missing[:5])}")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_resumable(checkpoint)
        rng = checkpoint.get("rng")
        if rng is not None:
            ranks = rng.get("ranks", [rng])  # older checkpoints: rank 0's state only
            rank = self.global_rank
            if rank >= len(ranks):
                log.warning(
                    "the checkpoint holds the RNG states of %d ranks, this run has more: rank %d continues "
                    "with rank 0's (the resumed run differs from an uninterrupted one)",
                    len(ranks),
                    rank,
                )
            set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
            # What a validation right after the restart (Lightning may redo one) puts back.
            self._rng_after_step = rng_state()
        self._resume_step = int(checkpoint.get("global_step", 0))


def rng_state() -> dict:
    """The global torch RNG states of this process (CPU and, if any, every CUDA device)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def label_root(dataset) -> Path:
    """The folder all label files of ``dataset`` live under (predictions mirror it)."""
    import os

    labels = [label for _, label in dataset.pairs if label is not None]
    if not labels:
        raise ValueError(f"{dataset.name} has no labels")
    return Path(os.path.commonpath([str(Path(p).parent) for p in labels]))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: a killed run never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        remove_stale_temporaries(Path(path).parent)
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        # A resume reads the file like any other: nothing in it may run (torch's default would
        # follow TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
        return load_torch_file(path, what="checkpoint")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it
    (the rows between the checkpoint and an interruption appear twice, with equal values)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            import csv

            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        import csv
        import io

        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        # A kill while the header grows must not lose the rows already logged.
        atomic_write_bytes(self.metrics_file_path, text.getvalue().encode())


class _AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class TrainingInterrupted(RuntimeError):
    """Training (after writing a checkpoint) or evaluation stopped on SIGTERM; the command line
    exits with ``exit_status``, 143 (128 + SIGTERM, as a shell reports a process the signal ended)."""

    exit_status = 143


@contextlib.contextmanager
def _on_sigterm(message):
    """Lightning ends a run on SIGTERM with a SystemExit of status 0: make it an error whose
    text is ``message()``."""
    try:
        yield
    except SIGTERMException:
        raise TrainingInterrupted(message()) from None


class _RunGuard(L.Callback):
    """Writes ``last.ckpt`` when SIGTERM arrives (at the end of the current step) and at the end
    of training when the last step is not a checkpoint step (the final weights are never lost)."""

    def __init__(self, last: Path) -> None:
        self.last = last
        self._saved_step: int | None = None

    def _save(self, trainer) -> None:
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        if trainer.global_step in (saved, self._saved_step):
            return  # last.ckpt holds this step already
        trainer.save_checkpoint(self.last)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        # Here the state is the one every other checkpoint of a step holds. Under DDP the ranks
        # may see the signal at different steps: they save together when Lightning stops them
        # all at once (on_exception), never here.
        if trainer.received_sigterm and trainer.world_size == 1:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self._save(trainer)


class _Progress(TQDMProgressBar):
    """Progress bar in iterations (the training stream is endless, so epochs mean nothing)."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # As Lightning's, with the bar named after the domain instead of "DataLoader <i>".
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.val_progress_bar
        bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))
        bar.set_description(f"validate {pl_module.val_sets()[dataloader_idx][0]}")


class _NoBanners(logging.Filter):
    """Drops the banners every Lightning Trainer prints (device availability, adverts for
    Lightning's cloud services); Lightning's other messages, such as the checkpoint a run resumes
    from, still show."""

    BANNERS = ("GPU available:", "TPU available:", "HPU available:", "\N{ELECTRIC LIGHT BULB} Tip:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.BANNERS)


def _hide_lightning_banners() -> None:
    # They are INFO records of Lightning's rank-zero loggers (lightning_utilities logs through the
    # one of whichever Lightning package was imported last).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoBanners) for f in logger.filters):
            logger.addFilter(_NoBanners())


def build_trainer(
    config: Config,
    callbacks: list | None = None,
    validate_during_training: bool = True,
    enable_progress_bar: bool = True,
    logging: bool = True,
) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    # The frozen VFM is in eval mode on purpose (no dropout or drop-path in it); Lightning's
    # pytree deprecation is not ours to act on.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    tc = config.train
    set_tf32(tc.tf32)
    out = Path(tc.output_dir)
    accelerator = tc.accelerator
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    precision = tc.precision if tc.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    devices = tc.devices
    many = (
        (isinstance(devices, int) and devices > 1)
        or tc.num_nodes > 1
        or (devices == "auto" and on_gpu and torch.cuda.device_count() > 1)
    )
    # Every trainable parameter gets a gradient each step: no find_unused_parameters.
    strategy = DDPStrategy(find_unused_parameters=False) if many else "auto"
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="iter_{iteration:06.0f}",
        auto_insert_metric_name=False,
        every_n_train_steps=tc.checkpoint_interval,
        save_last=True,
        enable_version_counter=False,  # never last-v1.ckpt beside a stale last.ckpt
        save_top_k=tc.keep_checkpoints,
        monitor="iteration",
        mode="max",
    )
    val_interval = min(tc.val_interval, tc.max_iters)
    _hide_lightning_banners()
    loggers = [TensorBoardLogger(out, name="tensorboard", version=""), _AppendingCSVLogger(out, name="csv", version="")]
    if not logging:
        loggers = False
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=tc.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=tc.max_iters,
        val_check_interval=val_interval if (validate_during_training and config.data.val) else None,
        check_val_every_n_epoch=None,
        limit_val_batches=None if (validate_during_training and config.data.val) else 0,
        num_sanity_val_steps=0,
        gradient_clip_val=tc.grad_clip,
        log_every_n_steps=tc.log_interval,
        callbacks=[checkpoint, _RunGuard(out / "checkpoints" / "last.ckpt"), LearningRateMonitor("step"), _Progress()]
        + list(callbacks or []),
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=enable_progress_bar,
        use_distributed_sampler=False,  # the stream and ShardSampler split the data themselves
        enable_model_summary=False,
        default_root_dir=out,
    )


def train(
    config: Config, resume: str = "auto", callbacks: list | None = None, overwrite: bool = False
) -> SegmentationTask:
    """Train as ``config`` says.

    Args:
        resume: "auto" (from the newest intact checkpoint of ``<output_dir>/checkpoints``, if
            any), "never" (a new run; refused where checkpoints exist unless ``overwrite``) or a
            checkpoint path.
        overwrite: with ``resume="never"``, delete the run's checkpoints, logs and metrics first.
    Raises:
        FileExistsError: ``resume="never"`` into a folder holding a run's checkpoints.
        TrainingInterrupted: SIGTERM arrived; ``last.ckpt`` holds the state to resume from.

    Everything (configuration, checkpoint, data) is checked before anything is written. A run
    that had already reached ``train.max_iters`` is left as it is (``already_finished`` holds
    its step).
    """
    check_values(config)
    check_num_classes(config)
    L.seed_everything(config.train.seed, workers=True, verbose=False)  # before the model's initialisation
    out = Path(config.train.output_dir)
    checkpoints = out / "checkpoints"
    ckpt_path = None
    if resume == "auto":
        ckpt_path = latest_checkpoint(checkpoints)
    elif resume == "never":
        existing = sorted(p.name for p in checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
        if existing and not overwrite:
            raise FileExistsError(
                f"{checkpoints} holds the checkpoints of an earlier run ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}): continue it (--resume auto), choose another "
                "output folder, or delete them with --overwrite"
            )
    else:
        ckpt_path = Path(resume)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt_path}")
    task = SegmentationTask(config)
    step = 0
    if ckpt_path is not None:
        # Refuse another model's checkpoint before writing anything (config.yaml, logs).
        payload = _read_checkpoint(ckpt_path)
        task.check_resumable(payload, f"checkpoint {ckpt_path}")
        step = int(payload.get("global_step", 0))
        del payload
        if step >= config.train.max_iters:
            log.info("%s is at iteration %d of %d: the run is finished", ckpt_path, step, config.train.max_iters)
            task.already_finished = step
            return task
    # Fail on bad data now, not after hours of training (and before writing anything).
    task.train_set()
    if config.data.val:
        task.val_sets()
    # Rank 0 (as the launcher's environment says): before the trainer, so a bad output folder fails first.
    if rank_zero_only.rank == 0:
        from .config import dump_config

        if resume == "never" and overwrite:
            _clear_run(out)
        for folder in (out, checkpoints, out / "metrics", out / "csv"):
            remove_stale_temporaries(folder)
        atomic_write_bytes(out / "config.yaml", dump_config(config).encode())
    trainer = build_trainer(config, callbacks)
    if ckpt_path:
        log.info("resuming from %s (iteration %d)", ckpt_path, step)
    stopped = lambda: (
        f"stopped by SIGTERM at iteration {trainer.global_step}; {checkpoints / 'last.ckpt'} holds it: "
        "run the same command to resume"
    )
    with _on_sigterm(stopped):
        trainer.fit(task, ckpt_path=None if ckpt_path is None else str(ckpt_path))
        last_validated = task.last_results is not None and task.last_results["step"] == trainer.global_step
        if config.data.val and not last_validated and trainer.global_step >= config.train.max_iters:
            trainer.validate(task, verbose=False)
    return task


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of ``folder`` (``last.ckpt``, ``iter_*.ckpt``) at the highest step that
    reads back: a kill between writing ``iter_N.ckpt`` and ``last.ckpt`` loses nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    best, best_step = None, -1
    # last.ckpt first: at equal steps it is the one taken.
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.name != "last.ckpt"):
        try:
            step = int(_read_checkpoint(path).get("global_step", -1))
        except UnsafeFileError:
            raise  # not damaged but hostile: refused, never passed over
        except Exception as err:  # a damaged file is passed over, not fatal
            log.warning("passing over %s, which does not read back: %s", path, err)
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def _read_checkpoint(path: Path) -> dict:
    """A training checkpoint, memory-mapped (only what is touched is read)."""
    return load_torch_file(path, what="checkpoint", mmap=True)


def _clear_run(out: Path) -> None:
    """Delete what a run wrote into ``out``: checkpoints, logs, validation results, config."""
    import shutil

    for name in ("checkpoints", "csv", "tensorboard", "metrics"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "config.yaml").unlink(missing_ok=True)


def evaluate(config: Config, checkpoint: str, save_predictions: str | None = None) -> SegmentationTask:
    """Evaluate a checkpoint on ``data.val``; the task's ``last_results`` hold the per-domain
    results and their mean, its ``val_sets()`` the datasets."""
    from .checkpoints import segmentor_from_checkpoint

    check_values(config)
    check_num_classes(config)
    if not config.data.val:
        raise ConfigError("data.val lists no dataset to evaluate on")
    segmentor, _ = segmentor_from_checkpoint(checkpoint, config.model)
    # The results are returned, not written into the training run's metrics/.
    task = SegmentationTask(config, segmentor=segmentor, save_predictions=save_predictions, write_metrics=False)
    task.val_sets()
    # No loggers: evaluating must not touch (or overwrite) the training run's logs.
    trainer = build_trainer(config, validate_during_training=True, logging=False)
    with _on_sigterm(lambda: "evaluation stopped by SIGTERM"):
        trainer.validate(task, verbose=False)
    if task.last_results is None:
        raise RuntimeError("validation produced no results")
    return task
