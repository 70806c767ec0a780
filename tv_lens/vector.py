"""The tuning vector: ``τ = θ_tuned − θ_base``, addressable per head, neuron and matrix.

A :class:`TuningVector` holds one delta per TransformerLens weight (float32; float64 for
float64 models)
(``blocks.{l}.attn.W_Q``: ``[n_heads, d_model, d_head]``, ``blocks.{l}.attn.W_K``:
``[n_kv_heads, d_model, d_head]`` under grouped-query attention, ``blocks.{l}.mlp.W_out``:
``[d_mlp, d_model]``, ``embed.W_E``, norm gains ``blocks.{l}.ln1.w``, …). It supports

- component views: :meth:`component` (by name: ``"L3H5"``, ``"L3N100"``, ``"L3.mlp"``; see
  :mod:`tv_lens.components`), :meth:`head`, :meth:`neuron`, and the exact circuit changes :meth:`ov` /
  :meth:`qk` as rank ≤ 2·d_head ``FactoredMatrix`` objects (never a dense d_model² per head);
- arithmetic: ``a + b``, ``a - b``, ``-a``, ``2.0 * a`` and :meth:`select` (restrict to
  components, everything else zero);
- application: ``with tv.applied(model, alpha):`` (restored bit for bit on exit, exceptions
  included), :meth:`apply_to` (a patched copy) and :meth:`apply_` (in place, permanent);
- persistence: :meth:`save` / :meth:`load` (safetensors with metadata).

Entries may be *lazy* (a :class:`~tv_lens.lazy.LazyDeltas`: read from the two checkpoints on
access, as ``ModelPair.from_pretrained`` folders give them) and may carry *factors* (a LoRA
target's ``scale · B A`` as a :class:`~tv_lens.lazy.LowRank`, see :meth:`factors`). Everything
above works on them and materialises only what it touches: arithmetic and :meth:`select` on a lazy
vector give a lazy vector, :meth:`save` writes one tensor at a time, and :meth:`dense` holds
every entry in memory when that is what you want (patching a live model, many repeated reads).

Key and value weights belong to key-value heads: they are stored once per kv head and a query
head's circuits use its group's K/V (``head // (n_heads // n_kv_heads)``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.components import (PART_KINDS, ComponentIndex, Components, head_name, neuron_name,
                                part_kind)
from tv_lens.errors import (CheckpointNotFoundError, InvalidArgumentError, MissingBaseError,
                            OutOfRangeError, ShapeMismatchError, TvLensError, close_matches)
from tv_lens.layout import layout
from tv_lens.lazy import LazyDeltas, LowRank, Meta
from tv_lens.slots import Slot
from tv_lens.sources import ModelWeights, layer_of
from tv_lens.spec import ArchSpec, check_compatible, resolve_layers

PARTS = PART_KINDS
#: Part names of earlier versions and what replaced them.
_RENAMED_PARTS = {"norm": "'norms' (the blocks' norm gains) and/or 'final_norm'"}


@dataclass(frozen=True)
class HeadDelta:
    """The update of one attention head. K/V are its key-value group's (shared under GQA)."""

    layer: int
    head: int
    kv_head: int
    W_Q: Float[Tensor, "d_model d_head"]
    W_K: Float[Tensor, "d_model d_head"]
    W_V: Float[Tensor, "d_model d_head"]
    W_O: Float[Tensor, "d_head d_model"]

    def __repr__(self) -> str:
        norms = ", ".join(f"‖Δ{k}‖={float(getattr(self, k).norm()):.3g}"
                          for k in ("W_Q", "W_K", "W_V", "W_O"))
        return f"HeadDelta({head_name(self.layer, self.head)}, kv_head={self.kv_head}, {norms})"


@dataclass(frozen=True)
class NeuronDelta:
    """The update of one MLP neuron: its read direction(s) and its write direction."""

    layer: int
    neuron: int
    W_in: Float[Tensor, "d_model"]
    W_gate: Float[Tensor, "d_model"] | None
    W_out: Float[Tensor, "d_model"]

    def __repr__(self) -> str:
        parts = [f"‖Δ{k}‖={float(v.norm()):.3g}" for k, v in
                 (("W_in", self.W_in), ("W_gate", self.W_gate), ("W_out", self.W_out))
                 if v is not None]
        return f"NeuronDelta({neuron_name(self.layer, self.neuron)}, {', '.join(parts)})"


