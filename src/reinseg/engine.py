"""Training and evaluation with Lightning: the task (a thin LightningModule around the plain
Segmentor), the trainer and the ``train`` / ``evaluate`` runs.

The data of a run is :class:`reinseg.datamodule.SegmentationDataModule` (training stream,
validation sets, classes); the optimizer recipe is :mod:`reinseg.optim`. Their names are
importable from here too.

- Checkpoints hold the trainable weights (Rein + head), optimizer, schedule, step, every rank's
  RNG state, and the configuration; the frozen VFM is referenced by the configuration, not
  copied. They are written atomically, and ``train`` resumes from the newest intact checkpoint in
  ``<output_dir>/checkpoints``, bit for bit on the CPU: validation never draws from the RNG the
  loss uses (on a GPU, backward passes that sum with atomic additions make every run differ in
  the last bits, resumed or not).
- A run stopped by SIGTERM or Ctrl-C writes ``last.ckpt`` and raises :class:`TrainingInterrupted`
  (``reinseg train`` exits with status 143 or 130); logs are appended to across resumes.
- Validation: one confusion matrix per domain in its dataset's classes, summed over DDP ranks;
  per-domain mIoU and the mean over target domains are logged, printed and written as JSON.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from .build import build_segmentor
from .checkpoints import (
    CHECKPOINT_FORMAT,
    atomic_write,
    atomic_write_bytes,
    check_same_model,
    check_vfm_weights,
    checkpoint_state_dict,
    config_for_checkpoint,
    probe_writable_folder,
    refuse_running_run,
    remove_stale_temporaries,
    run_lock,
    vfm_record,
)
from .config import Config, ConfigError, check_values, to_dict
from .data.entries import EVAL_ENTRY_KEYS, DatasetEntry
from .datamodule import (
    SegmentationDataModule,
    ShardSampler,
    TrainingStream,
    check_num_classes,
    domain_folder,
    label_root,
    prediction_name,
    training_set,
    validation_sets,
)
from .ema import ExponentialAverage
from .fada import fits_haar_split
from .metrics import ConfusionMatrix, format_scores_table, mean_over_domains
from .optim import SCHEDULE_KEYS, build_optimizer, lr_factor, parameter_groups, set_tf32
from .safe_load import UnsafeFileError, damaged_record, load_torch_file
from .segmentor import Segmentor
from .train_options import apply_train_options

# The data and optimizer names are re-exported: they were defined here before the split.
__all__ = [
    "TrainingStream",
    "ShardSampler",
    "SegmentationDataModule",
    "training_set",
    "check_num_classes",
    "label_root",
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
    "SIGNAL_NAMES",
    "latest_checkpoint",
]

log = logging.getLogger("reinseg")


_Run = TypeVar("_Run", bound=Callable[..., Any])
_run_completed = False  # whether the last train() or evaluate() returned: no collective in flight


def _destroy_process_group() -> None:
    """At the interpreter's exit, the default process group a DDP run leaves behind. Lightning
    destroys NCCL's at exit, not gloo's (DDP on the CPU): then the interpreter's teardown
    destroys it, and gloo's threads now and then abort the process there ("terminate called
    without an active exception", exit -6 after a finished run; pytorch/pytorch#190489). Only
    after a run that returned: a rank that failed with a collective in flight would wait in the
    destroy for the other ranks, up to the group's timeout, where it exits at once."""
    if _run_completed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _records_completion(function: _Run) -> _Run:
    """``function`` (train, evaluate), noting for :func:`_destroy_process_group` whether it returned."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        global _run_completed
        _run_completed = False
        result = function(*args, **kwargs)
        _run_completed = True
        return result

    return cast(_Run, run)


atexit.register(_destroy_process_group)


def prediction_at_size(scores: torch.Tensor, size) -> torch.Tensor:
    """(C, h, w) class scores of one image -> (H, W) int64 classes at ``size`` = (H, W), its label's
    (original) size: bilinear resize without corner alignment, then argmax, as mmseg's
    ``postprocess_result``."""
    from .protocols import scores_at_size

    return scores_at_size(scores, size).argmax(0)


class SegmentationTask(L.LightningModule):
    """Trains and validates a :class:`Segmentor` as a :class:`Config` describes."""

    def __init__(
        self,
        config: Config,
        segmentor: Segmentor | None = None,
        save_predictions: str | None = None,
        write_metrics: bool = True,
        protocols: list | None = None,
        record_images: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        # Evaluation under named protocols (reinseg.protocols): the loaders give the images as read
        # and each protocol resizes them; None: the datasets resize (validation during training).
        self.protocols = protocols
        # Validation results go to <output_dir>/metrics/ (training); evaluate() writes elsewhere.
        self.write_metrics = write_metrics
        self.segmentor = segmentor if segmentor is not None else build_segmentor(config.model)
        apply_train_options(self.segmentor, config)
        self.save_predictions = None if save_predictions is None else Path(save_predictions)
        # Checkpoints hold only the trainable weights; on_load_checkpoint checks they are all there.
        self.strict_loading = False
        self.data = SegmentationDataModule(config, raw_images=protocols is not None)
        self._runs: list | None = None
        self._confusions: list[list[ConfusionMatrix]] = []  # [protocol][domain]
        self._part_confusions: list[list[dict[str, ConfusionMatrix]]] = []  # [protocol][domain][part]
        self._label_roots: dict[int, Path] = {}
        # With record_images, validation keeps per domain one record of scores per image
        # (reinseg.examples), and the confusion matrices go into the results.
        self.record_images = record_images
        self.image_records: list[list[dict]] = []
        self.last_results: dict[str, Any] | None = None
        self._rng_after_step: dict | None = None
        # Set by train() when the run had already reached train.max_iters: nothing was trained.
        self.already_finished: int | None = None
        # The iteration a validation outside fit belongs to (validate_missed_step); None: global_step.
        self.results_step: int | None = None
        # The weight average a resumed checkpoint holds (see on_load_checkpoint), for _WeightAverage.
        self.loaded_average: dict | None = None

    # -- data (the datamodule's; Lightning is given it with the task) -----------------------
    def train_set(self):
        return self.data.train_set()

    def val_sets(self) -> list[tuple[str, Any, DatasetEntry]]:
        """``(domain name, dataset, entry)`` per ``data.val`` entry."""
        return self.data.val_sets()

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.segmentor.loss(batch["image"], batch["label"], label_values=batch.get("label_values"))
        # Not a progress-bar metric: Lightning reads those from the device every step (_Progress).
        self.log("loss", losses["loss"])
        self.log_dict({f"train/{k}": v for k, v in losses.items() if not k.startswith("d")})
        # A fill on the device: a Python number would be copied there, and the host would wait.
        self.log("iteration", torch.full((), float(self.global_step + 1), device=self.device))
        return losses["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The RNG state checkpoints of this step hold; validation, which may follow, puts it back.
        self._rng_after_step = rng_state()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit" and self._rng_after_step is not None:
            set_rng_state(self._rng_after_step)

    def configure_optimizers(self):
        precision = self._trainer.precision if self._trainer is not None else "32-true"  # without Lightning: fp32
        optimizer, schedule = build_optimizer(self.segmentor, self.config, precision=precision)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- validation -----------------------------------------------------------------------
    @contextlib.contextmanager
    def prediction_context(self):
        """For predictions made after a validation (``eval --save-examples``, ``--submission``):
        the model back on the trainer's device, which Lightning's teardown leaves for the CPU, and
        under the trainer's precision (its autocast), as the validation ran."""
        trainer = self.trainer
        self.to(trainer.strategy.root_device)
        with trainer.precision_plugin.forward_context():
            yield

    def protocol_runs(self) -> list:
        """The protocols of this evaluation resolved for its domains and model
        (:func:`reinseg.protocols.protocol_run`); ``[config]`` during training."""
        from .protocols import PROTOCOLS, protocol_run

        if self._runs is None:
            domains = [(domain, entry) for domain, _, entry in self.val_sets()]
            self._runs = [
                protocol_run(p, domains, self.config.model) for p in (self.protocols or [PROTOCOLS["config"]])
            ]
        return self._runs

    def on_validation_epoch_start(self) -> None:
        # One matrix per protocol and domain, in the classes of its dataset, and one per part of a
        # dataset in several (ACDC's conditions).
        sets = self.val_sets()
        self.image_records = [[] for _ in sets]
        names = self.data.class_names()
        self._confusions, self._part_confusions = [], []
        for _ in self.protocol_runs():
            self._confusions.append([ConfusionMatrix(len(n), device=self.device) for n in names])
            self._part_confusions.append(
                [
                    {part: ConfusionMatrix(len(n), device=self.device) for part in sorted(set(d.part_of.values()))}
                    for (_, d, _), n in zip(sets, names, strict=True)
                ]
            )

    def predictions(self, batch: dict, dataloader_idx: int, first_only: bool = False) -> list[list[torch.Tensor]]:
        """Per protocol (``first_only``: the first), the (H, W) int64 prediction of each image of
        ``batch`` at its label's size."""
        if self.protocols is None:
            from .predict import scores_at_sizes

            # Padded where the model needs it, as reinseg eval pads (nothing for a side above the
            # crop in slide mode, or on the patch grid): the same scores for the same images.
            scores = scores_at_sizes(self.segmentor, batch["image"], batch["ori_size"])
            return [[score.argmax(0) for score in scores]]
        from .protocols import protocol_scores

        domain = self.val_sets()[dataloader_idx][0]
        images = [image.cpu().numpy() for image in batch["image"]]  # (H, W, 3) uint8, as read
        return [
            [
                protocol_scores(self.segmentor, run, domain, image, size).argmax(0)
                for image, size in zip(images, batch["ori_size"], strict=True)
            ]
            for run in self.protocol_runs()[: 1 if first_only else None]
        ]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch.get("empty_shard"):
            return  # this rank has no image of this set (reinseg.datamodule.EmptyShard)
        if batch["label"] is None:
            raise ValueError(f"validation set {self.val_sets()[dataloader_idx][0]} has no labels")
        part_of = self.val_sets()[dataloader_idx][1].part_of
        for p, predictions in enumerate(self.predictions(batch, dataloader_idx)):
            for i, prediction in enumerate(predictions):
                confusion = self._confusions[p][dataloader_idx]
                if self.record_images and p == 0:  # the first protocol's, counted once
                    confusion.matrix += self._record_image(dataloader_idx, batch, i, prediction)
                else:
                    confusion.update(prediction, batch["label"][i])
                part = part_of.get(batch["image_path"][i])
                if part is not None:
                    self._part_confusions[p][dataloader_idx][part].update(prediction, batch["label"][i])
                if self.save_predictions is not None and p == 0:  # the first protocol's
                    self._write_prediction(dataloader_idx, batch["label_path"][i], prediction)

    def _record_image(self, dataloader_idx: int, batch: dict, i: int, prediction: torch.Tensor) -> torch.Tensor:
        """Keep the scores of image ``i`` of ``batch``; returns its confusion matrix (for the
        domain's)."""
        from .examples import image_scores

        confusion = self._confusions[0][dataloader_idx]  # the first protocol's
        own = ConfusionMatrix(confusion.num_classes, confusion.ignore_index, device=confusion.matrix.device)
        own.update(prediction, batch["label"][i])
        own.check()  # its matrix is read here, and added to the domain's without an update
        record = {"image": str(batch["image_path"][i]), "label": str(batch["label_path"][i])}
        self.image_records[dataloader_idx].append(record | image_scores(own.matrix))
        return own.matrix

    def _write_prediction(self, dataloader_idx: int, label_path: str, prediction: torch.Tensor) -> None:
        from .data.io import write_png

        domain, dataset, _ = self.val_sets()[dataloader_idx]
        if dataloader_idx not in self._label_roots:
            self._label_roots[dataloader_idx] = label_root(dataset)
        relative = Path(label_path).relative_to(self._label_roots[dataloader_idx])
        target = self.save_predictions / domain_folder(domain) / prediction_name(dataset, relative)
        write_png(target, prediction.to(torch.uint8).cpu().numpy(), sync=True)

    def _protocol_results(self, p: int) -> tuple[dict[str, Any], dict]:
        """The results of protocol ``p`` (as the results file holds them) and the tables to print."""
        from .data.corruptions import corruption_summary

        results, tables, subdomains = {}, {}, {}
        sets, names_of = self.val_sets(), self.data.class_names()
        for d, ((domain, _, _), names) in enumerate(zip(sets, names_of, strict=True)):
            self._confusions[p][d].reduce()
            results[domain] = self._confusions[p][d].scores(names)
            if self.record_images:
                results[domain]["confusion"] = self._confusions[p][d].matrix.tolist()
            tables.setdefault(names, {})[domain] = results[domain]
            for part, confusion in self._part_confusions[p][d].items():
                confusion.reduce()
                sub = f"{domain}/{part.rsplit('/', 1)[-1]}"  # e.g. acdc/fog
                results[sub] = confusion.scores(names)
                tables[names][sub] = results[sub]
                subdomains.setdefault(domain, []).append(sub)
        in_mean = [domain for domain, _, entry in sets if entry.in_mean]
        summary = {
            "step": self.step_of_results(),
            "protocol": self.protocol_runs()[p].parameters(self.segmentor),
            "domains": results,
            "mean_mIoU": mean_over_domains(results, in_mean) if in_mean else None,
            "mean_domains": in_mean,
        }
        if subdomains:
            summary["subdomains"] = subdomains  # e.g. ACDC's conditions; not in the mean
        corruptions = corruption_summary(results, [(domain, entry) for domain, _, entry in sets])
        if corruptions:
            summary["corruptions"] = corruptions
        return summary, tables

    def on_validation_epoch_end(self) -> None:
        if self.record_images:
            self.image_records = _gather_records(self.image_records, [d for _, d, _ in self.val_sets()])
        per_protocol = [self._protocol_results(p) for p in range(len(self.protocol_runs()))]
        summary = dict(per_protocol[0][0])
        if len(per_protocol) > 1:  # the first protocol's results stay at the top, for older readers
            summary["protocols"] = {run.name: s for run, (s, _) in zip(self.protocol_runs(), per_protocol, strict=True)}
        self.last_results = summary
        # The scores are already summed over ranks: rank 0 logs them. A validation outside fit
        # (validate_missed_step) is logged at its iteration by its caller instead.
        if self.results_step is None:
            for name, value in logged_scores(summary, self.step_of_results()).items():
                self.log(name, value, prog_bar=name == "val/mean_mIoU", rank_zero_only=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for run, (results, tables) in zip(self.protocol_runs(), per_protocol, strict=True):
                if self.protocols is not None:
                    print(f"\nprotocol {run.name}")
                for names, table in tables.items():  # one table per class list
                    print("\n" + format_scores_table(table, names))
                if results["mean_mIoU"] is not None:
                    print(f"mean mIoU over {', '.join(results['mean_domains'])}: {results['mean_mIoU']:.2f}")
                for base, corruption in results.get("corruptions", {}).items():
                    means = ", ".join(f"{s}: {v:.2f}" for s, v in corruption["per_severity"].items() if v is not None)
                    print(f"{base}: mean mIoU over corruptions per severity: {means}")
            if self.write_metrics:
                out = Path(self.config.train.output_dir)
                payload = json.dumps(summary, indent=2).encode()
                atomic_write_bytes(validation_file(out, self.step_of_results()), payload)

    def step_of_results(self) -> int:
        """The iteration the current validation's results belong to."""
        return int(self.global_step if self.results_step is None else self.results_step)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"segmentor.{k}" for k in checkpoint_state_dict(self.segmentor)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["format"] = CHECKPOINT_FORMAT
        checkpoint["config"] = config_for_checkpoint(to_dict(self.config))
        checkpoint.update(vfm_record(self.segmentor))
        # The loss samples points with torch's generator (the data has its own seeded ones). Each
        # DDP rank draws its own points: every rank's state is kept, rank r's at ranks[r].
        state = rng_state()
        ranks = [state]
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, state)
        checkpoint["rng"] = {"ranks": ranks}
        # Where the data stream stands: a resume with another global batch continues from here.
        checkpoint["samples_seen"] = self.data.samples_before(self.global_step)
        checkpoint["global_batch"] = self.data.global_batch()
        # Float sums are split across threads: a resume continues with the thread count that
        # wrote the checkpoint, so that it ends where an uninterrupted run would, on any machine.
        checkpoint["torch_threads"] = torch.get_num_threads()

    def check_resumable(self, checkpoint: dict, name: str = "the checkpoint") -> None:
        """Refuse a checkpoint this task cannot continue from (another model, missing weights)."""
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{name} is not a reinseg training checkpoint")
        check_same_model(checkpoint.get("config", {}).get("model"), to_dict(self.config.model), name)
        expected = {f"segmentor.{k}" for k in checkpoint_state_dict(self.segmentor)}
        missing = sorted(expected - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(f"{name} lacks {len(missing)} trainable weights, e.g. {', '.join(missing[:5])}")
        check_vfm_weights(checkpoint, self.segmentor, name, self.config.model.backbone.checkpoint)
        states = checkpoint.get("optimizer_states") or []
        if states and isinstance(states[0], dict):
            saved = [len(group.get("params", [])) for group in states[0].get("param_groups", [])]
            now = [len(group["params"]) for group in build_optimizer(self.segmentor, self.config)[0].param_groups]
            if saved != now and sum(saved) == sum(now):
                # The groups are keyed by (lr, weight decay): a value made equal or different regroups.
                raise ValueError(
                    f"{name} holds the optimizer state of {sum(saved)} trainable tensors in groups of {saved}, this "
                    f"run groups them as {now}: a train.weight_decay, train.lr or train.backbone_lr_mult changed to "
                    "or from 0 (1 for the multiplier) regroups them; resume with the checkpoint's values (its "
                    "config.yaml), or start a new run (--resume never)"
                )
            elif saved != now:
                # Checkpoints of runs without linked queries written before Rein's unused transform
                # and merge were frozen (2026-12-06) train four tensors more.
                raise ValueError(
                    f"{name} holds the optimizer state of {sum(saved)} trainable tensors (per group {saved}), this "
                    f"run trains {sum(now)} ({now}): its run trained other parameters (e.g. a reinseg from before "
                    "Rein's unused transform and merge were frozen without linked queries); evaluate it, or start "
                    "a new run (--resume never)"
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_resumable(checkpoint)
        saved = (checkpoint.get("config") or {}).get("train") or {}
        now = to_dict(self.config.train)
        changed = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != now[k]]
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"  # not validate_missed_step's
        if changed and resuming and self.global_rank == 0:
            # A longer run (README's way to train further) is expected: told, not warned.
            (log.info if changed == ["max_iters"] else log.warning)(
                "the checkpoint's run had other optimizer settings (%s): the run goes on with this configuration's, "
                "its learning rate and weight decay as they are at iteration %d of its schedule",
                ", ".join(f"train.{k} {saved[k]!r} -> {now[k]!r}" for k in changed),
                int(checkpoint.get("global_step", 0)),
            )
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
        # A checkpoint of a run with an EMA holds the average as its weights (what evaluation and
        # prediction take) and the weights it trains from under "ema": those are loaded, the
        # average kept for the run's _WeightAverage (or dropped, if this run keeps none).
        self.loaded_average = None
        ema = checkpoint.get("ema")
        if isinstance(ema, dict) and isinstance(ema.get("trained"), dict):
            weights = checkpoint["state_dict"]
            trained = {k: v for k, v in ema["trained"].items() if k in weights}
            self.loaded_average = {"average": {k: weights[k] for k in trained}, "started": bool(ema.get("started"))}
            weights.update(trained)
        self.data.start_step = int(checkpoint.get("global_step", 0))
        samples_seen = checkpoint.get("samples_seen")  # older checkpoints: start_step x the global batch
        if isinstance(samples_seen, int) and not isinstance(samples_seen, bool) and samples_seen >= 0:
            self.data.start_sample = samples_seen
        batch = checkpoint.get("global_batch")
        if isinstance(batch, int) and batch != self.data.global_batch():
            log.warning(
                "the checkpoint's run took %d training samples per step, this one takes %d (data.batch_size x "
                "devices): the data continues where it stopped, but the run differs from an uninterrupted one",
                batch,
                self.data.global_batch(),
            )
        threads = checkpoint.get("torch_threads")
        if isinstance(threads, int) and not isinstance(threads, bool):
            threads = min(max(threads, 1), os.cpu_count() or 1)  # a file's number, bounded by this machine
        else:
            threads = None
        if threads is not None and threads != torch.get_num_threads():
            log.info(
                "continuing with %d threads, as the run that wrote the checkpoint (this process had %d)",
                threads,
                torch.get_num_threads(),
            )
            torch.set_num_threads(int(threads))


def logged_scores(summary: dict[str, Any], step: int) -> dict[str, float]:
    """The scalars the validation of iteration ``step`` logs: ``val/<domain>/mIoU`` per domain,
    ``val/mean_mIoU`` and ``iteration`` (the loggers' own step is Lightning's, one less)."""
    scores = {f"val/{domain}/mIoU": s["mIoU"] for domain, s in summary["domains"].items() if s["mIoU"] is not None}
    if summary["mean_mIoU"] is not None:
        scores["val/mean_mIoU"] = summary["mean_mIoU"]
    scores["iteration"] = float(step)
    return scores


def validation_file(output_dir: str | Path, step: int) -> Path:
    """Where training writes the validation results of iteration ``step``."""
    return Path(output_dir) / "metrics" / f"val_step{step:07d}.json"


def _gather_records(records: list[list[dict]], datasets) -> list[list[dict]]:
    """Every rank's per-image records, in each dataset's order (ranks see disjoint shards)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, records)
        records = [sum((r[k] for r in ranks), []) for k in range(len(records))]
    gathered = []
    for dataset, domain in zip(datasets, records, strict=True):
        position = {str(label): i for i, (_, label) in enumerate(dataset.pairs)}
        gathered.append(sorted(domain, key=lambda r: position.get(r["label"], len(position))))
    return gathered


def rng_state() -> dict:
    """The global torch RNG states of this process: the CPU's and, if any, its current CUDA
    device's (a rank draws on its own device only; every visible device's states would not fit
    a resume that sees fewer devices)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # checkpoints before 2026-12-06: every visible device's state
        device = torch.cuda.current_device()
        if device < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][device])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: a killed run never leaves half a
    file. Only ``*.ckpt`` files directly inside ``checkpoint_dir`` are ever removed, and a loaded
    checkpoint names no other file: ModelCheckpoint deletes the paths its state lists (a file
    could list any path, ``local:///home`` included, which Lightning would remove recursively)."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        super().__init__()
        # Real paths (Lightning's own are): a folder reached through a link is still this one.
        self.checkpoint_dir = Path(os.path.realpath(os.path.expanduser(checkpoint_dir)))

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        remove_stale_temporaries(Path(path).parent)
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        # A resume reads the file like any other: nothing in it may run (torch's default would
        # follow TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
        checkpoint = load_torch_file(path, what="checkpoint")
        in_this_folder = self.owns(path)
        for state in (checkpoint.get("callbacks") or {}).values():
            if isinstance(state, dict):  # ModelCheckpoint's, whatever its key; others hold no such paths
                self._keep_own_paths(state, in_this_folder)
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        if not self.owns(path):
            log.warning("not removing %s: only checkpoints in %s are removed", path, self.checkpoint_dir)
            return
        if Path(path).is_dir():  # a folder named *.ckpt: not a checkpoint of the run's
            log.warning("not removing %s: a folder", path)
            return
        Path(path).unlink(missing_ok=True)

    def owns(self, path) -> bool:
        """Whether ``path`` is a ``*.ckpt`` file name directly inside the checkpoint folder
        (links and ``..`` resolved, no URL scheme)."""
        return _names_a_checkpoint_in(self.checkpoint_dir, path)

    def _keep_own_paths(self, state: dict, in_this_folder: bool) -> None:
        """ModelCheckpoint's state without any path outside the checkpoint folder. ``in_this_folder``:
        the checkpoint read is one of this folder's, whose state then counts as this folder's
        wherever it was saved (a run folder moved to another disk or machine): Lightning would
        otherwise warn that it drops the state (which :class:`_RunCheckpoints` rebuilds anyway)."""
        for field in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if field in state and not self.owns(state[field]):
                state[field] = ""
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {p: v for p, v in state["best_k_models"].items() if self.owns(p)}
        if in_this_folder and "dirpath" in state and "best_k_models" in state:  # every path left is in this folder
            state["dirpath"] = str(self.checkpoint_dir)


def _names_a_checkpoint_in(folder: Path, path) -> bool:
    """Whether ``path`` is a ``*.ckpt`` file name directly inside ``folder`` (a real path), links
    and ``..`` resolved, no URL scheme."""
    if not isinstance(path, (str, Path)) or "://" in str(path) or "\0" in str(path):
        return False
    candidate = Path(os.path.realpath(path))
    return candidate.suffix == ".ckpt" and candidate.parent == folder


ITERATION_CHECKPOINT = re.compile(r"iter_([0-9]+)\.ckpt")


class _RunCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``iter_NNNNNN.ckpt``, the newest ``save_top_k`` kept), whose
    list of the run's checkpoints is, when training starts, the ``iter_*.ckpt`` files in its
    folder up to the step it starts from: a resumed run keeps ``train.keep_checkpoints`` of them
    whatever its checkpoint's state says. Lightning drops that state for a run moved elsewhere (it
    names the folder it was saved in) or resumed with another interval (it is keyed by it); with
    fewer checkpoints to keep than the state lists it never removes one again, or fails."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key: checkpoints written before this class read alike.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.dirpath is None:
            return
        found = None
        if trainer.is_global_zero:  # rank 0 writes and removes; every rank must agree on the list
            found = _run_checkpoints(Path(self.dirpath), up_to=trainer.global_step)
        found = trainer.strategy.broadcast(found, src=0)
        if self.save_top_k >= 0 and len(found) > self.save_top_k:
            resumed = trainer.ckpt_path and os.path.realpath(trainer.ckpt_path)
            extra, found = found[: len(found) - self.save_top_k], found[len(found) - self.save_top_k :]
            for _, path in extra:
                if path != resumed:  # as Lightning, never the file the run resumed from
                    trainer.strategy.remove_checkpoint(path)
        self.best_k_models = {path: torch.tensor(float(iteration)) for iteration, path in found}
        if found:  # monitor "iteration", mode "max": the oldest is the k-th best, the newest the best
            self.kth_best_model_path, self.kth_value = found[0][1], self.best_k_models[found[0][1]]
            self.best_model_path, self.best_model_score = found[-1][1], self.best_k_models[found[-1][1]]
        else:  # as ModelCheckpoint starts
            self.kth_best_model_path, self.best_model_path = "", ""
            self.kth_value, self.best_model_score = torch.tensor(-torch.inf), None


