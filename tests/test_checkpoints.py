import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch

from reinseg.checkpoints import CHECKPOINT_FORMAT, atomic_write, load_checkpoint, save_checkpoint


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"the previous checkpoint")

    def crash(f):
        f.write(b"half of the new one")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_atomic_write_gives_the_permissions_of_a_plain_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic = atomic_write(tmp_path / "atomic", lambda f: f.write(b"x"))
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_checkpoint_round_trip_and_refusal(tmp_path):
    state = {"head.cls_embed.weight": torch.randn(3, 2)}
    save_checkpoint(tmp_path / "c.pt", {"model": {"tuning": "rein"}}, state, step=7)
    payload = load_checkpoint(tmp_path / "c.pt")
    assert payload["format"] == CHECKPOINT_FORMAT and payload["step"] == 7
    assert torch.equal(payload["state_dict"]["head.cls_embed.weight"], state["head.cls_embed.weight"])
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="plain.pt is not a reinseg checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    import subprocess
    import sys

    from reinseg.checkpoints import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("failed while writing")
    assert (target / "a.txt").read_text() == "first"  # the old folder, untouched
    with atomic_directory(target) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    # a killed writer's staging folder (its process is gone) is removed by the next writer
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".out.{dead.stdout.strip()}-partial-x").mkdir()
    with atomic_directory(target):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_leaves_the_old_or_the_new_folder_at_every_moment(tmp_path, monkeypatch):
    """Where the system can exchange two folders in one step (Linux), the new folder takes the
    old one's place without a moment in which neither is there: a kill then leaves a whole folder.
    Without the exchange the old folder steps aside first (the fallback, also checked)."""
    import shutil

    import reinseg.checkpoints as checkpoints

    probe = [tmp_path / "probe_a", tmp_path / "probe_b"]
    for folder in probe:
        folder.mkdir()
    if not checkpoints.exchange(*probe):
        pytest.skip("this system or file system cannot exchange two folders in one step")
    for folder in probe:
        folder.rmdir()
    target = tmp_path / "out"
    with checkpoints.atomic_directory(target) as staging:
        (staging / "old.txt").write_text("old")
    seen = []

    def watched(function):
        def run(*args, **kwargs):
            seen.append(target.is_dir())
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(checkpoints.os, "replace", watched(os.replace))
    monkeypatch.setattr(shutil, "rmtree", watched(shutil.rmtree))
    with checkpoints.atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert seen and all(seen)  # the old folder's removal came after the exchange
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    monkeypatch.setattr(checkpoints, "exchange", lambda a, b: False)
    seen.clear()
    with checkpoints.atomic_directory(target) as staging:
        (staging / "fallback.txt").write_text("fallback")
    assert False in seen  # the moment the exchange closes
    assert [p.name for p in target.iterdir()] == ["fallback.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_temporary_is_removed_only_when_its_writer_ran_here_and_is_gone(tmp_path):
    """On a file system several machines write to, a process id of another machine says nothing
    here: its temporaries stay (a job array predicting into one folder lost its files)."""
    import subprocess
    import sys

    from reinseg.checkpoints import _HOST, atomic_write, remove_stale_temporaries

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    names = {
        "killed here": f".a.png.{dead}@{_HOST}-partial-x1.tmp",
        "killed, no machine recorded": f".b.png.{dead}-partial-x2.tmp",
        "another machine's": f".c.png.{dead}@{_HOST}x-partial-x3.tmp",
        "running here": f".d.png.{os.getpid()}@{_HOST}-partial-x4.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["killed here"], names["killed, no machine recorded"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["another machine's"], names["running here"]])
    # What this process writes is named so (a killed write of it would be found).
    seen = []
    atomic_write(tmp_path / "e.png", lambda f: seen.extend(p.name for p in tmp_path.glob(".e.png.*")))
    assert len(seen) == 1 and seen[0].startswith(f".e.png.{os.getpid()}@{_HOST}-partial-")


def _run_with_a_relative_vfm(tmp_path, monkeypatch):
    """A tiny model whose config names its VFM file relative to the run's folder, as the shipped
    configs do, built from that file; its checkpoint config and the weights a checkpoint stores."""
    from dataclasses import replace

    from conftest import tiny_model_config

    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict
    from reinseg.config import Config, to_dict

    torch.manual_seed(0)
    model = tiny_model_config()
    random_vfm = build_segmentor(model, load_backbone_weights=False).backbone.vit
    (tmp_path / "project" / "checkpoints").mkdir(parents=True)
    torch.save(random_vfm.state_dict(), tmp_path / "project" / "checkpoints" / "vfm.pth")
    monkeypatch.chdir(tmp_path / "project")
    model = replace(model, backbone=replace(model.backbone, checkpoint="checkpoints/vfm.pth"))
    segmentor = build_segmentor(model).eval()
    return segmentor, to_dict(Config(model=model)), checkpoint_state_dict(segmentor)


def test_a_checkpoint_loads_from_any_folder_and_names_a_missing_vfm(tmp_path, monkeypatch):
    from reinseg.checkpoints import config_for_checkpoint, segmentor_from_checkpoint, vfm_record

    segmentor, config, state = _run_with_a_relative_vfm(tmp_path, monkeypatch)
    save_checkpoint(tmp_path / "new.ckpt", config_for_checkpoint(config), state, **vfm_record(segmentor))
    save_checkpoint(tmp_path / "old.ckpt", config, state)  # as runs before 2026-12-06 stored it
    assert config["model"]["backbone"]["checkpoint"] == "checkpoints/vfm.pth"  # the run's own config unchanged
    monkeypatch.chdir(tmp_path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = segmentor(images)
        loaded, payload = segmentor_from_checkpoint(tmp_path / "new.ckpt")
        assert payload["config"]["model"]["backbone"]["checkpoint"] == str(tmp_path / "project/checkpoints/vfm.pth")
        torch.testing.assert_close(loaded.eval()(images), expected, rtol=0, atol=0)
        with pytest.raises(FileNotFoundError) as missing:
            segmentor_from_checkpoint(tmp_path / "old.ckpt")
        message = str(missing.value)
        assert "old.ckpt references the VFM weights checkpoints/vfm.pth" in message
        assert f"relative to the current folder, {tmp_path}" in message and "--backbone" in message
        loaded, _ = segmentor_from_checkpoint(tmp_path / "old.ckpt", backbone="project/checkpoints/vfm.pth")
        torch.testing.assert_close(loaded.eval()(images), expected, rtol=0, atol=0)


def test_predict_takes_the_vfm_file_a_checkpoint_references_elsewhere(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from reinseg.cli import main

    _, config, state = _run_with_a_relative_vfm(tmp_path, monkeypatch)
    save_checkpoint(tmp_path / "old.ckpt", config, state)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 32)).save(tmp_path / "street.png")
    arguments = ["predict", "old.ckpt", "street.png", "--output", "out", "--device", "cpu"]
    assert main(arguments) == 2
    assert "references the VFM weights checkpoints/vfm.pth" in capsys.readouterr().err
    assert main([*arguments, "--backbone", "project/checkpoints/vfm.pth"]) == 0
    assert (tmp_path / "out" / "street_labelTrainIds.png").is_file()


def test_a_checkpoint_refuses_other_vfm_weights_than_it_was_trained_on(tmp_path, monkeypatch):
    """Rein and the head on another frozen VFM score wrong without any error: a config or
    --backbone naming another file is refused; the same weights under another name are not."""
    from reinseg.checkpoints import segmentor_from_checkpoint, vfm_record

    segmentor, config, state = _run_with_a_relative_vfm(tmp_path, monkeypatch)
    record = vfm_record(segmentor)
    assert len(record["vfm_fingerprint"]) == 20
    save_checkpoint(tmp_path / "model.ckpt", config, state, **record)
    weights = torch.load(tmp_path / "project/checkpoints/vfm.pth")
    torch.save(weights, tmp_path / "copy.pth")
    weights["blocks.1.mlp.fc1.weight"] = weights["blocks.1.mlp.fc1.weight"] * 1.01
    torch.save(weights, tmp_path / "other.pth")
    loaded, _ = segmentor_from_checkpoint(tmp_path / "model.ckpt", backbone=tmp_path / "copy.pth")
    torch.testing.assert_close(loaded.state_dict(), segmentor.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"model.ckpt was trained on other VFM weights than .*other.pth"):
        segmentor_from_checkpoint(tmp_path / "model.ckpt", backbone=tmp_path / "other.pth")


def test_a_vfm_stored_on_one_side_and_referenced_on_the_other_is_named(tmp_path, monkeypatch):
    """The 60 backbone.vit.* keys that differ then are one thing: the VFM weight file setting."""
    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict, load_checkpoint_weights
    from reinseg.config import ModelConfig, from_dict

    segmentor, config, referenced_state = _run_with_a_relative_vfm(tmp_path, monkeypatch)
    stored = build_segmentor(
        from_dict(
            ModelConfig, dict(config["model"], backbone=dict(config["model"]["backbone"], checkpoint=None)), "model"
        )
    )
    stored_state = checkpoint_state_dict(stored)
    assert set(stored_state) > set(referenced_state)
    with pytest.raises(ValueError, match=r"c.ckpt holds its VFM's weights .* set model.backbone.checkpoint=null"):
        load_checkpoint_weights(segmentor, stored_state, source="c.ckpt")
    with pytest.raises(ValueError, match=r"c.ckpt references its VFM's weight file, but the configuration names none"):
        load_checkpoint_weights(stored, referenced_state, source="c.ckpt")


def test_backbone_replaces_the_hub_too_and_a_configs_missing_file_is_named_as_the_configs(tmp_path, monkeypatch):
    from dataclasses import replace

    from reinseg.checkpoints import segmentor_from_checkpoint
    from reinseg.config import ModelConfig, from_dict

    segmentor, config, state = _run_with_a_relative_vfm(tmp_path, monkeypatch)
    hub = dict(config["model"], backbone=dict(config["model"]["backbone"], checkpoint=None, pretrained=True))
    save_checkpoint(tmp_path / "hub.ckpt", {"model": hub}, state)
    # Offline, a checkpoint trained on hub weights runs on the same weights from a file.
    loaded, _ = segmentor_from_checkpoint(tmp_path / "hub.ckpt", backbone="checkpoints/vfm.pth")
    torch.testing.assert_close(loaded.state_dict(), segmentor.state_dict(), rtol=0, atol=0)
    model = from_dict(ModelConfig, config["model"], "model")
    model = replace(model, backbone=replace(model.backbone, checkpoint="gone.pth"))
    with pytest.raises(FileNotFoundError) as missing:
        segmentor_from_checkpoint(tmp_path / "hub.ckpt", model)
    assert str(missing.value).startswith("the VFM weights gone.pth (relative to the current folder")
    assert "--backbone" not in str(missing.value)  # eval has no such option: the config names the file


@pytest.mark.slow  # builds a 160-billion-parameter ViT on the meta device
def test_a_checkpoint_whose_config_asks_for_more_than_its_weights_is_refused_before_building(tmp_path, monkeypatch):
    """A shared checkpoint's configuration named two million classes (or a giant ViT): the model
    was built, taking the memory, before its weights were found not to fit. Now the model is
    planned on the meta device and refused first; and a test scale is bounded."""
    from conftest import tiny_model_config

    import reinseg.build
    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict, segmentor_from_checkpoint
    from reinseg.config import to_dict
    from reinseg.predict import checkpoint_scale

    model = tiny_model_config()
    weights = checkpoint_state_dict(build_segmentor(model))
    built = []
    real_build = reinseg.build.build_segmentor
    monkeypatch.setattr(
        reinseg.build,
        "build_segmentor",
        lambda config, **kw: built.append(torch.empty(0).device.type) or real_build(config, **kw),
    )
    for key, value, message in (
        ("head", {**to_dict(model)["head"], "num_classes": 2_000_000}, "class count mismatch.*2000000 classes"),
        ("rein", {**to_dict(model)["rein"], "token_length": 9}, r"backbone\.rein\..* should be \(.*9"),
    ):
        config = {"model": {**to_dict(model), key: value}}
        save_checkpoint(tmp_path / "hostile.ckpt", config, weights)
        built.clear()
        with pytest.raises(ValueError, match=message):
            segmentor_from_checkpoint(tmp_path / "hostile.ckpt")
        assert built == ["meta"]  # planned, never built for real
    giant = {**to_dict(model)["backbone"], "timm_kwargs": {"embed_dim": 8192, "depth": 200, "num_heads": 8}}
    save_checkpoint(tmp_path / "giant.ckpt", {"model": {**to_dict(model), "backbone": giant}}, weights)
    with pytest.raises(ValueError, match=r"giant\.ckpt: its configuration describes a model of [\d,]+ parameters"):
        segmentor_from_checkpoint(tmp_path / "giant.ckpt")
    save_checkpoint(tmp_path / "ok.ckpt", {"model": to_dict(model)}, weights)
    assert segmentor_from_checkpoint(tmp_path / "ok.ckpt")[0].num_classes == model.head.num_classes
    scale = {"model": to_dict(model), "data": {"val": [{"name": "cityscapes", "root": "x", "scale": [40000, 40000]}]}}
    with pytest.raises(ValueError, match="test scale 40000x40000 of cityscapes: more than 16384 pixels a side"):
        checkpoint_scale(scale)


def _hold_lock_in_another_process(folder):
    """A process (plain Python, not reinseg) that holds ``folder``'s run lock with flock, as a
    run does, and writes its pid there."""
    import subprocess
    import sys

    from reinseg.checkpoints import RUN_LOCK

    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(folder / RUN_LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.skipif(os.name != "posix", reason="advisory locks are POSIX flock")
def test_a_folder_another_process_trains_into_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    from reinseg.checkpoints import RunInProgressError, refuse_running_run, run_lock, writer_mark

    refuse_running_run(tmp_path / "absent")  # no folder, no lock file: nothing to refuse
    assert not (tmp_path / "absent").exists()
    holder = _hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunInProgressError, match=rf"{tmp_path}: another reinseg run \(pid {holder.pid}\)"):
            refuse_running_run(tmp_path)
        with pytest.raises(RunInProgressError, match="train.output_dir"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    refuse_running_run(tmp_path)
    with run_lock(tmp_path) as lock_file:
        assert lock_file.read_text() == f"{writer_mark()}\n"  # as temporaries name their writer
        with pytest.raises(RunInProgressError):  # a second holder in this process is refused too
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released when the block ended
        pass


def test_atomic_write_names_the_file_and_writes_through_a_link(tmp_path):
    import errno

    target = tmp_path / "results.json"
    target.write_bytes(b"old")

    def full_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as failed:
        atomic_write(target, full_disk)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(target)  # not the temporary
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    def torch_full_disk(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 632704 vs 632592")

    with pytest.raises(OSError, match=r"could not write .*results.json \(is the disk full\?\): \[enforce fail"):
        atomic_write(target, torch_full_disk)

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "latest.json").write_bytes(b"old")
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "shared" / "latest.json")
    atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and (tmp_path / "shared" / "latest.json").read_bytes() == b"new"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked children")
def test_a_forked_child_such_as_a_data_worker_does_not_keep_the_run_lock(tmp_path):
    """flock belongs to the open file, which a fork shares: a lingering data worker kept the
    lock after its run had ended."""
    from reinseg.checkpoints import refuse_running_run, run_lock

    started, ready = os.pipe()
    with run_lock(tmp_path):
        child = os.fork()
        if child == 0:  # pragma: no cover - the child only sleeps until killed
            os.write(ready, b"1")  # the fork's handlers have run
            signal.pause()
            os._exit(0)
    assert os.read(started, 1) == b"1"
    try:
        refuse_running_run(tmp_path)  # the child still runs, and holds no lock
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_signals_deferred_holds_ctrl_c_until_the_block_ends(python_sigint_handler):
    from reinseg.checkpoints import signals_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")  # still inside: the signal waits
        steps.append("after the block")  # never: it is delivered as the block ends
    assert steps == ["after the signal"]


@contextlib.contextmanager
def signals_to_another_thread():
    """A send(signum) that hands the signal to a thread other than the main one, as the kernel may
    hand a process's signal to PyTorch's worker threads, and returns once its C-level handler has
    run there (a wakeup byte): Python runs the handler in the main thread at its next check."""
    import threading

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    woken, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    previous_wakeup = signal.set_wakeup_fd(wakeup)

    def send(signum: int) -> None:
        signal.pthread_kill(worker.ident, signum)
        os.read(woken, 1)

    try:
        yield send
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        os.close(woken)
        os.close(wakeup)
        stop.set()
        worker.join()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX threads")
def test_signals_deferred_holds_a_ctrl_c_that_another_thread_receives(python_sigint_handler):
    """A mask on the calling thread let such a signal through, and Python raised at once."""
    from reinseg.checkpoints import signals_deferred

    steps = []
    with signals_to_another_thread() as send, pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            send(signal.SIGINT)
            steps.append("after the signal")
        steps.append("after the block")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX threads")
def test_signals_deferred_hands_each_held_signal_on_once_in_order(python_sigint_handler):
    """SIGTERM twice, then Ctrl-C: SIGTERM's own handler runs once and Ctrl-C's KeyboardInterrupt
    follows, also where SIGTERM's handler raises (an undeferred Ctrl-C would still arrive)."""
    from reinseg.checkpoints import signals_deferred

    received = []

    def on_sigterm(signum, frame):
        received.append(signum)
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with signals_to_another_thread() as send, pytest.raises(KeyboardInterrupt) as interrupted:
            with signals_deferred():
                send(signal.SIGTERM)
                send(signal.SIGTERM)
                send(signal.SIGINT)
                assert received == []
        assert received == [signal.SIGTERM]  # once, as a blocked signal is
        assert isinstance(interrupted.value.__context__, SystemExit)  # SIGTERM's, handled first
        assert signal.getsignal(signal.SIGTERM) is on_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_moved_beside_crosses_file_systems_and_names_a_missing_folder(tmp_path):
    from reinseg.checkpoints import moved_beside

    source = tmp_path / "staged.bin"
    source.write_bytes(b"new")
    other = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path  # another file system where there is one
    target = other / f"reinseg-test-{os.getpid()}.bin"
    try:
        beside = moved_beside(source, target)
        assert beside.parent == other and beside.read_bytes() == b"new" and not source.exists()
        os.replace(beside, target)
        assert target.read_bytes() == b"new"
    finally:
        target.unlink(missing_ok=True)
    source.write_bytes(b"new")
    with pytest.raises(OSError, match=r"cannot write .*missing.*target\.bin"):
        moved_beside(source, tmp_path / "missing" / "target.bin")
    assert source.read_bytes() == b"new"
