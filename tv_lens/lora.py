"""PEFT / LoRA adapters read from their factors.

A LoRA adapter's update of a target weight is ``ΔW = scale · B A`` (``B``: ``[out, r]``,
``A``: ``[r, in]``), with ``scale = alpha / r`` (``alpha / √r`` under rsLoRA) and per-module
overrides in ``rank_pattern`` / ``alpha_pattern``, read exactly as PEFT reads them: its defaults
where the config leaves a field out (``r`` and ``lora_alpha`` 8), its pattern rule, and the
update transposed for ``Conv1D`` targets only (PEFT overrides ``fan_in_fan_out`` to match the
module). :class:`Adapter` reads an adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) without loading any model;
:func:`lora_vector` turns it into a :class:`~tv_lens.TuningVector` against a base checkpoint:

- each LoRA target's entry carries its factors (:meth:`TuningVector.factors`) in TL matrix
  orientation, and its dense TL-shaped value is formed only when asked for;
- ``modules_to_save`` (full copies of a module, e.g. ``lm_head``) enter as dense differences
  against the base;
- DoRA adapters (``use_dora``) rescale each output row of ``W + scale·B A`` to a learned
  magnitude, which is not low rank: their targets are merged densely
  (``ΔW = m/‖W + sBA‖_row · (W + sBA) − W``, PEFT's formula) and carry no factors;
- every other weight is exactly zero.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tv_lens.errors import (CheckpointNotFoundError, NonFiniteWeightsError,
                            PickleCheckpointError, TvLensError)
from tv_lens.slots import Fused
from tv_lens.lazy import LazyDeltas, LowRank
from tv_lens.spec import ArchSpec
from tv_lens.vector import TuningVector

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                       r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$")


@dataclass(frozen=True)
class LoraTarget:
    """One adapted module: ``ΔW = scale · B A`` in the module's ``[out, in]`` orientation."""

    module: str
    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float
    magnitude: Tensor | None = None  # DoRA's per-output-row magnitude
    embedding: bool = False  # nn.Embedding: the weight is [num, dim] = ΔWᵀ
    conv1d: bool = False  # transformers' Conv1D: the weight is [in, out] = ΔWᵀ


