"""Component names: the pieces of a tuning vector that patching, attribution and views talk about.

Every entry of τ belongs to exactly one component of each of two granularities, so each
granularity is a partition of τ (``shared/METHODS.md``, "Components"):

- **parts**: ``L3.attn``, ``L3.mlp``, ``L3.norms`` (the block's norm gains and biases),
  ``embed`` (W_E and W_pos), ``unembed`` (W_U; absent when embeddings are tied) and
  ``final_norm``;
- **units**: ``L3H5`` (what belongs to query head 5 alone: its W_Q/W_O slices and b_Q slice, and
  its K/V when every head has its own), ``L3KV1`` (key-value head 1's K and V under grouped-query
  attention), ``L3.attn.shared`` (what belongs to no single head: b_O), ``L3N1024`` (neuron 1024:
  its W_in/W_gate columns, b_in entry and W_out row), ``L3.mlp.shared`` (b_out), plus the parts
  that have no units (``L3.norms``, ``embed``, ``unembed``, ``final_norm``).

A mixture-of-experts MLP (``ArchSpec.n_experts > 0``) has per-expert neurons ``L3E5N100``
(expert 5's neuron 100), its router ``L3.router`` (with a shared expert's gate) and a shared
expert's neurons ``L3N100`` as units (all inside the part ``L3.mlp``),
and one *group* per expert, ``L3E5`` (all of expert 5's neurons): a group is a component to
select, patch and sum over, but belongs to neither granularity.

A weight's entries are owned either by one component as a whole or, along the slot's unit axis
(:attr:`tv_lens.layout.Slot.unit_axis`), one component per index. :class:`ComponentIndex` holds
that ownership for one model, parses names (with close-match suggestions) and does the two
things everything else needs: cut a component's entries out of a tuning vector, and sum a
per-entry quantity (such as ``∇f ⊙ τ``) over every component at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tv_lens.errors import InvalidArgumentError, TvLensError, close_matches
from tv_lens.layout import Slot
from tv_lens.sources import layer_of
from tv_lens.spec import ArchSpec

#: Kinds of the part granularity, in the vocabulary of ``TuningVector.select(parts=...)``.
PART_KINDS = ("attn", "mlp", "norms", "embed", "unembed", "final_norm")
#: Kinds that exist only in the unit granularity.
UNIT_KINDS = ("head", "kv_head", "attn_shared", "neuron", "mlp_shared", "router")
#: Kinds that group units without being a granularity of their own.
GROUP_KINDS = ("expert",)
#: Parts with no units: they belong to both granularities.
_UNITLESS_PARTS = ("norms", "embed", "unembed", "final_norm")
GRANULARITIES = ("parts", "units")

_PATTERNS = (
    (re.compile(r"^L(\d+)E(\d+)N(\d+)$"), "expert_neuron"),
    (re.compile(r"^L(\d+)E(\d+)$"), "expert"),
    (re.compile(r"^L(\d+)\.router$"), "router"),
    (re.compile(r"^L(\d+)H(\d+)$"), "head"),
    (re.compile(r"^L(\d+)KV(\d+)$"), "kv_head"),
    (re.compile(r"^L(\d+)N(\d+)$"), "neuron"),
    (re.compile(r"^L(\d+)\.attn\.shared$"), "attn_shared"),
    (re.compile(r"^L(\d+)\.mlp\.shared$"), "mlp_shared"),
    (re.compile(r"^L(\d+)\.(attn|mlp|norms)$"), None),
)


@dataclass(frozen=True)
class Component:
    """One named piece of τ: ``kind`` is a part, unit or group kind; ``layer``/``index``/
    ``expert`` are ``None`` where they do not apply (``index`` is the head, kv head or neuron,
    ``expert`` the expert of an expert's neuron or group)."""

    name: str
    kind: str
    layer: int | None = None
    index: int | None = None
    expert: int | None = None

    @property
    def granularity(self) -> str:
        """``"part"``, ``"unit"``, ``"both"`` (a part without units) or ``"group"``."""
        if self.kind in GROUP_KINDS:
            return "group"
        if self.kind in UNIT_KINDS:
            return "unit"
        return "both" if self.kind in _UNITLESS_PARTS else "part"

    def in_granularity(self, granularity: str) -> bool:
        return self.granularity in ("both", granularity.rstrip("s"))


def part_kind(tl_name: str, slot: Slot) -> str:
    """The part kind a weight belongs to: ``attn``, ``mlp``, ``norms``, ``embed``, ``unembed`` or
    ``final_norm``."""
    if layer_of(tl_name) is not None:
        return {"attn": "attn", "mlp": "mlp", "norm": "norms"}[slot.part]
    if tl_name.startswith("unembed."):
        return "unembed"
    return "final_norm" if slot.part == "norm" else "embed"


def _part_name(tl_name: str, slot: Slot) -> str:
    layer, kind = layer_of(tl_name), part_kind(tl_name, slot)
    return kind if layer is None else f"L{layer}.{kind}"


#: a mixture-of-experts MLP's routing weights: the component ``L{l}.router``
ROUTER_WEIGHTS = ("W_router", "b_router", "W_shared_gate")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_of(tl_name: str) -> int | None:
    """The expert in a TL name (``blocks.3.mlp.experts.5.W_in`` -> 5), else ``None``."""
    m = _EXPERT.search(tl_name)
    return int(m.group(1)) if m else None


def _group_name(tl_name: str) -> str | None:
    expert = expert_of(tl_name)
    return None if expert is None else f"L{layer_of(tl_name)}E{expert}"


def _unit_names(tl_name: str, slot: Slot, spec: ArchSpec) -> list[str] | str:
    """The unit owning each index along the slot's unit axis, or the one owner of the whole."""
    layer = layer_of(tl_name)
    if slot.unit == "neuron" and expert_of(tl_name) is not None:
        return [f"L{layer}E{expert_of(tl_name)}N{n}" for n in range(spec.d_mlp)]
    if slot.unit == "neuron" and spec.n_experts:  # the always-on shared expert
        return [f"L{layer}N{n}" for n in range(spec.d_mlp_shared)]
    if slot.matrix in ROUTER_WEIGHTS:
        return f"L{layer}.router"
    if slot.unit == "head" or (slot.unit == "kv_head" and spec.n_kv_heads == spec.n_heads):
        return [f"L{layer}H{h}" for h in range(spec.n_heads)]
    if slot.unit == "kv_head":
        return [f"L{layer}KV{g}" for g in range(spec.n_kv_heads)]
    if slot.unit == "neuron":
        return [f"L{layer}N{n}" for n in range(spec.d_mlp)]
    if layer is not None and slot.part in ("attn", "mlp"):
        return f"L{layer}.{slot.part}.shared"
    return _part_name(tl_name, slot)


def _component(name: str) -> Component:
    """A :class:`Component` from a well-formed name (no check against a model)."""
    for pattern, kind in _PATTERNS:
        m = pattern.match(name)
        if m:
            if kind == "expert_neuron":
                return Component(name, "neuron", int(m.group(1)), int(m.group(3)), int(m.group(2)))
            if kind == "expert":
                return Component(name, kind, int(m.group(1)), expert=int(m.group(2)))
            if kind is None:
                return Component(name, m.group(2), int(m.group(1)))
            index = int(m.group(2)) if kind in ("head", "kv_head", "neuron") else None
            return Component(name, kind, int(m.group(1)), index)
    return Component(name, name)


@dataclass(frozen=True)
class _Member:
    """A component's share of one weight: all of it (``index is None``) or one index along
    ``axis``."""

    tl_name: str
    axis: int
    index: int | None


class ComponentIndex:
    """Which entries of each weight belong to which component, for one model.

    Args:
        spec: the architecture.
        slots: ``TL name -> Slot`` of the weights the tuning vector holds (tied unembeddings and
            absent biases are simply not there, and neither are their components).
    """

    def __init__(self, spec: ArchSpec, slots: Mapping[str, Slot]):
        self.spec = spec
        self._members: dict[str, list[_Member]] = {}
        self._owners: dict[str, tuple[str, list[str] | str, int, str | None]] = {}
        for tl_name, slot in slots.items():
            part, units = _part_name(tl_name, slot), _unit_names(tl_name, slot, spec)
            group = _group_name(tl_name)
            self._owners[tl_name] = (part, units, slot.unit_axis, group)
            self._members.setdefault(part, []).append(_Member(tl_name, slot.unit_axis, None))
            if group is not None:
                self._members.setdefault(group, []).append(_Member(tl_name, slot.unit_axis, None))
            if isinstance(units, str):
                if units != part:
                    self._members.setdefault(units, []).append(_Member(tl_name, slot.unit_axis, None))
            else:
                for i, unit in enumerate(units):
                    self._members.setdefault(unit, []).append(_Member(tl_name, slot.unit_axis, i))
        ordered = sorted(self._members, key=_sort_key)
        self.components: dict[str, Component] = {n: _component(n) for n in ordered}

    def __repr__(self) -> str:
        counts = {g: len(self.names(g)) for g in GRANULARITIES}
        return f"ComponentIndex({counts['parts']} parts, {counts['units']} units)"

    def __contains__(self, name: object) -> bool:
        return name in self.components

    def names(self, granularity: str | None = None) -> list[str]:
        """Component names of one granularity (``"parts"`` or ``"units"``), or of both."""
        if granularity is None:
            return list(self.components)
        if granularity not in GRANULARITIES:
            raise InvalidArgumentError(f"granularity must be one of {GRANULARITIES} or None, got "
                             f"{granularity!r}.")
        return [n for n, c in self.components.items() if c.in_granularity(granularity)]

    def parse(self, name: str) -> Component:
        """The component called ``name``, or a :class:`TvLensError` that says what is wrong."""
        if not isinstance(name, str):
            raise TvLensError(f"Component names are strings like 'L3H5', 'L3N100' or 'L3.mlp'; "
                              f"got {name!r} ({type(name).__name__}).")
        if name in self.components:
            return self.components[name]
        raise TvLensError(self._why_unknown(name))

    def parse_all(self, names: Iterable[str] | str) -> list[Component]:
        if isinstance(names, str):
            names = [names]
        return [self.parse(n) for n in names]

    def resolve(self, components: Iterable[str] | str) -> list[Component]:
        """Components from names, or from a whole group: ``"parts"``, ``"units"``, or a kind in
        the plural (``"heads"``, ``"kv_heads"``, ``"neurons"``, ``"experts"``)."""
        if isinstance(components, str) and components in GRANULARITIES:
            return self.parse_all(self.names(components))
        kinds = {f"{k}s": k for k in ("head", "kv_head", "neuron", "expert")}
        if isinstance(components, str) and components in kinds:
            return [c for c in self.components.values() if c.kind == kinds[components]]
        if not isinstance(components, str) and hasattr(components, "tolist"):
            components = components.tolist()  # a pandas column of names
        chosen = self.parse_all(components)
        if not chosen:
            raise TvLensError("No components given. Pass names such as ['L0H1', 'L2.mlp'], or "
                              "'parts', 'units', 'heads', 'kv_heads' or 'neurons'.")
        return chosen

    def _why_unknown(self, name: str) -> str:
        s = self.spec
        c = _component(name)
        if c.layer is not None and not 0 <= c.layer < s.n_layers:
            return (f"Component {name!r}: layer {c.layer} is out of range; the model has "
                    f"{s.n_layers} layers (0..{s.n_layers - 1}).")
        if c.expert is not None and not 0 <= c.expert < s.n_experts:
            return (f"Component {name!r}: expert {c.expert} is out of range; the model has "
                    f"{s.n_experts} experts per layer" + (f" (0..{s.n_experts - 1})." if s.n_experts
                                                          else " (its MLPs are dense)."))
        if c.kind == "router" and not s.n_experts:
            return f"Component {name!r}: this model's MLPs are dense; there is no router."
        sizes = {"head": s.n_heads, "kv_head": s.n_kv_heads,
                 "neuron": s.d_mlp_shared if s.n_experts and c.expert is None else s.d_mlp}
        if c.kind == "neuron" and not sizes["neuron"]:
            return (f"Component {name!r}: this model's MLPs are mixtures of experts without a "
                    f"shared expert; neurons are named 'L{c.layer}E{{expert}}N{c.index}'.")
        if c.kind in sizes and not 0 <= c.index < sizes[c.kind]:
            return (f"Component {name!r}: {c.kind.replace('_', ' ')} {c.index} is out of range; "
                    f"the model has {sizes[c.kind]} per layer (0..{sizes[c.kind] - 1}).")
        if c.kind == "kv_head":
            return (f"Component {name!r}: this model has no grouped-query attention (n_kv_heads "
                    f"== n_heads == {s.n_heads}), so each head's K and V belong to the head "
                    f"itself: use 'L{c.layer}H{c.index}'.")
        if c.kind in ("attn_shared", "mlp_shared", "unembed"):
            what = {"attn_shared": "b_O", "mlp_shared": "b_out",
                    "unembed": "an untied W_U"}[c.kind]
            return f"Component {name!r}: this model has no {what}, so there is nothing in it."
        options = [n for n in self.components if _component(n).kind != "neuron"]
        return (f"Unknown component {name!r}. Names are 'L{{layer}}H{{head}}', "
                f"'L{{layer}}KV{{kv_head}}' (grouped-query attention), 'L{{layer}}N{{neuron}}', "
                f"'L{{layer}}.attn', 'L{{layer}}.mlp', 'L{{layer}}.norms', 'L{{layer}}.attn.shared', "
                f"'L{{layer}}.mlp.shared', 'embed', 'unembed', 'final_norm'; with experts "
                f"'L{{layer}}E{{expert}}N{{neuron}}', 'L{{layer}}E{{expert}}', 'L{{layer}}.router'."
                + close_matches(name, options))

    # ------------------------------------------------------------------ cutting and summing
    def deltas(self, vector: Mapping[str, Tensor], names: Iterable[str] | str) -> dict[str, Tensor]:
        """The entries of ``vector`` that belong to the named components, for the weights they
        touch only (``TL name -> tensor``, zero outside the components)."""
        out: dict[str, Tensor] = {}
        for component in self.parse_all(names):
            for m in self._members[component.name]:
                full = vector[m.tl_name]
                target = out.setdefault(m.tl_name, torch.zeros_like(full))
                if m.index is None:
                    target.copy_(full)
                else:
                    target.select(m.axis, m.index).copy_(full.select(m.axis, m.index))
        return out

    def weights_of(self, names: Iterable[str] | str) -> set[str]:
        """The TL names of the weights the named components own entries of."""
        return {m.tl_name for c in self.parse_all(names) for m in self._members[c.name]}

    def totals(self, entries: Mapping[str, Tensor]) -> dict[str, float]:
        """``Σ entries`` over each component (both granularities), e.g. ``∇f ⊙ τ`` summed to
        attributions. ``entries`` has a tensor for every weight of the index; sums in float64."""
        out = dict.fromkeys(self.components, 0.0)
        for tl_name, (part, units, axis, group) in self._owners.items():
            values = entries[tl_name].double()
            total = float(values.sum())
            out[part] += total
            if group is not None:
                out[group] += total
            if isinstance(units, str):
                if units != part:
                    out[units] += total
                continue
            other = [d for d in range(values.ndim) if d != axis]
            per_unit = (values.sum(dim=other) if other else values).tolist()
            for unit, value in zip(units, per_unit):
                out[unit] += value
        return out


def _sort_key(name: str) -> tuple:
    """embed; then per layer: attn part, heads, kv heads, attn.shared, mlp part, router, neurons
    (each expert's after its group), mlp.shared, norms; then final_norm, unembed."""
    c = _component(name)
    order = ("attn", "head", "kv_head", "attn_shared", "mlp", "router", "expert", "neuron",
             "mlp_shared", "norms")
    if c.layer is None:
        return ({"embed": -1, "final_norm": 10**9, "unembed": 10**9 + 1}[c.kind], 0, 0, 0)
    kind = "expert" if c.expert is not None else c.kind  # an expert's neurons follow its group
    return (c.layer, order.index(kind), c.expert or 0, c.kind == "neuron", c.index or 0)
