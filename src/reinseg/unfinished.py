"""Folders of predictions while a command writes them: the ``.reinseg-incomplete`` marker.

``reinseg eval --save-preds DIR`` and ``reinseg predict ... --output DIR`` put the marker in DIR
when they start and remove it once they have written everything. Its first line names the
writing process (:func:`~reinseg.checkpoints.writer_mark`), its second the command (``eval`` or
``predict``; a marker of one line is an earlier release's evaluation). A predict's marker then
lists the files it owes, as one JSON list on its third line: its own images' files and those an
interrupted predict it took over still owed. A marker whose process is gone is what an
interrupted or failed run left: a rerun of the same command into the folder replaces its
outputs, and a predict removes the marker only once no owed file is left (a rerun on some of the
images keeps it, listing the others). Until then the folder may hold part of the predictions, or
predictions of two models side by side, and ``reinseg score`` refuses to score them: those in the
folder, and for an evaluation (which writes a tree, a folder per domain) those in the folders
below it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "MARKER",
    "Marker",
    "read_marker",
    "check_finished",
    "check_folder",
    "claim_folder",
    "release_folder",
    "describe_files",
    "marker_above",
    "markers_below",
]

MARKER = ".reinseg-incomplete"

# The commands whose marker covers the folders below theirs: an evaluation writes a tree.
_TREE_WRITERS = ("eval",)


class Marker:
    """The writer (``<pid>@<host>``; empty in an earlier release's marker cut by a kill), command and
    owed files (names in its folder; empty where unknown: an evaluation's, an earlier release's)
    a folder's marker names."""

    def __init__(self, path: Path, writer: str, command: str, owed: tuple[str, ...] = ()) -> None:
        self.path, self.writer, self.command, self.owed = path, writer, command, owed

    def is_running(self) -> bool:
        """Whether its process may still write (it runs, or ran on another machine, unseen here);
        not this process's own marker (a run it finished or stopped), nor an empty one."""
        from .checkpoints import writer_is_gone, writer_mark

        return bool(self.writer) and self.writer != writer_mark() and not writer_is_gone(self.writer)

    def covers_below(self) -> bool:
        return self.command in _TREE_WRITERS

    def describe(self) -> str:
        writer = f" ({self.writer})" if self.writer else ""
        return f"`reinseg {self.command}`{writer} into {self.path.parent}"

    def describe_owed(self) -> str:
        """The owed files in words (:func:`describe_files`)."""
        return describe_files(self.owed)


def describe_files(names: Sequence[str]) -> str:
    """``names`` in words, the first few named (``"2 file(s) (a.png, b.png)"``), or "" for none."""
    if not names:
        return ""
    named = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} file(s) ({named})"


def _marker_text(writer: str, command: str, owed: Iterable[str]) -> str:
    # One JSON list: a file name may hold a line break, and a list cut short fails to parse.
    owed = list(owed)
    return f"{writer}\n{command}\n" + (f"{json.dumps(owed)}\n" if owed else "")


def read_marker(folder: Path) -> Marker | None:
    """The marker in ``folder``, if it holds one; a ValueError naming it if it cannot be read."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise ValueError(f"{path}: the marker of unfinished predictions cannot be read ({err.strerror})") from None
    writer = lines[0].strip() if lines else ""
    command = lines[1].strip() if len(lines) > 1 and lines[1].strip() else "eval"
    owed: tuple[str, ...] = ()
    if len(lines) > 2 and lines[2].strip():
        try:
            listed = json.loads(lines[2])
        except json.JSONDecodeError:  # edited by hand (markers are written whole): nothing known owed
            listed = []
        if isinstance(listed, list) and all(isinstance(name, str) for name in listed):
            owed = tuple(listed)
    return Marker(path, writer, command, owed)


def _refuse_to_write(folder: Path, command: str, option: str) -> Marker | None:
    """The marker an interrupted run of ``command`` left in ``folder`` (to replace), or None;
    a ValueError naming ``option`` where ``folder`` may not be written: a running command marked
    it, an interrupted run of another command did, or an evaluation's marker above covers it."""
    marker = read_marker(folder)
    if marker is not None:
        if marker.is_running():
            raise ValueError(
                f"{option} {folder}: another {marker.describe()} is writing it, or ran on another machine and "
                f"stopped: choose a new folder, or remove {marker.path} once that command has ended"
            )
        if marker.command != command:
            raise ValueError(
                f"{option} {folder}: it holds the unfinished outputs of an interrupted {marker.describe()} "
                f"({marker.path}): choose a new folder, or run that command there again first"
            )
    above = _covering_marker(folder)
    if above is not None:
        state = "running" if above.is_running() else "interrupted"
        raise ValueError(
            f"{option} {folder}: it is inside the outputs of a {state} {above.describe()} ({above.path}), "
            f"which would mix with these or delete them: choose a folder outside it"
        )
    return marker


