"""Checkpoint folders read one tensor at a time, without loading a model.

Weight-space analysis needs one layer of each model at a time, so tv_lens reads checkpoints
directly: :class:`SafetensorsFile` parses a safetensors header (validated against the file size,
so a truncated download is named as such before any work starts) and reads a tensor with plain
``seek`` + ``readinto`` (no memory map: memory holds only what the caller keeps).
:class:`Checkpoint` is a folder's tensors by checkpoint key, single-file or sharded
(``model.safetensors.index.json``); pickle checkpoints (``pytorch_model.bin``) are refused unless
the caller opts in, and then read with ``torch.load(weights_only=True)``.
:class:`CheckpointWeights` maps TransformerLens names to tensors through
:mod:`tv_lens.layout`, exactly as :class:`tv_lens.sources.ModelWeights` does for a live model.
:func:`write_safetensors` is the matching streaming writer.
"""

from __future__ import annotations

import json
import re
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tv_lens.errors import (CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError,
                            PickleCheckpointError, UnsupportedDtypeError)
from tv_lens.layout import layout
from tv_lens.slots import Slot
from tv_lens.speedups import empty
from tv_lens.sources import SlotWeights, compute_dtype
from tv_lens.spec import ArchSpec, config_error

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Largest tensor a Checkpoint keeps after reading it (an MLP weight of a 1B model: 23 MB in bf16).
CACHE_MAX_BYTES = 64 * 2**20
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Buffers older checkpoints store beside the weights (GPT-2's causal mask, rotary frequencies):
#: not parameters, so never part of a tuning vector.
KNOWN_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
#: The prefixes of ``transformers``' base models inside their causal-LM classes; a checkpoint
#: saved from the base class (the Hub's GPT-2) stores its keys without them.
MODEL_PREFIXES = ("transformer.", "model.")


#: dtypes of the safetensors format that tv_lens does not read (quantized or 8-bit floats: their
#: values mean nothing without scales stored elsewhere)
UNSUPPORTED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "U16", "U32",
                      "U64", "C64")


def _corrupt(path: Path, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{str(path)!r} is truncated or corrupt: {problem}. An interrupted download or copy "
        "leaves files like this: download or save the checkpoint again."
    )


