"""reinseg checkpoints: the trainable weights (Rein + head) with the configuration they belong to.

The frozen VFM weights are not copied: the configuration references them
(``model.backbone.checkpoint`` or ``pretrained``). Files are written atomically (a temporary file
in the same folder, flushed to disk, then renamed over the target), so a killed process never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig, from_dict, to_dict
from .pretrained import state_dict_mismatches
from .safe_load import load_torch_file
from .tuning import strategy_names

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_directory",
    "exchange",
    "remove_stale_temporaries",
    "RunInProgressError",
    "run_lock",
    "refuse_running_run",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_state_dict",
    "load_checkpoint_weights",
    "merge_checkpoint",
    "config_for_checkpoint",
    "vfm_record",
    "check_vfm_weights",
    "segmentor_from_checkpoint",
    "check_same_model",
]

CHECKPOINT_FORMAT = "reinseg-checkpoint-v1"


@functools.cache
def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere read (once) by setting it and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_TMP_MARK = "-partial-"  # temporary files are .<name>.<pid>@<host>-partial-<random>.tmp
# This machine's name as temporary names carry it (no dots: the name's own are parsed around it).
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temporary_prefix(name: str) -> str:
    """The start of a temporary file's or staging folder's name beside ``name``: the writer's
    process and machine tell a killed writer's leftover from a live one's, also in a folder that
    other machines write to (a shared file system, where their processes cannot be seen)."""
    return f".{name}.{writer_mark()}{_TMP_MARK}"


def writer_mark() -> str:
    """``<pid>@<host>``: this process, as temporaries and markers of unfinished outputs name it."""
    return f"{os.getpid()}@{_HOST}"


def writer_is_gone(mark: str) -> bool:
    """Whether the process a :func:`writer_mark` names ran on this machine (or the mark names no
    machine, as earlier releases wrote it) and has ended."""
    pid, _, host = mark.partition("@")
    return pid.isdigit() and host in ("", _HOST) and not _alive(int(pid))


def _left_by_a_killed_writer(temporary: str) -> bool:
    """Whether the temporary named ``temporary`` is a leftover of a killed writer."""
    return writer_is_gone(temporary[: temporary.rindex(_TMP_MARK)].rpartition(".")[2])


def written_through(path: Path) -> Path:
    """Where a write to ``path`` lands: a link's target, as a plain ``open()`` writes it (the link
    stays a link), else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write(path: str | Path, write, sync: bool = True) -> Path:
    """Call ``write(file_object)`` on a temporary file, then rename it to ``path``.

    ``sync`` flushes the file to disk before the rename (for checkpoints and results); files
    that can be regenerated, such as prepared labels, skip it.
    """
    path = written_through(Path(path))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            # Named by the file being written, not by its temporary (a full disk names none).
            raise OSError(err.errno, err.strerror, str(path)) from err
        if isinstance(err, RuntimeError) and "inline_container" in str(err):
            # torch.save's writer reports a failed write as a position mismatch.
            raise OSError(f"could not write {path} (is the disk full?): {str(err).splitlines()[0]}") from err
        raise
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``
    (those whose writing process is gone); returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".*{_TMP_MARK}*.tmp"):
        if _left_by_a_killed_writer(tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def probe_writable_folder(folder: str | Path) -> None:
    """Create ``folder`` and write a file in it (then removed): an OSError naming ``folder`` when
    that fails (a file or a link to nowhere in its place, its permissions, a read-only disk)."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        # Named by the folder, not by the temporary file, which would mean nothing to the user.
        raise OSError(err.errno, f"cannot write there ({err.strerror or err})", str(folder)) from err


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def staging_folder(path: Path) -> Path:
    """A new empty folder beside ``path`` (``.<name>.<pid>@<host>-partial-<random>``) to build
    it in, after removing those that killed writers of ``path`` on this machine left."""
    import shutil

    for stale in path.parent.glob(f".{path.name}.*{_TMP_MARK}*"):
        if stale.is_dir() and _left_by_a_killed_writer(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(path.name), dir=path.parent))


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM held back while the block runs, delivered when it ends: for a few renames
    that must happen all or none (Ctrl-C between two of them would leave half).

    In the main thread the two signals' handlers are swapped for the block with one that notes
    them; the block's end puts the handlers back and raises each noted signal once, in the order
    they came, so that the handler in place then acts (KeyboardInterrupt, a run's own handler, the
    default action). The calling thread's signal mask alone would not hold them: the kernel hands
    a process's signal to any thread not blocking it (PyTorch's worker threads), and Python runs
    the handler in the main thread at once. Off the main thread (where handlers cannot change),
    or where a handler was not installed from Python (``signal.getsignal`` is None: it could not
    be put back), the calling thread's mask is the fallback, which holds only the signals the
    kernel hands to that thread (POSIX; elsewhere nothing is held)."""
    import signal
    import threading

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        with _signals_blocked(held):
            yield
        return
    noted: list[int] = []

    def note(signum, frame) -> None:
        if signum not in noted:
            noted.append(signum)

    try:
        for signum in held:
            signal.signal(signum, note)
        yield
    finally:
        try:
            _put_back(previous)
        finally:
            _raise_each(noted)


def _put_back(handlers: dict) -> None:
    """Each signal's handler put back. ``signal.signal`` first runs the handlers of signals that
    have arrived, which may raise: the others are put back all the same, then the error raised."""
    import signal

    error: BaseException | None = None
    for signum, handler in handlers.items():
        while signal.getsignal(signum) is not handler:
            try:
                signal.signal(signum, handler)
            except BaseException as err:  # a handler's KeyboardInterrupt, SystemExit, ...
                error = error or err
    if error is not None:
        raise error


def _raise_each(signums: list[int]) -> None:
    """Each signal raised in turn, the later ones also when a handler raises for an earlier one
    (as signals that were never held would all have arrived)."""
    import signal

    if signums:
        try:
            signal.raise_signal(signums[0])
        finally:
            _raise_each(signums[1:])


@contextlib.contextmanager
def _signals_blocked(signums):
    """``signums`` blocked in the calling thread while the block runs (POSIX; elsewhere nothing)."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signums))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def moved_beside(source: Path, target: Path) -> Path:
    """``source`` moved to a new temporary file beside ``target`` (copied where they are on two
    file systems), from which a rename replaces ``target`` in one step; an OSError naming
    ``target`` where that cannot be done (a missing folder, a full disk)."""
    import shutil

    try:
        descriptor, beside = tempfile.mkstemp(prefix=_temporary_prefix(target.name), suffix=".tmp", dir=target.parent)
        os.close(descriptor)
        try:
            shutil.move(str(source), beside)
        except BaseException:
            Path(beside).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise OSError(err.errno, f"cannot write {target} ({err.strerror or err})", str(target)) from err
    return Path(beside)


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a fresh temporary folder beside ``path``; when the block ends without an error it
    replaces ``path`` (an older ``path`` is removed), otherwise it is deleted: ``path`` is never
    half written. Staging folders that killed writers left beside ``path`` are removed.

    On Linux the new folder and an older one trade places in one step (:func:`exchange`), so a
    kill at any moment leaves ``path`` whole, old or new. Elsewhere, or on a file system that
    cannot exchange, the old folder steps aside first: a kill between the two renames leaves
    neither at ``path`` (both are in staging folders, which the next write removes)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(path))
    staging = staging_folder(path)
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if not path.exists():
            os.replace(staging, path)
            return
        if exchange(staging, path):
            shutil.rmtree(staging, ignore_errors=True)  # the old folder, now
            return
        # A folder cannot be renamed over a non-empty one: the old one steps aside first, and
        # comes back if the new one cannot take its place.
        old = Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(path.name)}old-", dir=path.parent))
        os.replace(path, old / path.name)
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(old / path.name, path)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# renameat2(2): the working directory as the base of relative paths, and the exchange flag.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the files or folders at ``a`` and ``b`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``). False, with nothing moved, where the system, its C library or the file
    system cannot; an OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.5+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(b))


RUN_LOCK = ".reinseg-run.lock"


class RunInProgressError(RuntimeError):
    """Another process is training into the same output folder."""


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ""
    # writer_mark()'s "<pid>@<host>"; earlier releases wrote "<pid> on <host>".
    pid, _, host = text.replace(" on ", "@", 1).partition("@")
    if pid == str(os.getpid()) and host in ("", _HOST):
        return " (this process)"
    return f" (pid {pid}{f' on {host}' if host else ''})" if pid else ""


# The run locks this process holds: a forked child (a data worker) closes its copies, or the lock
# (which belongs to the open file, shared by the fork) would outlive the run in a lingering worker.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _try_lock(fd: int) -> bool:
    """Take the advisory lock on ``fd`` without waiting; False when another process holds it.
    Where the file system has no locks (some network mounts), the run goes on without one."""
    import errno

    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True
    return True


def _running(folder: Path, lock_file: Path) -> RunInProgressError:
    return RunInProgressError(
        f"train.output_dir {folder}: another reinseg run{_holder(lock_file)} is training into it; "
        "wait for it to end or stop it, or choose another train.output_dir"
    )


def refuse_running_run(folder: str | Path) -> None:
    """Raise :class:`RunInProgressError` if a live process holds ``folder``'s run lock; writes
    nothing (a check before a run's other checks)."""
    lock_file = Path(folder) / RUN_LOCK
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has trained here since locks exist
    try:
        if not _try_lock(fd):
            raise _running(Path(folder), lock_file)
    finally:
        os.close(fd)  # closing releases a lock taken here


@contextlib.contextmanager
def run_lock(folder: str | Path):
    """Hold ``folder``'s run lock (``.reinseg-run.lock``, an advisory ``flock``) for the block:
    two runs never train into one folder. The kernel releases it when the process ends, however
    it ends, so a killed run leaves no stale lock. Raises :class:`RunInProgressError` at once
    when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / RUN_LOCK
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            raise _running(folder, lock_file)
        os.ftruncate(fd, 0)
        os.write(fd, f"{writer_mark()}\n".encode())
        _HELD_LOCKS.add(fd)
        yield lock_file
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def checkpoint_state_dict(segmentor: torch.nn.Module) -> dict[str, Tensor]:
    """The weights a checkpoint stores: everything but the frozen weights of a VFM that come from
    a file or the hub (trainable weights inside it, such as LoRA's, are stored; a randomly
    initialised VFM, as in tests and the demo, cannot be referenced, so it is stored whole)."""
    backbone = segmentor.backbone
    referenced = backbone.freeze_backbone and backbone.weights_source is not None
    trainable = {name for name, param in segmentor.named_parameters() if param.requires_grad}
    return {
        k: v
        for k, v in segmentor.state_dict().items()
        if not (referenced and k.startswith("backbone.vit.") and k not in trainable)
    }


def save_checkpoint(path: str | Path, config: dict[str, Any], state_dict: dict[str, Tensor], **extra: Any) -> Path:
    """Write a checkpoint atomically.

    Args:
        config: the full configuration as a plain dict (at least its ``model`` section).
        state_dict: the trainable weights (:func:`checkpoint_state_dict`).
        **extra: training state (optimizer, schedule, step, ...).
    """
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state_dict, **extra}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a reinseg checkpoint, refusing (with the path) files that are not one."""
    path = Path(path)
    payload = load_torch_file(path, what="reinseg checkpoint", verify=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a reinseg checkpoint (official Rein releases are converted with `reinseg convert-official`)"
        )
    # Training checkpoints name the weights as the LightningModule holds them.
    payload["state_dict"] = {k.removeprefix("segmentor."): v for k, v in payload["state_dict"].items()}
    return payload


def segmentor_from_checkpoint(
    path: str | Path, model_config: ModelConfig | None = None, backbone: str | Path | None = None
):
    """Build the segmentor of a checkpoint and load its weights.

    Args:
        path: the checkpoint.
        model_config: use this model configuration instead of the checkpoint's: it must describe
            the same model (:func:`check_same_model`), else an error names the keys that differ.
        backbone: the VFM weight file, instead of the one the configuration names
            (``model.backbone.checkpoint``: a checkpoint references the frozen VFM, it does not
            hold it).
    Returns:
        ``(segmentor, payload)``.
    Raises:
        FileNotFoundError naming the checkpoint and the VFM weight file it references.
    """
    from .build import build_segmentor

    payload = load_checkpoint(path)
    from_config = model_config is not None and backbone is None  # the VFM file is the caller's config's
    if model_config is None:
        model_config = from_dict(ModelConfig, payload["config"].get("model"), "model")
    else:
        check_same_model(payload["config"].get("model"), to_dict(model_config), f"checkpoint {path}")
    if backbone is not None:  # the file instead of the hub too: offline use is what it is for
        model_config = replace(
            model_config, backbone=replace(model_config.backbone, checkpoint=str(backbone), pretrained=False)
        )
    weights = model_config.backbone.checkpoint
    if weights and not Path(weights).is_file():
        where = "" if Path(weights).is_absolute() else f" (relative to the current folder, {Path.cwd()})"
        if from_config:
            raise FileNotFoundError(f"the VFM weights {weights}{where} (model.backbone.checkpoint) are not there")
        raise FileNotFoundError(
            f"{path} references the VFM weights {weights}{where} (model.backbone.checkpoint), which are "
            "not there: pass the file (--backbone in the command line)"
        )
    check_planned_model(model_config, payload["state_dict"], str(path))
    segmentor = build_segmentor(model_config)
    check_vfm_weights(payload, segmentor, str(path), weights)
    load_checkpoint_weights(segmentor, payload["state_dict"], source=str(path))
    return segmentor, payload


# DINOv3-7B, the zoo's largest VFM, has 6.7 billion parameters.
MAX_PARAMETERS = 8_000_000_000


def check_planned_model(model_config: ModelConfig, state_dict: dict[str, Tensor], source: str) -> None:
    """Refuse, before any memory is taken, a checkpoint whose configuration describes a model
    larger than the zoo's largest, or trainable weights of other shapes than the file holds (a
    shared checkpoint's configuration asked for two million classes: built, then refused). The
    model is built on the meta device."""
    from .build import plan_segmentor

    planned = plan_segmentor(model_config)
    total = sum(p.numel() for p in planned.parameters())
    if total > MAX_PARAMETERS:
        raise ValueError(f"{source}: its configuration describes a model of {total:,} parameters: refused")
    _check_class_count(planned, dict(planned.named_parameters()), state_dict, source)
    for name, param in planned.named_parameters():
        stored = state_dict.get(name)
        if param.requires_grad and (not isinstance(stored, Tensor) or stored.shape != param.shape):
            found = "nothing" if not isinstance(stored, Tensor) else f"shape {tuple(stored.shape)}"
            raise ValueError(
                f"{source} does not fit its model configuration: {name} should be {tuple(param.shape)}, "
                f"the file holds {found}"
            )


def vfm_record(segmentor: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint records of the VFM weight file it references (``vfm_fingerprint``:
    :func:`~reinseg.pretrained.weights_fingerprint` of them as loaded), for
    :func:`segmentor_from_checkpoint` to refuse other weights; nothing when it stores them."""
    backbone = segmentor.backbone
    fingerprint = getattr(backbone, "weights_fingerprint", None)
    referenced = backbone.freeze_backbone and backbone.weights_source is not None
    return {"vfm_fingerprint": fingerprint} if referenced and fingerprint else {}


def check_vfm_weights(payload: dict, segmentor: torch.nn.Module, name: str, weights: str | None) -> None:
    """Refuse a checkpoint ``payload`` whose recorded VFM fingerprint (:func:`vfm_record`) is not
    that of the weights ``segmentor`` loaded (from ``weights``): Rein and the head trained on other
    frozen weights would score wrong, silently."""
    recorded, loaded = payload.get("vfm_fingerprint"), vfm_record(segmentor).get("vfm_fingerprint")
    if recorded and loaded and recorded != loaded:
        raise ValueError(
            f"{name} was trained on other VFM weights than {weights or 'these'} (model.backbone.checkpoint): "
            f"their fingerprints differ ({recorded} recorded, {loaded} loaded); use the weight file the model "
            "was trained on"
        )


def config_for_checkpoint(config: dict) -> dict:
    """``config`` (a plain dict) as a checkpoint stores it: the VFM weight file it references
    (``model.backbone.checkpoint``) as an absolute path, so that the checkpoint loads from any
    folder (configs name it relative to where the run is started)."""
    backbone = (config.get("model") or {}).get("backbone") or {}
    weights = backbone.get("checkpoint")
    if not weights or Path(weights).is_absolute():
        return config
    # abspath, not resolve: a symbolic link in the path stays one (it may be re-pointed later)
    model = dict(config["model"], backbone=dict(backbone, checkpoint=os.path.abspath(weights)))
    return dict(config, model=model)


def merge_checkpoint(path: str | Path, output: str | Path, backbone: str | Path | None = None) -> Path:
    """Fold a checkpoint's tuning modules into the VFM's weights (the strategy's ``merge``: SoMA,
    LoRA) and write a self-contained checkpoint of the plain model (``model.tuning: full``, every
    weight stored, no VFM file referenced) that computes the same logits at no extra cost.

    ``backbone``: the VFM weight file, instead of the one the checkpoint references. A strategy
    that cannot be merged raises ``NotImplementedError`` naming it.
    """
    from .tuning import get_strategy

    if Path(output).resolve() == Path(path).resolve():
        raise ValueError(f"merge: the output {output} is the checkpoint itself; write the merged model elsewhere")
    remove_stale_temporaries(Path(output).parent)  # a killed merge's (a whole VFM each)
    segmentor, payload = segmentor_from_checkpoint(path, backbone=backbone)
    model = payload["config"]["model"]
    tuning = model.get("tuning", "rein")
    get_strategy(tuning).merge(segmentor.backbone)
    config = dict(payload["config"])
    config["model"] = dict(model, tuning="full", backbone=dict(model["backbone"], checkpoint=None, pretrained=False))
    state = {k: v.detach().clone() for k, v in segmentor.state_dict().items()}
    return save_checkpoint(output, config, state, merged_from=tuning, source=str(path))


def load_checkpoint_weights(segmentor, state_dict: dict[str, Tensor], source: str, names=lambda name: name) -> None:
    """Load the weights of :func:`checkpoint_state_dict` strictly; what does not fit is named (in
    ``names``' convention)."""
    expected = checkpoint_state_dict(segmentor)
    _check_class_count(segmentor, expected, state_dict, source, names)
    problems = state_dict_mismatches(expected, state_dict, names)
    vfm_keys = set(state_dict) ^ set(expected)
    if problems and vfm_keys and all(k.startswith("backbone.vit.") for k in vfm_keys):
        # Only the frozen VFM differs: one side stores it, the other references a weight file.
        if set(state_dict) > set(expected):
            raise ValueError(
                f"{source} holds its VFM's weights (trained on a VFM without a weight file), but the "
                "configuration references one (model.backbone.checkpoint or pretrained): set model.backbone."
                "checkpoint=null model.backbone.pretrained=false"
            )
        raise ValueError(
            f"{source} references its VFM's weight file, but the configuration names none "
            "(model.backbone.checkpoint is null and pretrained false): set model.backbone.checkpoint"
        )
    if problems:
        raise ValueError(f"{source} does not fit the model configuration: " + "; ".join(problems))
    segmentor.load_state_dict(state_dict, strict=False)


def _check_class_count(segmentor, expected: dict, state_dict: dict, source: str, names=lambda name: name) -> None:
    cls_key = "head.cls_embed.weight"
    if cls_key in state_dict and cls_key in expected and state_dict[cls_key].shape != expected[cls_key].shape:
        raise ValueError(
            f"class count mismatch: the config has {segmentor.num_classes} classes but {source}'s "
            f"{names(cls_key)} has {state_dict[cls_key].shape[0] - 1} (+1 no-object)"
        )


def check_same_model(saved: dict | None, current: dict, what: str) -> None:
    """Refuse weights trained for another model configuration, naming the differing keys."""
    if saved is None:
        raise ValueError(f"{what} holds no model configuration")
    ignored = {
        "backbone.checkpoint",
        "backbone.pretrained",
        "backbone.resample",
        "test.mode",
        "test.crop_size",
        "test.stride",
        "test.flip",
        "test.window_batch",
        "test.protocols",
    }
    # Sections that change no weight: the loss, and the options of strategies not in use.
    tuning = current.get("tuning")
    unused = ("loss.", *(f"{name}." for name in strategy_names() if name != tuning))

    def counts(key: str) -> bool:
        if key in ignored or key.startswith(unused):
            return False
        return not key.startswith("options.") or key.startswith(f"options.{tuning}.")

    # Checkpoints of earlier versions lack keys added since: compare with their defaults filled in.
    try:
        saved = to_dict(from_dict(ModelConfig, saved, "model"))
    except ValueError as err:
        raise ValueError(f"{what} holds a model configuration this version cannot read: {err}") from None
    differences = [key for key in _diff_keys(saved, current) if counts(key)]
    if differences:
        shown = ", ".join(f"model.{k}: {_get(saved, k)!r} vs {_get(current, k)!r}" for k in differences[:5])
        raise ValueError(f"{what} belongs to another model configuration ({shown})")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for key in sorted(set(a) | set(b)):
            keys += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
