"""Machine-specific speed-ups, all in one place, and one switch that turns them off.

Everything here changes how fast (or in how much memory) a result is computed, never what it
means: with the speed-ups off, the library runs plain PyTorch, numpy and pandas, and its tables
equal those computed with them on, up to the float32 rounding each section states
(``tests/test_speedups.py`` checks every one against its plain computation). Turn them off to
rule them out when a result looks wrong, or on a machine where one misbehaves:

- ``TV_LENS_SPEEDUPS=0`` in the environment (also ``false``, ``off``, ``no``): off for the whole
  process and for the processes it starts (a zoo's workers);
- ``with speedups.disabled():`` off for the block (it sets that variable, so a zoo's worker
  processes started inside the block inherit it; the threads ``analyze`` runs layers in see it
  too; a Ray cluster's workers do not, set the variable in their environment instead).

The speed-ups (measured on an AMD EPYC Zen 5 with AVX-512, two cores, on a TinyLlama-sized
Gaussian pair; ``benchmarks/README.md`` has the runs):

**oneDNN matrix products** (:func:`mm`). torch's CPU BLAS, MKL, runs its AVX2 kernels on CPUs
that are not Intel's, so a float32 ``Aᵀ B`` at 5632 × 2048 runs at 106 GFLOP/s on one thread;
oneDNN's AVX-512 kernels (``torch.ops.mkldnn._linear_pointwise``) run it at 193. The large
float32 products of exact mode (the Grams of :func:`tv_lens.linalg.gram`) go through them:
an exact layer took 9.8 instead of 12.5 s on one thread. Same float32 accumulation, another
summation order: results differ from ``a @ b`` by float32 rounding (~1e-7 relative). Used on
CPUs with AVX-512 only, and never for float64, autograd or batched operands.

**bfloat16 sketches** (:func:`sketch_dtype`). ``--fast``'s randomized range finder
(:func:`tv_lens.linalg.randomized_svd`) multiplies in bfloat16 where that is fast (CPUs with
AVX512-BF16, GPUs): a 5632 × 2048 pass takes 3 instead of 17 ms. The rounded sketch only tilts
the subspace found (by ~1e-3); the singular triplets are then computed from the weight itself in
float32, so their error is second order. Off: float32 sketches everywhere.

**Threads shared out between workers** (:func:`split_threads`). ``analyze`` runs two layers at
once in threads (:mod:`tv_lens.workers`); each gets its share of torch's CPU threads and of
every BLAS thread pool loaded in the process (numpy's and scipy's OpenBLAS, found and set
through ``threadpoolctl``). Without that an OpenBLAS call keeps its idle threads spinning on the
core the other layer needs: an exact layer took 6.35 instead of 6.7 s with two workers. Off:
every worker runs with the process's full thread counts (oversubscribed, same results up to the
rounding of another BLAS split).

**Huge pages** (:func:`empty`). Every layer reads and converts a few hundred megabytes into
fresh buffers, and the first touch of a fresh buffer costs a page fault per 4 KiB page:
converting a 5632 × 2048 bf16 weight to float32 takes 21 ms into fresh memory and 2 ms into
memory touched before. Buffers of ``HUGE_FROM`` bytes or more are marked for transparent huge
pages (2 MiB, ``madvise(MADV_HUGEPAGE)``) where Linux offers them on request, which takes that
conversion to 4 ms. Off: plain ``torch.empty``. The values are the same either way.

**Freed memory handed back** (:func:`release_freed_memory`). Streaming analysis allocates and
frees the same few hundred megabytes for every layer; glibc keeps the many 1–32 MB blocks among
them on its heap, so the resident set grew layer after layer (by 0.3 GB over 22 TinyLlama
layers; an embedding read on top of that crossed 2 GB) although nothing was held.
``malloc_trim(0)`` between layers hands the free pages back (a few milliseconds per call,
nothing per allocation; lowering glibc's mmap threshold instead made the analysis ~20% slower).
Off: nothing is handed back (more memory, same results).

**pyarrow's CSV writer** (:func:`write_csv`). A 1.1B pair's neuron table has 370 000 rows, a
zoo's eight times that; ``DataFrame.to_csv`` formats every float in Python and takes 10 s for
one such table (a tenth of a ``--fast`` analysis); pyarrow's C++ writer is about 10× faster.
It is used only where it writes what pandas would read back identically (dtypes included: see
:func:`write_csv`). Off: ``to_csv``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd  # (imported where a table is written: the kernels do not need it)

#: the environment variable that turns every speed-up off (``0``, ``false``, ``off``, ``no``)
ENV = "TV_LENS_SPEEDUPS"
_OFF = ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether the speed-ups are on (read from :data:`ENV` at every call)."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


@contextmanager
def disabled() -> Iterator[None]:
    """Every speed-up off inside the block (:data:`ENV` set to ``0``, restored after)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


