"""Interrupted runs: kill -9 anywhere (a validation step; DDP: test_resume_ddp.py), SIGTERM, Ctrl-C,
data workers, logs, refusals.

The oracle of every exactness test is an uninterrupted run of the same configuration: a resumed
run must end with bit-identical weights.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from test_engine import run_reinseg, tiny_config

from reinseg.config import dump_config
from reinseg.engine import SIGNAL_NAMES

# Sends signal argv[4] to the process (every DDP rank, each to itself, or rank argv[5] alone): at
# the start of training step argv[2], or during the validation that follows step argv[3].
# SIGKILL is a power cut.
KILLER = textwrap.dedent(
    """
    import os, sys
    import lightning as L
    from reinseg.config import load_config
    from reinseg.engine import TrainingInterrupted, train

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == int(sys.argv[2]) and int(sys.argv[5]) in (-1, trainer.global_rank):
                os.kill(os.getpid(), int(sys.argv[4]))

        def on_validation_batch_end(self, trainer, *args):
            if trainer.global_step == int(sys.argv[3]) and not trainer.received_sigterm:
                os.kill(os.getpid(), int(sys.argv[4]))

    if __name__ == "__main__":
        try:
            train(load_config(sys.argv[1]), callbacks=[Kill()])
        except TrainingInterrupted as stopped:
            sys.exit(stopped.exit_status)
    """
)


def kill_run(tmp_path, config, at_step=-1, in_validation_after=-1, sig=signal.SIGKILL, status=-signal.SIGKILL, rank=-1):
    """Run ``config`` in a fresh process that signals itself as :data:`KILLER` says."""
    (tmp_path / "killer.py").write_text(KILLER)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(dump_config(config))
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "killer.py"),
            str(config_file),
            str(at_step),
            str(in_validation_after),
            str(sig),
            str(rank),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert result.returncode == status, result.stderr[-3000:]
    return config_file


def weights(run_dir):
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


def assert_same_weights(a, b):
    (step_a, a), (step_b, b) = a, b
    assert step_a == step_b
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def csv_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def validation_results(run_dir):
    """Each ``metrics/val_step*.json`` of a run with its bytes."""
    return {p.name: p.read_bytes() for p in sorted((run_dir / "metrics").glob("*.json"))}


def two_domains(config):
    """Validation on two domains (two DataLoaders, as the shipped configs have)."""
    config.data.val.append(dict(config.data.val[0], label="again"))
    return config


@pytest.mark.slow
def test_kill_during_validation_resumes_bit_exactly_and_keeps_the_log(tmp_path):
    from reinseg.engine import train

    options = dict(num_val=2, max_iters=6, val_interval=2, checkpoint_interval=2)
    reference, interrupted = (two_domains(tiny_config(tmp_path / name, **options)) for name in "ab")
    train(reference)
    # Checkpoint at step 4, then its validation, killed halfway through.
    kill_run(tmp_path / "b", interrupted, in_validation_after=4)
    run = tmp_path / "b" / "run"
    assert weights(run)[0] == 4
    logged = csv_rows(run)
    assert any(row.get("step") == "3" for row in logged)
    assert "val_step0000004.json" not in validation_results(run)
    train(interrupted)
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(run))
    # The interrupted validation is redone (Lightning's resume alone skips it): every result
    # file and logged row of the uninterrupted run, the rows logged before the kill kept.
    assert validation_results(run) == validation_results(tmp_path / "a" / "run")
    after = csv_rows(run)
    assert all(row in after for row in logged)
    assert sorted(after, key=repr) == sorted(csv_rows(tmp_path / "a" / "run"), key=repr)


@pytest.mark.slow
def test_kill_during_the_final_validation_is_validated_on_the_next_run(tmp_path, capsys):
    from reinseg.cli import main
    from reinseg.engine import train

    options = dict(num_val=2, max_iters=4, val_interval=2, checkpoint_interval=2)
    reference, interrupted = (tiny_config(tmp_path / name, **options) for name in "ab")
    train(reference)
    config_file = kill_run(tmp_path / "b", interrupted, in_validation_after=4)
    run = tmp_path / "b" / "run"
    assert weights(run)[0] == 4 and list(validation_results(run)) == ["val_step0000002.json"]
    assert main(["train", str(config_file)]) == 0
    assert "its interrupted final validation is now done" in capsys.readouterr().out
    assert validation_results(run) == validation_results(tmp_path / "a" / "run")
    assert sorted(csv_rows(run), key=repr) == sorted(csv_rows(tmp_path / "a" / "run"), key=repr)
    # Now the run is finished and complete: the next one changes nothing.
    assert main(["train", str(config_file)]) == 0
    assert "nothing changed" in capsys.readouterr().out


@pytest.mark.slow  # data-loader worker processes
def test_data_workers_do_not_change_training(tmp_path):
    from reinseg.engine import train

    serial = train(tiny_config(tmp_path / "a", max_iters=3))
    config = tiny_config(tmp_path / "b", max_iters=3)
    config.data.num_workers = 2
    parallel = train(config)
    for (key, a), b in zip(
        serial.segmentor.state_dict().items(), parallel.segmentor.state_dict().values(), strict=False
    ):
        assert torch.equal(a, b), key


def test_augmentation_does_not_depend_on_the_thread_count(tmp_path):
    from reinseg.engine import TrainingStream, training_set

    config = tiny_config(tmp_path)
    batches = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            stream = iter(TrainingStream(training_set(config), batch_size=2, seed=0))
            batches.append([next(stream) for _ in range(4)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*batches, strict=False):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def train_until_the_first_checkpoint(config_file: Path, run: Path, **popen) -> subprocess.Popen:
    """``reinseg train config_file`` in a child process, returned once ``iter_000002.ckpt`` is
    written (or the child ended, or 240 s passed)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reinseg", "train", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())},
        **popen,
    )
    deadline = time.monotonic() + 240
    first = run / "checkpoints" / "iter_000002.ckpt"
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_exactly(tmp_path):
    from reinseg.engine import train

    options = dict(max_iters=20, checkpoint_interval=2, val_interval=100)
    config = tiny_config(tmp_path / "b", **options)
    config_file = tmp_path / "b.yaml"
    config_file.write_text(dump_config(config))
    process = train_until_the_first_checkpoint(config_file, tmp_path / "b" / "run")
    process.send_signal(signal.SIGTERM)  # as `timeout`, a scheduler or `docker stop`
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr[-3000:]
    step, _ = weights(tmp_path / "b" / "run")
    assert 2 <= step < 20
    message = [line for line in stderr.splitlines() if line.startswith("reinseg train:")]
    assert len(message) == 1 and "SIGTERM" in message[0] and "last.ckpt" in message[0]
    # The checkpoint continues as the uninterrupted run: same weights at the end.
    train(config)
    train(tiny_config(tmp_path / "a", **options))
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run"))


