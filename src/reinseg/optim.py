"""The optimizer recipe of the official Rein: AdamW groups, the learning-rate schedule, TF32.

AdamW (lr 1e-4, weight decay 0.05) without weight decay for norm layers and for the parameters
the head and the tuning strategy declare (Rein's tokens and scale, query and level embeddings);
``lr x backbone_lr_mult`` for the VFM's own weights when they fine-tune; poly decay (power 0.9)
to ``min_lr`` over ``max_iters`` after an optional linear warm-up, stepped every iteration; the
weight decay follows the tuning strategy's schedule where it has one (SoMA's cosine annealing).
Pinned against mmengine by ``tests/test_optimizer_golden.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ConfigError
from .tuning import get_strategy

if TYPE_CHECKING:
    from .config import Config
    from .segmentor import Segmentor

__all__ = [
    "NORM_LAYERS",
    "TF32_MODES",
    "parameter_groups",
    "lr_factor",
    "set_tf32",
    "build_optimizer",
    "ConfiguredSchedule",
    "ScheduleWithWeightDecay",
    "SCHEDULE_KEYS",
    "state_in_parameter_layouts",
]

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)
TF32_MODES = ("conv", "all", "none")


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


def check_tf32_mode(mode: str) -> None:
    """ConfigError naming ``train.tf32`` unless ``mode`` is one of :data:`TF32_MODES`."""
    if mode not in TF32_MODES:
        raise ConfigError(f"train.tf32 must be one of {', '.join(TF32_MODES)}, got {mode!r}")


def set_tf32(mode: str) -> None:
    """Where fp32 CUDA math may run on TF32 tensor cores (process-wide PyTorch flags).

    ``"conv"``: cuDNN convolutions only, matmuls (linear layers, attention) in IEEE fp32. These are
    PyTorch's defaults since 1.12, and the official Rein runs trained with them (PyTorch 2.0.1, fp32
    ``OptimWrapper``; neither mmengine nor the official code touches the flags). ``"all"``: matmuls
    too (faster on Ampere and Hopper GPUs, about 10 mantissa bits). ``"none"``: IEEE fp32 everywhere.
    """
    check_tf32_mode(mode)
    torch.backends.cuda.matmul.allow_tf32 = mode == "all"
    torch.backends.cudnn.allow_tf32 = mode != "none"


class ConfiguredSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The per-iteration lr schedule of the configuration, and with ``decay`` every group's weight
    decay set to ``decay(initial, step)`` (as mmengine's parameter schedulers on ``weight_decay``,
    stepped after every iteration).

    Loading a checkpoint's state keeps its step but not its hyperparameters: each group's lr,
    weight decay, betas and eps are the configuration's again, at that step. (The optimizer's own
    ``load_state_dict``, which runs first, would keep the checkpoint's: a resume that raises
    ``train.max_iters`` would train its first iteration at the finished schedule's last lr
    (``min_lr``, 0 by default), and one that changes ``train.lr`` would never take it.) An
    unchanged configuration gives the same values bit for bit (the same products as ``step``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda, decay=None) -> None:
        self.decay = decay
        hyperparameters = ("lr", "weight_decay", "betas", "eps")
        self.configured = [{k: group[k] for k in hyperparameters if k in group} for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.decay is not None:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = self.decay(group["initial_weight_decay"], self.last_epoch)

    def state_dict(self) -> dict:
        # The functions and hyperparameters come from the configuration; checkpoints hold the step.
        return {k: v for k, v in super().state_dict().items() if k not in ("decay", "configured")}

    def load_state_dict(self, state_dict: dict) -> None:
        configured = self.configured
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in ("decay", "configured")})
        self.configured = configured
        self.base_lrs = [group["lr"] for group in configured]
        for group, values, lr_lambda in zip(self.optimizer.param_groups, configured, self.lr_lambdas, strict=True):
            group.update({k: v for k, v in values.items() if k != "lr"})
            group["initial_lr"] = values["lr"]
            group["lr"] = values["lr"] * lr_lambda(self.last_epoch)
            group["initial_weight_decay"] = values["weight_decay"]
            if self.decay is not None:
                group["weight_decay"] = self.decay(values["weight_decay"], self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


ScheduleWithWeightDecay = ConfiguredSchedule  # its name before 2026-12-08

# The train keys that shape the optimizer's hyperparameters and schedule (a resume applies them).
SCHEDULE_KEYS = (
    "lr",
    "max_iters",
    "warmup_iters",
    "warmup_start_factor",
    "poly_power",
    "min_lr",
    "weight_decay",
    "betas",
    "eps",
    "backbone_lr_mult",
)


def state_in_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every loaded state tensor its parameter's memory layout (an optimizer's
    ``load_state_dict`` post hook). A checkpoint written with the other ``train.channels_last``
    holds NCHW moments for NHWC weights, or NHWC for NCHW; fused AdamW pairs a weight's and its
    moments' elements by memory position, so the update would silently mix elements."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype, device=value.device).copy_(value)


def build_optimizer(
    segmentor: Segmentor, config: Config, precision: str = "32-true"
) -> tuple[torch.optim.AdamW, ConfiguredSchedule]:
    """The AdamW optimizer and its per-iteration schedule for ``segmentor`` as ``config.train`` says,
    under the Lightning ``precision`` the trainer runs (``config.train.precision`` resolved)."""
    tc = config.train
    # train.backbone_lr_mult is for the VFM's own weights when they fine-tune; modules added inside
    # it (LoRA, adapters, SoMA's components) take their strategy's multiplier (1 but for SoMA).
    strategy = get_strategy(config.model.tuning)
    options = config.model.strategy_options()
    backbone_lr_mult = tc.backbone_lr_mult if strategy.trains_vfm else strategy.backbone_lr_mult(options)
    groups = parameter_groups(segmentor, tc.lr, tc.weight_decay, backbone_lr_mult, tc.no_decay_keys)
    # Fused where PyTorch has the kernel (CPU, CUDA): one pass over all parameters (the CPU step
    # of the paper head's parameters 0.043 -> 0.016 s, benchmarks/vs_official.py); the same update
    # up to float rounding, within the official code's two-step golden (test_optimizer_golden.py).
    # Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients (its step
    # would unscale fp16's itself; bf16 is refused alike): clipping under mixed precision takes
    # the foreach update.
    clipped_mixed = bool(tc.grad_clip) and "mixed" in str(precision)
    fused = not clipped_mixed and all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(
        groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay, fused=fused
    )
    optimizer.register_load_state_dict_post_hook(state_in_parameter_layouts)
    min_factor = tc.min_lr / tc.lr if tc.lr else 0.0

    def lr_lambda(step: int) -> float:
        return lr_factor(step, tc.max_iters, tc.warmup_iters, tc.warmup_start_factor, tc.poly_power, min_factor)

    return optimizer, ConfiguredSchedule(optimizer, lr_lambda, strategy.weight_decay_schedule(options, tc.max_iters))
