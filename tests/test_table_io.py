"""``write_csv``: pyarrow's writer for large tables, read back as ``to_csv``'s output reads."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from tv_lens import table_io
from tv_lens.table_io import write_csv


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(table_io, "ARROW_FROM_ROWS", 4)


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


def _no_to_csv(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("to_csv was called")

    monkeypatch.setattr(pd.DataFrame, "to_csv", refuse)


def test_arrow_path_reads_back_like_to_csv(tmp_path, small_threshold, monkeypatch):
    table = _table()
    table.to_csv(tmp_path / "pandas.csv", index=False)
    _no_to_csv(monkeypatch)  # the rows above the threshold must go through pyarrow
    write_csv(table, tmp_path / "arrow.csv")
    expected, got = pd.read_csv(tmp_path / "pandas.csv"), pd.read_csv(tmp_path / "arrow.csv")
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert got["rank"].dtype == np.float64 and got["kept"].dtype == bool
    header = (tmp_path / "arrow.csv").read_text().splitlines()[0]
    assert header == ",".join(table.columns)


def test_values_that_need_quoting_go_through_to_csv(tmp_path, small_threshold):
    table = _table()
    table.loc[3, "label"] = 'new, "really"'
    write_csv(table, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == table.to_csv(index=False)


@pytest.mark.parametrize("case", ["small table", "object column", "no pyarrow"])
def test_other_tables_go_through_to_csv(tmp_path, monkeypatch, case):
    table = _table()
    if case != "small table":
        monkeypatch.setattr(table_io, "ARROW_FROM_ROWS", 4)
    if case == "object column":
        table["mixed"] = [1, "a"] * (len(table) // 2)
    if case == "no pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow", None)
    write_csv(table, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == table.to_csv(index=False)