def python_sigint_handler_in_the_child() -> None:
    """A test process started as a background job ignores SIGINT, and so would its child: Python
    installs its own handler (KeyboardInterrupt) only over the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # data-loader worker processes
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_process_group_with_data_workers_writes_a_checkpoint(tmp_path, sig, status):
    """`timeout`, Slurm's scancel and Ctrl-C signal every process of the group: the data workers
    outlive it, so the step ends and last.ckpt is written (a killed worker failed the next batch)."""
    config = tiny_config(tmp_path / "b", max_iters=200, checkpoint_interval=2, val_interval=1000)
    config.data.num_workers = 2
    config_file = tmp_path / "b.yaml"
    config_file.write_text(dump_config(config))
    # its own process group, as a shell job's
    process = train_until_the_first_checkpoint(
        config_file, tmp_path / "b" / "run", start_new_session=True, preexec_fn=python_sigint_handler_in_the_child
    )
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    os.killpg(process.pid, sig)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == status, stderr[-3000:]
    step, _ = weights(tmp_path / "b" / "run")
    assert (checkpoints / "last.ckpt").exists() and 2 <= step < 200
    message = [line for line in stderr.splitlines() if line.startswith("reinseg train:")]
    assert len(message) == 1 and f"stopped by {SIGNAL_NAMES[sig]} at iteration {step};" in message[0]


class CtrlC(L.Callback):
    """Presses Ctrl-C (SIGINT to this process) ``times`` times at the start of training step
    ``at_step`` + 1, or at the end of the first batch of the validation of step ``in_validation_of``."""

    def __init__(self, at_step=-1, in_validation_of=-1, times=1):
        self.at_step, self.in_validation_of, self.times = at_step, in_validation_of, times

    def press(self):
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:
            self.press()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.in_validation_of and batch_idx == 0 and dataloader_idx == 0:
            self.press()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("press", "saved_step"),
    [
        # The step ends and is saved; the validation due after it is left to the resume.
        (dict(at_step=3), 4),
        # A single process stops its validation midway, as on SIGTERM; the resume redoes it.
        (dict(in_validation_of=2), 2),
    ],
    ids=["during step 4, whose validation is due", "during the validation of step 2"],
)
def test_ctrl_c_saves_the_step_stops_with_130_and_resumes_exactly(tmp_path, python_sigint_handler, press, saved_step):
    from reinseg.engine import TrainingInterrupted, train

    options = dict(num_val=2, max_iters=6, val_interval=2, checkpoint_interval=3)
    reference, interrupted = (tiny_config(tmp_path / name, **options) for name in "ab")
    train(reference)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(interrupted, callbacks=[CtrlC(**press)])
    assert stopped.value.exit_status == 130
    assert "Ctrl-C" in str(stopped.value) and "run the same command" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    run = tmp_path / "b" / "run"
    assert weights(run)[0] == saved_step
    assert f"val_step{saved_step:07d}.json" not in validation_results(run)
    train(interrupted)
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(run))
    assert validation_results(run) == validation_results(tmp_path / "a" / "run")
    # Every step's logged row, as the uninterrupted run's (the stopped step's loss included).
    assert sorted(csv_rows(run), key=repr) == sorted(csv_rows(tmp_path / "a" / "run"), key=repr)


@pytest.mark.slow
@pytest.mark.parametrize(
    "press", [dict(at_step=2), dict(in_validation_of=3)], ids=["during step 3", "during the validation of step 3"]
)
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, python_sigint_handler, press):
    from reinseg.engine import train

    config = tiny_config(tmp_path, num_val=2, max_iters=6, checkpoint_interval=2, val_interval=3)
    with pytest.raises(KeyboardInterrupt):  # not Lightning's SystemExit(1): the command's status is 130
        train(config, callbacks=[CtrlC(**press, times=2)])
    assert weights(tmp_path / "run")[0] == 2  # the checkpoint before: step 3 is not saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_is_left_to_a_program_that_handles_it(tmp_path):
    """train() catches Ctrl-C only over Python's own handler: a program's handler stays, and sees it."""
    from reinseg.engine import train

    pressed = []

    def own_handler(signum, frame):
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, own_handler)
    try:
        train(tiny_config(tmp_path, max_iters=2, checkpoint_interval=2), callbacks=[CtrlC(at_step=0)])
        assert signal.getsignal(signal.SIGINT) is own_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert pressed == [signal.SIGINT]
    assert weights(tmp_path / "run")[0] == 2  # trained to the end


@pytest.mark.slow
def test_sigterm_during_validation_resumes_exactly(tmp_path):
    from reinseg.engine import train

    # Validation after step 3, which is not a checkpoint step: the SIGTERM checkpoint is step 3's.
    options = dict(num_val=3, max_iters=5, val_interval=3, checkpoint_interval=2)
    reference, interrupted = (two_domains(tiny_config(tmp_path / name, **options)) for name in "ab")
    train(reference)
    kill_run(tmp_path / "b", interrupted, in_validation_after=3, sig=signal.SIGTERM, status=143)
    assert weights(tmp_path / "b" / "run")[0] == 3
    train(interrupted)
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run"))
    assert validation_results(tmp_path / "b" / "run") == validation_results(tmp_path / "a" / "run")


@pytest.mark.slow
def test_a_resume_with_another_thread_count_continues_with_the_checkpoints(tmp_path, one_thread):
    """Killed with 1 thread, resumed in a process that starts with 2: the resume takes the thread
    count the checkpoint records and ends bit-identical to an uninterrupted 1-thread run."""
    from reinseg.engine import train

    options = dict(max_iters=6, val_interval=100, checkpoint_interval=2)
    reference, interrupted = (tiny_config(tmp_path / name, **options) for name in "ab")
    train(reference)  # this process runs 1 thread (the one_thread fixture)
    config_file = kill_run(tmp_path / "b", interrupted, at_step=3)  # the child inherits OMP_NUM_THREADS=1
    assert weights(tmp_path / "b" / "run")[0] == 2
    torch.set_num_threads(2)
    result = run_reinseg("train", str(config_file))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run"))


class ImagesSeen(L.Callback):
    """The training images of every step, as one checksum per sample."""

    def __init__(self):
        self.sums = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sums += batch["image"].flatten(1).double().sum(1).tolist()


@pytest.mark.slow
def test_a_resume_with_another_batch_size_takes_the_samples_that_follow(tmp_path, caplog):
    from reinseg.engine import train

    def config(name, max_iters, batch_size):
        config = tiny_config(tmp_path / name, max_iters=max_iters)
        config.data.batch_size = batch_size
        return config

    uninterrupted, before, after = ImagesSeen(), ImagesSeen(), ImagesSeen()
    train(config("a", 6, 1), callbacks=[uninterrupted])
    train(config("b", 2, 2), callbacks=[before])
    with caplog.at_level("WARNING", logger="reinseg"):
        train(config("b", 4, 1), callbacks=[after])
    assert "took 2 training samples per step, this one takes 1" in caplog.text
    # Samples 0-3 in two steps of two, then 4 and 5: the uninterrupted stream's six.
    assert len(set(uninterrupted.sums)) == 6
    assert before.sums + after.sums == uninterrupted.sums


class WeightsEachStep(L.Callback):
    """The trainable weights after every step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