def check_finished(path: Path) -> None:
    """A ValueError naming the marker where the predictions in ``path`` are not all written
    (:func:`marker_above`): they may be partial, or two models' side by side."""
    marker = marker_above(path)
    if marker is not None:
        if marker.is_running():
            state = "is running"
        elif marker.owed:
            state = (
                f"was interrupted, and {marker.describe_owed()} it owes are missing or an earlier "
                "model's: predict those images there again"
            )
        else:
            state = "was interrupted: run it again to finish them"
        raise ValueError(
            f"the predictions in {path} are unfinished: the {marker.describe()} {state}; they may be "
            f"partial or mixed with earlier ones (remove {marker.path} to score them anyway)"
        )


def check_folder(folder: Path, command: str, option: str) -> bool:
    """Whether ``command`` may write into ``folder`` now (see :func:`claim_folder`; nothing is
    written): True where it would replace an interrupted run's outputs, False for a folder
    without a marker; a ValueError where it may not."""
    return _refuse_to_write(folder, command, option) is not None


def claim_folder(folder: Path, command: str, option: str, owes: Iterable[str] = ()) -> Path:
    """Mark ``folder`` (created if missing) as written by this process running ``command``; the
    marker's path. ``owes``: the files (names in ``folder``) this run writes; the marker lists
    them, then those an interrupted run's marker it replaces still owed (and listed). The folder
    is locked while its marker is read and written (two commands claiming it at once: the second
    finds the first's marker), and the marker is written whole in one rename (a kill leaves the
    old one or the new one). Anything else :func:`check_folder` refuses raises its ValueError."""
    from .checkpoints import atomic_write_bytes, writer_mark

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MARKER
    owes = list(owes)
    with _locked(folder):
        interrupted = _refuse_to_write(folder, command, option)
        carried = sorted(set(interrupted.owed) - set(owes)) if interrupted is not None else []
        atomic_write_bytes(path, _marker_text(writer_mark(), command, owes + carried).encode())
    return path


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive ``flock`` on ``folder`` while the block runs, released however the process
    ends; none where the system or the file system has no such lock (some network mounts)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here: claims are then as exclusive as reading and writing apart allow
        yield
    finally:
        os.close(descriptor)


def release_folder(folder: Path, written: Iterable[str] = ()) -> tuple[str, ...]:
    """Remove ``folder``'s marker if it is this process's, once it owes no file but those in
    ``written`` (names in ``folder``, as :func:`claim_folder` took them); else the marker is
    rewritten to list the files still owed (those of an interrupted run this one took over),
    which are returned."""
    from .checkpoints import atomic_write_bytes, writer_mark

    marker = read_marker(folder)
    if marker is None or marker.writer != writer_mark():
        return ()
    done = set(written)
    owed = tuple(name for name in marker.owed if name not in done)
    if owed:
        atomic_write_bytes(marker.path, _marker_text(marker.writer, marker.command, owed).encode())
    else:
        marker.path.unlink(missing_ok=True)
    return owed


def marker_above(path: Path) -> Marker | None:
    """The marker that says the predictions in ``path`` are not all written: one in ``path``
    itself, or an evaluation's in a folder above it."""
    resolved = path.resolve()
    return read_marker(resolved) or _covering_marker(resolved)


def _covering_marker(folder: Path) -> Marker | None:
    """An evaluation's marker in a folder above ``folder`` (a predict's covers its own folder only)."""
    for parent in folder.resolve().parents:
        marker = read_marker(parent)
        if marker is not None and marker.covers_below():
            return marker
    return None


def markers_below(folder: Path) -> list[Path]:
    """The markers in the folders below ``folder`` (not in ``folder`` itself)."""
    return sorted(path for path in folder.rglob(MARKER) if path.parent != folder)