# --- oneDNN matrix products -----------------------------------------------------------------

_ONEDNN: bool | None = None  # (decided on first use)


def _onednn_matmul() -> bool:
    """Whether this CPU has AVX-512 and torch oneDNN's ``_linear_pointwise`` (see the module
    docstring)."""
    global _ONEDNN
    if _ONEDNN is None:
        supported = getattr(torch.cpu, "_is_avx512_supported", None)
        ops = getattr(torch.ops, "mkldnn", None)
        _ONEDNN = bool(torch.backends.mkldnn.is_available() and supported is not None
                       and supported() and hasattr(ops, "_linear_pointwise"))
    return _ONEDNN


def mm(a: Float[Tensor, "p k"], b: Float[Tensor, "k q"]) -> Float[Tensor, "p q"]:
    """``a @ b``; a float32 CPU product runs in oneDNN's kernels where they are the fast ones
    (the same float32 accumulation in another summation order). oneDNN takes ``b`` as it is only
    when ``b`` or ``bᵀ`` is contiguous — any other layout (a column slice) it re-lays out element
    by element, ~2000× slower — so such a ``b`` is copied first."""
    if not (a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" == b.device.type
            and a.dim() == b.dim() == 2 and a.numel() and b.numel()
            and not (a.requires_grad or b.requires_grad) and enabled() and _onednn_matmul()):
        return a @ b
    if b.shape[1] < 256 and not a.is_contiguous():  # skinny product of a transposed matrix:
        return a @ b  # MKL's is faster (5632 × 2048 times 42 columns: 17 against 30 ms)
    if not (b.is_contiguous() or b.T.is_contiguous()):
        b = b.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")


# --- bfloat16 sketches ----------------------------------------------------------------------

