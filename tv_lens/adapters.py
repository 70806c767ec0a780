"""Weight layouts derived from TransformerLens's architecture adapters.

TransformerLens 4.x ships an adapter per architecture whose ``component_mapping`` says which
Hugging Face module holds each TransformerLens component: ``blocks`` → ``model.layers``,
``attn.q`` → ``self_attn.q_proj``, ``mlp.gate`` → ``mlp.gate_proj``, ``ln1`` →
``input_layernorm``, and so on. :func:`derived_slots` walks that mapping and builds the same
:class:`~tv_lens.slots.Slot` table the hand-written layouts hold, so a family whose adapter uses
the standard components needs no hand-written entry.

What the walk understands (anything else is refused with the component it stopped at):

- attention as four linear layers ``q``/``k``/``v``/``o`` (``[out, in]`` weights, optional
  biases), with per-head norms inside it (Qwen3, OLMo-2, Gemma-3 ``q_norm``/``k_norm``: one
  gain shared by every head of the layer, so part of the layer's shared attention component);
- a gated MLP ``gate``/``in``/``out`` or a plain one ``in``/``out`` (optional biases); blocks
  whose attention and MLP read the same normalized input in parallel (GPT-J) have the same
  weights as sequential ones;
- every normalization in the block under its TransformerLens name (``ln1``, ``ln2``, Gemma-2/3's
  ``ln1_post``, ``ln2_post``), gain and optional bias;
- embedding, final norm and (optional, tied) unembedding with its optional bias.

- a mixture-of-experts MLP (Mixtral, OLMoE): the router and every expert's gate / in / out,
  each expert's neurons its own units (``blocks.{l}.mlp.experts.{e}.W_in``);
- fused QKV and gate-up tensors (Phi-3's ``qkv_proj`` with grouped-query sizes and
  ``gate_up_proj``, GPT-NeoX's per-head interleaved ``query_key_value``): each adapter splits
  them with its own function, so the walk *asks* that function where each block lies, by
  splitting a tensor whose rows hold their own index, and accepts only an order it knows how to
  write back (:class:`~tv_lens.slots.Fused`); anything else is refused.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tv_lens.errors import UnsupportedArchitectureError
from tv_lens.slots import Fused, Slot, fused_blocks, linear_attention
from tv_lens.spec import DERIVED_ARCHITECTURES, ArchSpec

_NORM = "Normalization"


def adapter_for(hf_config: dict[str, Any]) -> Any:
    """The TransformerLens adapter of a ``config.json`` (TransformerLens 4.x only)."""
    try:
        from transformers import AutoConfig
        from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    except ImportError as exc:  # TransformerLens 3.x has no architecture adapters of this kind
        raise UnsupportedArchitectureError(
            "Deriving a weight layout needs TransformerLens 4.x's architecture adapters "
            f"({exc}); this TransformerLens line supports the hand-written families only."
        ) from None
    config = AutoConfig.for_model(**hf_config)
    architecture = (hf_config.get("architectures") or [""])[0]
    cfg = build_bridge_config_from_hf(config, architecture, architecture, torch.float32)
    return ArchitectureAdapterFactory.select_architecture_adapter(cfg)


def _kind(component: Any) -> str:
    return type(component).__name__


#: model types whose norms multiply by ``(1 + w)`` (Gemma's RMSNorm, q/k norms included;
#: Nemotron's LayerNorm1P)
UNIT_OFFSET_NORMS = {"gemma", "gemma2", "gemma3_text", "vaultgemma", "nemotron"}


def _norm_slots(tl: str, hf: str, offset: float, part: str = "norm") -> list[Slot]:
    # optional: OLMo's LayerNorm has no parameters, Cohere's q/k norms exist only with
    # use_qk_norm (a checkpoint holding a tensor no slot reads is refused, so nothing is missed)
    return [Slot(f"{tl}.w", f"{hf}.weight", "d -> d", part, gain_offset=offset, optional=True),
            Slot(f"{tl}.b", f"{hf}.bias", "d -> d", part, optional=True)]


def _probe_split(split: Any, attr: str, rows: int, d_model: int) -> list[list[int]]:
    """Which rows of a fused ``nn.Linear`` (``attr`` of the module it is split from) each part
    returned by the adapter's ``split`` function holds: split one whose row ``i`` (weight and
    bias) is ``i``."""
    fused = nn.Linear(d_model, rows)
    with torch.no_grad():
        fused.weight.copy_(torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, d_model))
        fused.bias.copy_(torch.arange(rows, dtype=torch.float32))
    parts = split(SimpleNamespace(**{attr: fused}))
    out = []
    for part in parts:
        got = part.weight.detach()[:, 0]
        if part.bias is not None and not torch.equal(part.bias.detach(), got):
            raise UnsupportedArchitectureError(f"the adapter's split of {attr!r} moves biases "
                                               "and weights differently; not derivable.")
        out.append(got.round().long().tolist())
    return out


def _fused_layout(split: Any, attr: str, probe: ArchSpec, candidates: list[list[Fused]]) -> list[Fused]:
    """The candidate block layout of ``attr`` whose positions are what the adapter's split
    function returns, refusing a fused tensor laid out any other way."""
    seen = []
    for blocks in candidates:
        rows = blocks[0].length(probe)
        try:
            found = _probe_split(split, attr, rows, probe.d_model)
        except (RuntimeError, ValueError, AssertionError):  # the split expects another size
            continue
        if found == [torch.arange(rows)[f.positions(probe)].tolist() for f in blocks]:
            return blocks
        seen.append([r[:4] for r in found])
    raise UnsupportedArchitectureError(
        f"the fused tensor {attr!r} is split in an order tv_lens does not know (first rows of "
        f"each part: {seen}); it needs a hand-written layout.")


def _attention_slots(attn: Any, prefix: str, offset: float, probe: ArchSpec) -> list[Slot]:
    subs = attn.submodules
    p = f"{prefix}{attn.name}."
    if "qkv" in subs and {"o", "q", "k", "v"} <= set(subs):
        qkv = subs["qkv"].name
        order = _fused_layout(attn.split_qkv_matrix, qkv, probe, [
            fused_blocks(0, ("q", "kv", "kv"), "qkv"),  # [q | k | v], grouped-query sizes
            fused_blocks(0, ("dh", "dh", "dh"), "qkv", per_head=True)])  # [q_h0 k_h0 v_h0 q_h1 …]
        slots = linear_attention(p, qkv, qkv, qkv, subs["o"].name)
        fused = {f"W_{x}": f for x, f in zip("QKV", order)} | {f"b_{x}": f for x, f in zip("QKV", order)}
        slots = [replace(s, chunk=fused.get(s.matrix)) for s in slots]
        others = set(subs) - {"qkv", "q", "k", "v", "o"}
    elif {"q", "k", "v", "o"} <= set(subs):
        slots = linear_attention(p, *(subs[x].name for x in "qkvo"))
        others = set(subs) - {"q", "k", "v", "o"}
    else:
        raise UnsupportedArchitectureError(
            f"attention {_kind(attn)} at {prefix}{attn.name} has neither separate q/k/v/o linear "
            f"layers nor a fused qkv (it has {sorted(subs)}).")
    for tl in sorted(others):
        component = subs[tl]
        if _NORM not in _kind(component):
            raise UnsupportedArchitectureError(f"unknown attention submodule {tl!r} ({_kind(component)}).")
        # one gain shared by every head (d_head, or all heads' dims for OLMo-2): the layer's
        # shared attention component
        slots += _norm_slots(f"blocks.{{l}}.attn.{tl}", p + component.name, offset, "attn")
    return slots


#: how ``transformers`` (5.x) holds a mixture-of-experts MLP's experts in memory: one tensor per
#: kind stacking every expert on axis 0, the gate above the up projection in ``gate_up_proj``
#: (checkpoints store one tensor per expert; :func:`tv_lens.checkpoints.stored_expert_slots`
#: maps them with transformers's own conversion table)
_STACKED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def _moe_slots(mlp: Any, p: str) -> list[Slot]:
    """A mixture-of-experts MLP: the router (``W_router``: ``[d_model, n_experts]``, TL 3.x's
    ``mlp.W_gate``), each routed expert's W_gate / W_in / W_out under ``mlp.experts.{e}``, and
    an always-on shared expert (Qwen-MoE) as the layer's plain ``mlp.W_gate`` / ``W_in`` /
    ``W_out`` with its sigmoid gate ``W_shared_gate`` (``[d_model, 1]``, part of the router).

    ``dense_*`` submodules describe layers whose MLP is dense instead (``mlp_only_layers``);
    such checkpoints are refused, their tensors being ones this layout does not read."""
    subs = mlp.submodules
    shared = next((subs[k] for k in ("shared_expert", "shared_experts") if k in subs), None)
    known = {"gate", "experts", "shared_expert", "shared_experts", "shared_expert_gate",
             "dense_gate", "dense_in", "dense_out"}
    if "gate" not in subs or "Router" not in _kind(subs["gate"]) or set(subs) - known or (
            shared is not None and set(shared.submodules) != {"gate", "in", "out"}):
        raise UnsupportedArchitectureError(
            f"mixture-of-experts MLP {_kind(mlp)} at {p[:-1]} has submodules {sorted(subs)}: only "
            "a router, routed experts and a gated shared expert are derived.")
    router = f"{p}{subs['gate'].name}"
    gate_up, down = (p + name for name in _STACKED_EXPERTS)
    e = "blocks.{l}.mlp.experts.{e}."
    slots = [
        Slot("blocks.{l}.mlp.W_router", f"{router}.weight", "n d -> d n", "mlp"),
        Slot("blocks.{l}.mlp.b_router", f"{router}.bias", "n -> n", "mlp", optional=True),
        Slot(e + "W_gate", gate_up, "m d -> d m", "mlp", "neuron", 1,
             chunk=Fused(0, 0, ("m", "m"), "gate"), expert=0),
        Slot(e + "W_in", gate_up, "m d -> d m", "mlp", "neuron", 1,
             chunk=Fused(0, 1, ("m", "m"), "in"), expert=0),
        Slot(e + "W_out", down, "d m -> m d", "mlp", "neuron", 0, expert=0),
    ]
    if shared is not None:
        s = {tl: f"{p}{shared.name}.{c.name}.weight" for tl, c in shared.submodules.items()}
        slots += [Slot("blocks.{l}.mlp.W_gate", s["gate"], "m d -> d m", "mlp", "neuron", 1),
                  Slot("blocks.{l}.mlp.W_in", s["in"], "m d -> d m", "mlp", "neuron", 1),
                  Slot("blocks.{l}.mlp.W_out", s["out"], "d m -> m d", "mlp", "neuron", 0)]
    if "shared_expert_gate" in subs:
        slots.append(Slot("blocks.{l}.mlp.W_shared_gate", f"{p}{subs['shared_expert_gate'].name}.weight",
                          "n d -> d n", "mlp"))
    return slots


def _mlp_slots(mlp: Any, prefix: str, probe: ArchSpec) -> list[Slot]:
    subs = mlp.submodules
    p = f"{prefix}{mlp.name}."
    if _kind(mlp) == "MoEBridge":
        return _moe_slots(mlp, p)
    names = {"in": "W_in", "gate": "W_gate"}
    if not {"in", "out"} <= set(subs) or set(subs) - {"in", "gate", "out"}:
        raise UnsupportedArchitectureError(
            f"MLP {_kind(mlp)} at {p[:-1]} has submodules {sorted(subs)}: only in/(gate)/out "
            "linear layers (separate or a fused gate-up) are derived.")
    keys = {tl: (f"{p}{subs[tl].name}", None) for tl in ("in", "gate") if tl in subs}
    if hasattr(mlp, "fused_attr"):  # one gate_up tensor, split by the adapter into gate and in
        fused = mlp.fused_attr
        order = _fused_layout(mlp.split_gate_up_matrix, fused, probe,
                              [fused_blocks(0, ("m", "m"), ("gate", "in")),
                               fused_blocks(0, ("m", "m"), ("in", "gate"))])
        keys = {f.split: (f"{p}{fused}", f) for f in order}
    slots = []
    for tl in ("in", "gate"):
        if tl in keys:
            key, chunk = keys[tl]
            slots += [Slot(f"blocks.{{l}}.mlp.{names[tl]}", f"{key}.weight", "m d -> d m", "mlp", "neuron", 1,
                           chunk=chunk),
                      Slot(f"blocks.{{l}}.mlp.b_{tl}", f"{key}.bias", "m -> m", "mlp", "neuron", 0,
                           chunk=chunk, optional=True)]
    key = f"{p}{subs['out'].name}"
    return slots + [Slot("blocks.{l}.mlp.W_out", f"{key}.weight", "d m -> m d", "mlp", "neuron", 0),
                    Slot("blocks.{l}.mlp.b_out", f"{key}.bias", "d -> d", "mlp", optional=True)]


def derived_slots(adapter: Any, gain_offset: float = 0.0) -> tuple[list[Slot], list[Slot]]:
    """``(per-block slots, per-model slots)`` from an adapter's ``component_mapping``
    (``gain_offset``: 1 for models whose norms multiply by ``1 + w``)."""
    probe = _probe_spec(adapter.cfg)
    mapping = adapter.component_mapping
    blocks = mapping["blocks"]
    prefix = f"{blocks.name}.{{l}}."
    per_block: list[Slot] = []
    for tl, component in blocks.submodules.items():
        kind = _kind(component)
        if tl == "attn":
            per_block += _attention_slots(component, prefix, gain_offset, probe)
        elif tl == "mlp":
            per_block += _mlp_slots(component, prefix, probe)
        elif _NORM in kind:
            per_block += _norm_slots(f"blocks.{{l}}.{tl}", prefix + component.name, gain_offset)
        else:
            raise UnsupportedArchitectureError(f"unknown block component {tl!r} ({kind}).")
    unknown = set(mapping) - {"embed", "rotary_emb", "blocks", "ln_final", "unembed"}
    if unknown:  # e.g. learned positions (OPT, BLOOM's embedding norm): weights the walk would miss
        raise UnsupportedArchitectureError(f"unknown model-level components {sorted(unknown)}.")
    per_model = [Slot("embed.W_E", f"{mapping['embed'].name}.weight", "v d -> v d", "embed")]
    if "ln_final" in mapping:
        per_model += _norm_slots("ln_final", mapping["ln_final"].name, gain_offset)
    unembed = mapping["unembed"].name
    per_model += [Slot("unembed.W_U", f"{unembed}.weight", "v d -> d v", "embed", optional=True),
                  Slot("unembed.b_U", f"{unembed}.bias", "v -> v", "embed", optional=True)]
    return per_block, per_model


def _probe_spec(cfg: Any) -> ArchSpec:
    """The sizes of the adapter's own config, for probing its split functions."""
    n_heads = cfg.n_heads
    return ArchSpec("probe", "adapter", cfg.n_layers, cfg.d_model, n_heads,
                    getattr(cfg, "n_key_value_heads", None) or n_heads, cfg.d_head, cfg.d_mlp,
                    cfg.d_vocab, True, "RMS", "rotary")


@functools.lru_cache(maxsize=None)
def _slots_of(architecture: str) -> tuple[tuple[Slot, ...], tuple[Slot, ...]]:
    # the mapping names modules, not sizes: a small config of the right model_type is enough
    config = {"architectures": [architecture], "model_type": DERIVED_ARCHITECTURES[architecture],
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64,
              "num_local_experts": 4, "num_experts": 4, "shared_expert_intermediate_size": 96}
    offset = 1.0 if config["model_type"] in UNIT_OFFSET_NORMS else 0.0
    per_block, per_model = derived_slots(adapter_for(config), offset)
    return tuple(per_block), tuple(per_model)


def slots_for(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    """The derived ``(per-block, per-model)`` slots of ``spec``'s architecture."""
    per_block, per_model = _slots_of(spec.architecture)
    return list(per_block), list(per_model)
