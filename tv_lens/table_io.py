"""Writing the result tables as CSV.

A 1.1B pair's neuron table has 370 000 rows, a zoo's eight times that; ``DataFrame.to_csv``
formats every float in Python and takes 10 s for one such table (a tenth of a ``--fast``
analysis). :func:`write_csv` hands large tables to pyarrow's C++ writer (about 10× faster)
where it writes the values pandas would: floats in their shortest round-trip form (``4.2e-05``
may read ``0.000042``; the same double either way), integers, strings unquoted, missing values
empty. Columns the two would write differently are formatted first the way pandas does, so
``pd.read_csv`` gives back the same frame (dtypes included): float columns holding whole
numbers only (pyarrow would write ``4``, which reads back as an integer) and booleans. Anything
else (other dtypes, a string that needs quoting, no pyarrow) goes through ``to_csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: Fewer rows than this: ``to_csv`` (its cost does not matter, its output is the reference).
ARROW_FROM_ROWS = 50_000
_NEEDS_QUOTES = (",", '"', "\n", "\r")


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """``table.to_csv(path, index=False)``, through pyarrow for large tables (module docstring)."""
    arrow_ready = _arrow_columns(table) if len(table) >= ARROW_FROM_ROWS else None
    if arrow_ready is None or not _write_arrow(arrow_ready, Path(path)):
        table.to_csv(path, index=False)


def _arrow_columns(table: pd.DataFrame) -> pd.DataFrame | None:
    """``table`` with the columns pyarrow would write unlike pandas pre-formatted as text, or
    ``None`` when it holds anything this writer does not handle."""
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