def sketch_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a randomized range finder multiplies in: bfloat16 where its products are fast
    (a GPU; a CPU with AVX512-BF16, where they run 4–6× faster than float32), float32 elsewhere
    (on an AVX2-only CPU bfloat16 products are emulated and slower) and with speed-ups off."""
    if not enabled():
        return torch.float32
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else torch.float32


# --- threads shared out between workers -----------------------------------------------------

def blas_thread_pools() -> list:
    """``threadpoolctl`` controllers of the BLAS libraries loaded in this process (numpy and
    scipy each bundle an OpenBLAS; scipy's runs exact mode's tridiagonal reductions, so it is
    loaded first), each with ``num_threads`` and ``set_num_threads``."""
    from threadpoolctl import ThreadpoolController

    try:
        import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS if it is not yet)
    except ImportError:
        pass
    return ThreadpoolController().select(user_api="blas").lib_controllers


@contextmanager
def split_threads(workers: int) -> Iterator[None]:
    """torch's CPU threads, and every BLAS pool's, shared out between ``workers`` (at least one
    each) for the block and restored after it, also on error; with speed-ups off (or one
    worker) nothing is changed."""
    if workers <= 1 or not enabled():
        yield
        return
    total = torch.get_num_threads()
    pools = [(pool, pool.num_threads) for pool in blas_thread_pools()]
    torch.set_num_threads(max(1, total // workers))
    for pool, before in pools:
        pool.set_num_threads(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(total)
        for pool, before in pools:
            pool.set_num_threads(before)


# --- huge pages and freed memory --------------------------------------------------------------

#: buffers from this size on are put on huge pages (:func:`empty`)
HUGE_FROM = 4 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` where transparent huge pages are offered on request (Linux with THP
    ``madvise`` or ``always``; under ``always`` the kernel uses them anyway), else ``None``."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
    except OSError:
        return None
    libc = _libc()
    madvise = getattr(libc, "madvise", None) if libc is not None else None
    if madvise is not None:
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, untouched, with the whole 2 MiB pages
    inside it marked for transparent huge pages when it is at least ``HUGE_FROM`` bytes (a hint:
    where the kernel declines, it is an ordinary buffer)."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if nbytes >= HUGE_FROM and enabled() else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        stop = (out.data_ptr() + nbytes) // _HUGE * _HUGE
        if stop > start:
            madvise(start, stop - start, _MADV_HUGEPAGE)
    return out


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl)."""
    libc = _libc()
    return getattr(libc, "malloc_trim", None) if libc is not None else None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS (glibc); ``True`` where that was done (never with
    speed-ups off)."""
    trim = _malloc_trim() if enabled() else None
    if trim is None:
        return False
    trim(0)
    return True


# --- pyarrow's CSV writer ---------------------------------------------------------------------

#: Fewer rows than this: ``to_csv`` (its cost does not matter, its output is the reference).
ARROW_FROM_ROWS = 50_000
_NEEDS_QUOTES = (",", '"', "\n", "\r")


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """``table.to_csv(path, index=False)``, through pyarrow for large tables where it writes the
    values pandas would: floats in their shortest round-trip form (``4.2e-05`` may read
    ``0.000042``; the same double either way), integers, strings unquoted, missing values empty.
    Columns the two would write differently are formatted first the way pandas does, so
    ``pd.read_csv`` gives back the same frame (dtypes included): float columns holding whole
    numbers only (pyarrow would write ``4``, which reads back as an integer) and booleans.
    Anything else (other dtypes, a string that needs quoting, no pyarrow) goes through
    ``to_csv``."""
    large = len(table) >= ARROW_FROM_ROWS and enabled()
    arrow_ready = _arrow_columns(table) if large else None
    if arrow_ready is None or not _write_arrow(arrow_ready, Path(path)):
        table.to_csv(path, index=False)


def _arrow_columns(table: pd.DataFrame) -> pd.DataFrame | None:
    """``table`` with the columns pyarrow would write unlike pandas pre-formatted as text, or
    ``None`` when it holds anything this writer does not handle."""
    import pandas as pd

    if isinstance(table.columns, pd.MultiIndex):
        return None  # pandas writes one header line per level
    names = [str(c) for c in table.columns]
    if any(ch in name for name in names for ch in _NEEDS_QUOTES) or len(set(names)) < len(names):
        return None
    out = {}
    for name, col in table.items():
        if pd.api.types.is_bool_dtype(col) and not col.isna().any():
            out[str(name)] = np.where(col.to_numpy(), "True", "False")
        elif pd.api.types.is_float_dtype(col) and col.dtype == np.float64:
            values = col.to_numpy()
            finite = values[np.isfinite(values)]
            whole = finite.size == 0 or bool((finite == np.round(finite)).all())
            out[str(name)] = _pandas_floats(values) if whole else values
        elif pd.api.types.is_integer_dtype(col) or pd.api.types.infer_dtype(
                col, skipna=True) in ("string", "empty"):
            out[str(name)] = col
        else:
            return None
    return pd.DataFrame(out)


def _pandas_floats(values: np.ndarray) -> np.ndarray:
    """Float values as ``to_csv`` writes them: ``repr`` (``4.0``, ``inf``), NaN empty."""
    return np.array(["" if v != v else repr(float(v)) for v in values], dtype=object)


def _write_arrow(table: pd.DataFrame, path: Path) -> bool:
    """Write ``table`` with pyarrow; ``False`` (nothing written) where it cannot."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pa_csv
    except ImportError:
        return False
    try:
        data = pa.Table.from_pandas(table, preserve_index=False)
        with pa.OSFile(str(path), "wb") as sink:
            sink.write((",".join(table.columns) + "\n").encode())
            pa_csv.write_csv(data, sink, pa_csv.WriteOptions(include_header=False,
                                                             quoting_style="none"))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False  # e.g. a string holding a comma: quoting it is left to pandas
    return True
