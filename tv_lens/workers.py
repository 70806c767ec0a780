"""Layers analysed side by side, in threads of one process.

A layer's analysis alternates between LAPACK/BLAS calls that two CPU threads barely speed up
(tridiagonal reductions, small products, the head nulls' many ``k × k`` GEMMs) and work that
runs on one thread whatever torch is told (reading and converting weights, Python between
kernels). Two layers at once with one torch thread each keep both cores busy: on two cores a
TinyLlama-sized layer takes ~15% less wall time in exact mode and ~35% less with ``--fast``
than one layer with two threads (``benchmarks/bench_scale.py``). torch releases the GIL in its
kernels, so threads suffice, and they share the process's imports and checkpoint headers.
Each worker gets its share of torch's and the BLAS libraries' threads
(:func:`tv_lens.speedups.split_threads`).

Results come back in order, so tables are the same whatever the number of workers, up to
rounding: BLAS splits products differently across thread counts, and where a base's singular
values are nearly equal that rounding can move a cluster (docs/scale-and-lora.md: up to 0.8% in a matrix's
amplification share on a Gaussian base). Memory: each worker holds one layer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from tv_lens.errors import InvalidArgumentError
from tv_lens.speedups import split_threads

T = TypeVar("T")
R = TypeVar("R")


def default_workers(device: torch.device) -> int:
    """2 on a CPU that gives torch at least two threads, else 1 (a GPU runs one layer at a
    time: its kernels are already parallel)."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def check_workers(workers: Any, device: torch.device) -> int:
    """``workers`` checked (``None``: :func:`default_workers`)."""
    if workers is None:
        return default_workers(device)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError(f"workers must be a positive integer (layers analysed at once), "
                                   f"got {workers!r}.")
    return workers


def check_threads(threads: Any) -> int | None:
    """``threads`` (BLAS threads per worker) checked: ``None`` or a positive integer."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InvalidArgumentError(f"threads must be a positive integer (BLAS threads per "
                                   f"worker) or None, got {threads!r}.")
    return threads


@contextmanager
def worker_threads(workers: int, threads: int | None = None) -> Iterator[None]:
    """Each worker's threads for the block, restored after it: ``threads`` for torch and every
    BLAS pool where given, else :func:`~tv_lens.speedups.split_threads`'s even share."""
    if threads is None:
        with split_threads(workers):
            yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                threads: int | None = None) -> Iterator[R]:
    """``fn`` of each item, in the items' order, ``workers`` at a time (threads; ``1``: in this
    thread), each with ``threads`` BLAS threads (:func:`worker_threads`). torch's grad mode is
    per thread, so each call runs under ``torch.no_grad()``. When a call raises (or the caller
    stops iterating), calls not yet started are cancelled and the error is raised once the
    running ones have finished."""
    def call(item: T) -> R:
        with torch.no_grad():
            return fn(item)

    if workers == 1:
        if threads is None:
            yield from map(call, items)
        else:
            with worker_threads(1, threads):
                yield from map(call, items)
        return
    with worker_threads(workers, threads), ThreadPoolExecutor(workers,
                                                              thread_name_prefix="tv_lens") as pool:
        futures = [pool.submit(call, item) for item in items]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
