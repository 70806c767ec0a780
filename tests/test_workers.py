"""Layers analysed side by side (tv_lens.workers): same tables as one at a time, results in
order, errors that stop the rest, threads given back, thread-safe reads (the threads' shares:
test_speedups.py)."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch

from tv_lens import ModelPair, analyze
from tv_lens.checkpoints import Checkpoint
from tv_lens.cli import main
from tv_lens.errors import InvalidArgumentError
from tv_lens.workers import check_workers, default_workers, ordered_map

TABLES = ("heads", "neurons", "matrices", "summary")


@pytest.fixture
def threads():
    """Sets torch's CPU threads for one test and restores them after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_workers_give_the_same_tables_in_the_same_order(family_dirs, threads):
    # one torch thread in both runs, so that only the threading of layers differs (BLAS may
    # round differently with another thread count)
    threads(1)
    pair = ModelPair.from_pretrained(*family_dirs[1])
    one = analyze(pair, progress=False, workers=1)
    two = analyze(pair, progress=False, workers=3)
    assert two.info["workers"] == 3 and one.info["workers"] == 1
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name), check_exact=True)
    n_layers = pair.tuning_vector().spec.n_layers
    assert list(two.heads.layer.drop_duplicates()) == list(range(n_layers))
    fast = [analyze(pair, progress=False, fast=True, fast_rank=12, workers=w) for w in (1, 2)]
    pd.testing.assert_frame_equal(fast[0].matrices, fast[1].matrices, check_exact=True)


def test_embeddings_go_first_beside_the_layers(llama_dirs, monkeypatch):
    """With several workers the embeddings (the largest matrices) start first, beside layer 0,
    instead of after every layer on their own; their rows still come last."""
    from tv_lens.analysis import run

    seen = []

    def recording(fn, items, workers, threads=None):
        seen.append((list(items), workers))
        return ordered_map(fn, items, workers, threads)

    monkeypatch.setattr(run, "ordered_map", recording)
    pair = ModelPair.from_pretrained(*llama_dirs)
    two = analyze(pair, progress=False, workers=2)
    one = analyze(pair, progress=False, workers=1)
    n = pair.spec.n_layers
    assert seen == [([None, *range(n)], 2), ([*range(n), None], 1)]
    for result in (one, two):
        assert result.matrices.layer.isna().sum() == 2  # W_E and W_U, after the layers
        assert result.matrices.layer.tail(2).isna().all()


def test_ordered_map_runs_side_by_side_in_order():
    started, grad = [], []
    barrier = threading.Barrier(2, timeout=10)

    def work(i):
        started.append(threading.current_thread().name)
        grad.append(torch.is_grad_enabled())
        if i < 2:
            barrier.wait()  # the first two calls wait for each other: they run at once
        time.sleep(0.01 * (5 - i))  # later items finish first
        return i * i

    assert list(ordered_map(work, range(5), 2)) == [0, 1, 4, 9, 16]
    assert all(name.startswith("tv_lens") for name in started)
    assert grad == [False] * 5  # each thread runs under no_grad (grad mode is per thread)
    assert list(ordered_map(work, [2, 3], 1)) == [4, 9]


def test_an_error_cancels_the_calls_not_started(threads):
    threads(2)
    calls = []

    def work(i):
        calls.append(i)
        time.sleep(0.05)
        if i == 1:
            raise ValueError("layer 1 is broken")
        return i

    with pytest.raises(ValueError, match="layer 1 is broken"):
        list(ordered_map(work, range(50), 2))
    assert len(calls) < 10  # the rest was cancelled, not run
    assert torch.get_num_threads() == 2  # given back


def test_default_and_checked_workers(threads):
    threads(2)
    assert default_workers(torch.device("cpu")) == 2
    assert default_workers(torch.device("cuda")) == 1  # (a device object; no GPU needed)
    threads(1)
    assert check_workers(None, torch.device("cpu")) == 1
    assert check_workers(3, torch.device("cpu")) == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError, match="workers must be a positive integer"):
            check_workers(bad, torch.device("cpu"))


def test_cli_workers_option(llama_dirs, tmp_path, capsys):
    assert main(["analyze", *map(str, llama_dirs), "--out", str(tmp_path / "bad"),
                 "--workers", "0"]) == 2
    assert "workers must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["analyze", *map(str, llama_dirs), "--out", str(tmp_path / "ok"),
                 "--workers", "2"]) == 0
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["info"]["workers"] == 2


def test_checkpoint_reads_from_many_threads(llama_dirs):
    checkpoint = Checkpoint(llama_dirs[0])
    keys = sorted(checkpoint.keys())
    want = {k: Checkpoint(llama_dirs[0], cache=0).read(k).clone() for k in keys}
    order = [keys[(7 * i) % len(keys)] for i in range(400)]  # repeats: cache hits and evictions
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(checkpoint.read, order))
    assert all(torch.equal(g, want[k]) for g, k in zip(got, order))


def test_threads_per_worker_are_set_for_the_work_and_restored(threads):
    """``threads`` BLAS threads per worker while the items run (with one worker or several),
    torch's count given back after; a bad value is refused."""
    from tv_lens.workers import check_threads

    threads(4)
    seen = []
    list(ordered_map(lambda i: seen.append(torch.get_num_threads()), range(3), 2, threads=1))
    list(ordered_map(lambda i: seen.append(torch.get_num_threads()), range(2), 1, threads=2))
    assert seen == [1, 1, 1, 2, 2] and torch.get_num_threads() == 4
    with pytest.raises(InvalidArgumentError, match="threads must be a positive integer"):
        check_threads(0)
