import os

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
