"""The training loss and its gradients against the official Rein code (mmseg 1.2 / mmdet 3.3).

``official_train_tiny.pt`` (see ``tests/data/README.md``): three batches through the official
``EncoderDecoder.loss`` and backward of the sum of its terms. ``official_optim_tiny.pt``
(``tests/golden/make_optim_golden.py``): the same loss with the real ``torch.rand`` after a seed,
and the sizes of the official code's ``torch.rand`` calls in order.
"""

import pytest
import torch
from conftest import golden_rand, load_golden, relative_errors, shape_rand, take_gpu_code_paths

from reinseg.official import from_official

CASES = ["main", "ignored_image", "more_segments_than_queries"]


# The golden README: compare with one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    return load_golden("official_train_tiny.pt")


@pytest.fixture(scope="module")
def seeded():
    return {run["name"]: run for run in load_golden("official_optim_tiny.pt")["seeded"]}


@pytest.fixture(scope="module")
def segmentor(golden):
    segmentor = from_official(golden["model_config"], golden["release_state_dict"], golden["backbone_state_dict"])
    return segmentor.train()


def case_of(golden, name):
    return next(case for case in golden["cases"] if case["name"] == name)


def test_the_random_stand_in_matches_the_golden_probe(golden):
    rand = shape_rand(golden["rand_seed"])
    assert [tuple(p.shape) for p in golden["rand_probe"]] == [(1, 5, 2), (3, 7, 2)]
    for probe in golden["rand_probe"]:
        assert torch.equal(rand(*probe.shape), probe)
        assert torch.equal(rand(tuple(probe.shape)), probe)


@pytest.mark.parametrize("gpu_code_paths", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_loss_terms_and_gradients_match_the_official_code(golden, segmentor, name, gpu_code_paths, monkeypatch):
    """On the CPU's code paths, and on the GPU's (taken here on the CPU), which the official
    code's numerics would not otherwise pin."""
    if gpu_code_paths:
        take_gpu_code_paths(monkeypatch)
    case = case_of(golden, name)
    segmentor.zero_grad(set_to_none=True)
    with golden_rand(golden["rand_seed"]):
        losses = segmentor.loss(case["images"], case["labels"])
    losses["loss"].backward()

    assert set(losses) == set(case["losses"]) | {"loss"}
    for term, value in case["losses"].items():
        assert losses[term].item() == pytest.approx(value, rel=1e-5), term
    assert losses["loss"].item() == pytest.approx(case["total"], rel=1e-5)

    grads = {n: p.grad for n, p in segmentor.named_parameters() if p.requires_grad}
    assert set(grads) == set(case["grads"])
    errors = relative_errors(grads, case["grads"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])


@pytest.mark.parametrize("name", CASES)
def test_on_the_gpus_code_paths_a_seeded_run_gives_the_official_terms(golden, seeded, segmentor, name, monkeypatch):
    """There every prediction is matched first and its loss points are drawn again from the
    generator's state after its matching (more calls than the official code's), so the points,
    and the terms of a seeded run, are still the official ones."""
    take_gpu_code_paths(monkeypatch)
    torch.manual_seed(golden["rand_seed"])
    with torch.no_grad():
        losses = segmentor.loss(case_of(golden, name)["images"], case_of(golden, name)["labels"])
    for term, value in seeded[name]["losses"].items():
        assert losses[term].item() == pytest.approx(value, rel=1e-5), term


@pytest.mark.parametrize("name", CASES)
def test_random_points_are_drawn_as_the_official_code_draws_them(golden, seeded, segmentor, name):
    """Same ``torch.rand`` calls in the same order (also for an image without a labelled pixel),
    hence a seeded run gives the official terms."""
    case = case_of(golden, name)
    draws = []
    real = torch.rand

    def recording_rand(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        draws.append(tuple(int(s) for s in shape))
        return real(*size, **kwargs)

    torch.manual_seed(golden["rand_seed"])
    torch.rand = recording_rand
    try:
        with torch.no_grad():
            losses = segmentor.loss(case["images"], case["labels"])
    finally:
        torch.rand = real
    assert draws == seeded[name]["draws"]
    for term, value in seeded[name]["losses"].items():
        assert losses[term].item() == pytest.approx(value, rel=1e-5), term