def _run_checkpoints(folder: Path, up_to: int) -> list[tuple[int, str]]:
    """``(iteration, path in the folder's real path)`` of the ``iter_*.ckpt`` files directly in
    ``folder`` (not links out of it) up to iteration ``up_to``, oldest first. Later ones belong to
    the run a ``--resume PATH`` of an earlier checkpoint left: the run writes its own over them at
    its checkpoint steps."""
    folder = Path(os.path.realpath(folder))
    found = []
    for path in folder.glob("iter_*.ckpt"):
        match = ITERATION_CHECKPOINT.fullmatch(path.name)
        if match and (iteration := int(match.group(1))) <= up_to and _names_a_checkpoint_in(folder, path):
            if path.is_file():  # not a folder, nor a link to one
                found.append((iteration, str(path)))
    return sorted(found)


def _drop_partial_last_line(path: Path) -> None:
    """Cut a last line without its newline (an append a kill or a full disk stopped midway): the
    next append would join it to its own row. (A run's log is small: read whole.)"""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    with open(path, "r+b") as file:
        file.truncate(data.rfind(b"\n") + 1)  # 0 where even the header is partial: written again
    log.warning("%s ended in a partial row (an interrupted write): removed", path)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it
    (the rows between the checkpoint and an interruption appear twice, with equal values)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            import csv

            _drop_partial_last_line(Path(self.metrics_file_path))
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
    """Training (after writing a checkpoint) or evaluation stopped on SIGTERM or Ctrl-C; the
    command line exits with ``exit_status``, 128 + the signal's number as a shell reports a
    process the signal ended: 143 for SIGTERM, 130 for SIGINT."""

    def __init__(self, message: str, stop: signal.Signals = signal.SIGTERM) -> None:
        super().__init__(message)
        self.stop, self.exit_status = stop, 128 + stop

    @classmethod
    def on(cls, stop: signal.Signals, message) -> TrainingInterrupted:
        """The error of a run the signal ``stop`` ended, whose text is ``message(name)``, ``name``
        the signal's as the messages say it (:data:`SIGNAL_NAMES`)."""
        return cls(message(SIGNAL_NAMES[stop]), stop)


