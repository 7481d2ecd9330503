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
