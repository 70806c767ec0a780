"""Results tv_lens keeps for itself (zoo tasks, caches), stored without pickles.

tv_lens writes and reads no pickles of its own: unpickling runs code, and a results folder may
come from anyone. A *record* is two files beside each other: ``NAME.json`` holds the structure
(dicts, lists, tuples, strings, numbers, ``None``, dataclass fields, DataFrames' columns and
dtypes, not their index) with a schema version, the key of what the record was computed from and
the digest of its arrays; ``NAME.safetensors`` holds every array and every numeric DataFrame
column, with its dtype. Reading one builds only those
types back: nothing in a record can name a class or a function to call.

A record's JSON is written last and names its arrays' digest, so a writer killed midway leaves
no record that reads (an earlier JSON does not match the new arrays), and :func:`load_record`
returns ``None`` for a record that is missing, unreadable, of another schema, computed from
something else or torn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

#: Bumped whenever what a record holds changes meaning; older records are recomputed.
SCHEMA = 3  # 2: tables keyed by component; 3: head_similarity per attention unit (issue 31)


class _Encoder:
    """Turns a result into JSON-able structure plus a dict of arrays (by generated key)."""

    def __init__(self) -> None:
        self.arrays: dict[str, torch.Tensor] = {}

    def _array(self, values: np.ndarray) -> str:
        key = f"a{len(self.arrays)}"
        self.arrays[key] = torch.from_numpy(np.array(values, copy=True, order="C"))
        return key

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, float)) and type(obj) in (int, float):
            return obj
        if isinstance(obj, np.generic):
            return {"$scalar": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, np.ndarray):
            return {"$array": self._array(obj)}
        if isinstance(obj, pd.DataFrame):
            return {"$frame": [self._column(name, obj[name]) for name in obj.columns]}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {"$fields": {f.name: self.encode(getattr(obj, f.name))
                                for f in dataclasses.fields(obj)}}
        if isinstance(obj, tuple):
            return {"$tuple": [self.encode(x) for x in obj]}
        if isinstance(obj, list):
            return [self.encode(x) for x in obj]
        if isinstance(obj, dict):
            return {"$dict": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        raise TypeError(f"records cannot store a {type(obj).__name__}")

    def _column(self, name: Any, column: pd.Series) -> dict:
        dtype = column.dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iub":
            return {"name": self.encode(name), "dtype": str(dtype),
                    "values": self._array(column.fillna(0).to_numpy(dtype.numpy_dtype)),
                    "missing": self._array(column.isna().to_numpy())}
        if dtype.kind in "iufb":
            return {"name": self.encode(name), "dtype": str(dtype),
                    "values": self._array(column.to_numpy())}
        return {"name": self.encode(name), "dtype": str(dtype),
                "objects": [self.encode(x) for x in column.tolist()]}


def _decode(obj: Any, arrays: dict[str, torch.Tensor], types: dict[str, type]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, arrays, types) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "$scalar" in obj:
        return np.dtype(obj["$scalar"]).type(obj["value"])
    if "$array" in obj:
        return arrays[obj["$array"]].numpy()
    if "$tuple" in obj:
        return tuple(_decode(x, arrays, types) for x in obj["$tuple"])
    if "$dict" in obj:
        return {_decode(k, arrays, types): _decode(v, arrays, types) for k, v in obj["$dict"]}
    if "$fields" in obj:
        fields = {k: _decode(v, arrays, types) for k, v in obj["$fields"].items()}
        cls = next(t for t in types.values()
                   if {f.name for f in dataclasses.fields(t)} == set(fields))
        return cls(**fields)
    if "$frame" in obj:
        columns = {}
        for c in obj["$frame"]:
            name = _decode(c["name"], arrays, types)
            if "objects" in c:
                columns[name] = pd.Series([_decode(x, arrays, types) for x in c["objects"]],
                                          dtype=c["dtype"])
            elif "missing" in c:
                values = pd.array(arrays[c["values"]].numpy(), dtype=c["dtype"])
                values[arrays[c["missing"]].numpy()] = pd.NA
                columns[name] = pd.Series(values)
            else:
                columns[name] = pd.Series(arrays[c["values"]].numpy(), dtype=c["dtype"])
        return pd.DataFrame(columns)
    raise ValueError("unknown entry in a record")


def save_record(obj: Any, path: str | os.PathLike, *, key: dict) -> None:
    """Store ``obj`` as ``path.json`` + ``path.safetensors`` (``path`` without suffix), with
    :data:`SCHEMA` and ``key`` (what it was computed from) in the JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = _Encoder()
    data = encoder.encode(obj)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(fd)
    save_file(encoder.arrays, tmp)
    digest = _digest(Path(tmp))
    os.replace(tmp, path.with_suffix(".safetensors"))
    payload = {"schema": SCHEMA, "key": key, "arrays": digest, "data": data}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path.with_suffix(".json"))


def load_record(path: str | os.PathLike, *, key: dict,
                types: tuple[type, ...] = ()) -> Any | None:
    """The record at ``path`` (see :func:`save_record`), or ``None`` where it is missing,
    unreadable, of another schema or stored under another ``key``. ``types``: the dataclasses
    the record may hold (matched by their field names)."""
    path = Path(path)
    try:
        payload = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if payload.get("schema") != SCHEMA or payload.get("key") != key:
            return None
        arrays_file = path.with_suffix(".safetensors")
        if _digest(arrays_file) != payload.get("arrays"):
            return None  # the arrays of another write (a writer killed between its two files)
        arrays = load_file(arrays_file)
        return _decode(payload["data"], arrays, {t.__name__: t for t in types})
    except Exception:  # noqa: BLE001 - any unreadable record (safetensors' own errors too) is
        return None  # recomputed, never trusted


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
