"""Optimizer, parameter groups, lr schedule and whole training steps against the official code.

``official_optim_tiny.pt`` is made by ``tests/golden/make_optim_golden.py`` with mmengine's
``PEFTOptimWrapperConstructor`` and ``param_scheduler`` of the official configs, on the tiny
official segmentor of ``official_train_tiny.pt``.
"""

import math
from pathlib import Path

import pytest
import torch
from conftest import golden_rand, load_golden, relative_errors

from reinseg.build import build_segmentor
from reinseg.config import Config, TrainConfig, load_config
from reinseg.engine import SegmentationTask, lr_factor, parameter_groups
from reinseg.official import from_official, official_model_config, to_official_name

CONFIGS = Path(__file__).parents[1] / "configs"


# The golden README: compare with one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_golden():
    return load_golden("official_train_tiny.pt")


@pytest.fixture(scope="module")
def golden():
    return load_golden("official_optim_tiny.pt")


def build(train_golden, model_config, **train):
    """reinseg's segmentor and its optimizer and schedule, as ``reinseg train`` builds them."""
    segmentor = from_official(model_config, train_golden["release_state_dict"], train_golden["backbone_state_dict"])
    segmentor.train()
    config = Config(model=official_model_config(model_config), train=TrainConfig(**train))
    setup = SegmentationTask(config, segmentor).configure_optimizers()
    assert setup["lr_scheduler"]["interval"] == "step"
    return segmentor, setup["optimizer"], setup["lr_scheduler"]["scheduler"]


def test_adamw_settings_are_the_official_ones(train_golden, golden):
    official = golden["optimizer"]
    assert (official["type"], official["optim_wrapper"]) == ("AdamW", "OptimWrapper")  # fp32, no AMP
    _, optimizer, _ = build(train_golden, train_golden["model_config"])
    assert isinstance(optimizer, torch.optim.AdamW)
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert optimizer.defaults[key] == pytest.approx(official[key]), key


