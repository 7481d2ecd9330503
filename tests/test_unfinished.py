import subprocess
import sys

import pytest

from reinseg.checkpoints import _HOST, writer_mark
from reinseg.unfinished import (
    MARKER,
    check_folder,
    claim_folder,
    marker_above,
    markers_below,
    read_marker,
    release_folder,
)


@pytest.fixture(scope="module")
def ended_writer() -> str:
    """The mark of a process of this machine that has ended."""
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{int(pid.stdout)}@{_HOST}"


RUNNING = (f"1@{_HOST}", f"2@{_HOST}-another-machine")  # init runs; another machine's is unseen


def test_a_marker_names_its_writer_and_command(tmp_path):
    assert read_marker(tmp_path) is None
    path = claim_folder(tmp_path / "new", "predict", "--output")  # the folder is made
    assert path == tmp_path / "new" / MARKER and path.read_text() == f"{writer_mark()}\npredict\n"
    marker = read_marker(tmp_path / "new")
    assert (marker.writer, marker.command, marker.is_running()) == (writer_mark(), "predict", False)
    path.write_text("12@elsewhere\n")  # one line: an earlier release's evaluation
    marker = read_marker(tmp_path / "new")
    assert (marker.writer, marker.command, marker.is_running()) == ("12@elsewhere", "eval", True)
    path.write_text("")  # a kill before the writer was written: nobody writes it
    assert not read_marker(tmp_path / "new").is_running()


def test_a_folder_is_taken_over_only_from_an_ended_run_of_the_same_command(tmp_path, ended_writer):
    assert check_folder(tmp_path / "new", "predict", "--output") is False
    for running in RUNNING:
        (tmp_path / MARKER).write_text(f"{running}\neval\n")
        for attempt in (check_folder, claim_folder):
            with pytest.raises(ValueError, match=rf"--output {tmp_path}: another `reinseg eval` \({running}\) into"):
                attempt(tmp_path, "predict", "--output")
        assert (tmp_path / MARKER).read_text() == f"{running}\neval\n"  # left alone
    (tmp_path / MARKER).write_text(f"{ended_writer}\neval\n")
    with pytest.raises(ValueError, match="unfinished outputs of an interrupted `reinseg eval`"):
        claim_folder(tmp_path, "predict", "--output")
    assert check_folder(tmp_path, "eval", "--save-preds") is True
    claim_folder(tmp_path, "eval", "--save-preds")  # the interrupted run's marker, replaced
    assert (tmp_path / MARKER).read_text() == f"{writer_mark()}\neval\n"
    release_folder(tmp_path)
    assert not (tmp_path / MARKER).exists()


def test_a_marker_is_removed_only_by_its_writer(tmp_path):
    (tmp_path / MARKER).write_text(f"{RUNNING[0]}\npredict\n")  # another process took it over
    release_folder(tmp_path)
    assert (tmp_path / MARKER).exists()
    release_folder(tmp_path / "none")  # no marker: nothing to do


def test_an_evaluations_marker_covers_the_folders_below_it_a_predicts_only_its_own(tmp_path, ended_writer):
    below = tmp_path / "preds" / "acdc" / "fog"
    below.mkdir(parents=True)
    assert marker_above(below) is None
    (tmp_path / "preds" / MARKER).write_text(f"{ended_writer}\npredict\n")
    assert marker_above(tmp_path / "preds").path == tmp_path / "preds" / MARKER
    assert marker_above(below) is None
    assert check_folder(below, "predict", "--output") is False  # another folder than the predict's
    for writer in (ended_writer, RUNNING[0]):
        (tmp_path / "preds" / MARKER).write_text(f"{writer}\neval\n")
        assert marker_above(below).path == tmp_path / "preds" / MARKER
        with pytest.raises(ValueError, match=r"it is inside the outputs of a (running|interrupted) `reinseg eval`"):
            claim_folder(below, "predict", "--output")  # its files would mix, or the rerun delete them
    assert not (below / MARKER).exists()
    assert marker_above(tmp_path) is None  # not the folders above it
    assert markers_below(tmp_path) == [tmp_path / "preds" / MARKER]
    assert markers_below(tmp_path / "preds") == []


def test_of_two_processes_claiming_a_folder_at_once_the_second_is_refused(tmp_path, monkeypatch):
    """The claim is one step that fails if the marker exists (O_EXCL): a predict that another
    one marked while its model loaded reads that marker again and stops, instead of writing over
    the other's marker (whose end would then have removed this one's)."""
    import os

    import reinseg.unfinished as unfinished

    real_open = os.open

    def another_first(path, flags, *args):
        (tmp_path / MARKER).write_text(f"{RUNNING[0]}\npredict\n")  # the other process, just before
        return real_open(path, flags, *args)

    monkeypatch.setattr(unfinished.os, "open", another_first)
    with pytest.raises(ValueError, match=r"another `reinseg predict` \(1@.*\) into .* is writing it"):
        claim_folder(tmp_path, "predict", "--output")
    assert (tmp_path / MARKER).read_text() == f"{RUNNING[0]}\npredict\n"
