"""Map a function over many files on several processes, with a progress bar."""

from __future__ import annotations

import os
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
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=chunksize), **bar))