@pytest.mark.slow
def test_the_weight_average_is_validated_saved_and_resumed_exactly(tmp_path):
    """train.ema_momentum: the checkpoint's weights are the average (the recurrence replayed on
    the weights of every step), validation and evaluation score it, and a run killed at a step
    or stopped during a validation (the model then holding the average) resumes bit-exactly."""
    from reinseg.engine import evaluate, train

    def config(name):
        # Checkpoints at 3 and 6: the SIGTERM during the validation of step 4 saves the model as
        # it is then, holding the average.
        config = tiny_config(tmp_path / name, num_val=2, max_iters=6, val_interval=2, checkpoint_interval=3)
        config.train.ema_momentum, config.train.ema_begin = 0.5, 3
        return config

    seen = WeightsEachStep()
    train(config("a"), callbacks=[seen])
    expected = None
    for step, now in enumerate(seen.steps, start=1):
        expected = now if step <= 3 else {k: expected[k] + 0.5 * (w - expected[k]) for k, w in now.items()}
    saved = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=1e-6, atol=1e-7)
        assert torch.equal(saved["ema"]["trained"][name], seen.steps[-1][name])
    assert any(not torch.equal(expected[k], seen.steps[-1][k]) for k in expected)  # it is not the last step's
    final = json.loads((tmp_path / "a" / "run" / "metrics" / "val_step0000006.json").read_text())
    evaluated = evaluate(config("a"), str(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt")).last_results
    assert evaluated["domains"] == final["domains"]

    def trained(run):
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        return checkpoint["global_step"], checkpoint["ema"]["trained"]

    for name, stop in (("b", dict(at_step=5)), ("c", dict(in_validation_after=4, sig=signal.SIGTERM, status=143))):
        kill_run(tmp_path / name, config(name), **stop)
        train(config(name))
        run = tmp_path / name / "run"
        assert_same_weights(weights(tmp_path / "a" / "run"), weights(run))
        assert_same_weights(trained(tmp_path / "a" / "run"), trained(run))
        assert validation_results(run) == validation_results(tmp_path / "a" / "run")
