import json
import subprocess
import sys

import pytest

from reinseg.checkpoints import _HOST, writer_mark
from reinseg.unfinished import (
    MARKER,
    check_finished,
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


def test_of_two_processes_claiming_a_folder_at_once_the_second_is_refused(tmp_path):
    """The folder is locked while a claim reads and writes its marker: a predict that another
    one marked while it waited for the lock reads that marker and stops, instead of writing over
    it (the other's end would then have removed this one's marker, or both written the folder)."""
    import fcntl
    import os
    import threading

    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the other process, mid-claim
    outcome = []

    def claim():
        try:
            claim_folder(tmp_path, "predict", "--output")
        except ValueError as err:
            outcome.append(str(err))

    waiting = threading.Thread(target=claim)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not (tmp_path / MARKER).exists()  # it waits for the lock
    (tmp_path / MARKER).write_text(f"{RUNNING[0]}\npredict\n")  # the other's claim, done
    os.close(holder)
    waiting.join(10)
    assert len(outcome) == 1 and "another `reinseg predict` (1@" in outcome[0] and "is writing it" in outcome[0]
    assert (tmp_path / MARKER).read_text() == f"{RUNNING[0]}\npredict\n"


def test_a_predicts_marker_lists_the_files_it_owes_and_goes_once_none_is_left(tmp_path, ended_writer):
    """A rerun on some of an interrupted predict's images takes its marker over and, when done,
    keeps it listing the interrupted run's other files: those may be missing, or an earlier
    model's beside this run's (before, the marker went and the mix was silent)."""
    first = ["a_labelTrainIds.png", "a_overlay.png", "b_labelTrainIds.png", "b_overlay.png"]
    path = claim_folder(tmp_path, "predict", "--output", owes=first)
    assert read_marker(tmp_path).owed == tuple(first)
    assert release_folder(tmp_path, first) == () and not path.exists()  # all written

    path.write_text(f"{ended_writer}\npredict\n" + json.dumps(first) + "\n")  # killed midway
    claim_folder(tmp_path, "predict", "--output", owes=["b_labelTrainIds.png", "b_overlay.png"])
    assert read_marker(tmp_path).owed == ("b_labelTrainIds.png", "b_overlay.png", *first[:2])
    assert release_folder(tmp_path, ["b_labelTrainIds.png", "b_overlay.png"]) == tuple(first[:2])
    marker = read_marker(tmp_path)
    assert (marker.writer, marker.command, marker.owed) == (writer_mark(), "predict", tuple(first[:2]))
    with pytest.raises(ValueError, match=r"was interrupted, and 2 file\(s\) \(a_labelTrainIds.png, a_overlay.png\)"):
        check_finished(tmp_path)
    claim_folder(tmp_path, "predict", "--output", owes=first[:2])  # this process's own leftover, taken over
    assert release_folder(tmp_path, first[:2]) == () and not path.exists()


def test_an_unreadable_owed_list_carries_nothing(tmp_path, ended_writer):
    """A list cut short or not a list of names (markers are written whole: a hand edit) is read
    as owing nothing; the marker still marks the folder."""
    for listed in ('["a_labelTrainIds.png", "a_ov', '{"a": 1}', "[1, 2]", '"a_overlay.png"'):
        (tmp_path / MARKER).write_text(f"{ended_writer}\npredict\n{listed}\n")
        assert read_marker(tmp_path).owed == ()
        with pytest.raises(ValueError, match="was interrupted: run it again to finish them"):
            check_finished(tmp_path)
        claim_folder(tmp_path, "predict", "--output", owes=["b_overlay.png"])
        assert read_marker(tmp_path).owed == ("b_overlay.png",)
        assert release_folder(tmp_path, ["b_overlay.png"]) == ()


def test_names_with_line_breaks_and_other_characters_are_listed_whole(tmp_path):
    # The last: a name holding a byte that is not UTF-8, as Python decodes it.
    names = ["a\nb_overlay.png", '\u00e9t\u00e9 "x"_overlay.png', "\udcff_overlay.png"]
    claim_folder(tmp_path, "predict", "--output", owes=names)
    assert len((tmp_path / MARKER).read_text().splitlines()) == 3
    assert read_marker(tmp_path).owed == tuple(names)


def test_a_takeover_stopped_midway_leaves_the_interrupted_runs_marker_whole(tmp_path, ended_writer, monkeypatch):
    """The taken-over marker is replaced by a whole one in one rename: before, it was deleted and
    then made again, and a stop in between left the folder unmarked, its owed files forgotten."""
    import reinseg.checkpoints as checkpoints

    old = f"{ended_writer}\npredict\n" + json.dumps(["a_overlay.png"]) + "\n"
    (tmp_path / MARKER).write_text(old)

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        claim_folder(tmp_path, "predict", "--output", owes=["b_overlay.png"])
    assert [p.name for p in tmp_path.iterdir()] == [MARKER] and (tmp_path / MARKER).read_text() == old
    monkeypatch.undo()
    claim_folder(tmp_path, "predict", "--output", owes=["b_overlay.png"])
    assert read_marker(tmp_path).owed == ("b_overlay.png", "a_overlay.png")
