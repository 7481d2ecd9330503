"""What a user ran is never lost: finished runs, refused resumes, re-runs, evaluation, leftovers."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_engine import tiny_config

from reinseg.checkpoints import atomic_write, remove_stale_temporaries
from reinseg.cli import main
from reinseg.config import dump_config, load_config
from reinseg.engine import latest_checkpoint
from reinseg.optim import lr_factor


def _finished_run_config(folder):
    return tiny_config(folder, num_val=2, max_iters=4, val_interval=4, checkpoint_interval=2)


def _train_finished_run(folder):
    """Train the finished tiny run (4 iterations, checkpoints at 2 and 4, validation at 4) in
    ``folder``; its config file."""
    config_file = folder / "config.yaml"
    config_file.write_text(dump_config(_finished_run_config(folder)))
    assert main(["train", str(config_file)]) == 0
    return config_file


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The finished run, trained once for the module's tests."""
    folder = tmp_path_factory.mktemp("finished")
    _train_finished_run(folder)
    return folder


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished run, its data and a config pointing at them: each test its own
    (the copied files keep the first folder's paths inside, which a run moved by a user does too)."""
    for name in ("cityscapes", "run"):
        shutil.copytree(finished_run / name, tmp_path / name, copy_function=shutil.copy2)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(_finished_run_config(tmp_path)))
    return tmp_path / "run", config_file


