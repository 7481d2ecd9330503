"""reinseg.optim's schedule across a resume: the checkpoint's step, the configuration's values."""

import torch
from torch import nn

from reinseg.optim import ConfiguredSchedule, lr_factor


def optimizer_and_schedule(lr, max_iters, weight_decay=0.05, betas=(0.9, 0.999), decay=None):
    weights = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.AdamW(
        [{"params": [weights[0]], "lr": lr, "weight_decay": weight_decay}, {"params": [weights[1]], "lr": lr / 10}],
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
    )
    schedule = ConfiguredSchedule(optimizer, lambda step: lr_factor(step, max_iters), decay)
    return optimizer, schedule


def trained(optimizer, schedule, steps):
    for _ in range(steps):
        for group in optimizer.param_groups:
            for weight in group["params"]:
                weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
        schedule.step()
    return optimizer.state_dict(), schedule.state_dict()


def hyperparameters(optimizer):
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def shrinking(initial, step):  # a weight-decay schedule, as SoMA's
    return initial * (1.0 - step / 10)


def test_an_unchanged_configuration_resumes_with_the_same_values_bit_for_bit():
    optimizer, schedule = optimizer_and_schedule(1e-3, 8, decay=shrinking)
    optimizer_state, schedule_state = trained(optimizer, schedule, 3)
    resumed, resumed_schedule = optimizer_and_schedule(1e-3, 8, decay=shrinking)
    resumed.load_state_dict(optimizer_state)
    resumed_schedule.load_state_dict(schedule_state)
    assert hyperparameters(resumed) == hyperparameters(optimizer)
    assert resumed_schedule.get_last_lr() == schedule.get_last_lr() and resumed_schedule.last_epoch == 3


def test_a_resume_takes_the_configurations_schedule_and_settings_at_the_checkpoints_step():
    """Raised max_iters, another lr, weight decay and betas: the optimizer's own state would keep
    the checkpoint's (an lr of 0 at the end of a finished schedule, the old lr for good)."""
    optimizer, schedule = optimizer_and_schedule(1e-3, 4, decay=shrinking)
    optimizer_state, schedule_state = trained(optimizer, schedule, 4)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    resumed, resumed_schedule = optimizer_and_schedule(0.5, 6, weight_decay=0.1, betas=(0.8, 0.99), decay=shrinking)
    resumed.load_state_dict(optimizer_state)
    resumed_schedule.load_state_dict(schedule_state)
    factor = lr_factor(4, 6)
    assert factor > 0
    assert [group["lr"] for group in resumed.param_groups] == [0.5 * factor, 0.05 * factor]
    assert [group["initial_lr"] for group in resumed.param_groups] == [0.5, 0.05]
    assert [group["weight_decay"] for group in resumed.param_groups] == [shrinking(0.1, 4)] * 2
    assert [group["betas"] for group in resumed.param_groups] == [(0.8, 0.99)] * 2
    assert resumed.state_dict()["state"][0]["step"] == optimizer_state["state"][0]["step"]  # moments kept
    resumed_schedule.step()
    assert [group["lr"] for group in resumed.param_groups] == [0.5 * lr_factor(5, 6), 0.05 * lr_factor(5, 6)]


def test_the_schedules_state_holds_no_hyperparameters():
    _, schedule = optimizer_and_schedule(1e-3, 4, decay=shrinking)
    state = schedule.state_dict()
    assert {"configured", "decay", "optimizer"}.isdisjoint(state) and state["lr_lambdas"] == [None, None]
