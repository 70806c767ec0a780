"""tv_lens.speedups: each speed-up against the plain computation it replaces, and the switch
(``TV_LENS_SPEEDUPS=0``, ``speedups.disabled()``) that makes the plain path run instead."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import runs_once_in
from oracles import rand
from tv_lens import linalg, speedups


@pytest.fixture
def threads():
    """Sets torch's CPU threads for one test and restores them after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _refuse(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran with the speed-ups off")
    return refuse


# ------------------------------------------------------------------------------------ the switch

@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False),
                                       (" False ", False), ("no", False), ("yes", True)])
def test_environment_variable(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(speedups.ENV, raising=False)
    else:
        monkeypatch.setenv(speedups.ENV, value)
    assert speedups.enabled() is on


@pytest.mark.parametrize("before", [None, "1", "0"])
def test_disabled_turns_off_and_restores(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(speedups.ENV, raising=False)
    else:
        monkeypatch.setenv(speedups.ENV, before)
    with pytest.raises(RuntimeError), speedups.disabled():
        assert not speedups.enabled()
        with speedups.disabled():
            assert not speedups.enabled()
        assert not speedups.enabled()  # the inner block restored "off", not the default
        raise RuntimeError
    assert os.environ.get(speedups.ENV) == before


# ------------------------------------------------------------------------ oneDNN matrix products

@runs_once_in(3)
def test_mm_in_every_layout_against_float64(monkeypatch):
    """``mm`` (oneDNN on AVX-512 CPUs, else ``@``) on float32 operands of every layout the
    analysis passes — contiguous, transposed, column slices with an offset (which ``mm`` copies
    first: oneDNN would re-lay them out element by element) — against a float64 product (1e-5
    relative: float32 accumulation in another order); everything it does not take (float64,
    autograd, batches) is exactly ``@``."""
    A = rand(700, 300, seed=31).float()
    B = rand(700, 260, seed=32).float()
    cases = {"contiguous": (A.T.contiguous(), B), "transposed": (A.T, B),
             "column slices": (A[:, 40:90].T, B[:, 17:]), "offset rows": (A[5:].T, B[5:]),
             "skinny, transposed": (A.T, B[:, :20])}
    for name, (a, b) in cases.items():
        want = a.double() @ b.double()
        got = speedups.mm(a, b)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-5, name
        plain = a @ b
        assert ((got - plain).abs().max() / plain.abs().max()) < 1e-5, name
    a64, b64 = A.double().T, B.double()
    assert torch.equal(speedups.mm(a64, b64), a64 @ b64)
    grad = A.T.clone().requires_grad_()
    assert speedups.mm(grad, B).requires_grad
    monkeypatch.setattr(speedups, "_ONEDNN", False)  # a CPU without AVX-512: plain @
    a, b = cases["column slices"]
    assert torch.equal(speedups.mm(a, b), a @ b)


@runs_once_in(3)
def test_mm_switched_off_is_the_plain_product(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[0].shape)
        return onednn(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    monkeypatch.setattr(speedups, "_ONEDNN", True)  # the oneDNN path, whatever this CPU is
    a, b = rand(300, 400, seed=1).float(), rand(400, 300, seed=2).float()
    fast = speedups.mm(a, b)
    assert calls == [a.shape]
    assert ((fast - a @ b).abs().max() / (a @ b).abs().max()) < 1e-5
    with speedups.disabled():
        plain = speedups.mm(a, b)
    assert calls == [a.shape] and torch.equal(plain, a @ b)


# ----------------------------------------------------------------------------- bfloat16 sketches

@runs_once_in(3)
def test_sketch_dtype_and_the_plain_range_finder():
    """On: bfloat16 on GPUs and AVX512-BF16 CPUs. Off: float32 everywhere, so ``--fast``'s range
    finder is bit-equal to one asked for float32; on, its top singular values are within 2e-3 of
    that (``tests/test_linalg.py`` bounds both against an exact SVD)."""
    assert speedups.sketch_dtype("cuda") == torch.bfloat16
    assert speedups.sketch_dtype("cpu") in (torch.bfloat16, torch.float32)
    W = rand(400, 200, seed=3).float() * torch.linspace(1.0, 0.01, 200)
    fast = linalg.randomized_svd(W, 16)
    with speedups.disabled():
        assert speedups.sketch_dtype("cuda") == speedups.sketch_dtype("cpu") == torch.float32
        off = linalg.randomized_svd(W, 16)
        plain = linalg.randomized_svd(W, 16, sketch=torch.float32)
    assert torch.equal(off.S, plain.S) and torch.equal(off.V, plain.V)
    assert ((fast.S[:8] - plain.S[:8]).abs() / plain.S[:8]).max() < 2e-3


# --------------------------------------------------------------- threads shared out, via threadpoolctl

@runs_once_in(3)
def test_split_threads_shares_and_restores(threads):
    threads(2)
    with speedups.split_threads(2):
        assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError), speedups.split_threads(4):
        assert torch.get_num_threads() == 1  # at least one each
        raise RuntimeError
    assert torch.get_num_threads() == 2


@runs_once_in(3)
def test_split_threads_shares_blas_too(threads):
    """numpy's and scipy's OpenBLAS (each bundles its own) get their share inside the block and
    their thread counts back after it, also on error."""
    threads(2)
    pools = speedups.blas_thread_pools()
    assert pools, "numpy and scipy wheels bundle OpenBLAS: threadpoolctl should find it"
    before = [pool.num_threads for pool in pools]
    for pool in pools:
        pool.set_num_threads(4)
    try:
        with pytest.raises(RuntimeError), speedups.split_threads(2):
            assert [pool.get_num_threads() for pool in pools] == [2] * len(pools)
            raise RuntimeError
        assert [pool.get_num_threads() for pool in pools] == [4] * len(pools)
    finally:
        for pool, count in zip(pools, before):
            pool.set_num_threads(count)


@runs_once_in(3)
def test_split_threads_switched_off_changes_nothing(threads, monkeypatch):
    """Off: the workers run with the process's thread counts (threadpoolctl is not even asked)
    and compute the same results as with their shares (up to BLAS rounding: 1e-12 here)."""
    from tv_lens.workers import ordered_map

    threads(2)
    G = [rand(300, 120, seed=s) for s in range(4)]

    def work(A):
        return torch.linalg.eigvalsh(A.T @ A)

    shared = list(ordered_map(work, G, 2))
    monkeypatch.setattr(speedups, "blas_thread_pools", _refuse("threadpoolctl"))
    with speedups.disabled():
        with speedups.split_threads(2):
            assert torch.get_num_threads() == 2
        plain = list(ordered_map(work, G, 2))
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ------------------------------------------------------------------- huge pages and freed memory

def test_large_buffers_ask_for_huge_pages(monkeypatch):
    """``empty``: the whole 2 MiB pages inside a large buffer are advised (and nothing outside
    it), small buffers are left alone, and without THP or with the speed-ups off it is a plain
    ``torch.empty`` (values written into either read back the same)."""
    calls = []
    monkeypatch.setattr(speedups, "_madvise", lambda: lambda addr, size, advice: calls.append(
        (addr, size, advice)))
    big = speedups.empty((3, 5 << 20), torch.float32)
    assert big.shape == (3, 5 << 20) and big.dtype == torch.float32
    ((addr, size, advice),) = calls
    assert advice == 14 and addr % (2 << 20) == 0 and size % (2 << 20) == 0
    start, stop = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert start <= addr and addr + size <= stop and stop - start - size < 2 * (2 << 20)
    values = torch.arange(big.numel(), dtype=torch.float32).view(big.shape)
    assert torch.equal(big.copy_(values), values)
    speedups.empty((1000,), torch.uint8)
    assert len(calls) == 1  # below HUGE_FROM: not advised
    with speedups.disabled():
        plain = speedups.empty((3, 5 << 20), torch.float32)
    assert len(calls) == 1 and torch.equal(plain.copy_(values), values)
    monkeypatch.setattr(speedups, "_madvise", lambda: None)
    assert speedups.empty((5 << 20,), torch.uint8).shape == (5 << 20,)


def test_release_freed_memory_where_glibc_has_malloc_trim(monkeypatch):
    assert speedups.release_freed_memory() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setattr(speedups, "_malloc_trim", _refuse("malloc_trim"))
    with speedups.disabled():
        assert speedups.release_freed_memory() is False


# ------------------------------------------------------------------------ pyarrow's CSV writer

@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(speedups, "ARROW_FROM_ROWS", 4)


def _table(n: int = 64) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    shares = rng.random(n) * 10.0 ** rng.integers(-9, 3, n)
    whole = np.arange(n, dtype=np.float64)  # pyarrow alone would write 3, read back as int64
    whole[::7], whole[1] = np.nan, np.inf
    return pd.DataFrame({
        "layer": np.arange(n) // 8,
        "label": pd.array(["new", "amplified", None, "aligned"] * (n // 4), dtype="string"),
        "share": shares,
        "count": whole,
        "rank": np.arange(n, dtype=np.float64) % 5,
        "expert": pd.array([None, 1] * (n // 2), dtype="Int64"),
        "kept": np.arange(n) % 3 == 0,
        "negative_zero": np.full(n, -0.0),
    })


def test_arrow_path_reads_back_like_to_csv(tmp_path, small_threshold, monkeypatch):
    table = _table()
    table.to_csv(tmp_path / "pandas.csv", index=False)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _refuse("to_csv"))  # must go through pyarrow
    speedups.write_csv(table, tmp_path / "arrow.csv")
    expected, got = pd.read_csv(tmp_path / "pandas.csv"), pd.read_csv(tmp_path / "arrow.csv")
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert got["rank"].dtype == np.float64 and got["kept"].dtype == bool
    header = (tmp_path / "arrow.csv").read_text().splitlines()[0]
    assert header == ",".join(table.columns)


def test_values_that_need_quoting_go_through_to_csv(tmp_path, small_threshold):
    table = _table()
    table.loc[3, "label"] = 'new, "really"'
    speedups.write_csv(table, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == table.to_csv(index=False)


@pytest.mark.parametrize("case", ["small table", "object column", "no pyarrow", "switched off"])
def test_other_tables_go_through_to_csv(tmp_path, monkeypatch, case):
    table = _table()
    if case != "small table":
        monkeypatch.setattr(speedups, "ARROW_FROM_ROWS", 4)
    if case == "object column":
        table["mixed"] = [1, "a"] * (len(table) // 2)
    if case == "no pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow", None)
    if case == "switched off":
        monkeypatch.setattr(speedups, "_write_arrow", _refuse("pyarrow's writer"))
        monkeypatch.setenv(speedups.ENV, "0")
    speedups.write_csv(table, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == table.to_csv(index=False)


# ---------------------------------------------------------------------------- all of them at once

def test_analysis_with_speedups_off_equals_on(llama_dirs, threads):
    """The whole analysis (two workers, so threads are shared out) with every speed-up off gives
    the same tables: labels identical, numbers within 1e-6."""
    from tv_lens import ModelPair, analyze

    threads(2)
    pair = ModelPair.from_pretrained(*llama_dirs)
    on = analyze(pair, progress=False, workers=2)
    with speedups.disabled():
        off = analyze(pair, progress=False, workers=2)
    for name in ("heads", "neurons", "matrices"):
        a, b = getattr(on, name), getattr(off, name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-9)
        for column in a.columns:
            if "label" in column:
                assert a[column].equals(b[column]), (name, column)