def _as_pairs(items: Iterable[int | tuple[int, int]] | None, layers: list[int]) -> set[tuple[int, int]] | None:
    """``[(l, i), …]`` or ``[i, …]`` (meaning index i in every selected layer) as a set of pairs."""
    if items is None:
        return None
    pairs = set()
    for item in items:
        if isinstance(item, tuple):
            pairs.add((int(item[0]), int(item[1])))
        else:
            pairs.update((l, int(item)) for l in layers)
    return pairs


def check_alpha(alpha: float | int) -> None:
    """Refuse a scale that would write NaN/inf into a model's weights."""
    if not math.isfinite(float(alpha)):
        raise InvalidArgumentError(f"alpha must be a finite number, got {alpha!r}: the model's "
                                   "weights would become NaN/inf. Pass e.g. alpha=0.5.")


class TuningVector(Mapping):  # of str -> Tensor (unsubscripted: checkers must not sample it)
    """Per-parameter differences ``tuned − base`` in TransformerLens names and shapes.

    Args:
        deltas: ``TL name -> tensor`` (float32, or float64 for float64 models).
        spec: the architecture the deltas belong to.
        base: the base model's weights (a ``TL name -> tensor`` mapping); needed only for the
            circuit differences :meth:`ov` / :meth:`qk`, relative norms and ``analyze``. From
            a ``ModelPair`` it reads the base model's *live* parameters (no copy), so do not
            ask for circuits while the base model itself is patched by :meth:`applied`.
        metadata: free-form provenance (model identifiers, vocab handling), saved with the vector.
        factors: ``TL name -> LowRank`` for entries known as a product of thin factors (a LoRA
            target); ``deltas[name]`` must equal their product (in TL shape).
    """

    def __init__(self, deltas: Mapping[str, Any], spec: ArchSpec, *,
                 base: Mapping[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                 factors: Mapping[str, LowRank] | None = None):
        # (values typed Any: a type checker sampling a lazy mapping's values would read weights)
        self.deltas: Mapping[str, Tensor] = deltas if isinstance(deltas, LazyDeltas) else dict(deltas)
        self._factors: dict[str, LowRank] = dict(factors or {})
        self.spec = spec
        self.base = base
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.slots: dict[str, Slot] = {s.tl_name: s for s in layout(spec)}
        unknown = [k for k in self.deltas if k not in self.slots]
        if unknown:
            raise InvalidArgumentError(f"Unknown parameter name(s) {unknown[:3]} for a {spec.family!r} model."
                              + close_matches(unknown[0], list(self.slots)))
        self._components: ComponentIndex | None = None

    # ----------------------------------------------------------------- construction
    def with_deltas(self, deltas: Mapping[str, Any],
                    factors: Mapping[str, LowRank] | None = None) -> "TuningVector":
        """A vector of the same model, base and metadata holding ``deltas`` (and ``factors``)."""
        return TuningVector(deltas, self.spec, base=self.base, metadata=self.metadata,
                            factors=factors)

    @property
    def lazy(self) -> bool:
        """Whether entries are computed on access rather than held (see :meth:`dense`)."""
        return isinstance(self.deltas, LazyDeltas)

    def meta(self, name: str) -> Meta:
        """Shape and dtype of one entry, without computing it."""
        if isinstance(self.deltas, LazyDeltas):
            return self.deltas.meta[name]
        t = self.deltas[name]
        return tuple(t.shape), t.dtype

    def _zeros(self, name: str) -> Tensor:
        shape, dtype = self.meta(name)
        return torch.zeros(shape, dtype=dtype)

    def _map(self, fn: Any, other: "TuningVector | None" = None,
             factors: Mapping[str, LowRank] | None = None) -> "TuningVector":
        """A vector with entries ``fn(name, self[name])`` (or ``fn(name, self[name],
        other[name])``): lazy when either input is, so nothing is computed until asked."""
        if self.lazy or (other is not None and other.lazy):
            if other is None:
                compute = lambda k: fn(k, self[k])  # noqa: E731
            else:
                compute = lambda k: fn(k, self[k], other[k])  # noqa: E731
            return self.with_deltas(LazyDeltas({k: self.meta(k) for k in self.deltas}, compute), factors)
        if other is None:
            return self.with_deltas({k: fn(k, v) for k, v in self.deltas.items()}, factors)
        return self.with_deltas({k: fn(k, v, other.deltas[k]) for k, v in self.deltas.items()}, factors)

    def dense(self) -> "TuningVector":
        """This vector with every entry computed and held in memory (itself if it already is)."""
        if not self.lazy:
            return self
        return TuningVector({k: self[k] for k in self.deltas}, self.spec, base=self.base,
                            metadata=self.metadata, factors=self._factors)

    def factors(self, name: str) -> LowRank | None:
        """The entry ``name`` as thin factors in TL matrix orientation (a LoRA target's
        ``scale · B A``), or ``None`` when it is only known densely."""
        return self._factors.get(name)

    # ----------------------------------------------------------------- mapping protocol
    def __getitem__(self, name: str) -> Tensor:
        if name not in self.deltas:
            raise KeyError(f"No parameter {name!r} in this tuning vector."
                           + close_matches(name, list(self.deltas)))
        return self.deltas[name]

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the entry
        return name in self.deltas

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def __repr__(self) -> str:
        n = sum(torch.Size(self.meta(k)[0]).numel() for k in self.deltas)
        norm = "lazy: read on access" if self.lazy else f"norm={self.norm():.4g}"
        factored = f", {len(self._factors)} factored" if self._factors else ""
        return (f"TuningVector({self.spec.architecture}, {self.spec.n_layers} layers, "
                f"{len(self)} tensors{factored}, {n:,} entries, {norm})")

    def tuning_vector(self) -> "TuningVector":
        """This vector: a ``TuningVector`` stands in for a pair wherever weights suffice
        (:class:`tv_lens.protocols.PairLike`)."""
        return self

    # ----------------------------------------------------------------- components
    @property
    def components(self) -> ComponentIndex:
        """The component names of this vector (``tv.components.names("units")``) and their
        entries; see :mod:`tv_lens.components`."""
        if self._components is None:
            self._components = ComponentIndex(self.spec, {k: self.slots[k] for k in self.deltas})
        return self._components

    def component(self, names: Components) -> "TuningVector":
        """The tuning vector of one named component (``"L3H5"``, ``"L3KV1"``, ``"L3N1024"``,
        ``"L3.mlp"``, ``"L3H5.OV"``, ``"embed"``, … any name of :mod:`tv_lens.components`) or
        of several together, everything else zero.

        The components of one granularity sum to the whole vector.
        """
        cut = self.components.deltas(self, names)
        entry = lambda k: cut[k] if k in cut else self._zeros(k)  # noqa: E731
        if self.lazy:  # zeros of a 7B vector would fill memory: made on access instead
            return self.with_deltas(LazyDeltas({k: self.meta(k) for k in self.deltas}, entry))
        return self.with_deltas({k: entry(k) for k in self.deltas})

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.spec.n_layers:
            raise OutOfRangeError(f"layer {layer} is out of range: the model has "
                                  f"{self.spec.n_layers} layers (0..{self.spec.n_layers - 1}).")

    def _check_index(self, kind: str, index: int, size: int) -> None:
        if not 0 <= index < size:
            raise OutOfRangeError(f"{kind} {index} is out of range: the model has {size} {kind}s "
                                  f"per layer (0..{size - 1}).")

    def head(self, layer: int, head: int) -> HeadDelta:
        """The update of query head ``head`` in ``layer`` (with its key-value group's K/V)."""
        self._check_layer(layer)
        self._check_index("head", head, self.spec.n_heads)
        kv = self.spec.kv_head(head)
        a = f"blocks.{layer}.attn."
        return HeadDelta(layer, head, kv, self[a + "W_Q"][head], self[a + "W_K"][kv],
                         self[a + "W_V"][kv], self[a + "W_O"][head])

    def neuron(self, layer: int, neuron: int) -> NeuronDelta:
        """The update of MLP neuron ``neuron`` in ``layer``: input, gate and output directions."""
        self._check_layer(layer)
        self._check_index("neuron", neuron, self.spec.d_mlp)
        m = f"blocks.{layer}.mlp."
        gate = self.deltas.get(m + "W_gate")
        return NeuronDelta(layer, neuron, self[m + "W_in"][:, neuron],
                           None if gate is None else gate[:, neuron], self[m + "W_out"][neuron])

    def base_tensor(self, name: str, device: torch.device | None = None) -> Tensor:
        """The base weight of entry ``name`` on ``device`` (default: the update's); a
        :class:`~tv_lens.MissingBaseError` with the fix where the vector carries no base."""
        if self.base is None:
            raise MissingBaseError(
                "This tuning vector carries no base weights, which circuit differences need "
                "(ΔOV = W_V' W_O' − W_V W_O). Use pair.tuning_vector(), or attach a base with "
                "tv.with_base(base_model)."
            )
        return self.base[name].to(device or self.deltas[name].device)

    def base_and_update(self, name: str) -> tuple[Tensor, Tensor]:
        """``(base weight, update)`` of one entry; a vector read from two checkpoints reads the
        base weight once for both (half the reads of ``tv.base[name]`` then ``tv[name]``)."""
        if isinstance(self.deltas, LazyDeltas) and self.deltas.with_base is not None:
            return self.deltas.with_base(name)
        update = self[name]
        return self.base_tensor(name, update.device), update

    def with_base(self, base_model: Any) -> "TuningVector":
        """This vector with ``base_model``'s weights attached (for :meth:`ov`, :meth:`qk`)."""
        weights = ModelWeights(base_model)
        self.check_fits(weights)
        return TuningVector(self.deltas, self.spec, base=weights, metadata=self.metadata,
                            factors=self._factors)

    def ov(self, layer: int, head: int):
        """Exact change of the head's OV circuit, ``W_V' W_O' − W_V W_O``, kept factored.

        Returns a TransformerLens ``FactoredMatrix`` ``A @ B`` with ``A = [W_V', −W_V]``
        (``[d_model, 2·d_head]``) and ``B = [W_O'; W_O]`` (``[2·d_head, d_model]``).
        """
        from transformer_lens.FactoredMatrix import FactoredMatrix

        h = self.head(layer, head)
        a = f"blocks.{layer}.attn."
        V = self.base_tensor(a + "W_V", h.W_V.device)[h.kv_head]
        O = self.base_tensor(a + "W_O", h.W_O.device)[head]
        return FactoredMatrix(torch.cat([V + h.W_V, -V], dim=-1), torch.cat([O + h.W_O, O], dim=0))

    def qk(self, layer: int, head: int):
        """Exact change of the head's QK circuit, ``W_Q' W_K'ᵀ − W_Q W_Kᵀ``, kept factored."""
        from transformer_lens.FactoredMatrix import FactoredMatrix

        h = self.head(layer, head)
        a = f"blocks.{layer}.attn."
        Q = self.base_tensor(a + "W_Q", h.W_Q.device)[head]
        K = self.base_tensor(a + "W_K", h.W_K.device)[h.kv_head]
        return FactoredMatrix(torch.cat([Q + h.W_Q, -Q], dim=-1),
                              torch.cat([(K + h.W_K).T, K.T], dim=0))

    # ----------------------------------------------------------------- arithmetic
    def check_same(self, other: "TuningVector") -> None:
        """Raise a clear error unless ``other`` is a vector of the same parameters and shapes
        (fine-tunes of one base), which vectors need to combine."""
        if not isinstance(other, TuningVector):
            raise TypeError(f"Cannot combine a TuningVector with a {type(other).__name__}.")
        check_compatible(self.spec, other.spec, "combine")
        mismatched = sorted(set(self.deltas) ^ set(other.deltas))
        mismatched += [k for k in self.deltas if k in other.deltas
                       and self.meta(k)[0] != other.meta(k)[0]]
        if mismatched:
            raise ShapeMismatchError(
                f"The two tuning vectors hold different parameters or shapes, e.g. "
                f"{mismatched[:3]}. Vectors combine only when they come from fine-tunes of the "
                "same base (made with the same vocab= setting)."
            )

    def __add__(self, other: "TuningVector") -> "TuningVector":
        self.check_same(other)
        return self._map(lambda k, a, b: a + b, other)

    def __sub__(self, other: "TuningVector") -> "TuningVector":
        self.check_same(other)
        return self._map(lambda k, a, b: a - b, other)

    def __neg__(self) -> "TuningVector":
        return self * -1

    def __mul__(self, alpha: float | int) -> "TuningVector":
        if not isinstance(alpha, (int, float)):
            return NotImplemented
        factors = {k: f.scaled(alpha) for k, f in self._factors.items()}
        return self._map(lambda k, v: alpha * v, factors=factors)

    __rmul__ = __mul__

    def __truediv__(self, alpha: float | int) -> "TuningVector":
        return self * (1.0 / alpha)

    def select(self, *, layers: Iterable[int] | None = None,
               heads: Iterable[int | tuple[int, int]] | None = None,
               neurons: Iterable[int | tuple[int, int]] | None = None,
               parts: Iterable[str] | None = None) -> "TuningVector":
        """A tuning vector with everything outside the named components set to zero.

        Filters narrow one another:

        - ``parts``: any of ``"attn"``, ``"mlp"``, ``"norms"`` (the blocks' norms), ``"embed"``
          (W_E, W_pos), ``"unembed"`` (W_U), ``"final_norm"``: the part kinds of
          :mod:`tv_lens.components`;
        - ``layers``: keep only block weights of these layers (embeddings drop out);
        - ``heads`` / ``neurons``: ``(layer, index)`` pairs, or bare indices meaning that index in
          every selected layer. When either is given, only those heads' attention weights and
          those neurons' MLP weights remain. Selecting a query head keeps its Q and O slices and
          its key-value group's K and V (shared with the group's other query heads under GQA).
        """
        spec = self.spec
        layer_set = set(resolve_layers(None if layers is None else sorted(set(layers)), spec.n_layers))
        part_set = set(PARTS if parts is None else ([parts] if isinstance(parts, str) else parts))
        renamed = sorted(part_set & set(_RENAMED_PARTS))
        if renamed:
            raise InvalidArgumentError(f"The part {renamed[0]!r} was renamed: use "
                             f"{_RENAMED_PARTS[renamed[0]]}. Parts are {PARTS}.")
        if part_set - set(PARTS):
            raise InvalidArgumentError(f"Unknown part(s) {sorted(part_set - set(PARTS))}; parts are {PARTS}.")
        head_pairs = _as_pairs(heads, sorted(layer_set))
        neuron_pairs = _as_pairs(neurons, sorted(layer_set))
        by_unit = head_pairs is not None or neuron_pairs is not None
        for pairs, kind, size in ((head_pairs, "head", spec.n_heads),
                                  (neuron_pairs, "neuron", spec.d_mlp)):
            for _, index in pairs or ():
                self._check_index(kind, index, size)

        def keep(name: str, delta: Tensor) -> Tensor:
            slot, layer = self.slots[name], layer_of(name)
            kept = part_kind(name, slot) in part_set and (
                layer in layer_set if layer is not None else layers is None)
            mask = None
            if kept and by_unit:
                kept, mask = self._unit_mask(slot, layer, delta, head_pairs, neuron_pairs)
            if not kept:
                return torch.zeros_like(delta)
            return delta.clone() if mask is None else delta * mask

        return self._map(keep)

    def _unit_mask(self, slot: Slot, layer: int | None, delta: Tensor,
                   head_pairs: set | None, neuron_pairs: set | None) -> tuple[bool, Tensor | None]:
        """Whether a weight survives a head/neuron selection, and the mask along its unit axis."""
        if slot.part == "attn" and head_pairs:
            chosen = {h for l, h in head_pairs if l == layer}
            if slot.unit == "kv_head":
                chosen = {self.spec.kv_head(h) for h in chosen}
            elif slot.unit is None:  # b_O belongs to no head
                return False, None
        elif slot.part == "mlp" and neuron_pairs and slot.unit == "neuron":
            chosen = {n for l, n in neuron_pairs if l == layer}
        else:
            return False, None
        shape = [1] * delta.ndim
        shape[slot.unit_axis] = delta.shape[slot.unit_axis]
        mask = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
        index = torch.tensor(sorted(chosen), dtype=torch.long, device=delta.device)
        mask.index_fill_(slot.unit_axis, index, 1.0)
        return bool(chosen), mask

    # ----------------------------------------------------------------- magnitudes
    def norm(self) -> float:
        """Frobenius norm of the whole vector."""
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.deltas.values())))

    def norms(self) -> pd.DataFrame:
        """One row per parameter: ``name, layer, part, matrix, shape, delta_norm, base_norm,
        relative_norm`` (``base_norm``/``relative_norm`` are NaN without base weights)."""
        rows = []
        for name, delta in self.deltas.items():
            slot = self.slots[name]
            d = float(delta.double().norm())
            b = (float((self.base[name].double() + slot.gain_offset).norm())
                 if self.base is not None else float("nan"))
            rows.append(dict(name=name, layer=layer_of(name), part=part_kind(name, slot),
                             matrix=slot.matrix,
                             shape=tuple(delta.shape), delta_norm=d, base_norm=b,
                             relative_norm=d / b if b > 0 else float("nan")))
        df = pd.DataFrame(rows)
        df["layer"] = df["layer"].astype("Int64")
        return df

    # ----------------------------------------------------------------- application
    def check_fits(self, weights: ModelWeights, names: Iterable[str] | None = None) -> None:
        """Raise a clear error unless every delta (or those of ``names``) has the model's shape
        for that parameter."""
        check_compatible(self.spec, weights.spec, "apply")
        problems = []
        for name in self.deltas if names is None else names:
            shape = tuple(self.meta(name)[0])
            if name not in weights.slots:
                problems.append(f"{name}: not in the model")
                continue
            slot = weights.slots[name]
            expected = tuple(slot.to_tl(weights.parameter(slot.hf_key).detach(), weights.spec).shape)
            if expected != shape:
                problems.append(f"{name}: vector {shape}, model {expected}")
        if problems:
            hint = ""
            if any("W_E" in p or "W_U" in p for p in problems):
                hint = (" The vocabularies differ: a vector made with vocab='shared' covers only "
                        "the shared rows; apply it to the base model.")
            raise ShapeMismatchError(
                f"This tuning vector does not fit the model ({len(problems)} parameter(s)): "
                + "; ".join(problems[:4]) + "." + hint
            )

    @contextmanager
    def applied(self, model: Any, alpha: float | int = 1.0):
        """Temporarily set ``θ ← θ + alpha·τ`` in ``model`` (bridge or HF causal LM).

        The original values are restored bit for bit when the block exits, also when it raises
        and when such contexts nest. The sum is computed in the parameter's precision
        (float64 stays float64; bf16/fp16 go through float32) and cast back. Yields ``model``.
        """
        check_alpha(alpha)
        weights = ModelWeights(model)
        self.check_fits(weights)
        with weights.patched(self.deltas, alpha):
            yield model

    def apply_(self, model: Any, alpha: float | int = 1.0) -> Any:
        """Add ``alpha·τ`` to ``model``'s weights in place, permanently. Returns ``model``."""
        check_alpha(alpha)
        weights = ModelWeights(model)
        self.check_fits(weights)
        weights.add_(self.deltas, alpha)
        return model

    def apply_to(self, model: Any, alpha: float | int = 1.0) -> Any:
        """A deep copy of ``model`` with ``alpha·τ`` added; ``model`` itself is untouched."""
        return self.apply_(copy.deepcopy(model), alpha)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the vector to a safetensors file (architecture, shapes and provenance in its
        metadata), one entry at a time (a lazy vector is never held whole). The file appears
        only once complete. Returns the path."""
        from tv_lens import __version__
        from tv_lens.checkpoints import write_safetensors

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: self.meta(k) for k in self.deltas}
        header = {"spec": self.spec.to_dict(), "metadata": self.metadata,
                  "tv_lens_version": __version__,
                  "shapes": {k: list(shape) for k, (shape, _) in meta.items()}}
        return write_safetensors(path, list(self.deltas), meta, self.__getitem__,
                                 metadata={"tv_lens": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", *,
             lazy: bool = False) -> "TuningVector":
        """Read a vector written by :meth:`save` (no base weights attached; see :meth:`with_base`).

        ``lazy=True`` reads each entry from the file on access instead of all at once."""
        from tv_lens.checkpoints import SafetensorsFile

        path = Path(path)
        if not path.is_file():
            raise CheckpointNotFoundError(f"No tuning vector file at {str(path)!r}. Pass the path "
                                          "TuningVector.save wrote to.")
        file = SafetensorsFile(path)
        raw = file.metadata.get("tv_lens")
        if raw is None:
            raise TvLensError(f"{str(path)!r} is a safetensors file but not a tv_lens tuning "
                              "vector (no 'tv_lens' metadata). Write vectors with tv.save().")
        header = json.loads(raw)
        spec = ArchSpec.from_dict(header["spec"])
        meta = dict(header.get("metadata", {}), saved_with=header.get("tv_lens_version"))
        read = lambda k: file.read(k).to(device)  # noqa: E731
        if lazy:
            entries = LazyDeltas({k: (shape, dtype) for k, (dtype, shape, _, _)
                                  in file.entries.items()}, read)
            return cls(entries, spec, metadata=meta)
        return cls({k: read(k) for k in file.keys()}, spec, metadata=meta)
