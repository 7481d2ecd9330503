import subprocess
import sys

import pytest

from reinseg.checkpoints import _HOST, writer_mark
from reinseg.unfinished import MARKER, check_unfinished, claim_folder, marker_above, read_marker


@pytest.fixture(scope="module")
def ended_writer() -> str:
    """The mark of a process of this machine that has ended."""
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{int(pid.stdout)}@{_HOST}"


def test_a_marker_names_its_writer_and_command(tmp_path):
    assert read_marker(tmp_path) is None
    path = claim_folder(tmp_path, "predict")
    assert path == tmp_path / MARKER and path.read_text() == f"{writer_mark()}\npredict\n"
    marker = read_marker(tmp_path)
    assert (marker.writer, marker.command, marker.is_running()) == (writer_mark(), "predict", False)
    path.write_text("12@elsewhere\n")  # one line: an earlier release's evaluation
    marker = read_marker(tmp_path)
    assert (marker.writer, marker.command, marker.is_running()) == ("12@elsewhere", "eval", True)


def test_a_folder_is_taken_over_only_from_an_ended_run_of_the_same_command(tmp_path, ended_writer):
    assert check_unfinished(tmp_path / "new", "predict", "--output") is None
    for running in (f"1@{_HOST}", f"{ended_writer}x"):  # init runs; another machine, unseen
        (tmp_path / MARKER).write_text(f"{running}\neval\n")
        with pytest.raises(ValueError, match=rf"--output {tmp_path}: another `reinseg eval` \({running}\) is writing"):
            check_unfinished(tmp_path, "predict", "--output")
    (tmp_path / MARKER).write_text(f"{ended_writer}\neval\n")
    with pytest.raises(ValueError, match="unfinished outputs of an interrupted `reinseg eval`"):
        check_unfinished(tmp_path, "predict", "--output")
    assert check_unfinished(tmp_path, "eval", "--save-preds").path == tmp_path / MARKER


def test_a_marker_covers_the_folders_below_it(tmp_path):
    below = tmp_path / "preds" / "acdc" / "fog"
    below.mkdir(parents=True)
    assert marker_above(below) is None
    claim_folder(tmp_path / "preds", "eval")
    assert marker_above(below).path == tmp_path / "preds" / MARKER
    assert marker_above(tmp_path) is None  # not the folders above it
