"""Training and evaluation with Lightning: a thin LightningModule around the plain Segmentor.

- Optimizer as the official Rein: AdamW (lr 1e-4, weight decay 0.05) without weight decay for
  norm layers, Rein's tokens and scale, query and level embeddings; poly decay (power 0.9) to 0
  over ``max_iters`` after an optional linear warm-up.
- Data: an endless, reproducible stream of augmented crops (:class:`TrainingStream`): sample ``s``
  of the run is always the same image with the same augmentation, so a resumed run sees exactly
  the data an uninterrupted one would.
- Checkpoints hold the trainable weights (Rein + head), optimizer, schedule, step and RNG state,
  and the configuration; the frozen VFM is referenced by the configuration, not copied. They are
  written atomically, and ``train`` resumes from ``<output_dir>/checkpoints/last.ckpt``.
- Validation: one confusion matrix per domain, summed over DDP ranks; per-domain mIoU and the
  mean over target domains are logged, printed and written as JSON.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .checkpoints import CHECKPOINT_FORMAT, atomic_write, atomic_write_bytes, check_same_model, checkpoint_state_dict
from .config import Config, ConfigError, to_dict
from .metrics import ConfusionMatrix, format_scores_table, mean_over_domains
from .segmentor import Segmentor, build_segmentor

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
    "EVAL_ENTRY_KEYS",
]

log = logging.getLogger("reinseg")
# The frozen VFM is in eval mode on purpose (no dropout or drop-path in it).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")

# Keys of a data.val entry that reinseg reads itself (the rest go to build_dataset).
EVAL_ENTRY_KEYS = ("scale", "label", "in_mean")
# No weight decay for these (the official Rein configs' paramwise_cfg custom keys, in reinseg's names:
# rein.scale is the official reins.scale; prompts.tokens are VPT's), nor for norm layers.
NO_DECAY_KEYS = ("norm", "query_embed", "level_embed", "learnable_tokens", "rein.scale", "prompts.tokens")
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
    no_decay_keys: Sequence[str] = NO_DECAY_KEYS,
) -> list[dict]:
    """AdamW groups of the trainable parameters, as mmengine's constructor with the official ``paramwise_cfg``.

    No weight decay for a parameter of a norm layer (``norm_decay_mult=0``) or whose name contains
    one of ``no_decay_keys`` (the ``custom_keys``, all with ``decay_mult=0`` and ``lr_mult=1``);
    ``lr x backbone_lr_mult`` for the VFM's own weights.
    """
    groups: dict[tuple[float, float], list] = {}
    for module_name, module in segmentor.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            decay = 0.0 if isinstance(module, NORM_LAYERS) or any(k in full for k in no_decay_keys) else weight_decay
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


def validation_sets(config: Config) -> list[tuple[str, Any, dict]]:
    """``(domain name, dataset, entry)`` per ``data.val`` entry, with the evaluation transform."""
    from .data import TEST_SCALES, build_dataset, eval_transform

    sets = []
    for entry in config.data.val:
        entry = dict(entry)
        options = {k: v for k, v in entry.items() if k not in EVAL_ENTRY_KEYS + ("name", "root", "split")}
        if "name" not in entry or "root" not in entry:
            raise ConfigError(f"data.val entry {entry} needs a name and a root")
        scale = entry.get("scale") or TEST_SCALES.get(entry["name"])
        dataset = build_dataset(
            entry["name"],
            entry["root"],
            entry.get("split", "val"),
            transform=eval_transform(None if scale is None else tuple(scale)),
            on_error=config.data.on_error,
            **options,
        )
        if config.data.on_error == "skip":
            # Drop bad pairs now: skipping at load time would score a replacement image twice.
            dataset.validate()
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
        datasets.append(
            build_dataset(
                name, root, split, transform=transform, on_error=config.data.on_error, seed=config.train.seed, **entry
            )
        )
    return datasets[0] if len(datasets) == 1 else ConcatSegmentationDataset(datasets)


class SegmentationTask(L.LightningModule):
    """Trains and validates a :class:`Segmentor` as a :class:`Config` describes."""

    def __init__(self, config: Config, segmentor: Segmentor | None = None, save_predictions: str | None = None) -> None:
        super().__init__()
        self.config = config
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
        return [
            DataLoader(
                dataset,
                batch_size=1,
                sampler=ShardSampler(len(dataset), rank, world),
                num_workers=self.config.data.num_workers,
                collate_fn=collate,
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

    def configure_optimizers(self):
        tc = self.config.train
        # The multiplier is for the VFM's own weights when they fine-tune, not for modules added
        # inside it (LoRA, adapters).
        backbone_lr_mult = tc.backbone_lr_mult if self.config.model.tuning == "full" else 1.0
        no_decay_keys = NO_DECAY_KEYS if tc.no_decay_keys is None else tc.no_decay_keys
        groups = parameter_groups(self.segmentor, tc.lr, tc.weight_decay, backbone_lr_mult, no_decay_keys)
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
        from .data import NUM_CLASSES

        self._confusions = [ConfusionMatrix(NUM_CLASSES, device=self.device) for _ in self.val_sets()]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch["label"] is None:
            raise ValueError(f"validation set {self.val_sets()[dataloader_idx][0]} has no labels")
        scores = self.segmentor.predict(batch["image"])
        for i, size in enumerate(batch["ori_size"]):
            # As mmseg: scores resized (bilinear) to the label's resolution, then argmax.
            item = F.interpolate(scores[i : i + 1].float(), size=tuple(size), mode="bilinear", align_corners=False)
            prediction = item.argmax(1)[0]
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
        from .data import CLASSES

        results = {}
        for (domain, _, _), confusion in zip(self.val_sets(), self._confusions):
            confusion.reduce()
            results[domain] = confusion.scores(CLASSES)
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
            print("\n" + format_scores_table(results, CLASSES))
            if summary["mean_mIoU"] is not None:
                print(f"mean mIoU over {', '.join(in_mean)}: {summary['mean_mIoU']:.2f}")
            out = Path(self.config.train.output_dir)
            payload = json.dumps(summary, indent=2).encode()
            atomic_write_bytes(out / "metrics" / f"val_step{self.global_step:07d}.json", payload)

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"segmentor.{k}" for k in checkpoint_state_dict(self.segmentor)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["format"] = CHECKPOINT_FORMAT
        checkpoint["config"] = to_dict(self.config)
        # The loss samples points with torch's generator; the data has its own seeded generators.
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a reinseg training checkpoint")
        check_same_model(checkpoint.get("config", {}).get("model"), to_dict(self.config.model), "the checkpoint")
        expected = {f"segmentor.{k}" for k in checkpoint_state_dict(self.segmentor)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trainable weights, e.g. {', '.join(missing[:5])}")
        rng = checkpoint.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self._resume_step = int(checkpoint.get("global_step", 0))


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
        atomic_write(path, lambda f: torch.save(checkpoint, f))


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


def build_trainer(
    config: Config,
    callbacks: list | None = None,
    validate_during_training: bool = True,
    enable_progress_bar: bool = True,
    logging: bool = True,
) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

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
        save_top_k=tc.keep_checkpoints,
        monitor="iteration",
        mode="max",
    )
    val_interval = min(tc.val_interval, tc.max_iters)
    loggers = [TensorBoardLogger(out, name="tensorboard", version=""), CSVLogger(out, name="csv", version="")]
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
        callbacks=[checkpoint, LearningRateMonitor("step"), _Progress()] + list(callbacks or []),
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=enable_progress_bar,
        use_distributed_sampler=False,  # the stream and ShardSampler split the data themselves
        enable_model_summary=False,
        default_root_dir=out,
    )


def train(config: Config, resume: str = "auto", callbacks: list | None = None) -> SegmentationTask:
    """Train as ``config`` says; ``resume``: "auto" (from ``last.ckpt`` if present), "never" or a path."""
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    out = Path(config.train.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    ckpt_path = None
    if resume == "auto":
        ckpt_path = str(last) if last.is_file() else None
    elif resume != "never":
        ckpt_path = str(resume)
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt_path}")
    task = SegmentationTask(config)
    # Fail on bad data now, not after hours of training (and before writing anything).
    task.train_set()
    if config.data.val:
        task.val_sets()
    trainer = build_trainer(config, callbacks)
    if trainer.is_global_zero:
        from .config import dump_config

        atomic_write_bytes(out / "config.yaml", dump_config(config).encode())
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(task, ckpt_path=ckpt_path)
    last_validated = task.last_results is not None and task.last_results["step"] == trainer.global_step
    if config.data.val and not last_validated and trainer.global_step >= config.train.max_iters:
        trainer.validate(task, verbose=False)
    return task


def evaluate(config: Config, checkpoint: str, save_predictions: str | None = None) -> SegmentationTask:
    """Evaluate a checkpoint on ``data.val``; the task's ``last_results`` hold the per-domain
    results and their mean, its ``val_sets()`` the datasets."""
    from .checkpoints import segmentor_from_checkpoint

    if not config.data.val:
        raise ConfigError("data.val lists no dataset to evaluate on")
    segmentor, _ = segmentor_from_checkpoint(checkpoint, config.model)
    task = SegmentationTask(config, segmentor=segmentor, save_predictions=save_predictions)
    task.val_sets()
    # No loggers: evaluating must not touch (or overwrite) the training run's logs.
    trainer = build_trainer(config, validate_during_training=True, logging=False)
    trainer.validate(task, verbose=False)
    if task.last_results is None:
        raise RuntimeError("validation produced no results")
    return task
