"""An exponential moving average of the trainable weights, as mmengine's ``EMAHook`` keeps one
(SoMA's official runs: ``EMAHook(begin_iter=12000)``, momentum 2e-4).

After every optimizer step ``t`` (counted from 1): before ``begin`` the average is a copy of the
weights; at the first step from ``begin`` on it is copied once more, then

    average <- average + momentum * (weights - average)      (mmengine's ``lerp_``)

The training engine (:mod:`reinseg.engine`, ``train.ema_momentum`` / ``train.ema_begin``)
validates the average and saves it as the checkpoint's weights, the weights it trains from beside
them, as mmengine does: evaluation, prediction and ``reinseg merge`` of a checkpoint use the
average, and a resume continues both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["ExponentialAverage"]


class ExponentialAverage:
    """The average of named tensors (the trainable parameters); plain PyTorch, no Lightning.

    Args:
        weights: name -> the parameter the average follows (kept by reference).
        momentum: the weight of the newest weights, in (0, 1].
        begin: the first step (counted from 1) that averages instead of copying.
    """

    def __init__(self, weights: Mapping[str, Tensor], momentum: float, begin: int = 0) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"the EMA momentum must be in (0, 1], got {momentum!r}")
        self.weights = dict(weights)
        self.momentum = float(momentum)
        self.begin = int(begin)
        self.average = {name: w.detach().clone() for name, w in self.weights.items()}
        self.started = False  # whether the step at begin has made its copy

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (the number of steps done)."""
        names = list(self.weights)
        if step < self.begin or not self.started:
            torch._foreach_copy_([self.average[n] for n in names], [self.weights[n].detach() for n in names])
            self.started = step >= self.begin
            return
        torch._foreach_lerp_([self.average[n] for n in names], [self.weights[n].detach() for n in names], self.momentum)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the weights' values and the average's (twice: back as before)."""
        for name, weight in self.weights.items():
            held = weight.detach().clone()
            weight.detach().copy_(self.average[name])
            self.average[name].copy_(held)

    def state_dict(self) -> dict:
        return {"average": self.average, "started": self.started, "momentum": self.momentum, "begin": self.begin}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """The average of ``state`` (names it lacks keep the current weights: a parameter that
        did not train before)."""
        for name, value in state.get("average", {}).items():
            if name in self.average:
                self.average[name].copy_(value)
        self.started = bool(state.get("started", False))
