"""One way to map a function over many jobs in worker processes, with a progress bar."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

MIN_JOBS_PER_WORKER = 100  # below this a pool's start-up costs more than it saves


def parallel_map(func: Callable[[Any], Any], jobs: Sequence[Any], *, workers: int | None = None,
                 progress: bool = False, desc: str = "", unit: str = "it", chunksize: int = 16) -> list[Any]:
    """`func` over `jobs` in order, in worker processes (in this one when too few jobs pay for a pool).

    Workers are spawned, not forked: a forked child of a process that has started torch or BLAS threads can hang.
    """
    n_workers = min(workers or os.cpu_count() or 1, len(jobs) // MIN_JOBS_PER_WORKER)
    results = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress))
        if n_workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(n_workers))
            mapped = pool.imap(func, jobs, chunksize=chunksize)
        else:
            mapped = map(func, jobs)
        for result in mapped:
            results.append(result)
            bar.update()
    return results