def _shown(name: Any) -> str:
    """A name read from a file, quoted and cut short for a message."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the tensor name {_shown(key)} appears twice")
        out[key] = value
    return out


class SafetensorsFile:
    """One safetensors file: its header, validated at least as strictly as the ``safetensors``
    library validates it (also refusing duplicate names and entries with other keys), and
    tensors read on demand.

    Raises:
        CorruptCheckpointError: the file is shorter than its header says; the header is not a
            JSON object of unique names; an entry is malformed (unknown dtype, negative or
            non-integer shape); or the tensors' byte ranges are not contiguous from the start of
            the data section to its end, each the size its shape and dtype need.
        UnsupportedDtypeError: a valid entry of a dtype tv_lens does not read (float8, …).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(self.path, f"it has {size} bytes, fewer than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise _corrupt(self.path, f"its header claims {n} bytes but the file has {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except UnicodeDecodeError:
            raise _corrupt(self.path, "its header is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise _corrupt(self.path, f"its header is not valid JSON (at byte {exc.pos})") from None
        except ValueError as exc:  # a duplicate name
            raise _corrupt(self.path, f"its header is invalid: {exc}") from None
        if not isinstance(header, dict):
            raise _corrupt(self.path, "its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise _corrupt(self.path, "its __metadata__ is not a JSON object")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = self._entry(key, info)
        self._check_layout(size - self.data_start)

    def _entry(self, key: str, info: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
                and isinstance(info["shape"], list) and isinstance(info["data_offsets"], list)
                and len(info["data_offsets"]) == 2 and isinstance(info["dtype"], str)
                and all(type(x) is int and x >= 0 for x in info["shape"] + info["data_offsets"])):
            raise _corrupt(self.path, f"the header entry of {_shown(key)} is malformed")
        shape, offsets = info["shape"], info["data_offsets"]
        if info["dtype"] in UNSUPPORTED_DTYPES:
            raise UnsupportedDtypeError(
                f"{str(self.path)!r} stores {_shown(key)} as {info['dtype']}, which tv_lens does "
                "not read (quantized and 8-bit float weights mean nothing without their scales). "
                "Save the checkpoint in bfloat16, float16 or float32 first.")
        if info["dtype"] not in DTYPES:
            raise _corrupt(self.path, f"{_shown(key)} has the unknown dtype "
                                      f"{_shown(info['dtype'])}")
        dtype, (begin, end) = DTYPES[info["dtype"]], offsets
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise _corrupt(self.path, f"{_shown(key)} holds {end - begin} bytes, its shape "
                                      f"{list(shape)} needs {expected}")
        return dtype, tuple(shape), begin, end

    def _check_layout(self, data_size: int) -> None:
        """Byte ranges contiguous from 0 and covering the data section, as the library
        requires (no overlaps, no gaps, nothing pointing into the header or past the end)."""
        position = 0
        for key, (_, _, begin, end) in sorted(self.entries.items(), key=lambda e: e[1][2:]):
            if begin != position:
                raise _corrupt(self.path, f"{_shown(key)} starts at data byte {begin}, not at "
                                          f"{position} where the tensor before it ends")
            if end > data_size:  # the common case: a download cut short
                raise _corrupt(self.path, f"{_shown(key)} ends at byte {self.data_start + end} "
                                          f"but the file has only {self.data_start + data_size} "
                                          "bytes")
            position = end
        if position != data_size:
            raise _corrupt(self.path, f"its tensors end at data byte {position} but the data "
                                      f"section has {data_size} bytes")

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str) -> Tensor:
        """The tensor stored under ``key`` (a fresh CPU tensor of the stored dtype)."""
        dtype, shape, begin, end = self.entries[key]
        buffer = empty((end - begin,), torch.uint8)  # (not zeroed first, as a bytearray is)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
                raise _corrupt(self.path, f"reading {key!r} ended early")
        if not buffer.numel():
            return torch.empty(shape, dtype=dtype)
        return buffer.view(dtype).reshape(shape)


class Checkpoint:
    """A checkpoint folder's tensors by key: ``model.safetensors``, a sharded safetensors
    checkpoint, or, only with ``allow_pickle=True``, ``pytorch_model.bin`` (sharded or not).

    Reads are not cached beyond the last ``cache`` tensors under ``CACHE_MAX_BYTES`` each (a
    tuning vector reads the base weight it has just returned again; an embedding is simply read
    twice), so memory stays bounded by what the caller holds.
    """

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False, cache: int = 2):
        self.folder = Path(folder).expanduser()
        self._files: dict[str, Any] = {}  # file name -> SafetensorsFile or loaded pickle dict
        self._where: dict[str, str] = {}  # key -> file name
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cache_size = cache
        self._lock = threading.RLock()  # the cache and the loaded pickle shard, across threads
        self.pickle = False
        if (self.folder / SAFETENSORS_INDEX).is_file():
            self._index(SAFETENSORS_INDEX)
        elif (self.folder / "model.safetensors").is_file():
            self._open("model.safetensors")
            self._where = dict.fromkeys(self._files["model.safetensors"].keys(), "model.safetensors")
        elif any((self.folder / p).is_file() for p in PICKLE_FILES):
            self._pickle(allow_pickle)
        else:
            for name in ("model.safetensors", SAFETENSORS_INDEX, *PICKLE_FILES):
                if (self.folder / name).is_symlink():  # but no file behind it
                    raise CheckpointNotFoundError(
                        f"{str(self.folder / name)!r} is a symbolic link that leads to no file "
                        "(broken, or a loop). Point it at the weights, or copy the file in its "
                        "place.")
            found = sorted(p.name for p in self.folder.iterdir())[:8]
            raise CheckpointNotFoundError(
                f"{str(self.folder)!r} has no weights: no model.safetensors, no "
                f"{SAFETENSORS_INDEX} and no pytorch_model.bin (found {found})."
            )

    def _open(self, name: str) -> None:
        path = self.folder / name
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"The shard {name!r} named by {str(self.folder / SAFETENSORS_INDEX)!r} is "
                "missing. Download or copy every shard of the checkpoint."
            )
        self._files[name] = SafetensorsFile(path)

    def _index(self, index_name: str) -> None:
        path = self.folder / index_name
        not_an_index = _corrupt(path, "it is not a shard index: a JSON object whose 'weight_map' "
                                      "maps tensor names to shard file names")
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise not_an_index from None
        if not (isinstance(weight_map, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise not_an_index
        pickled = index_name != SAFETENSORS_INDEX
        for name in sorted(set(weight_map.values())):
            if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise _corrupt(path, f"it names the shard {_shown(name)}, which is not a file "
                                     "name beside the index (shards must sit in the checkpoint "
                                     "folder)")

            if pickled and not (self.folder / name).is_file():
                raise CheckpointNotFoundError(f"The shard {name!r} named by {str(path)!r} is "
                                              "missing. Download or copy every shard.")
            if not pickled:
                self._open(name)
        for key, name in weight_map.items():
            if not pickled and key not in self._files[name].entries:
                raise _corrupt(self.folder / name, f"the index {index_name} places {key!r} in "
                                                   "this shard but the shard does not hold it")
            self._where[key] = name

    def _pickle(self, allow_pickle: bool) -> None:
        found = [p for p in PICKLE_FILES if (self.folder / p).is_file()][0]
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{str(self.folder)!r} holds only pickle weights ({found}). Unpickling can run "
                "arbitrary code, so tv_lens reads safetensors only by default. Convert the "
                "checkpoint (model.save_pretrained(folder, safe_serialization=True)), or opt in "
                "with allow_pickle=True (CLI: --allow-pickle) to load it with "
                "torch.load(weights_only=True)."
            )
        self.pickle = True
        if found.endswith(".json"):
            self._index(found)
        else:
            self._where = dict.fromkeys(self._load_pickle(found), found)

    def _load_pickle(self, name: str) -> dict[str, Tensor]:
        with self._lock:
            return self._load_pickle_locked(name)

    def _load_pickle_locked(self, name: str) -> dict[str, Tensor]:
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointNotFoundError(f"The shard {name!r} of {str(self.folder)!r} is "
                                              "missing. Download or copy every shard.")
            try:
                self._files = {name: torch.load(path, map_location="cpu", weights_only=True,
                                                mmap=True)}
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
                raise _corrupt(path, f"torch.load(weights_only=True) failed ({exc})") from None
        return self._files[name]

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        if self.pickle:
            return tuple(self._load_pickle(self._where[key])[key].shape)
        return self._files[self._where[key]].entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        if self.pickle:
            return self._load_pickle(self._where[key])[key].dtype
        return self._files[self._where[key]].entries[key][0]

    def read(self, key: str) -> Tensor:
        """The tensor stored under ``key`` (CPU, stored dtype). Safe to call from several
        threads; safetensors reads (each with a file handle of its own) then run side by side."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            name = self._where[key]
            tensor = self._load_pickle(name)[key].clone() if self.pickle else None
        if tensor is None:
            tensor = self._files[name].read(key)
        with self._lock:
            if tensor.numel() * tensor.element_size() <= CACHE_MAX_BYTES:
                self._cache[key] = tensor
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tensor


def _config_or_empty(folder: Path) -> dict[str, Any]:
    return read_config(folder) if (folder / "config.json").is_file() else {}


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, with a clear error when it is not valid JSON."""
    path = Path(folder).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise config_error(repr(str(path)), f"is a JSON {type(config).__name__}, not an object")
        return config
    except UnicodeDecodeError:
        raise _corrupt(path, "it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"it is not valid JSON (line {exc.lineno}, column {exc.colno})") from None


def _conversions(config: dict[str, Any]) -> list[Any]:
    """``transformers``'s checkpoint conversion rules for this model (none before 5.x)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    architecture = (config.get("architectures") or [""])[0]
    return (get_checkpoint_conversion_mapping(architecture)
            or get_checkpoint_conversion_mapping(config.get("model_type", "")) or [])


def in_memory_names(keys: Iterable[str], config: dict[str, Any]) -> dict[str, str]:
    """In-memory parameter name -> stored key, for the keys ``transformers`` renames on loading
    (its checkpoint conversion mapping's plain renamings: GPT-NeoX's ``embed_out`` is
    ``lm_head`` in memory, Mixtral's ``block_sparse_moe`` is ``mlp``). Layouts name tensors as
    they are in memory; an older ``transformers`` without such a mapping renames nothing."""
    renames = [(src, tgt) for rule in _conversions(config) if type(rule).__name__ == "WeightRenaming"
               for src, tgt in zip(rule.source_patterns, rule.target_patterns)]
    out = {}
    for key in keys:
        name = key
        for src, tgt in renames:
            name = re.sub(src, tgt, name)
        if name != key:
            out[name] = key
    return out


def stored_expert_slots(slots: Iterable[Slot], keys: set[str], config: dict[str, Any]) -> list[Slot]:
    """``slots`` with each slot of a stacked expert tensor (``Slot.expert``; how transformers
    holds experts in memory) re-pointed at the one-tensor-per-expert key a checkpoint stores,
    by transformers's own conversion rule: its source patterns (Mixtral's
    ``.experts.*.w1.weight`` and ``.experts.*.w3.weight`` for ``.experts.gate_up_proj``) are
    the stacked tensor's blocks in order. Slots whose key is stored as it is stay."""
    stacked = {}
    for rule in _conversions(config):
        ops = [type(op).__name__ for op in getattr(rule, "operations", [])]
        if type(rule).__name__ == "WeightConverter" and ops in (["MergeModulelist"],
                                                                ["MergeModulelist", "Concatenate"]):
            stacked[rule.target_patterns[0]] = list(rule.source_patterns)
    out = []
    for slot in slots:
        if slot.expert is not None and slot.hf_key not in keys:
            target = next((t for t in stacked if slot.hf_key.endswith(t)), None)
            if target is not None:
                block = slot.chunk.index if slot.chunk is not None else 0
                source = stacked[target][block].replace("*", str(slot.expert))
                slot = replace(slot, hf_key=slot.hf_key[:-len(target)] + source, expert=None,
                               chunk=None)
        out.append(slot)
    return out


class CheckpointWeights(SlotWeights):
    """Read-only mapping ``TL name -> tensor`` over a checkpoint folder, read on access.

    The streaming counterpart of :class:`tv_lens.sources.ModelWeights`: same layout, same
    :func:`~tv_lens.sources.compute_dtype` (float32; float64 for float64 weights), but nothing
    is loaded until a name is asked for. ``device`` is where returned tensors live;
    ``float64=True`` returns float64 whatever the stored dtype (differences of float32 weights
    are then exact).
    """

    def __init__(self, folder: str | os.PathLike, *, spec: ArchSpec | None = None,
                 allow_pickle: bool = False, device: str | torch.device | None = None,
                 float64: bool = False):
        self.folder = Path(folder).expanduser()
        self.float64 = float64
        self.spec = spec or ArchSpec.from_hf_config(read_config(self.folder),
                                                    repr(str(self.folder / "config.json")))
        self.checkpoint = Checkpoint(self.folder, allow_pickle=allow_pickle)
        self.device = torch.device(device) if device is not None else None
        keys = self.checkpoint.keys()
        self.slots: dict[str, Slot] = {s.tl_name: s for s in self._slots(keys)}
        self._check_everything_read(keys)
        missing = [s.hf_key for s in self.slots.values() if s.hf_key not in keys]
        if missing:
            from tv_lens.errors import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"The checkpoint {str(self.folder)!r} ({self.spec.architecture}) lacks tensors "
                f"its layout needs, e.g. {missing[:3]}; it holds keys like {sorted(keys)[:4]}. "
                "Is it a complete checkpoint of that architecture?"
            )
        self._check_shapes()

    def _slots(self, keys: set[str]) -> list[Slot]:
        """The layout's slots pointed at the stored keys. ``transformers``'s conversion rules
        (renamed keys, one tensor per expert; importing them costs seconds) are consulted only
        where the layout does not find every tensor it reads, and every stored tensor, under
        the names models hold in memory."""
        slots = layout(self.spec, keys)
        read = {s.hf_key for s in slots}
        if read <= keys and (self.spec.family != "adapter" or keys <= read):
            return slots
        bare = self._without_model_prefix(slots, keys)
        if bare is not None:
            return bare
        config = _config_or_empty(self.folder)
        stored = in_memory_names(keys, config)
        known = keys | set(stored)
        slots = stored_expert_slots(layout(self.spec, known), known, config)
        return [replace(s, hf_key=stored.get(s.hf_key, s.hf_key)) for s in slots]

    def _without_model_prefix(self, slots: list[Slot], keys: set[str]) -> list[Slot] | None:
        """The slots of a checkpoint saved from the base model class, without its prefix (the
        Hub's GPT-2 stores ``h.0.attn.c_attn.weight``, not ``transformer.h.0…``), or None."""
        for prefix in MODEL_PREFIXES:
            if any(k.startswith(prefix) for k in keys):
                continue
            prefixed = {prefix + k for k in keys}
            slots = layout(self.spec, prefixed)
            if slots and {s.hf_key for s in slots} <= prefixed:
                return [replace(s, hf_key=s.hf_key.removeprefix(prefix)) for s in slots]
        return None

    def _check_everything_read(self, keys: set[str]) -> None:
        """Every tensor of the checkpoint is in the vector, but for known buffers: one the layout
        does not read (extra layers the config does not declare, a module tv_lens does not know,
        Apertus's learned activation parameters) would silently be missing from τ."""
        unread = sorted(k for k in keys - {s.hf_key for s in self.slots.values()}
                        if not k.endswith(KNOWN_BUFFERS))
        if not unread:
            return
        from tv_lens.errors import UnsupportedArchitectureError

        where = f"The checkpoint {str(self.folder)!r} ({self.spec.architecture}) holds {len(unread)}"
        if self.spec.family == "adapter":
            raise UnsupportedArchitectureError(
                f"{where} tensor(s) the layout derived from TransformerLens's adapter does not "
                f"read, e.g. {unread[:3]}: the tuning vector would miss them. Open an issue with "
                "the checkpoint's config.json.")
        if all(k.endswith(".bias") for k in unread):
            raise UnsupportedArchitectureError(
                f"{where} bias tensor(s) that tv_lens's {self.spec.architecture} layout does not "
                f"read, e.g. {unread[:3]} (mlp_bias, say): the tuning vector would miss them. Open "
                "an issue with the checkpoint's config.json.")
        raise UnsupportedArchitectureError(
            f"{where} tensor(s) its config.json does not describe, e.g. {unread[:3]}: the tuning "
            "vector would miss them. Check that config.json belongs to these weights (its "
            f"{self.spec.n_layers} layers, say).")

    def _check_shapes(self) -> None:
        """Every tensor's shape against ``config.json`` (read from headers, no data)."""
        from tv_lens.errors import ShapeMismatchError

        problems = []
        for name, slot in self.slots.items():
            stored = self.checkpoint.shape(slot.hf_key)
            if slot.part == "attn" and slot.pattern == "d -> d" and len(stored) == 2:
                from tv_lens.errors import UnsupportedArchitectureError

                raise UnsupportedArchitectureError(
                    f"{slot.hf_key} holds one q/k norm gain per head ({list(stored)}; Cohere's "
                    "use_qk_norm): per-head norm gains are not supported yet.")
            try:
                got = tuple(slot.to_tl(torch.empty(stored, device="meta"), self.spec).shape)
            except Exception:  # noqa: BLE001 - einops names the failed split; we name the key
                got = None
            want = expected_shape(name, self.spec)
            if got is None or (want is not None and got != want):
                problems.append(f"{slot.hf_key} has shape {list(stored)}")
        if problems:
            raise ShapeMismatchError(
                f"The weights in {str(self.folder)!r} do not match its config.json "
                f"({len(problems)} tensor(s)): " + "; ".join(problems[:3]) + ". The config and "
                "the weights come from different models: save them together again."
            )

    def shape(self, tl_name: str) -> tuple[int, ...]:
        """The TL shape of ``tl_name``, from the file header (no data read)."""
        slot = self.slots[tl_name]
        meta = torch.empty(self.checkpoint.shape(slot.hf_key), device="meta")
        return tuple(slot.to_tl(meta, self.spec).shape)

    def dtype(self, tl_name: str) -> torch.dtype:
        """The dtype returned for ``tl_name`` (compute dtype of the stored one)."""
        stored = self.checkpoint.dtype(self.slots[tl_name].hf_key)
        return torch.float64 if self.float64 else compute_dtype(stored)

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {self.checkpoint.dtype(s.hf_key) for s in self.slots.values()}

    #: every read returns a tensor of its own (never one the checkpoint cache holds), so a
    #: caller may change it in place (:func:`tv_lens.pair.weight_difference` does)
    returns_copies = True

    def __getitem__(self, tl_name: str) -> Tensor:
        slot = self.slots[tl_name]
        raw = self.checkpoint.read(slot.hf_key)
        out = slot.to_tl(raw, self.spec, torch.float64 if self.float64 else compute_dtype(raw.dtype))
        out = out.to(self.device) if self.device is not None else out
        shares = out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
        return out.clone() if shares else out



def expected_shape(tl_name: str, spec: ArchSpec) -> tuple[int, ...] | None:
    """The TL shape ``config.json`` implies for a weight (``None`` where it does not say)."""
    kind = tl_name.rsplit(".", 1)[-1]
    d, dh, m = spec.d_model, spec.d_head, spec.d_mlp
    if spec.n_experts and ".experts." not in tl_name:
        m = spec.d_mlp_shared  # the MLP weights outside the routed experts: the shared expert
    if ".attn." in tl_name and kind in ("w", "b"):  # q/k norms: one head's size (Qwen3) or all
        return None  # heads' (OLMo-2); the config does not say which
    shapes = {"W_Q": (spec.n_heads, d, dh), "W_K": (spec.n_kv_heads, d, dh),
              "W_V": (spec.n_kv_heads, d, dh), "W_O": (spec.n_heads, dh, d),
              "b_Q": (spec.n_heads, dh), "b_K": (spec.n_kv_heads, dh),
              "b_V": (spec.n_kv_heads, dh), "b_O": (d,), "W_in": (d, m), "W_gate": (d, m),
              "W_out": (m, d), "b_in": (m,), "b_out": (d,), "W_E": (spec.d_vocab, d),
              "W_U": (d, spec.d_vocab), "w": (d,), "b": (d,),
              "W_router": (d, spec.n_experts), "b_router": (spec.n_experts,), "W_shared_gate": (d, 1)}
    return shapes.get(kind)


def write_safetensors(path: str | os.PathLike, names: Iterable[str],
                      meta: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      get: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors one at a time: ``get(name)`` is called once per name, in order, and its
    result written and dropped, so memory holds one tensor. ``meta`` gives each name's shape
    and dtype up front (the header precedes the data). The file appears under ``path`` only
    when complete (written to a temporary name, then renamed)."""
    path = Path(path)
    names = list(names)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        shape, dtype = meta[name]
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                tensor = get(name).detach().to("cpu").contiguous()
                shape, dtype = meta[name]
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise InvalidArgumentError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the "
                                     f"header says {tuple(shape)} {dtype}.")
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