def test_parameter_groups_equal_the_official_constructor(train_golden, golden):
    segmentor = from_official(
        train_golden["model_config"], train_golden["release_state_dict"], train_golden["backbone_state_dict"]
    )
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=1.0)
    name_of = {id(p): to_official_name(n) for n, p in segmentor.named_parameters()}
    ours = {name_of[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert set(ours) == set(golden["param_groups"])
    for name, (lr, decay) in golden["param_groups"].items():
        assert ours[name] == pytest.approx((lr, decay)), name
    # Both kinds are there: the no-decay keys and norm layers, and ordinary weights.
    assert {decay for _, decay in golden["param_groups"].values()} == {0.0, 0.05}


@pytest.mark.parametrize("keys_from", ["config", "strategy"])
def test_frozen_baseline_groups_equal_the_official_constructor(golden, keys_from):
    """The frozen-VFM config has its own paramwise_cfg (query_feat without decay, no Rein keys);
    the frozen strategy declares the same keys, for a run that picks it by ``model.tuning=frozen``."""
    frozen = golden["frozen"]
    config = load_config(CONFIGS / "frozen_dinov2-l_gta_512.yaml")
    segmentor = build_segmentor(official_model_config(frozen["model_config"]), load_backbone_weights=False)
    segmentor.train()
    keys = config.train.no_decay_keys if keys_from == "config" else None
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=1.0, no_decay_keys=keys)
    name_of = {id(p): to_official_name(n) for n, p in segmentor.named_parameters()}
    ours = {name_of[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert set(ours) == set(frozen["param_groups"])
    for name, (lr, decay) in frozen["param_groups"].items():
        assert ours[name] == pytest.approx((lr, decay)), name
    assert frozen["param_groups"]["decode_head.query_feat.weight"] == (1e-4, 0.0)


@pytest.mark.parametrize(
    "name, train",
    [
        ("gta_512", dict(max_iters=40000, lr=1e-4)),
        ("citys2acdc_1024", dict(max_iters=40000, lr=6e-5, warmup_iters=10000)),
    ],
)
def test_lr_at_every_step_equals_mmengine(golden, name, train):
    """The closed form equals mmengine's chained LinearLR / PolyLR over whole 40k-iteration runs."""
    curve = golden["lr_curves"][name]
    assert curve["max_iters"] == train["max_iters"] and curve["base_lr"] == train["lr"]
    options = TrainConfig(**train)
    ours = torch.tensor(
        [
            options.lr
            * lr_factor(
                int(step),
                options.max_iters,
                options.warmup_iters,
                options.warmup_start_factor,
                options.poly_power,
                options.min_lr / options.lr,
            )
            for step in curve["steps"]
        ],
        dtype=torch.float64,
    )
    assert len(curve["steps"]) > 1000 and int(curve["steps"][-1]) == options.max_iters - 1
    # Relative to the base lr: the curve ends at exactly 0.
    assert (ours - curve["lr"]).abs().max().item() <= 1e-9 * options.lr
    assert ours[-1].item() == curve["lr"][-1].item() == 0.0


def test_the_lambda_schedule_steps_like_mmengine(train_golden, golden):
    """Through Lightning's scheduler object: iteration i runs at the official lr of iteration i."""
    curve = golden["lr_curves"]["gta_512"]
    _, optimizer, scheduler = build(train_golden, train_golden["model_config"], max_iters=40000, lr=1e-4)
    wanted = dict(zip(curve["steps"].tolist(), curve["lr"].tolist(), strict=False))
    n_groups = len(optimizer.param_groups)
    for step in range(301):
        if step in wanted:
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([wanted[step]] * n_groups, rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_two_training_steps_give_the_official_weights(train_golden, golden):
    """Two whole iterations (loss, backward, AdamW step, schedule step) from the same weights and
    batches as the official code, with the golden stand-in for ``torch.rand``."""
    steps = golden["two_steps"]
    segmentor, optimizer, scheduler = build(
        train_golden, steps["model_config"], max_iters=steps["max_iters"], lr=1e-4, weight_decay=0.05
    )
    params = {to_official_name(n): p for n, p in segmentor.named_parameters() if p.requires_grad}
    assert set(params) == set(steps["weights"][0])
    before = {n: p.detach().clone() for n, p in params.items()}
    n_groups = len(optimizer.param_groups)
    # Adam divides a gradient by its own size: an entry whose gradient is float noise (below 1e-4
    # of its tensor's largest entry and not exactly 0 on both sides: e.g. attention key biases,
    # whose true gradient is 0) takes a step of up to lr in a direction no implementation can
    # reproduce.
    # Those entries are held to that bound; all others to 1e-5 relative.
    determined = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    moved = 0.0
    for k, index in enumerate(steps["case_indices"]):
        case = train_golden["cases"][index]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([steps["lrs"][k]] * n_groups, rel=1e-12)
        # One iteration as Lightning runs it with automatic optimization.
        with golden_rand(train_golden["rand_seed"]):
            losses = segmentor.loss(case["images"], case["labels"])
        for term, value in steps["losses"][k].items():
            assert losses[term].item() == pytest.approx(value, rel=1e-5), (k, term)
        optimizer.zero_grad()
        losses["loss"].backward()
        grads = {n: p.grad for n, p in params.items()}
        grad_errors = relative_errors(grads, steps["grads"][k])
        worst = max(grad_errors, key=grad_errors.get)
        assert grad_errors[worst] <= 1e-5, (k, worst, grad_errors[worst])
        optimizer.step()
        scheduler.step()
        moved += steps["lrs"][k]

        official = steps["weights"][k]
        for name, grad in steps["grads"][k].items():
            # Exact zeros on both sides (inactive ReLU units) give the same step: weight decay alone.
            determined[name] &= ((grad == 0) & (grads[name] == 0)) | (grad.abs() >= 1e-4 * grad.abs().max())
        ours = {n: p.detach() for n, p in params.items()}
        for name, theirs in official.items():
            sure = determined[name]
            error = (ours[name] - theirs).abs()
            assert error[sure].max() <= 1e-5 * theirs.abs().max(), (k, name)
            # The updates themselves (about lr an entry) relative to the tensor's largest
            # official update: a wrong lr, eps, beta or decay shows here.
            update = (theirs - before[name]).abs().max()
            assert error[sure].max() <= 1e-3 * update, (k, name, (error[sure].max() / update).item())
            if not sure.all():
                assert error[~sure].max() <= 2 * moved, (k, name)
    noise = sum((~d).sum().item() for d in determined.values())
    assert noise <= 0.05 * sum(d.numel() for d in determined.values()), noise
    assert not math.isclose(steps["lrs"][0], steps["lrs"][1])  # the schedule took part
