"""Layers analysed side by side, in threads of one process.

A layer's analysis alternates between LAPACK/BLAS calls that two CPU threads barely speed up
(tridiagonal reductions, small products, the head nulls' many ``k × k`` GEMMs) and work that
runs on one thread whatever torch is told (reading and converting weights, Python between
kernels). Two layers at once with one torch thread each keep both cores busy: on two cores a
TinyLlama-sized layer takes ~15% less wall time in exact mode and ~35% less with ``--fast``
than one layer with two threads (``benchmarks/bench_scale.py``). torch releases the GIL in its
kernels, so threads suffice, and they share the process's imports and checkpoint headers.

Results come back in order, so tables are the same whatever the number of workers, up to
rounding: BLAS splits products differently across thread counts, and where a base's singular
values are nearly equal that rounding can move a cluster (README, scale: up to 0.8% in a matrix's
amplification share on a Gaussian base). Memory: each worker holds one layer.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import product
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from tv_lens.errors import InvalidArgumentError

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


def openblas_thread_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """``(get, set)`` thread-count functions of each OpenBLAS loaded in this process (numpy and
    scipy each bundle one; scipy's runs the tridiagonal reductions of exact mode), found through
    ``/proc/self/maps`` as threadpoolctl does; empty where there is none or no such file."""
    try:
        import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS if it is not yet)
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()
                            and ".so" in line})
    except OSError:
        return []
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        for prefix, suffix in product(("openblas", "scipy_openblas"), ("", "64_")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                put.argtypes = (ctypes.c_int,)
                controls.append((get, put))
                break
    return controls


@contextmanager
def split_threads(workers: int) -> Iterator[None]:
    """torch's CPU threads, and OpenBLAS's, shared out between ``workers`` (at least one each)
    for the block, restored after it, also on error. (An OpenBLAS call with more threads than
    its share keeps them spinning after it returns, on the cores the other workers need: exact
    mode's layers took 6.4 instead of 6.7 s with two workers once OpenBLAS had one thread each.)"""
    total = torch.get_num_threads()
    blas = [(get, put, get()) for get, put in openblas_thread_controls()] if workers > 1 else []
    if workers > 1:
        torch.set_num_threads(max(1, total // workers))
        for _, put, before in blas:
            put(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(total)
        for _, put, before in blas:
            put(before)


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
    BLAS pool where given, else :func:`split_threads`'s even share."""
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