# How the messages name the signals a run stops on.
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


@contextlib.contextmanager
def _on_sigterm(message, guard: _RunGuard | None = None):
    """Lightning ends a run on SIGTERM (and _RunGuard's Ctrl-C) with a SystemExit of status 0:
    make it an error whose text is ``message(name)``, ``name`` the signal's
    (:data:`SIGNAL_NAMES`). A second Ctrl-C, which Lightning ends with status 1, stays a
    KeyboardInterrupt."""
    try:
        yield
    except SIGTERMException:
        raise TrainingInterrupted.on(guard.stop_signal if guard is not None else signal.SIGTERM, message) from None
    except SystemExit:
        if guard is not None and guard.aborted:
            raise KeyboardInterrupt from None  # Lightning's sys.exit(1) after a second Ctrl-C
        raise


class _RunGuard(L.Callback):
    """Writes ``last.ckpt`` when SIGTERM or Ctrl-C arrives (at the end of the current step), when
    a validation during training fails (one process), and at the end of training when the last
    step is not a checkpoint step (the final weights are never lost).

    Ctrl-C (SIGINT) is handled as SIGTERM is, once :meth:`catch_ctrl_c` has installed its handler
    (Lightning's own handling ends the run at once, without a checkpoint); a second Ctrl-C stops
    the run at once, without saving, as a KeyboardInterrupt.

    Under DDP, SIGTERM only marks the rank: Lightning's own handler issues a collective inside
    the signal handler, wherever the rank happens to be, and stops a rank mid-validation while the
    others go on to the validation's score sums; both deadlock (a signal during a validation
    hung two ranks for good). At the end of every step the ranks instead take the maximum of
    their marks, together; if any was signalled, all save ``last.ckpt`` and stop. A signal during
    a validation lets it finish, and the run stops after the next step.
    """

    def __init__(self, last: Path) -> None:
        self.last = last
        self._saved_step: int | None = None
        self._signalled = False
        self._ctrl_c = False  # pressed once: the run stops as on SIGTERM
        self.aborted = False  # pressed twice: KeyboardInterrupt, which Lightning made SystemExit(1)

    @property
    def stop_signal(self) -> signal.Signals:
        """The signal a stopped run's message names: Ctrl-C's once pressed, else SIGTERM."""
        return signal.SIGINT if self._ctrl_c else signal.SIGTERM

    @contextlib.contextmanager
    def catch_ctrl_c(self, trainer, notice: str):
        """While the run is inside this block, the first Ctrl-C stops it as SIGTERM does (at the
        end of the step, ``last.ckpt`` written, status 130; an evaluation at the end of the batch)
        and logs ``notice``; the second one stops it at once. Only where Python's own handler is
        in place, in the main thread: a program's own SIGINT handler, or a SIGINT ignored (a
        background job), is left as it is."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
            yield
            return

        def ctrl_c(signum, frame):
            if self._ctrl_c:  # Lightning's teardown may have put this handler back
                raise KeyboardInterrupt
            signal.signal(signal.SIGINT, previous)  # the second press interrupts at once
            self._ctrl_c = True
            if trainer.world_size > 1:
                self._signalled = True
            else:  # the SIGTERM path: last.ckpt at the step's end, logged as every step
                trainer._signal_connector.received_sigterm = True
            log.warning("Ctrl-C: %s; press Ctrl-C again to stop at once", notice)

        signal.signal(signal.SIGINT, ctrl_c)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _save(self, trainer) -> None:
        if trainer.state.fn != "fit":
            return  # a validation outside fit (validate_missed_step) has no training state to save
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        if trainer.global_step in (saved, self._saved_step):
            return  # last.ckpt holds this step already
        trainer.save_checkpoint(self.last)
        self._saved_step = trainer.global_step

    def _keep_ctrl_c(self, trainer) -> None:
        # Lightning clears its SIGTERM mark at the start of every fit and validate.
        if self._ctrl_c and trainer.world_size == 1:
            trainer._signal_connector.received_sigterm = True

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:  # Lightning registered its handler at the start of fit: replaced
            signal.signal(signal.SIGTERM, self._mark_signalled)
        self._keep_ctrl_c(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._keep_ctrl_c(trainer)
        # A validation outside fit (reinseg eval, the final or a missed one) cannot stop its ranks
        # together midway (they hold different numbers of images): it finishes, then its caller
        # looks at signalled().
        if trainer.world_size > 1 and trainer.state.fn == "validate":
            signal.signal(signal.SIGTERM, self._mark_signalled)

    def signalled(self) -> bool:
        """Whether SIGTERM reached this rank under DDP (then marked, not acted on at once)."""
        return self._signalled

    def _mark_signalled(self, signum, frame) -> None:
        self._signalled = True

    def any_rank_signalled(self, trainer) -> bool:
        """Whether SIGTERM reached any DDP rank: a collective, so every rank must call it together."""
        mark = torch.tensor([int(self._signalled)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(mark, op=torch.distributed.ReduceOp.MAX)
        return bool(mark.item())

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        # Here the state is the one every other checkpoint of a step holds.
        if trainer.world_size > 1:
            if self.any_rank_signalled(trainer):  # every rank, every step: the collectives pair up
                self._save(trainer)
                raise SIGTERMException
        elif trainer.received_sigterm:
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.aborted = True  # a second Ctrl-C: at once, without saving
            return
        if trainer.world_size > 1:
            return  # a save is a collective there: not from one rank's error
        if isinstance(exception, SIGTERMException):
            self._save(trainer)
        elif trainer.state.fn == "fit" and trainer.validating:
            # An error in a validation (a file, the disk) comes after a whole step: the training
            # since the last checkpoint is kept, and the resume redoes this validation.
            try:
                self._save(trainer)
            except Exception as err:  # the validation's error is the one to report (and a full disk fails both)
                log.warning(
                    "the validation of iteration %d failed, and so did saving %s: %s",
                    trainer.global_step,
                    self.last,
                    err,
                )
                return
            if self._saved_step == trainer.global_step:
                log.warning("the validation of iteration %d failed: saved %s first", trainer.global_step, self.last)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self._save(trainer)


class _WeightAverage(L.Callback):
    """``train.ema_momentum``: keeps a :class:`~reinseg.ema.ExponentialAverage` of the trainable
    weights, updated after every step, validated (swapped into the model for the validation) and
    saved as the checkpoint's weights, the trained ones under ``checkpoint["ema"]["trained"]``
    (:meth:`SegmentationTask.on_load_checkpoint` swaps them back), as mmengine's EMAHook."""

    def __init__(self, momentum: float, begin: int) -> None:
        self.momentum, self.begin = momentum, begin
        self.average: ExponentialAverage | None = None
        self.swapped = False  # the model holds the average (during a validation)

    def _ensure(self, pl_module) -> ExponentialAverage:
        if self.average is None:
            weights = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
            self.average = ExponentialAverage(weights, self.momentum, self.begin)
            if pl_module.loaded_average is not None:  # a resumed checkpoint's
                self.average.load_state_dict(pl_module.loaded_average)
        return self.average

    def on_fit_start(self, trainer, pl_module) -> None:
        self.average = None  # made from the weights as fit restored them
        self._ensure(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._ensure(pl_module).update(trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not self.swapped:
            self._ensure(pl_module).swap()
            self.swapped = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.swapped:
            self._ensure(pl_module).swap()
            self.swapped = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        average = self._ensure(pl_module)
        weights = checkpoint["state_dict"]  # the model's tensors, the average's while swapped
        trained, averaged = {}, {}
        for name, held in average.average.items():
            if name in weights:
                current = weights[name]
                trained[name], averaged[name] = (held, current) if self.swapped else (current, held)
        weights.update(averaged)
        checkpoint["ema"] = {
            "trained": trained,
            "started": average.started,
            "momentum": self.momentum,
            "begin": self.begin,
        }


class _Progress(TQDMProgressBar):
    """Progress bar in iterations (the training stream is endless, so epochs mean nothing).

    It shows the training loss as read on the CPU every step, and on a GPU every
    ``train.log_interval`` steps, when the logs read it anyway: reading a value makes the host wait
    for the device, which then idles until the next step is queued (Lightning's own progress-bar
    metrics are read twice a step).
    """

    def __init__(self) -> None:
        super().__init__()
        self._loss: float | None = None

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics if self._loss is None else {"loss": self._loss, **metrics}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("loss")
        if loss is not None and (self.reads_freely(pl_module) or trainer.global_step % trainer.log_every_n_steps == 0):
            self._loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @staticmethod
    def reads_freely(pl_module) -> bool:
        """Whether reading the module's values costs the device nothing: on the CPU."""
        return pl_module.device.type == "cpu"

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._in_iterations(trainer)  # a resumed run starts no epoch (it continues one)

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._in_iterations(trainer)

    def _in_iterations(self, trainer) -> None:
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
    # A resume's folder holds checkpoints by design; a new run into one is refused before (train()).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # A resume with another train.checkpoint_interval: ModelCheckpoint's state is keyed by it, and
    # _RunCheckpoints rebuilds what it held from the folder.
    warnings.filterwarnings(
        "ignore", message=r"Be aware that when using `ckpt_path`.*callbacks: \[\"ModelCheckpoint\{[^\"]*\}\"\]\.$"
    )
    tc = config.train
    set_tf32(tc.tf32)
    out = Path(tc.output_dir)
    accelerator = tc.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = tc.precision if tc.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    devices = tc.devices
    many = tc.num_nodes > 1 or process_count(devices, on_gpu) > 1
    # Every trainable parameter gets a gradient each step: no find_unused_parameters.
    strategy = DDPStrategy(find_unused_parameters=False) if many else "auto"
    checkpoint = _RunCheckpoints(
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
    try:
        trainer = L.Trainer(
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
            benchmark=tc.cudnn_benchmark,
            log_every_n_steps=tc.log_interval,
            # The average first: the step's update before any checkpoint of the step is written.
            callbacks=([_WeightAverage(tc.ema_momentum, tc.ema_begin)] if tc.ema_momentum is not None else [])
            + [checkpoint, _RunGuard(out / "checkpoints" / "last.ckpt"), LearningRateMonitor("step"), _Progress()]
            + list(callbacks or []),
            logger=loggers,
            plugins=[AtomicCheckpointIO(out / "checkpoints")],
            enable_progress_bar=enable_progress_bar,
            use_distributed_sampler=False,  # the stream and ShardSampler split the data themselves
            enable_model_summary=False,
            default_root_dir=out,
        )
    except (MisconfigurationException, ImportError, TypeError, ValueError) as err:
        # Lightning's own checks of these keys, named (an unknown accelerator, devices it cannot use).
        raise ConfigError(
            f"train.accelerator={tc.accelerator!r}, train.devices={tc.devices!r}, train.num_nodes={tc.num_nodes}: "
            f"{str(err).strip() or type(err).__name__}"
        ) from err
    if many:
        # Lightning registers its SIGTERM handler (a collective inside the signal handler) at the
        # start of every fit and validate, before any hook: replaced at the source, so that no
        # moment between its registration and _RunGuard's hooks is left to it. (Where a Lightning
        # release names it otherwise, the hooks still replace it from the first step on.)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "_sigterm_notifier_fn"):
            connector._sigterm_notifier_fn = _run_guard(trainer)._mark_signalled
    return trainer


def process_count(devices: int | str, on_gpu: bool) -> int:
    """The processes Lightning starts on one node for ``train.devices`` (as it reads them: an
    int, -1 or "auto" for every visible GPU, a string of a number or of GPU indices "0,1")."""
    every = torch.cuda.device_count() if on_gpu else 1  # Lightning's CPU "auto" is one process
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return every
        if "," in text:
            return len([index for index in text.split(",") if index.strip()])
        try:
            devices = int(text)
        except ValueError:
            return 1  # Lightning names what it cannot read
    return every if devices == -1 else int(devices)


@_records_completion
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
        TrainingInterrupted: SIGTERM or Ctrl-C arrived; ``last.ckpt`` holds the state to resume
            from (a second Ctrl-C stops the run at once, without it).
        RunInProgressError: another process is training into ``train.output_dir`` (its run lock,
            ``.reinseg-run.lock``, is held until the run returns).

    Everything (configuration, checkpoint, data) is checked before anything is written. A run
    that had already reached ``train.max_iters`` is not trained further (``already_finished``
    holds its step). A resume first validates the checkpoint's iteration when that iteration's
    validation was due and its results are missing (a kill during it; see
    :func:`validate_missed_step`); a finished run is otherwise left as it is.
    """
    check_values(config)
    check_num_classes(config)
    L.seed_everything(config.train.seed, workers=True, verbose=False)  # before the model's initialisation
    out = Path(config.train.output_dir)
    checkpoints = out / "checkpoints"
    _check_run_folders(out)
    if overwrite and resume != "never":
        # Deleting a run is never implied: with resume="auto" it would be continued instead.
        raise ValueError("--overwrite (overwrite=True) deletes an earlier run only for a new one: add --resume never")
    if first_process():
        refuse_running_run(out)  # at once, not after the checks below (the lock is taken later)
    ckpt_path = _checkpoint_to_resume(resume, checkpoints, overwrite)
    task = SegmentationTask(config)
    step, epoch, missed = 0, 0, False
    if ckpt_path is not None:
        # Refuse another model's checkpoint before writing anything (config.yaml, logs).
        payload = _read_checkpoint(ckpt_path, verify=resume != "auto")  # auto's choice was verified
        task.check_resumable(payload, f"checkpoint {ckpt_path}")
        step, epoch = int(payload.get("global_step", 0)), int(payload.get("epoch", 0))
        del payload
        # Decided before any rank validates: every DDP rank reads the folder as it was.
        missed = validation_missed(config, step)
        if step >= config.train.max_iters:
            log.info("%s is at iteration %d of %d: the run is finished", ckpt_path, step, config.train.max_iters)
            task.already_finished = step
            if not missed:
                return task
    check_run_options(config, task.segmentor)  # what Lightning or the first step would refuse later
    # Fail on bad data now, not after hours of training (and before writing anything).
    task.train_set()
    if config.data.val:
        task.val_sets()
    with contextlib.ExitStack() as held:
        # Rank 0 (as the launcher's environment says): the run lock, config.yaml and stale
        # temporaries before the trainer, so a bad output folder fails first. The lock is held
        # until the run returns (the other ranks run inside it).
        if first_process():
            held.enter_context(run_lock(out))
            _start_run_folder(config, clear=resume == "never" and overwrite)
        trainer = build_trainer(config, callbacks)
        if ckpt_path:
            log.info("resuming from %s (iteration %d)", ckpt_path, step)

        def stopped(signal_name: str) -> str:
            if task.already_finished is not None or trainer.state.fn != "fit":
                n = trainer.global_step or step  # validate_missed_step's trainer has not restored the step
                return f"{signal_name} during the validation of iteration {n}: run the same command to continue"
            return (
                f"stopped by {signal_name} at iteration {trainer.global_step}; {checkpoints / 'last.ckpt'} holds it: "
                "run the same command to resume"
            )

        guard = _run_guard(trainer)
        notice = f"the run stops after this iteration and saves {checkpoints / 'last.ckpt'} (a second Ctrl-C does not)"
        with guard.catch_ctrl_c(trainer, notice), _on_sigterm(stopped, guard):
            if missed:
                validate_missed_step(trainer, task, ckpt_path, step, epoch)
                _stop_if_signalled(trainer, stopped)
            if task.already_finished is not None:
                return task
            # A real path: Lightning keeps the file a run resumed from by comparing it with its list
            # (real paths), and reads a bare "last" or "best" as its own names.
            resume_from = None if ckpt_path is None else os.path.realpath(ckpt_path)
            trainer.fit(task, datamodule=task.data, ckpt_path=resume_from)
            last_validated = task.last_results is not None and task.last_results["step"] == trainer.global_step
            if config.data.val and not last_validated and trainer.global_step >= config.train.max_iters:
                trainer.validate(task, datamodule=task.data, verbose=False)
                _stop_if_signalled(trainer, stopped)
        return task


# Lightning's fp32 and mixed precisions and their short aliases (lightning.fabric.connector), and
# reinseg's "auto". Not "*-true" other than fp32: the whole model in bf16, fp16 or fp64 meets the
# head's fp32 sampling tables and fails at the first step (train.frozen_dtype holds the VFM in bf16).
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "32", "16", "bf16")


def check_run_options(config: Config, segmentor: Segmentor | None = None) -> None:
    """Refuse what Lightning or the first training step would refuse later, naming the key: an
    unknown precision, a GPU that is not there, and with the ``segmentor`` to train, a training
    crop off its ViT's patch grid or under two patches, and its test windows."""
    from .backbones import ReinBackbone

    tc = config.train
    if segmentor is not None and isinstance(segmentor.backbone, ReinBackbone):
        ph, pw = segmentor.backbone.patch_size
        if config.data.crop_size % ph or config.data.crop_size % pw:
            raise ConfigError(
                f"data.crop_size={config.data.crop_size} is not a multiple of the backbone's patch size {ph}"
            )
        smallest = max(segmentor.backbone.smallest_input)
        if config.data.crop_size < smallest:
            raise ConfigError(f"data.crop_size={config.data.crop_size} must be at least two patches ({smallest})")
    if segmentor is not None:  # model.test's windows, refused now rather than at the first validation
        segmentor._check_inference_settings(segmentor.test_mode, segmentor.crop_size, segmentor.stride)
        _check_square_even_grids(config, segmentor)
    if str(tc.precision) not in PRECISIONS:
        raise ConfigError(f"train.precision={tc.precision!r} is not one of {', '.join(PRECISIONS)}")
    if tc.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator={tc.accelerator}: PyTorch sees no CUDA GPU here (use auto or cpu)")


def _check_square_even_grids(config: Config, segmentor: Segmentor) -> None:
    """FADA's Haar split takes square patch grids of an even side only: its training crop and its
    test windows must give them (whole-image inference would give the images' own grids)."""
    if not getattr(segmentor.backbone.rein, "square_even_grid", False):
        return
    patch = segmentor.backbone.patch_size[0]
    need = f"model.tuning={config.model.tuning} needs square patch grids with an even side"
    crop_grid = config.data.crop_size // patch
    if not fits_haar_split(crop_grid, crop_grid):
        raise ConfigError(f"{need}: data.crop_size={config.data.crop_size} is {crop_grid} patches")
    if segmentor.test_mode != "slide":
        raise ConfigError(f"{need}: set model.test.mode=slide (whole images give their own grids)")
    h, w = segmentor.crop_size
    if not fits_haar_split(h // patch, w // patch):
        raise ConfigError(f"{need}: model.test.crop_size {h}x{w} is {h // patch}x{w // patch} patches")


def _run_guard(trainer: L.Trainer) -> _RunGuard:
    return next(c for c in trainer.callbacks if isinstance(c, _RunGuard))


def _stop_if_signalled(trainer: L.Trainer, message) -> None:
    """After a DDP validation outside fit: TrainingInterrupted if SIGTERM or Ctrl-C reached any
    rank during it (the ranks agree, as at the end of a training step)."""
    guard = _run_guard(trainer)
    if trainer.world_size > 1 and guard.any_rank_signalled(trainer):
        raise TrainingInterrupted.on(guard.stop_signal, message)


def _checkpoint_to_resume(resume: str, checkpoints: Path, overwrite: bool) -> Path | None:
    """The checkpoint :func:`train`'s ``resume`` names, None for a new run."""
    if resume == "auto":
        found = latest_checkpoint(checkpoints)
        if found is None and checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")):
            # Starting afresh would write over the earlier run's checkpoints, logs and results.
            raise ValueError(
                f"no checkpoint in {checkpoints} reads back whole (warnings above): resume from one with "
                "--resume PATH, or start afresh with --resume never --overwrite"
            )
        return found
    if resume == "never":
        existing = sorted(p.name for p in checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
        if existing and not overwrite:
            raise FileExistsError(
                f"{checkpoints} holds the checkpoints of an earlier run ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}): continue it (--resume auto), choose another "
                "output folder, or delete them with --overwrite"
            )
        return None
    ckpt_path = Path(resume)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt_path}")
    return ckpt_path


def validation_missed(config: Config, step: int) -> bool:
    """Whether training validates at iteration ``step`` (every ``train.val_interval`` iterations
    and at ``train.max_iters``) and ``<output_dir>/metrics`` lacks its results."""
    tc = config.train
    if not config.data.val or step <= 0 or step > tc.max_iters:
        return False
    due = step % min(tc.val_interval, tc.max_iters) == 0 or step == tc.max_iters
    return due and not validation_file(tc.output_dir, step).exists()


def validate_missed_step(trainer: L.Trainer, task: SegmentationTask, ckpt_path: Path, step: int, epoch: int) -> None:
    """Validate the checkpoint of iteration ``step`` as training would have, results and logs.

    A kill during a validation loses it: Lightning, resuming from the checkpoint written just
    before (at the end of the step), fast-forwards past that validation, and a run killed during
    its final one is finished. The checkpoint's weights are validated with ``trainer`` (the one
    that then resumes the fit), its results written to ``metrics/`` and its scores logged at the
    row Lightning gives a validation after iteration ``step`` (``step - 1``).
    """
    log.info("validating iteration %d, whose validation was interrupted", step)
    task.results_step = step
    try:
        trainer.validate(task, datamodule=task.data, ckpt_path=os.path.realpath(ckpt_path), verbose=False)
    finally:
        task.results_step = None
    if trainer.is_global_zero and task.last_results is not None:
        # In float32, as self.log stores the scores of a validation during fit.
        scores = {name: float(torch.tensor(value)) for name, value in logged_scores(task.last_results, step).items()}
        for logger in trainer.loggers:
            logger.log_metrics({"epoch": epoch} | scores, step=step - 1)
            logger.save()


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of ``folder`` (``last.ckpt``, ``iter_*.ckpt``) at the highest step that
    reads back whole (every record matches its CRC): a kill between writing ``iter_N.ckpt`` and
    ``last.ckpt``, or a damaged file, loses nothing that another checkpoint holds."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = []
    # last.ckpt first: at equal steps it is the one taken.
    for order, path in enumerate(sorted(folder.glob("*.ckpt"), key=lambda p: p.name != "last.ckpt")):
        try:
            steps.append((-int(_read_checkpoint(path).get("global_step", -1)), order, path))
        except UnsafeFileError:
            raise  # not damaged but hostile: refused, never passed over
        except Exception as err:  # a damaged file is passed over, not fatal
            log.warning("passing over %s, which does not read back: %s", path, err)
    for _, _, path in sorted(steps):
        damaged = damaged_record(path)  # only as far as the first intact one: each read is whole
        if damaged is None:
            return path
        log.warning("passing over %s: %s", path, damaged)
    return None


def _read_checkpoint(path: Path, verify: bool = False) -> dict:
    """A training checkpoint, memory-mapped (only what is touched is read); ``verify``: every
    record checked against its CRC first."""
    return load_torch_file(path, what="checkpoint", mmap=True, verify=verify)


# The folders a run writes into its output_dir (besides config.yaml).
RUN_FOLDERS = ("checkpoints", "csv", "tensorboard", "metrics")


def _check_run_folders(out: Path) -> None:
    """Refuse, before anything is written, an output folder where one of the run's folders is a
    file (found otherwise at the first checkpoint's save)."""
    for name in RUN_FOLDERS:
        if (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"train.output_dir {out}: {name} is a file, where the run writes its {name} folder")


def first_process() -> bool:
    """Global rank 0 as the launcher's environment says, on the first node: a multi-node run
    started by hand on each node (Lightning's ``NODE_RANK``) sets no rank before ``fit``."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def _start_run_folder(config: Config, clear: bool) -> None:
    """Rank 0, holding the run lock: the earlier run deleted (``clear``), temporaries of killed
    writes removed, the run's ``config.yaml`` written."""
    from .config import dump_config

    out = Path(config.train.output_dir)
    if clear:
        _clear_run(out)
    for folder in (out, out / "checkpoints", out / "metrics", out / "csv"):
        remove_stale_temporaries(folder)
    atomic_write_bytes(out / "config.yaml", dump_config(config).encode())
    _check_writable_run(out)


def _check_writable_run(out: Path) -> None:
    """Write into each of the run's folders now: one the run cannot write to (its permissions, a
    link to nowhere) is otherwise found at the first checkpoint or validation, hours in."""
    for name in RUN_FOLDERS:
        probe_writable_folder(out / name)
    log_file = out / "csv" / "metrics.csv"
    if log_file.exists():
        with open(log_file, "ab"):  # appended to
            pass
    for checkpoint in (out / "checkpoints").glob("*.ckpt"):
        if checkpoint.is_dir():
            raise IsADirectoryError(21, "a folder where the run writes a checkpoint", str(checkpoint))


def _clear_run(out: Path) -> None:
    """Delete what a run wrote into ``out``: checkpoints, logs, validation results, config."""
    import shutil

    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "config.yaml").unlink(missing_ok=True)


@_records_completion
def evaluate(
    config: Config,
    checkpoint: str,
    save_predictions: str | None = None,
    protocols: list | None = None,
    save_examples: int = 0,
    examples_dir: str | Path | None = None,
    examples_like: dict[str, set[str]] | None = None,
) -> SegmentationTask:
    """Evaluate a checkpoint on ``data.val``; the task's ``last_results`` hold the per-domain
    results and their mean, its ``val_sets()`` the datasets.

    ``protocols``: :class:`reinseg.protocols.Protocol` s evaluated together, each image read once
    (default ``[config]``); the results of the first are at the top of ``last_results``, those of
    each under ``protocols`` when there are several. ``save_predictions`` holds the first's.

    ``save_examples`` N > 0 (the first protocol's): the results also hold each domain's confusion matrix, per-image
    scores and its N best, median and worst images, saved into ``examples_dir`` (paths relative
    to its parent folder; see :mod:`reinseg.examples`); ``examples_like`` (domain -> image
    files): images whose predictions are saved too, e.g. those another model's results chose."""
    from .checkpoints import segmentor_from_checkpoint
    from .protocols import PROTOCOLS

    check_values(config)
    check_num_classes(config)
    check_run_options(config)
    if not config.data.val:
        raise ConfigError("data.val lists no dataset to evaluate on")
    segmentor, payload = segmentor_from_checkpoint(checkpoint, config.model)
    # The results are returned, not written into the training run's metrics/.
    task = SegmentationTask(
        config,
        segmentor=segmentor,
        save_predictions=save_predictions,
        write_metrics=False,
        protocols=list(protocols or [PROTOCOLS["config"]]),
        record_images=save_examples > 0,
    )
    # The results name the checkpoint's iteration (a training checkpoint's; None for one that
    # records none, such as a converted release), not this trainer's step count (0).
    step = payload.get("global_step", payload.get("step"))
    step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
    task.results_step = step
    task.val_sets()
    # No loggers: evaluating must not touch (or overwrite) the training run's logs.
    trainer = build_trainer(config, validate_during_training=True, logging=False)
    guard = _run_guard(trainer)
    partial = (
        ""
        if save_predictions is None
        else f"; the predictions in {save_predictions} are incomplete (the same command replaces them)"
    )
    notice = "the evaluation stops " + ("at the end of this image" if trainer.world_size == 1 else "when it ends")
    with (
        guard.catch_ctrl_c(trainer, notice),
        _on_sigterm(lambda signal_name: f"evaluation stopped by {signal_name}: no results written{partial}", guard),
    ):
        trainer.validate(task, datamodule=task.data, verbose=False)
    if trainer.world_size > 1 and guard.any_rank_signalled(trainer):
        log.warning(
            "%s arrived during the evaluation, which finished first (DDP ranks stop together)",
            SIGNAL_NAMES[guard.stop_signal],
        )
    if step is None and task.last_results is not None:
        for summary in [task.last_results, *task.last_results.get("protocols", {}).values()]:
            summary["step"] = None
    if task.last_results is None:
        raise RuntimeError("validation produced no results")
    if save_examples > 0 and task.trainer.is_global_zero:
        from .examples import write_examples

        examples_dir = Path(examples_dir)
        with task.prediction_context():
            write_examples(task, save_examples, examples_dir, relative_to=examples_dir.parent, also=examples_like)
    return task