#: What PEFT assumes where ``adapter_config.json`` leaves a field out (``LoraConfig``'s defaults).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
#: The modules ``transformers`` builds as ``Conv1D`` (weight stored ``[in, out]``), by layout family.
#: PEFT transposes exactly these modules' updates, whatever ``fan_in_fan_out`` says (it warns and
#: overrides the flag for ``nn.Linear`` and for ``Conv1D`` targets alike).
CONV1D_MODULES = {"gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})}
#: Seconds a ``rank_pattern`` / ``alpha_pattern`` key may take to match one module name.
PATTERN_TIMEOUT = 1.0


def _pattern_value(patterns: Any, module: str, default: Any, field: str) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first key (in the file's order) that matches the end
    of the module's name, as a regular expression, gives the value; ``default`` otherwise.
    Matched with a timeout, so a key that backtracks without end cannot hang the run."""
    import regex

    if not isinstance(patterns, dict):
        raise TvLensError(f"adapter_config.json's {field} must be an object mapping module-name "
                          f"patterns to values, got {type(patterns).__name__}. Fix the config.")
    for key, value in patterns.items():
        try:
            found = regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT)
        except regex.error as exc:
            raise TvLensError(f"adapter_config.json's {field} key {key!r} is not a valid regular "
                              f"expression ({exc}). Fix the pattern (PEFT matches it as a "
                              "regular expression against the end of each module's name).") from None
        except TimeoutError:
            raise TvLensError(f"adapter_config.json's {field} key {key!r} takes more than "
                              f"{PATTERN_TIMEOUT:g} s to match {module!r} (a pattern that "
                              "backtracks). Simplify the pattern.") from None
        if found:
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter folder, read against the base checkpoint it adapts.

    Args:
        folder: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, only with
            ``allow_pickle=True``, ``adapter_model.bin``).
        base: the base's :class:`~tv_lens.checkpoints.CheckpointWeights` (for key and shape
            checks).
    """

    def __init__(self, folder: str | os.PathLike, base: Any, *, allow_pickle: bool = False):
        self.folder = Path(folder).expanduser()
        self.config = json.loads((self.folder / "adapter_config.json").read_text())
        if self.config.get("peft_type", "LORA") != "LORA":
            raise TvLensError(
                f"{str(self.folder)!r} is a {self.config.get('peft_type')} adapter; tv_lens reads "
                "LoRA adapters (peft_type LORA). Merge it with PEFT, save the merged model and "
                "pair the two folders."
            )
        tensors = self._read(allow_pickle)
        self.dora = bool(self.config.get("use_dora"))
        self.conv1d = CONV1D_MODULES.get(base.spec.family, frozenset())
        base_keys = base.checkpoint.keys()
        parts: dict[str, dict[str, Tensor]] = {}
        self.saved: dict[str, Tensor] = {}  # checkpoint key -> full tensor (modules_to_save)
        for key, tensor in tensors.items():
            if not key.startswith(PREFIX):
                raise TvLensError(f"Unexpected key {key!r} in {str(self.folder)!r}: PEFT adapter "
                                  f"keys start with {PREFIX!r}.")
            key = key[len(PREFIX):]
            m = _LORA_KEY.match(key)
            if m:
                parts.setdefault(m["module"], {})[m["part"]] = tensor
            elif key in base_keys:
                if tuple(tensor.shape) != tuple(base.checkpoint.shape(key)):
                    raise TvLensError(
                        f"The adapter's saved copy of {key!r} (modules_to_save) has shape "
                        f"{list(tensor.shape)} but the base's has {list(base.checkpoint.shape(key))}."
                        " Is this adapter for this base?")
                self.saved[key] = tensor
            else:
                raise TvLensError(
                    f"The adapter holds {key!r}, which tv_lens cannot place: it is neither a LoRA "
                    "factor nor a weight of the base checkpoint (is this adapter for this base?)."
                )
        self.targets = {module: self._target(module, p, base) for module, p in parts.items()}

    def _read(self, allow_pickle: bool) -> dict[str, Tensor]:
        from tv_lens.checkpoints import SafetensorsFile

        st, pkl = self.folder / "adapter_model.safetensors", self.folder / "adapter_model.bin"
        if st.is_file():
            file = SafetensorsFile(st)
            return {k: file.read(k) for k in file.keys()}
        if pkl.is_file():
            if not allow_pickle:
                raise PickleCheckpointError(
                    f"{str(self.folder)!r} holds a pickle adapter (adapter_model.bin), which can "
                    "run code when loaded. Save it again with safe_serialization=True, or opt in "
                    "with allow_pickle=True (CLI: --allow-pickle) to read it with "
                    "torch.load(weights_only=True)."
                )
            return torch.load(pkl, map_location="cpu", weights_only=True)
        raise CheckpointNotFoundError(f"{str(self.folder)!r} has adapter_config.json but no "
                                      "adapter_model.safetensors.")

    def _target(self, module: str, parts: dict[str, Tensor], base: Any) -> LoraTarget:
        embedding = "lora_embedding_A" in parts
        A = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        B = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if A is None or B is None:
            raise TvLensError(f"The adapter has only one LoRA factor for {module!r}; it needs "
                              "both A and B. The adapter file is incomplete.")
        key = f"{module}.weight"
        if key not in base.checkpoint:
            raise TvLensError(f"The adapter targets {module!r}, which the base checkpoint "
                              f"{str(base.folder)!r} does not have. Is this adapter for this base?")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise TvLensError(f"{module!r}: its LoRA factors have shapes {list(A.shape)} (A) and "
                              f"{list(B.shape)} (B), which do not multiply (A is [r, in], B is "
                              "[out, r]). The adapter file is corrupt: save it again.")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise NonFiniteWeightsError(f"{module!r}: its LoRA factors hold NaN or inf values. "
                                        "Check how the adapter was trained and saved.")
        r = A.shape[0]
        rank = _pattern_value(self.config.get("rank_pattern") or {}, module,
                              self.config.get("r", PEFT_DEFAULTS["r"]), "rank_pattern")
        if not (isinstance(rank, int) and rank > 0 and r > 0):
            raise TvLensError(f"{module!r}: LoRA rank {rank!r} (factors of rank {r}); a LoRA rank "
                              "is a positive integer. Fix r / rank_pattern in adapter_config.json.")
        if rank != r:
            raise TvLensError(f"{module!r}: its factors have rank {r} but adapter_config.json "
                              f"says {rank}" + ("" if "r" in self.config else " (PEFT's default "
                              "where r is missing)") + ". The config and the weights disagree.")
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module,
                               self.config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"]),
                               "alpha_pattern")
        if type(alpha) not in (int, float) or not math.isfinite(alpha):
            raise TvLensError(f"{module!r}: LoRA alpha {alpha!r}; an alpha is a finite number. Fix "
                              "lora_alpha / alpha_pattern in adapter_config.json.")
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        conv1d = not embedding and module.rsplit(".", 1)[-1] in self.conv1d
        out = (A.shape[1], B.shape[0]) if embedding else (B.shape[0], A.shape[1])
        stored = base.checkpoint.shape(key)
        want = tuple(reversed(out)) if conv1d else tuple(out)
        if tuple(stored) != want:
            raise TvLensError(f"{module!r}: the adapter's update has shape {list(want)} but the "
                              f"base weight has {list(stored)}. Is this adapter for this base?")
        magnitude = parts.get("lora_magnitude_vector")
        return LoraTarget(module, A.float(), B.float(), float(scale), magnitude, embedding, conv1d)

    def checkpoint_factors(self, target: LoraTarget) -> tuple[Tensor, Tensor]:
        """``(P, Q)`` with the checkpoint tensor's update ``= P @ Q`` (stored orientation)."""
        s, A, B = target.scale, target.A, target.B
        if target.embedding:  # nn.Embedding stores [num, dim] = (s·B A)ᵀ, A: [r, num]
            return A.T * s, B.T
        if target.conv1d:  # Conv1D stores [in, out]
            return A.T, B.T * s
        return B * s, A


def _chunk(P: Tensor, Q: Tensor, chunk: Fused | None, spec: ArchSpec) -> tuple[Tensor, Tensor]:
    """The factors of one block of a fused tensor's update ``P @ Q`` (rows of P or columns of Q)."""
    if chunk is None:
        return P, Q
    return (chunk.take(P, spec, 0), Q) if chunk.dim == 0 else (P, chunk.take(Q, spec, 1))


def _dora_delta(W: Tensor, target: LoraTarget) -> Tensor:
    """PEFT's DoRA merge minus the base, in the checkpoint orientation."""
    W = W.float()
    Wo = W.T if target.conv1d else W  # [out, in]
    merged = Wo + target.scale * (target.B @ target.A)
    merged = (target.magnitude.float() / merged.norm(dim=1))[:, None] * merged
    delta = merged - Wo
    return delta.T if target.conv1d else delta


def lora_vector(base: Any, adapter: Adapter,
                metadata: dict[str, Any] | None = None) -> TuningVector:
    """The tuning vector of ``adapter`` on the base checkpoint ``base`` (lazy; LoRA targets
    carry their factors, see the module docstring)."""
    slots = base.slots
    factors: dict[str, LowRank] = {}
    sources: dict[str, Any] = {}  # tl name -> how to compute its dense value
    for name, slot in slots.items():
        module, _, kind = slot.hf_key.rpartition(".")
        target = adapter.targets.get(module) if kind == "weight" else None
        if target is not None and target.magnitude is not None:
            sources[name] = ("dora", target)
        elif target is not None:
            sources[name] = ("factors", adapter.checkpoint_factors(target))
            P, Q = _chunk(*sources[name][1], slot.chunk, base.spec)
            factors[name] = LowRank(Q.T, P.T) if slot.matrix_transposed else LowRank(P, Q)
        elif slot.hf_key in adapter.saved:
            sources[name] = ("saved", adapter.saved[slot.hf_key])
        else:
            sources[name] = ("zero", None)
    dtypes = {name: base.dtype(name) for name in slots}

    def compute(name: str) -> Tensor:
        how, data = sources[name]
        slot, dtype = slots[name], dtypes[name]
        if how == "zero":
            return torch.zeros(base.shape(name), dtype=dtype)
        if how == "factors":
            P, Q = data
            return slot.to_tl(P @ Q, base.spec).to(dtype)
        raw = base.checkpoint.read(slot.hf_key)
        if how == "saved":
            hf_delta = data.to(torch.promote_types(raw.dtype, torch.float32)) - raw.float()
        else:
            hf_delta = _dora_delta(raw, data)
        return slot.to_tl(hf_delta, base.spec).to(dtype)

    meta = {name: (base.shape(name), dtypes[name]) for name in slots}
    info = {"adapter": str(adapter.folder), "lora_targets": len(adapter.targets),
            "lora_dora": adapter.dora, **(metadata or {})}
    return TuningVector(LazyDeltas(meta, compute), base.spec, base=base, metadata=info,
                        factors=factors)
