"""Folders of predictions while a command writes them: the ``.reinseg-incomplete`` marker.

``reinseg eval --save-preds DIR`` and ``reinseg predict ... --output DIR`` put the marker in DIR
when they start and remove it once they have written everything. Its first line names the
writing process (:func:`~reinseg.checkpoints.writer_mark`), its second the command (``eval`` or
``predict``; a marker of one line is an earlier release's evaluation). A marker whose process is
gone is what an interrupted or failed run left: the same command's rerun replaces its outputs.
Until then the folder may hold part of the predictions, or predictions of two models side by
side, and ``reinseg score`` refuses to score anything under it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MARKER", "Marker", "read_marker", "check_unfinished", "claim_folder", "marker_above"]

MARKER = ".reinseg-incomplete"


class Marker:
    """The writer (``<pid>@<host>``) and command a folder's marker names."""

    def __init__(self, path: Path, writer: str, command: str) -> None:
        self.path, self.writer, self.command = path, writer, command

    def is_running(self) -> bool:
        """Whether its process may still write (it runs, or ran on another machine, unseen here);
        this process's own marker (a run it finished or stopped) is not."""
        from .checkpoints import writer_is_gone, writer_mark

        return self.writer != writer_mark() and not writer_is_gone(self.writer)


def read_marker(folder: Path) -> Marker | None:
    """The marker in ``folder``, if it holds one."""
    path = folder / MARKER
    if not path.is_file():
        return None
    lines = path.read_text(errors="replace").splitlines()
    writer = lines[0].strip() if lines else ""
    command = lines[1].strip() if len(lines) > 1 and lines[1].strip() else "eval"
    return Marker(path, writer, command)


def check_unfinished(folder: Path, command: str, option: str) -> Marker | None:
    """Before ``command`` writes into ``folder``: the marker an interrupted run of the same command
    left there (its outputs to replace), or None; a ValueError naming ``option`` when another
    process is writing the folder, or when an interrupted run of another command left it."""
    marker = read_marker(folder)
    if marker is None:
        return None
    if marker.is_running():
        raise ValueError(
            f"{option} {folder}: another `reinseg {marker.command}` ({marker.writer}) is writing it, or ran on "
            f"another machine and stopped: choose a new folder, or empty it once that command has ended"
        )
    if marker.command != command:
        raise ValueError(
            f"{option} {folder}: it holds the unfinished outputs of an interrupted `reinseg {marker.command}` "
            f"({marker.path}): choose a new folder, or finish that command there first"
        )
    return marker


def claim_folder(folder: Path, command: str) -> Path:
    """Mark ``folder`` (which exists) as written by this process running ``command``: the marker's path."""
    from .checkpoints import writer_mark

    path = folder / MARKER
    path.write_text(f"{writer_mark()}\n{command}\n")
    return path


def marker_above(path: Path) -> Marker | None:
    """A marker in ``path`` or a folder above it: predictions there are not all written."""
    resolved = path.resolve()
    for folder in (resolved, *resolved.parents):
        marker = read_marker(folder)
        if marker is not None:
            return marker
    return None
