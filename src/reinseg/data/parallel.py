"""Map a function over many files on several processes, with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

__all__ = ["default_workers", "parallel_map"]


def default_workers(workers: int | None = None) -> int:
    """``workers``, or every core up to 8 when None."""
    if workers is None:
        return max(1, min(8, os.cpu_count() or 1))
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return workers


def parallel_map(fn, items: list, workers: int | None = None, desc: str | None = None, progress: bool = True) -> list:
    """``[fn(item) for item in items]``, in order, on ``workers`` processes (in this one for 1).

    ``fn`` must be picklable: a module-level function or a ``functools.partial`` of one.
    """
    workers = default_workers(workers)
    bar = dict(total=len(items), desc=desc, disable=not progress, unit="file")
    if workers == 1 or len(items) < 2:
        return [fn(item) for item in tqdm(items, **bar)]
    chunksize = max(1, len(items) // (workers * 16))
    # Workers forked from this process on Linux whatever the start method (forkserver is the
    # default from Python 3.14): the parent they watch is this one, not a fork server.
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))
    with pool:
        return list(tqdm(pool.map(fn, items, chunksize=chunksize), **bar))


def _die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when its parent dies, even by SIGKILL (which leaves the
    pool no chance to stop its workers). Linux: the kernel sends SIGTERM (PR_SET_PDEATHSIG);
    elsewhere a daemon thread watches the parent."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0:  # 1: PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
