"""Two-rank DDP runs killed or stopped anywhere resume bit-exactly (apart from tests/test_resume.py
so that the suite's workers run the two files side by side: these take about two minutes)."""

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import run_reinseg, tiny_config
from test_resume import assert_same_weights, kill_run, validation_results, weights

from reinseg.config import dump_config


def vary_class_counts(config):
    """Give training label ``i`` only ``2 + 5 i`` classes: DDP ranks then see different class
    counts, so the loss draws different amounts of random points on each rank."""
    root = Path(config.data.train[0]["root"])
    for i, path in enumerate(sorted(root.glob("gtFine/train/*/*_labelTrainIds.png"))):
        label = np.asarray(Image.open(path))
        Image.fromarray((label % (2 + 5 * i)).astype(np.uint8)).save(path)
    return config


DDP_STOPS = {
    "kill at the start of step 3": (dict(at_step=3), 2),
    "kill during the validation of step 2": (dict(in_validation_after=2), 2),
    # Lightning's own SIGTERM handling deadlocked here: the validation ends, then step 3.
    "SIGTERM during the validation of step 2": (dict(in_validation_after=2, sig=signal.SIGTERM, status=143), 3),
    # To one rank only (a scheduler, `kill` on one process): every rank stops at the step's end.
    "SIGTERM to rank 1 alone at the start of step 3": (dict(at_step=3, sig=signal.SIGTERM, status=143, rank=1), 4),
}


DDP_OPTIONS = dict(num_val=3, max_iters=5, val_interval=2, checkpoint_interval=2, devices=2, accelerator="cpu")


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """The uninterrupted two-rank run every DDP stop is compared with (run once)."""
    folder = tmp_path_factory.mktemp("ddp_reference")
    (folder / "a.yaml").write_text(dump_config(vary_class_counts(tiny_config(folder, **DDP_OPTIONS))))
    result = run_reinseg("train", str(folder / "a.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("where", list(DDP_STOPS))
def test_two_rank_ddp_kill_resumes_bit_exactly(tmp_path, where, ddp_reference):
    interrupted = vary_class_counts(tiny_config(tmp_path / "b", **DDP_OPTIONS))
    stop, saved_step = DDP_STOPS[where]
    config_file = kill_run(tmp_path / "b", interrupted, **stop)
    assert weights(tmp_path / "b" / "run")[0] == saved_step
    assert len(torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["rng"]["ranks"]) == 2
    result = run_reinseg("train", str(config_file))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(ddp_reference), weights(tmp_path / "b" / "run"))
    assert validation_results(tmp_path / "b" / "run") == validation_results(ddp_reference)
