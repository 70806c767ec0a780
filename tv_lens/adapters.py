"""Weight layouts derived from TransformerLens's architecture adapters.

TransformerLens 4.x ships an adapter per architecture whose ``component_mapping`` says which
Hugging Face module holds each TransformerLens component: ``blocks`` → ``model.layers``,
``attn.q`` → ``self_attn.q_proj``, ``mlp.gate`` → ``mlp.gate_proj``, ``ln1`` →
``input_layernorm``, and so on. :func:`derived_slots` walks that mapping and builds the same
:class:`~tv_lens.layout.Slot` table the hand-written layouts hold, so a family whose adapter uses
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

Fused QKV / gate-up tensors and mixture-of-experts have per-adapter split
functions this walk cannot read; they are not derived (see the README's family table).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tv_lens.errors import UnsupportedArchitectureError
from tv_lens.layout import Slot, linear_attention
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


#: model types whose RMSNorm multiplies by ``(1 + w)`` (Gemma's convention, q/k norms included)
UNIT_OFFSET_NORMS = {"gemma", "gemma2", "gemma3_text"}


def _norm_slots(tl: str, hf: str, offset: float, part: str = "norm") -> list[Slot]:
    return [Slot(f"{tl}.w", f"{hf}.weight", "d -> d", part, gain_offset=offset),
            Slot(f"{tl}.b", f"{hf}.bias", "d -> d", part, optional=True)]


def _attention_slots(attn: Any, prefix: str, offset: float) -> list[Slot]:
    subs = attn.submodules
    if not {"q", "k", "v", "o"} <= set(subs):
        raise UnsupportedArchitectureError(
            f"attention {_kind(attn)} at {prefix}{attn.name} has no separate q/k/v/o linear layers "
            f"(it has {sorted(subs)}): fused QKV needs a hand-written layout.")
    p = f"{prefix}{attn.name}."
    slots = linear_attention(p, *(subs[x].name for x in "qkvo"))
    for tl, component in subs.items():
        if tl in "qkvo":
            continue
        if _NORM not in _kind(component):
            raise UnsupportedArchitectureError(f"unknown attention submodule {tl!r} ({_kind(component)}).")
        # one gain shared by every head (d_head, or all heads' dims for OLMo-2): the layer's
        # shared attention component
        slots += _norm_slots(f"blocks.{{l}}.attn.{tl}", p + component.name, offset, "attn")
    return slots


def _mlp_slots(mlp: Any, prefix: str) -> list[Slot]:
    subs = mlp.submodules
    p = f"{prefix}{mlp.name}."
    names = {"in": "W_in", "gate": "W_gate"}
    if not {"in", "out"} <= set(subs) or set(subs) - {"in", "gate", "out"}:
        raise UnsupportedArchitectureError(
            f"MLP {_kind(mlp)} at {p[:-1]} has submodules {sorted(subs)}: only separate "
            "in/(gate)/out linear layers are derived (fused gate_up and experts are not).")
    slots = []
    for tl in ("in", "gate"):
        if tl in subs:
            key = f"{p}{subs[tl].name}"
            slots += [Slot(f"blocks.{{l}}.mlp.{names[tl]}", f"{key}.weight", "m d -> d m", "mlp", "neuron", 1),
                      Slot(f"blocks.{{l}}.mlp.b_{tl}", f"{key}.bias", "m -> m", "mlp", "neuron", 0,
                           optional=True)]
    key = f"{p}{subs['out'].name}"
    return slots + [Slot("blocks.{l}.mlp.W_out", f"{key}.weight", "d m -> m d", "mlp", "neuron", 0),
                    Slot("blocks.{l}.mlp.b_out", f"{key}.bias", "d -> d", "mlp", optional=True)]


def derived_slots(adapter: Any, gain_offset: float = 0.0) -> tuple[list[Slot], list[Slot]]:
    """``(per-block slots, per-model slots)`` from an adapter's ``component_mapping``
    (``gain_offset``: 1 for models whose norms multiply by ``1 + w``)."""
    mapping = adapter.component_mapping
    blocks = mapping["blocks"]
    prefix = f"{blocks.name}.{{l}}."
    per_block: list[Slot] = []
    for tl, component in blocks.submodules.items():
        kind = _kind(component)
        if tl == "attn":
            per_block += _attention_slots(component, prefix, gain_offset)
        elif tl == "mlp":
            per_block += _mlp_slots(component, prefix)
        elif _NORM in kind:
            per_block += _norm_slots(f"blocks.{{l}}.{tl}", prefix + component.name, gain_offset)
        else:
            raise UnsupportedArchitectureError(f"unknown block component {tl!r} ({kind}).")
    per_model = [Slot("embed.W_E", f"{mapping['embed'].name}.weight", "v d -> v d", "embed")]
    if "ln_final" in mapping:
        per_model += _norm_slots("ln_final", mapping["ln_final"].name, gain_offset)
    unembed = mapping["unembed"].name
    per_model += [Slot("unembed.W_U", f"{unembed}.weight", "v d -> d v", "embed", optional=True),
                  Slot("unembed.b_U", f"{unembed}.bias", "v -> v", "embed", optional=True)]
    return per_block, per_model


@functools.lru_cache(maxsize=None)
def _slots_of(architecture: str) -> tuple[tuple[Slot, ...], tuple[Slot, ...]]:
    # the mapping names modules, not sizes: a small config of the right model_type is enough
    config = {"architectures": [architecture], "model_type": DERIVED_ARCHITECTURES[architecture],
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64}
    offset = 1.0 if config["model_type"] in UNIT_OFFSET_NORMS else 0.0
    per_block, per_model = derived_slots(adapter_for(config), offset)
    return tuple(per_block), tuple(per_model)


def slots_for(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    """The derived ``(per-block, per-model)`` slots of ``spec``'s architecture."""
    per_block, per_model = _slots_of(spec.architecture)
    return list(per_block), list(per_model)
