"""Component names: the one key for every piece of the model, in every table and function.

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
expert's neurons ``L3N100`` as units (all inside the part ``L3.mlp``).

**Groups** select weight slices but belong to neither partition, so they are never summed with
units or parts:

- experts ``L3E5`` (all of expert 5's neurons);
- circuits ``L3H5.OV`` (W_V's slice of the head's key-value head and W_O's slice of the head)
  and ``L3H5.QK`` (W_Q's and W_K's); under grouped-query attention ``L3H5.OV`` touches the
  kv head's W_V, which it shares with the other query heads of its group (its unit is ``L3KV1``);
- matrices: one weight, named like its TransformerLens name with ``blocks.3.`` written ``L3.``
  and ``mlp.experts.2.`` written ``E2.mlp.`` (``L3.attn.W_Q``, ``L3.mlp.W_in``,
  ``L3E2.mlp.W_in``, ``embed.W_E``, ``unembed.W_U``); :func:`param_of` gives the TL name back;
- a neuron's slice of one matrix: ``L3N7.in``, ``L3N7.gate``, ``L3N7.out`` (``L3E2N7.out``);
- the model's attention or MLPs as a whole: ``attn`` (every ``L*.attn``), ``mlp``;
- a user's own named group, given as ``{"early_mlps": ["L0.mlp", "L1.mlp"]}`` wherever
  components are taken.

**Residual-stream points** ``L3.resid_pre``, ``L3.resid_mid``, ``L3.resid_post`` name
activations (activation patching, the activation lens); they have no weights.

:class:`ComponentIndex` holds the ownership of one model's weights, parses every name (with
close-match suggestions) and does the two things everything else needs: cut a component's
entries out of a tuning vector, and sum a per-entry quantity (such as ``∇f ⊙ τ``) over every
part and unit at once. The ``*_name`` functions below are the only place names are built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from numbers import Integral
from typing import Union

import torch
from torch import Tensor

from tv_lens.errors import InvalidArgumentError, TvLensError, close_matches
from tv_lens.slots import Slot
from tv_lens.sources import layer_of
from tv_lens.spec import ArchSpec

#: Kinds of the part granularity, in the vocabulary of ``TuningVector.select(parts=...)``.
PART_KINDS = ("attn", "mlp", "norms", "embed", "unembed", "final_norm")
#: Kinds that exist only in the unit granularity.
UNIT_KINDS = ("head", "kv_head", "attn_shared", "neuron", "mlp_shared", "router")
#: Kinds that select weights without belonging to either granularity.
GROUP_KINDS = ("expert", "circuit", "matrix", "neuron_matrix", "all_layers", "named")
#: Residual-stream points (activations, no weights).
STREAM_POINTS = ("resid_pre", "resid_mid", "resid_post")
#: Parts with no units: they belong to both granularities.
_UNITLESS_PARTS = ("norms", "embed", "unembed", "final_norm")
GRANULARITIES = ("parts", "units")
#: a neuron's matrix by the suffix of its name (``L3N7.in`` -> ``W_in``)
NEURON_MATRICES = {"in": "W_in", "gate": "W_gate", "out": "W_out"}
CIRCUITS = ("OV", "QK")
#: a mixture-of-experts MLP's routing weights: the component ``L{l}.router``
ROUTER_WEIGHTS = ("W_router", "b_router", "W_shared_gate")
#: plural selectors accepted wherever components are: every component of one kind
_PLURALS = {"heads": "head", "kv_heads": "kv_head", "neurons": "neuron", "experts": "expert"}

_L = r"L(?P<layer>\d+)"
_E = r"(?:E(?P<expert>\d+))?"
_PATTERNS = (
    (re.compile(rf"^{_L}{_E}N(?P<neuron>\d+)\.(?P<side>in|gate|out)$"), "neuron_matrix"),
    (re.compile(rf"^{_L}{_E}N(?P<neuron>\d+)$"), "neuron"),
    (re.compile(rf"^{_L}E(?P<expert>\d+)$"), "expert"),
    (re.compile(rf"^{_L}H(?P<head>\d+)\.(?P<circuit>OV|QK)$"), "circuit"),
    (re.compile(rf"^{_L}H(?P<head>\d+)$"), "head"),
    (re.compile(rf"^{_L}KV(?P<kv_head>\d+)$"), "kv_head"),
    (re.compile(rf"^{_L}\.router$"), "router"),
    (re.compile(rf"^{_L}\.attn\.shared$"), "attn_shared"),
    (re.compile(rf"^{_L}\.mlp\.shared$"), "mlp_shared"),
    (re.compile(rf"^{_L}\.(?P<part>attn|mlp|norms)$"), "part"),
    (re.compile(rf"^{_L}\.(?P<point>resid_pre|resid_mid|resid_post)$"), "stream"),
    (re.compile(rf"^{_L}{_E}\.(?P<rest>\w+(?:\.\w+)*)$"), "matrix"),
    (re.compile(r"^(?P<rest>(?:embed|pos_embed|unembed|ln_final)\.\w+)$"), "matrix"),
)


@dataclass(frozen=True)
class Component:
    """One named piece of the model.

    ``kind`` is a part, unit, group kind or ``"stream"``; the other fields are ``None`` where
    they do not apply: ``head``/``kv_head``/``neuron``/``expert`` its indices, ``circuit``
    (``OV``/``QK``), ``matrix`` (``W_in``, …: a matrix's or a neuron slice's weight), ``param``
    (a matrix's TL name), ``members`` (an ``all_layers`` or ``named`` group's component names).
    """

    name: str
    kind: str
    layer: int | None = None
    head: int | None = None
    kv_head: int | None = None
    neuron: int | None = None
    expert: int | None = None
    circuit: str | None = None
    matrix: str | None = None
    param: str | None = None
    members: tuple[str, ...] | None = None

    @property
    def granularity(self) -> str:
        """``"part"``, ``"unit"``, ``"both"`` (a part without units), ``"group"`` or
        ``"stream"``."""
        if self.kind == "stream":
            return "stream"
        if self.kind in GROUP_KINDS:
            return "group"
        if self.kind in UNIT_KINDS:
            return "unit"
        return "both" if self.kind in _UNITLESS_PARTS else "part"

    def in_granularity(self, granularity: str) -> bool:
        return self.granularity in ("both", granularity.rstrip("s"))


#: what every function acting on components accepts: a name, names (a DataFrame column works;
#: parsed :class:`Component` objects too), a selector (``"heads"``, ``"parts"``, …) or a dict of
#: named groups
Components = Union[str, Iterable[Union[str, Component]], Mapping[str, Union[str, Iterable[str]]]]


# ----------------------------------------------------------------------------- building names
def part_name(layer: Integral | None, part: str) -> str:
    """``L3.attn``, ``L3.mlp``, ``L3.norms``; a global part (``embed``, …) or, with ``layer``
    ``None``, ``attn``/``mlp`` (every layer's)."""
    return part if layer is None else f"L{layer}.{part}"


def layer_name(layer: Integral | None) -> str:
    """A layer as figures label it and caches file it: ``L3`` (``embed`` for the weights outside
    the blocks)."""
    return "embed" if layer is None else f"L{layer}"


def head_name(layer: Integral, head: Integral) -> str:
    return f"L{layer}H{head}"


def kv_head_name(layer: Integral, kv_head: Integral) -> str:
    return f"L{layer}KV{kv_head}"


def neuron_name(layer: Integral, neuron: Integral, expert: Integral | None = None) -> str:
    """``L3N7``, or an expert's ``L3E2N7``."""
    return f"L{layer}{'' if expert is None else f'E{expert}'}N{neuron}"


def expert_name(layer: Integral, expert: Integral) -> str:
    return f"L{layer}E{expert}"


def circuit_name(layer: Integral, head: Integral, circuit: str) -> str:
    """``L3H5.OV`` or ``L3H5.QK``."""
    return f"{head_name(layer, head)}.{circuit}"


def neuron_matrix_name(layer: Integral, neuron: Integral, matrix: str, expert: Integral | None = None) -> str:
    """A neuron's slice of one matrix: ``matrix`` ``W_in``/``W_gate``/``W_out`` -> ``L3N7.in``."""
    side = {m: s for s, m in NEURON_MATRICES.items()}[matrix]
    return f"{neuron_name(layer, neuron, expert)}.{side}"


def matrix_name(param: str) -> str:
    """A weight's component name from its TL name: ``blocks.3.mlp.experts.2.W_in`` ->
    ``L3E2.mlp.W_in``, ``blocks.3.attn.W_Q`` -> ``L3.attn.W_Q``, ``embed.W_E`` unchanged."""
    m = re.match(r"^blocks\.(\d+)\.(?:mlp\.experts\.(\d+)\.(.+)|(.+))$", param)
    if not m:
        return param
    if m[2] is not None:
        return f"L{m[1]}E{m[2]}.mlp.{m[3]}"
    return f"L{m[1]}.{m[4]}"


def param_of(name: str) -> str:
    """A matrix component's TL weight name (the inverse of :func:`matrix_name`)."""
    c = describe(name)
    if c.kind != "matrix":
        raise InvalidArgumentError(f"{name!r} is not a matrix name such as 'L3.attn.W_Q', "
                                   f"'L3E2.mlp.W_in' or 'embed.W_E'.")
    return c.param


def stream_name(layer: Integral, point: str) -> str:
    """A residual-stream point: ``L3.resid_pre``, ``L3.resid_mid``, ``L3.resid_post``."""
    return f"L{layer}.{point}"


def stream_of_hook(hook: str) -> str | None:
    """The component name of a TL hook point, where it has one: ``blocks.3.hook_resid_pre`` ->
    ``L3.resid_pre``, ``blocks.3.hook_attn_out`` -> ``L3.attn``, ``blocks.3.hook_mlp_out`` ->
    ``L3.mlp``; else ``None``."""
    m = re.match(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$", hook)
    if not m:
        return None
    point = m[2]
    return part_name(int(m[1]), point[:-4]) if point.endswith("_out") else stream_name(int(m[1]), point)


def name_of(c: Component) -> str:
    """The standard spelling of a described component (what the builders above print): parsing a
    name and printing it again gives the name back only if it was written the standard way
    (``L0H00.OV`` -> ``L0H0.OV``, ``L0.mlp.experts.1.W_in`` -> ``L0E1.mlp.W_in``)."""
    if c.kind == "matrix":
        return matrix_name(c.param)
    if c.kind == "circuit":
        return circuit_name(c.layer, c.head, c.circuit)
    if c.kind == "neuron_matrix":
        return neuron_matrix_name(c.layer, c.neuron, c.matrix, c.expert)
    if c.kind == "neuron":
        return neuron_name(c.layer, c.neuron, c.expert)
    if c.kind == "head":
        return head_name(c.layer, c.head)
    if c.kind == "kv_head":
        return kv_head_name(c.layer, c.kv_head)
    if c.kind == "expert":
        return expert_name(c.layer, c.expert)
    if c.kind == "stream":
        return c.name if c.layer is None else f"L{c.layer}.{c.name.split('.', 1)[1]}"
    if c.layer is not None and c.kind in ("attn", "mlp", "norms"):
        return part_name(c.layer, c.kind)
    if c.layer is not None:  # router, attn.shared, mlp.shared: L{layer}.<fixed suffix>
        return f"L{c.layer}.{c.name.split('.', 1)[1]}"
    return c.name


def hook_of(name: str) -> str | None:
    """The TransformerLens hook a residual-stream point or a block's attention / MLP output is
    read at (the inverse of :func:`stream_of_hook`): ``L3.resid_pre`` -> ``blocks.3.hook_resid_pre``,
    ``L3.attn`` -> ``blocks.3.hook_attn_out``, ``L3.mlp`` -> ``blocks.3.hook_mlp_out``; else ``None``."""
    c = describe(name)
    if c.layer is None or name_of(c) != name:
        return None
    if c.kind == "stream":
        return f"blocks.{c.layer}.hook_{name.split('.', 1)[1]}"
    if c.kind in ("attn", "mlp"):
        return f"blocks.{c.layer}.hook_{c.kind}_out"
    return None


def describe(name: str) -> Component:
    """The :class:`Component` a well-formed name denotes, checked against no model (its kind
    ``"unknown"`` if the grammar does not know it)."""
    if name in PART_KINDS:
        return Component(name, name)
    for pattern, kind in _PATTERNS:
        m = pattern.match(name)
        if not m:
            continue
        g = {k: v for k, v in m.groupdict().items() if v is not None}
        layer = int(g["layer"]) if "layer" in g else None
        expert = int(g["expert"]) if "expert" in g else None
        if kind == "neuron_matrix":
            return Component(name, kind, layer, neuron=int(g["neuron"]), expert=expert,
                             matrix=NEURON_MATRICES[g["side"]])
        if kind == "neuron":
            return Component(name, kind, layer, neuron=int(g["neuron"]), expert=expert)
        if kind == "expert":
            return Component(name, kind, layer, expert=expert)
        if kind == "circuit":
            return Component(name, kind, layer, head=int(g["head"]), circuit=g["circuit"])
        if kind == "head":
            return Component(name, kind, layer, head=int(g["head"]))
        if kind == "kv_head":
            return Component(name, kind, layer, kv_head=int(g["kv_head"]))
        if kind == "part":
            return Component(name, g["part"], layer)
        if kind == "stream":
            return Component(name, kind, layer)
        if kind == "matrix":
            rest = g["rest"]
            if layer is None:
                param = rest
            elif expert is None:
                param = f"blocks.{layer}.{rest}"
            elif rest.startswith("mlp."):
                param = f"blocks.{layer}.mlp.experts.{expert}.{rest[4:]}"
            else:
                break
            return Component(name, kind, layer, expert=expert, matrix=param.rsplit(".", 1)[-1],
                             param=param)
        return Component(name, kind, layer)
    return Component(name, "unknown")


# ----------------------------------------------------------------------------- ownership
def part_kind(tl_name: str, slot: Slot) -> str:
    """The part kind a weight belongs to: ``attn``, ``mlp``, ``norms``, ``embed``, ``unembed`` or
    ``final_norm``."""
    if layer_of(tl_name) is not None:
        return {"attn": "attn", "mlp": "mlp", "norm": "norms"}[slot.part]
    if tl_name.startswith("unembed."):
        return "unembed"
    return "final_norm" if slot.part == "norm" else "embed"


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_of(tl_name: str) -> int | None:
    """The expert in a TL name (``blocks.3.mlp.experts.5.W_in`` -> 5), else ``None``."""
    m = _EXPERT.search(tl_name)
    return int(m.group(1)) if m else None


def _unit_names(tl_name: str, slot: Slot, spec: ArchSpec) -> list[str] | str:
    """The unit owning each index along the slot's unit axis, or the one owner of the whole."""
    layer, expert = layer_of(tl_name), expert_of(tl_name)
    if slot.unit == "neuron" and expert is not None:
        return [neuron_name(layer, n, expert) for n in range(spec.d_mlp)]
    if slot.unit == "neuron" and spec.n_experts:  # the always-on shared expert
        return [neuron_name(layer, n) for n in range(spec.d_mlp_shared)]
    if slot.matrix in ROUTER_WEIGHTS:
        return f"L{layer}.router"
    if slot.unit == "head" or (slot.unit == "kv_head" and spec.n_kv_heads == spec.n_heads):
        return [head_name(layer, h) for h in range(spec.n_heads)]
    if slot.unit == "kv_head":
        return [kv_head_name(layer, g) for g in range(spec.n_kv_heads)]
    if slot.unit == "neuron":
        return [neuron_name(layer, n) for n in range(spec.d_mlp)]
    if layer is not None and slot.part in ("attn", "mlp"):
        return f"L{layer}.{slot.part}.shared"
    return part_name(layer, part_kind(tl_name, slot))


@dataclass(frozen=True)
class Slice:
    """A component's share of one weight (TL name ``param``): all of it (``index is None``) or
    one index along ``axis``."""

    param: str
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
        self.slots = dict(slots)
        self._members: dict[str, list[Slice]] = {}
        self._owners: dict[str, tuple[str, list[str] | str, int, str | None]] = {}
        for tl_name, slot in slots.items():
            layer, expert = layer_of(tl_name), expert_of(tl_name)
            part = part_name(layer, part_kind(tl_name, slot))
            units = _unit_names(tl_name, slot, spec)
            group = None if expert is None else expert_name(layer, expert)
            self._owners[tl_name] = (part, units, slot.unit_axis, group)
            self._members.setdefault(part, []).append(Slice(tl_name, slot.unit_axis, None))
            if group is not None:
                self._members.setdefault(group, []).append(Slice(tl_name, slot.unit_axis, None))
            if isinstance(units, str):
                if units != part:
                    self._members.setdefault(units, []).append(Slice(tl_name, slot.unit_axis, None))
            else:
                for i, unit in enumerate(units):
                    self._members.setdefault(unit, []).append(Slice(tl_name, slot.unit_axis, i))
        ordered = sorted(self._members, key=_sort_key)
        #: every part, unit and expert of the model, in model order (groups of other kinds are
        #: parsed on demand: a 7B model has a million neuron slices)
        self.components: dict[str, Component] = {n: describe(n) for n in ordered}

    def __repr__(self) -> str:
        counts = {g: len(self.names(g)) for g in GRANULARITIES}
        return f"ComponentIndex({counts['parts']} parts, {counts['units']} units)"

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.parse(name)
        except TvLensError:
            return False
        return True

    def names(self, granularity: str | None = None) -> list[str]:
        """Component names of one granularity (``"parts"`` or ``"units"``), or every part, unit
        and expert."""
        if granularity is None:
            return list(self.components)
        if granularity not in GRANULARITIES:
            raise InvalidArgumentError(f"granularity must be one of {GRANULARITIES} or None, got "
                                       f"{granularity!r}.")
        return [n for n, c in self.components.items() if c.in_granularity(granularity)]

    # ------------------------------------------------------------------ parsing
    def parse(self, name: str) -> Component:
        """The component called ``name`` (any kind above), or an :class:`InvalidArgumentError`
        that says what is wrong."""
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"Component names are strings like 'L3H5', 'L3N100', 'L3H5.OV' or 'L3.mlp'; got "
                f"{name!r} ({type(name).__name__}).")
        if name in self.components:
            return self.components[name]
        c = describe(name)
        if c.kind != "unknown" and name_of(c) != name:
            raise InvalidArgumentError(f"Component {name!r} is not written the standard way: did "
                                       f"you mean {name_of(c)!r}?")
        if c.kind in ("attn", "mlp") and c.layer is None:
            members = tuple(part_name(l, c.kind) for l in range(self.spec.n_layers)
                            if part_name(l, c.kind) in self.components)
            return replace(c, kind="all_layers", members=members)
        if c.kind == "stream" and 0 <= c.layer < self.spec.n_layers:
            return c
        if c.kind in ("circuit", "matrix", "neuron_matrix") and self._group_members(c):
            return c
        raise InvalidArgumentError(self._why_unknown(name))

    def resolve(self, components: Components) -> list[Component]:
        """Components from a name, a list of names (a DataFrame column works), a selector
        (``"parts"``, ``"units"`` or a kind in the plural: ``"heads"``, ``"kv_heads"``,
        ``"neurons"``, ``"experts"``), or a dict of named groups
        (``{"all_mlp": ["L0.mlp", "L1.mlp"]}``: one component per key, its members together)."""
        if isinstance(components, Mapping):
            out = [self.named_group(k, v) for k, v in components.items()]
            if not out:
                raise InvalidArgumentError("No groups given: the dict of named groups is empty.")
            return out
        if isinstance(components, str) and components in GRANULARITIES:
            return [self.components[n] for n in self.names(components)]
        if isinstance(components, str) and components in _PLURALS:
            chosen = [c for c in self.components.values() if c.kind == _PLURALS[components]]
            if not chosen:
                why = {"kv_heads": "it has no grouped-query attention (each head owns its K and V)",
                       "experts": "its MLPs are dense"}.get(components, "it has none")
                raise InvalidArgumentError(f"This model has no {components}: {why}.")
            return chosen
        if isinstance(components, str):
            components = [components]
        if hasattr(components, "tolist"):
            components = components.tolist()  # a pandas column of names
        chosen = [n if isinstance(n, Component) else self.parse(n) for n in components]
        if not chosen:
            raise InvalidArgumentError(
                "No components given. Pass names such as ['L0H1', 'L2.mlp', 'L0H1.OV'], a dict "
                "of named groups, or 'parts', 'units', 'heads', 'kv_heads', 'neurons'.")
        return chosen

    def named_group(self, name: str, members: Iterable[str] | str) -> Component:
        """A user's group ``name`` of the components ``members`` (names or a selector)."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"A named group's name must be a non-empty string, got "
                                       f"{name!r}.")
        if describe(name).kind != "unknown" or name in GRANULARITIES or name in _PLURALS:
            raise InvalidArgumentError(f"A named group cannot be called {name!r}: that is a "
                                       f"component's name or a selector. Choose another name, e.g. "
                                       f"'my_{name.replace('.', '_')}'.")
        chosen = self.resolve(members)
        if any(c.kind == "stream" for c in chosen):
            raise InvalidArgumentError(f"Group {name!r}: residual-stream points have no weights.")
        return Component(name, "named", members=tuple(c.name for c in chosen))

    def _why_unknown(self, name: str) -> str:
        s = self.spec
        c = describe(name)
        if c.layer is not None and not 0 <= c.layer < s.n_layers:
            return (f"Component {name!r}: layer {c.layer} is out of range; the model has "
                    f"{s.n_layers} layers (0..{s.n_layers - 1}).")
        if c.expert is not None and not 0 <= c.expert < s.n_experts:
            return (f"Component {name!r}: expert {c.expert} is out of range; the model has "
                    f"{s.n_experts} experts per layer" + (f" (0..{s.n_experts - 1})." if s.n_experts
                                                          else " (its MLPs are dense)."))
        if c.kind == "router" and not s.n_experts:
            return f"Component {name!r}: this model's MLPs are dense; there is no router."
        n_neurons = s.d_mlp_shared if s.n_experts and c.expert is None else s.d_mlp
        if c.kind in ("neuron", "neuron_matrix") and not n_neurons:
            return (f"Component {name!r}: this model's MLPs are mixtures of experts without a "
                    f"shared expert; neurons are named 'L{c.layer}E{{expert}}N{c.neuron}'.")
        for kind, index, size in (("head", c.head, s.n_heads), ("kv head", c.kv_head, s.n_kv_heads),
                                  ("neuron", c.neuron, n_neurons)):
            if index is not None and not 0 <= index < size:
                return (f"Component {name!r}: {kind} {index} is out of range; the model has "
                        f"{size} per layer (0..{size - 1}).")
        if c.kind == "kv_head":
            return (f"Component {name!r}: this model has no grouped-query attention (n_kv_heads "
                    f"== n_heads == {s.n_heads}), so each head's K and V belong to the head "
                    f"itself: use 'L{c.layer}H{c.kv_head}'.")
        if c.kind in ("attn_shared", "mlp_shared", "unembed"):
            what = {"attn_shared": "b_O", "mlp_shared": "b_out",
                    "unembed": "an untied W_U"}[c.kind]
            return f"Component {name!r}: this model has no {what}, so there is nothing in it."
        if name in self.slots:  # a TransformerLens weight name
            return (f"Unknown component {name!r}: that is a TransformerLens weight name; its "
                    f"component name is {matrix_name(name)!r}.")
        if c.kind == "matrix" and c.expert is None and s.n_experts and c.param.startswith(
                f"blocks.{c.layer}.mlp.") and c.matrix in NEURON_MATRICES.values():
            return (f"Component {name!r}: this model's MLP is a mixture of experts; an expert's "
                    f"matrix is named 'L{c.layer}E{{expert}}.mlp.{c.matrix}'.")
        if c.kind in ("circuit", "neuron_matrix") or (
                c.kind == "matrix" and re.fullmatch(r"[Wb]_\w+|[wb]", c.matrix)):
            what = c.param or c.matrix or "W_Q/W_K/W_V/W_O"
            return (f"Component {name!r}: this tuning vector holds no {what} for it (the "
                    f"fine-tune did not change that weight, or the model has none).")
        options = [n for n, comp in self.components.items() if comp.kind != "neuron"]
        return (f"Unknown component {name!r}. Names are 'L{{layer}}H{{head}}', "
                f"'L{{layer}}KV{{kv_head}}' (grouped-query attention), 'L{{layer}}N{{neuron}}', "
                f"'L{{layer}}.attn', 'L{{layer}}.mlp', 'L{{layer}}.norms', 'L{{layer}}.attn.shared', "
                f"'L{{layer}}.mlp.shared', 'embed', 'unembed', 'final_norm'; groups "
                f"'L{{layer}}H{{head}}.OV' (.QK), 'L{{layer}}.attn.W_Q' (any weight), "
                f"'L{{layer}}N{{neuron}}.out' (.in, .gate), 'attn', 'mlp'; with experts "
                f"'L{{layer}}E{{expert}}N{{neuron}}', 'L{{layer}}E{{expert}}', 'L{{layer}}.router'."
                + close_matches(name, options))

    # ------------------------------------------------------------------ weight slices
    def _group_members(self, c: Component) -> list[Slice]:
        """The weight slices of a circuit, matrix or neuron slice (empty if the vector holds
        none of them)."""
        s = self.spec
        if c.kind == "matrix":
            slot = self.slots.get(c.param)
            return [] if slot is None else [Slice(c.param, slot.unit_axis, None)]
        if c.kind == "circuit":
            if not 0 <= c.head < s.n_heads:
                return []
            weights = ("W_V", "W_O") if c.circuit == "OV" else ("W_Q", "W_K")
            out = []
            for w in weights:
                slot = self.slots.get(f"blocks.{c.layer}.attn.{w}")
                if slot is not None:
                    kv = slot.unit == "kv_head" and s.n_kv_heads != s.n_heads
                    out.append(Slice(slot.tl_name, slot.unit_axis,
                                       s.kv_head(c.head) if kv else c.head))
            return out
        if c.kind == "neuron_matrix":
            expert = "" if c.expert is None else f"experts.{c.expert}."
            slot = self.slots.get(f"blocks.{c.layer}.mlp.{expert}{c.matrix}")
            if slot is None:
                return []
            size = s.d_mlp if c.expert is not None or not s.n_experts else s.d_mlp_shared
            return [Slice(slot.tl_name, slot.unit_axis, c.neuron)] if 0 <= c.neuron < size else []
        if c.kind in ("all_layers", "named"):
            return [m for name in c.members for m in self._members_of(self.parse(name))]
        return []

    def _members_of(self, component: Component) -> list[Slice]:
        if component.kind == "stream":
            raise InvalidArgumentError(f"{component.name!r} is a residual-stream point: it has "
                                       f"no weights to cut, patch or sum.")
        return self._members.get(component.name) or self._group_members(component)

    def slices(self, name: str | Component) -> list[Slice]:
        """The weight slices the component ``name`` (any kind but a residual-stream point)
        selects."""
        return self._members_of(name if isinstance(name, Component) else self.parse(name))

    def deltas(self, vector: Mapping[str, Tensor], names: Components) -> dict[str, Tensor]:
        """The entries of ``vector`` that belong to the named components (names, components or
        a dict of named groups), for the weights they touch only (``TL name -> tensor``, zero
        outside the components)."""
        out: dict[str, Tensor] = {}
        for component in self.resolve(names):
            for m in self._members_of(component):
                full = vector[m.param]
                target = out.setdefault(m.param, torch.zeros_like(full))
                if m.index is None:
                    target.copy_(full)
                else:
                    target.select(m.axis, m.index).copy_(full.select(m.axis, m.index))
        return out

    def weights_of(self, names: Components) -> set[str]:
        """The TL names of the weights the named components own entries of."""
        return {m.param for c in self.resolve(names) for m in self._members_of(c)}

    def totals(self, entries: Mapping[str, Tensor]) -> dict[str, float]:
        """``Σ entries`` over every part, unit and expert, e.g. ``∇f ⊙ τ`` summed to
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

    def total(self, entries: Mapping[str, Tensor], component: Component) -> float:
        """``Σ entries`` over one component of any kind (a group's slices counted once)."""
        cut = self.deltas(entries, [component])
        return float(sum(v.double().sum() for v in cut.values()))


def _sort_key(name: str) -> tuple:
    """embed; then per layer: attn part, heads, kv heads, attn.shared, mlp part, router, neurons
    (each expert's after its group), mlp.shared, norms; then final_norm, unembed."""
    c = describe(name)
    order = ("attn", "head", "kv_head", "attn_shared", "mlp", "router", "expert", "neuron",
             "mlp_shared", "norms")
    if c.layer is None:
        return ({"embed": -1, "final_norm": 10**9, "unembed": 10**9 + 1}[c.kind], 0, 0, 0)
    kind = "expert" if c.expert is not None else c.kind  # an expert's neurons follow its group
    index = c.head if c.head is not None else c.kv_head if c.kv_head is not None else c.neuron
    return (c.layer, order.index(kind), c.expert or 0, c.kind == "neuron", index or 0)