def checkpoint_names(out):
    """The files in the run folder ``out``'s checkpoint folder."""
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def snapshot(folder):
    """Every file below ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_left_as_it_is(run, capsys):
    out, config_file = run
    before = snapshot(out)
    assert main(["train", str(config_file)]) == 0
    assert "is finished (its checkpoint is at iteration 4, train.max_iters is 4)" in capsys.readouterr().out
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--overwrite"], "deletes an earlier run only for a new one: add --resume never"),
        (["train.precision=fp16"], "train.precision='fp16' is not one of auto, 32-true"),
        # the whole model in bf16 met the head's fp32 tables at the first step, after files were written
        (["train.precision=bf16-true"], "train.precision='bf16-true' is not one of auto, 32-true"),
        (["data.crop_size=60"], "data.crop_size=60 is not a multiple of the backbone's patch size 16"),
        pytest.param(
            ["train.accelerator=gpu"],
            "train.accelerator=gpu: PyTorch sees no CUDA GPU here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
    ],
)
def test_bad_run_options_are_named_before_anything_is_written(run, capsys, arguments, message):
    """Lightning refused these at its trainer, the model at its first step, after files were written."""
    out, config_file = run
    before = snapshot(out)
    fresh = out.parent / "fresh"
    assert main(["train", str(config_file), *arguments, "--output", str(fresh)]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before and not fresh.exists()


def test_a_refused_resume_writes_nothing(run, capsys):
    out, config_file = run
    before = snapshot(out)
    assert main(["train", str(config_file), "model.rein.token_length=4", "train.max_iters=8"]) == 2
    error = capsys.readouterr().err.strip()
    assert "another model configuration" in error and "model.rein.token_length: 8 vs 4" in error
    assert len(error.splitlines()) == 1
    assert snapshot(out) == before


def test_a_resume_whose_optimizer_state_holds_other_parameters_is_refused(run, capsys):
    """A checkpoint whose run trained more tensors (a run without linked queries written before
    Rein's unused transform and merge were frozen): Lightning failed deep in the optimizer's
    load_state_dict after the run's files were touched; now one line, nothing written."""
    import torch

    out, config_file = run
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    group["params"].append(max(p for g in checkpoint["optimizer_states"][0]["param_groups"] for p in g["params"]) + 1)
    torch.save(checkpoint, last)
    before = snapshot(out)
    assert main(["train", str(config_file), "train.max_iters=8"]) == 2
    error = capsys.readouterr().err.strip()
    assert "holds the optimizer state of" in error and "--resume never" in error and str(last) in error
    assert snapshot(out) == before


def test_a_new_run_into_a_used_folder_is_refused_unless_overwritten(run, capsys):
    out, config_file = run
    before = snapshot(out)
    assert main(["train", str(config_file), "--resume", "never"]) == 2
    error = capsys.readouterr().err
    assert str(out / "checkpoints") in error and "--overwrite" in error
    assert snapshot(out) == before
    assert main(["train", str(config_file), "train.max_iters=3", "--resume", "never", "--overwrite"]) == 0
    # The new run alone: no stale last.ckpt beside a last-v1.ckpt, no rows of the old run.
    assert checkpoint_names(out) == ["iter_000002.ckpt", "last.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["val_step0000003.json"]


def test_the_final_step_is_saved_when_it_is_not_a_checkpoint_step(tmp_path):
    from reinseg.engine import train

    task = train(tiny_config(tmp_path, max_iters=3, checkpoint_interval=2))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    for key, value in task.segmentor.state_dict().items():
        if f"segmentor.{key}" in last["state_dict"]:
            assert torch.equal(last["state_dict"][f"segmentor.{key}"], value), key


def test_eval_leaves_the_run_alone_and_checks_its_destination_first(run, tmp_path, capsys, monkeypatch):
    out, config_file = run
    checkpoint = str(out / "checkpoints" / "last.ckpt")
    before = snapshot(out)
    assert main(["eval", str(config_file), checkpoint, "--json", str(tmp_path / "eval.json")]) == 0
    assert snapshot(out) == before  # no metrics/val_step0000000.json in the training run
    assert (tmp_path / "eval.json").is_file()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking where the results go")

    monkeypatch.setattr("reinseg.engine.evaluate", no_evaluation)
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for destination in (tmp_path / "a-folder", blocker / "eval.json"):
        (tmp_path / "a-folder").mkdir(exist_ok=True)
        assert main(["eval", str(config_file), checkpoint, "--json", str(destination)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and str(destination if destination.parent == tmp_path else blocker) in error
    assert main(["eval", str(config_file), checkpoint, "--save-preds", str(blocker)]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_resume_takes_the_newest_intact_checkpoint(run):
    out, _ = run
    checkpoints = out / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "last.ckpt"
    # Killed between writing iter_000004.ckpt and last.ckpt: last.ckpt still holds step 2.
    shutil.copy(checkpoints / "iter_000002.ckpt", checkpoints / "last.ckpt")
    assert latest_checkpoint(checkpoints) == checkpoints / "iter_000004.ckpt"
    # A damaged file is passed over.
    data = (checkpoints / "iter_000004.ckpt").read_bytes()
    (checkpoints / "iter_000004.ckpt").write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(checkpoints) == checkpoints / "last.ckpt"


KILLED_WRITE = """
import os, signal, sys
from reinseg.checkpoints import atomic_write

def write(f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""


@pytest.mark.slow  # a fresh interpreter killed mid-write
def test_leftovers_of_killed_writes_are_removed(tmp_path):
    target = tmp_path / "last.ckpt"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], timeout=120)
    assert killed.returncode == -9
    [leftover] = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not target.exists()
    # A live writer's temporary file stays.
    atomic_write(tmp_path / "other", lambda f: (f.write(b"x"), remove_stale_temporaries(tmp_path)))
    assert not leftover.exists() and (tmp_path / "other").read_bytes() == b"x"


def test_bad_validation_file_stops_training_before_it_starts(tmp_path):
    from reinseg.data.io import DataError
    from reinseg.engine import train

    config = tiny_config(tmp_path, max_iters=2)
    labels = sorted((tmp_path / "cityscapes" / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    bad = labels[-1]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=str(bad)):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_iters=0", "train.max_iters"),
        ("train.max_iters=-5", "train.max_iters"),
        ("train.devices=0", "train.devices"),
        ("train.val_interval=0", "train.val_interval"),
        ("train.checkpoint_interval=0", "train.checkpoint_interval"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=-2", "data.batch_size"),
        ("train.lr=-0.001", "train.lr"),
        ("data.crop_size=0", "data.crop_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.val.0.scale=[0,0]", "data.val[0].scale"),
        ("model.backbone.img_size=0", "model.backbone.img_size"),
        ("model.loss.importance_sample_ratio=1.5", "model.loss.importance_sample_ratio"),
        ("model.loss.oversample_ratio=0.5", "model.loss.oversample_ratio"),
        ("train.seed=-5", "train.seed"),
        ("train.betas=[0.9]", "train.betas"),
        ("train.betas=[0.9,0.99,0.5]", "train.betas"),
        ("train.min_lr=0.5", "train.min_lr"),
        ("data.val.0.in_mean=nope", "data.val[0]: in_mean"),
        ("train.warmup_start_factor=5", "train.warmup_start_factor"),
        ("train.tf32=bogus", "train.tf32"),
        ("data.crop_size=16", "data.crop_size=16"),
        ('train.output_dir="  "', "train.output_dir"),
        ("data.val.0.label=1", "data.val[0]: label"),
    ],
)
def test_numbers_out_of_range_are_one_line_naming_the_key(tmp_path, capsys, override, key):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(tiny_config(tmp_path)))
    assert main(["train", str(config_file), override]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{key} must be" in error
    assert not (tmp_path / "run").exists()


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; the configs write 1.0e-4."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(tiny_config(tmp_path)).replace("lr: 0.001", "lr: 1e-3"))
    assert "lr: 1e-3" in config_file.read_text()
    assert load_config(config_file, ["train.weight_decay=5e-2"]).train.lr == 1e-3
    assert load_config(config_file, ["train.weight_decay=5e-2"]).train.weight_decay == 0.05


def test_a_home_relative_output_folder_is_one_folder(tmp_path, monkeypatch):
    """Lightning expands "~" for its checkpoints and logs: the rest of the run goes there too."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(tiny_config(tmp_path)))
    assert load_config(config_file, ["train.output_dir=~/runs/a"]).train.output_dir == str(tmp_path / "home/runs/a")


def test_a_file_where_the_run_writes_a_folder_is_refused_before_training(tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(tiny_config(tmp_path, max_iters=1)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    assert main(["train", str(config_file)]) == 2
    assert "checkpoints is a file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_predict_scale_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["predict", "model.ckpt", "image.png", "--output", str(tmp_path), "--scale", "0", "0"])
    assert exit.value.code == 2
    assert "--scale: must be a positive integer, got 0" in capsys.readouterr().err


def test_file_system_errors_are_one_line_naming_the_path(tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(tiny_config(tmp_path, max_iters=1)))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", str(config_file), "--output", str(blocker / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Not a directory" in error and str(blocker) in error
    assert main(["train", str(config_file), "--output", str(blocker)]) == 2
    assert f"train.output_dir (--output) {blocker}: is a file, not a folder" in capsys.readouterr().err


def test_an_unwritable_results_path_is_named_by_its_option(run, capsys):
    out, config_file = run
    blocker = out.parent / "a-file"
    blocker.write_text("")
    checkpoint = str(out / "checkpoints" / "last.ckpt")
    assert main(["eval", str(config_file), checkpoint, "--json", str(blocker / "x.json")]) == 2
    assert f"--json {blocker}: cannot write there (Not a directory)" in capsys.readouterr().err
    assert main(["eval", str(config_file), checkpoint, "--json", str(out)]) == 2
    assert f"--json {out}: is a folder, not a file" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


POOL = """
import os, sys, time
from functools import partial
from pathlib import Path
from reinseg.data.parallel import parallel_map

def work(folder, item):
    Path(folder, str(os.getpid())).touch()
    time.sleep(120)

if __name__ == "__main__":
    if sys.argv[2] != "default":
        import multiprocessing
        multiprocessing.set_start_method(sys.argv[2])
    parallel_map(partial(work, sys.argv[1]), list(range(4)), workers=2, progress=False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "start_method",
    ["default", pytest.param("forkserver", marks=pytest.mark.slow)],  # forkserver: Python 3.14's default
)
def test_pool_workers_die_with_a_killed_parent(tmp_path, start_method):
    import time

    (tmp_path / "pool.py").write_text(POOL)
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, str(tmp_path / "pool.py"), str(pids), start_method])
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        parent.kill()  # SIGKILL: the pool cannot stop its workers itself
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers)
    finally:
        parent.kill()
        for p in pids.iterdir():
            if _alive(int(p.name)):
                os.kill(int(p.name), 9)


def test_prepare_redoes_empty_and_truncated_outputs(tmp_path):
    from fake_datasets import make_fake_cityscapes

    from reinseg.data.io import read_label
    from reinseg.data.prepare import prepare

    fake = make_fake_cityscapes(tmp_path, n=2)
    first = prepare("cityscapes", tmp_path, workers=1, progress=False)
    assert first.ok and len(first.written) == 4
    empty, truncated, intact = (tmp_path / p for p in first.written[:3])
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:-30])
    again = prepare("cityscapes", tmp_path, workers=1, progress=False)
    assert sorted(again.written) == sorted([str(empty), str(truncated)]) and str(intact) in again.skipped
    for image, expected in fake.expected.items():
        label = image.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        assert (read_label(label) == expected).all()


@pytest.mark.slow
def test_a_demo_rerun_replaces_the_previous_run(tmp_path):
    from reinseg.demo import run_demo

    run_demo(tmp_path, max_iters=3, num_train=4, num_val=1)
    run_demo(tmp_path, max_iters=2, num_train=4, num_val=1)
    assert checkpoint_names(tmp_path / "run") == ["iter_000002.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_resume_removes_leftovers_of_killed_writes(run):
    out, config_file = run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = out / "checkpoints" / f".last.ckpt.{int(dead.stdout)}-partial-abcd1234.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert main(["train", str(config_file), "train.max_iters=5"]) == 0
    assert not leftover.exists()


@pytest.mark.slow  # trains four steps
def test_a_moved_run_resumed_keeps_only_its_newest_checkpoints(run, finished_run, recwarn):
    """A run folder copied elsewhere (another disk, another machine) and resumed: its checkpoint's
    state names the first folder, yet the resume removes the oldest beyond
    ``train.keep_checkpoints`` (3), as the run would have where it started; the first folder's
    files are left alone."""
    out, config_file = run
    first = snapshot(finished_run / "run" / "checkpoints")
    assert main(["train", str(config_file), "train.max_iters=8"]) == 0
    assert checkpoint_names(out) == ["iter_000004.ckpt", "iter_000006.ckpt", "iter_000008.ckpt", "last.ckpt"]
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    assert snapshot(finished_run / "run" / "checkpoints") == first


@pytest.mark.slow  # trains five steps in all
@pytest.mark.parametrize(
    "options, expected",
    [
        # Fewer to keep than the run has: the extra ones go when training starts again.
        (["train.keep_checkpoints=1", "train.max_iters=6"], ["iter_000006.ckpt", "last.ckpt"]),
        (["train.keep_checkpoints=0", "train.max_iters=6"], ["last.ckpt"]),
        # Another interval: Lightning keys the state by it and would find none.
        (
            ["train.checkpoint_interval=3", "train.max_iters=9"],
            ["iter_000004.ckpt", "iter_000006.ckpt", "iter_000009.ckpt", "last.ckpt"],
        ),
    ],
    ids=["fewer_kept", "none_kept", "another_interval"],
)
def test_a_resume_with_other_checkpoint_options_keeps_only_the_newest(run, options, expected):
    out, config_file = run  # iterations 2 and 4 saved, 3 to keep
    assert main(["train", str(config_file), *options]) == 0
    assert checkpoint_names(out) == expected


@pytest.mark.slow  # trains two steps
@pytest.mark.parametrize("keep, written_again", [(1, True), (0, False)])
def test_a_resume_from_an_earlier_checkpoint_keeps_it_and_writes_the_later_ones_again(run, keep, written_again):
    """``--resume PATH`` of iteration 2 with iteration 4 in the folder: the file it resumed from is
    not removed by the run (as Lightning), though fewer are to be kept, also when the path reaches
    it through a link; with one to keep, the run's checkpoint at 4 is written again (not skipped as
    older than the file there); with none, it is not written and the earlier run's file is left."""
    out, config_file = run
    before = (out / "checkpoints" / "iter_000004.ckpt").read_bytes()
    (out.parent / "alias").symlink_to(out, target_is_directory=True)
    resume = out.parent / "alias" / "checkpoints" / "iter_000002.ckpt"
    assert main(["train", str(config_file), "--resume", str(resume), f"train.keep_checkpoints={keep}"]) == 0
    assert checkpoint_names(out) == ["iter_000002.ckpt", "iter_000004.ckpt", "last.ckpt"]
    assert ((out / "checkpoints" / "iter_000004.ckpt").read_bytes() != before) == written_again


@pytest.mark.slow  # trains two steps
def test_a_run_resumed_to_train_further_takes_the_configurations_schedule_from_its_step(run, caplog):
    """Raising train.max_iters of a finished run (as it says to) and changing train.lr: the first
    further iteration trains at the new schedule's lr, not at the finished one's last (0)."""
    out, config_file = run  # 4 iterations at lr 1e-3
    assert main(["train", str(config_file), "train.max_iters=8", "train.lr=0.5"]) == 0
    rows = [r for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("lr-AdamW/pg1")]
    lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows}
    assert lrs[3] == 0.0  # the finished schedule's last iteration
    for step in (4, 5, 6):
        assert lrs[step] == pytest.approx(0.5 * lr_factor(step, 8), rel=1e-6) and lrs[step] > 0
    assert "train.lr 0.001 -> 0.5, train.max_iters 4 -> 8" in caplog.text


def test_a_resume_that_regroups_the_parameters_is_refused_naming_the_keys(run, capsys):
    out, config_file = run  # weight decay 0.05 on some tensors, none on norms and biases
    before = snapshot(out)
    assert main(["train", str(config_file), "train.max_iters=6", "train.weight_decay=0"]) == 2
    error = capsys.readouterr().err
    assert "in groups of" in error and "train.weight_decay" in error and "--resume never" in error
    assert snapshot(out) == before


def test_a_runs_checkpoints_are_its_folders_iteration_files_up_to_its_step(tmp_path):
    from reinseg.engine import _run_checkpoints

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("iter_000010.ckpt", "iter_000002.ckpt", "iter_1000000.ckpt", "iter_000012.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"x")
    (folder / ".iter_000004.ckpt.1@host-partial-ab.tmp").write_bytes(b"x")  # a killed write
    (folder / "iter_x.ckpt").write_bytes(b"x")
    (folder / "iter_000006.ckpt").mkdir()
    (tmp_path / "elsewhere.ckpt").write_bytes(b"x")
    (folder / "iter_000008.ckpt").symlink_to(tmp_path / "elsewhere.ckpt")
    real = os.path.realpath(folder)
    assert _run_checkpoints(folder, up_to=1_000_000) == [
        (2, f"{real}/iter_000002.ckpt"),
        (10, f"{real}/iter_000010.ckpt"),
        (12, f"{real}/iter_000012.ckpt"),
        (1_000_000, f"{real}/iter_1000000.ckpt"),
    ]
    assert [i for i, _ in _run_checkpoints(folder, up_to=10)] == [2, 10]


@pytest.mark.slow  # trains six steps
def test_an_output_folder_reached_through_a_link_keeps_only_its_newest_checkpoints(tmp_path):
    """Lightning names checkpoints by their real path (macOS's /tmp, a linked scratch disk):
    reinseg's own rule of what it may delete compares real paths too."""
    from reinseg.engine import train

    (tmp_path / "scratch").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "scratch", target_is_directory=True)
    config = tiny_config(tmp_path, max_iters=6, checkpoint_interval=2, val_interval=100)
    config.train.output_dir = str(tmp_path / "link" / "run")
    config.train.keep_checkpoints = 1
    train(config)
    assert checkpoint_names(tmp_path / "scratch" / "run") == [
        "iter_000006.ckpt",
        "last.ckpt",
    ]
