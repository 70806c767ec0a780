"""Where each TransformerLens weight lives in a checkpoint: the slots of every model family.

:func:`layout` lists a model's slots (:class:`~tv_lens.slots.Slot`, one per TL weight, per layer
filled in, in a stable order): from the hand-written tables here (Llama, GPT-2, the native
layout) or, for other families, derived from TransformerLens's adapters
(:mod:`tv_lens.adapters`), re-pointed where the weights are read from a TransformerBridge or a
HookedTransformer. Reading goes through the same table for every source (a live bridge, an HF
model, safetensors shards), so a difference is always taken between two identically read raw
weights.
"""

from __future__ import annotations

import re
from dataclasses import replace

from tv_lens.slots import Slot, fused_blocks, linear_attention
from tv_lens.spec import ArchSpec


def _llama_slots(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    p = "model.layers.{l}."
    blocks = linear_attention(p + "self_attn.", "q_proj", "k_proj", "v_proj", "o_proj") + [
        Slot("blocks.{l}.mlp.W_in", p + "mlp.up_proj.weight", "m d -> d m", "mlp", "neuron", 1),
        Slot("blocks.{l}.mlp.W_gate", p + "mlp.gate_proj.weight", "m d -> d m", "mlp", "neuron", 1),
        Slot("blocks.{l}.mlp.W_out", p + "mlp.down_proj.weight", "d m -> m d", "mlp", "neuron", 0),
        Slot("blocks.{l}.ln1.w", p + "input_layernorm.weight", "d -> d", "norm"),
        Slot("blocks.{l}.ln2.w", p + "post_attention_layernorm.weight", "d -> d", "norm"),
    ]
    model = [
        Slot("embed.W_E", "model.embed_tokens.weight", "v d -> v d", "embed"),
        Slot("ln_final.w", "model.norm.weight", "d -> d", "norm"),
        Slot("unembed.W_U", "lm_head.weight", "v d -> d v", "embed", optional=True),
    ]
    return blocks, model


_C_ATTN = fused_blocks(1, ("q", "kv", "kv"), "qkv")  # GPT-2's Conv1D c_attn: [d, q|k|v]
_C_ATTN_B = fused_blocks(0, ("q", "kv", "kv"), "qkv")


def _gpt2_slots(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    p = "transformer.h.{l}."
    qkv_w, qkv_b = p + "attn.c_attn.weight", p + "attn.c_attn.bias"
    blocks = [
        Slot("blocks.{l}.attn.W_Q", qkv_w, "d (h dh) -> h d dh", "attn", "head", chunk=_C_ATTN[0]),
        Slot("blocks.{l}.attn.W_K", qkv_w, "d (h dh) -> h d dh", "attn", "kv_head", chunk=_C_ATTN[1]),
        Slot("blocks.{l}.attn.W_V", qkv_w, "d (h dh) -> h d dh", "attn", "kv_head", chunk=_C_ATTN[2]),
        Slot("blocks.{l}.attn.W_O", p + "attn.c_proj.weight", "(h dh) d -> h dh d", "attn", "head"),
        Slot("blocks.{l}.attn.b_Q", qkv_b, "(h dh) -> h dh", "attn", "head", chunk=_C_ATTN_B[0]),
        Slot("blocks.{l}.attn.b_K", qkv_b, "(h dh) -> h dh", "attn", "kv_head", chunk=_C_ATTN_B[1]),
        Slot("blocks.{l}.attn.b_V", qkv_b, "(h dh) -> h dh", "attn", "kv_head", chunk=_C_ATTN_B[2]),
        Slot("blocks.{l}.attn.b_O", p + "attn.c_proj.bias", "d -> d", "attn"),
        Slot("blocks.{l}.mlp.W_in", p + "mlp.c_fc.weight", "d m -> d m", "mlp", "neuron", 1),
        Slot("blocks.{l}.mlp.b_in", p + "mlp.c_fc.bias", "m -> m", "mlp", "neuron", 0),
        Slot("blocks.{l}.mlp.W_out", p + "mlp.c_proj.weight", "m d -> m d", "mlp", "neuron", 0),
        Slot("blocks.{l}.mlp.b_out", p + "mlp.c_proj.bias", "d -> d", "mlp"),
        Slot("blocks.{l}.ln1.w", p + "ln_1.weight", "d -> d", "norm"),
        Slot("blocks.{l}.ln1.b", p + "ln_1.bias", "d -> d", "norm"),
        Slot("blocks.{l}.ln2.w", p + "ln_2.weight", "d -> d", "norm"),
        Slot("blocks.{l}.ln2.b", p + "ln_2.bias", "d -> d", "norm"),
    ]
    model = [
        Slot("embed.W_E", "transformer.wte.weight", "v d -> v d", "embed"),
        Slot("pos_embed.W_pos", "transformer.wpe.weight", "n d -> n d", "embed"),
        Slot("ln_final.w", "transformer.ln_f.weight", "d -> d", "norm"),
        Slot("ln_final.b", "transformer.ln_f.bias", "d -> d", "norm"),
        Slot("unembed.W_U", "lm_head.weight", "v d -> d v", "embed", optional=True),
    ]
    return blocks, model


def _native_slots(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    p = "layers.{l}."
    blocks = linear_attention(p + "attn.", "q", "k", "v", "o") + [
        Slot("blocks.{l}.ln1.w", p + "ln1.weight", "d -> d", "norm", optional=True),
        Slot("blocks.{l}.ln1.b", p + "ln1.bias", "d -> d", "norm", optional=True),
        Slot("blocks.{l}.ln2.w", p + "ln2.weight", "d -> d", "norm", optional=True),
        Slot("blocks.{l}.ln2.b", p + "ln2.bias", "d -> d", "norm", optional=True),
    ]
    if spec.gated_mlp:
        blocks += [
            Slot("blocks.{l}.mlp.W_in", p + "mlp.in.weight", "m d -> d m", "mlp", "neuron", 1),
            Slot("blocks.{l}.mlp.W_gate", p + "mlp.gate.weight", "m d -> d m", "mlp", "neuron", 1),
            Slot("blocks.{l}.mlp.W_out", p + "mlp.out.weight", "d m -> m d", "mlp", "neuron", 0),
        ]
    else:
        blocks += [
            Slot("blocks.{l}.mlp.W_in", p + "mlp.fc_in.weight", "m d -> d m", "mlp", "neuron", 1),
            Slot("blocks.{l}.mlp.b_in", p + "mlp.fc_in.bias", "m -> m", "mlp", "neuron", 0, optional=True),
            Slot("blocks.{l}.mlp.W_out", p + "mlp.fc_out.weight", "d m -> m d", "mlp", "neuron", 0),
            Slot("blocks.{l}.mlp.b_out", p + "mlp.fc_out.bias", "d -> d", "mlp", optional=True),
        ]
    model = [
        Slot("embed.W_E", "tok_embed.weight", "v d -> v d", "embed"),
        Slot("pos_embed.W_pos", "pos.weight", "n d -> n d", "embed", optional=True),
        Slot("ln_final.w", "ln_out.weight", "d -> d", "norm", optional=True),
        Slot("ln_final.b", "ln_out.bias", "d -> d", "norm", optional=True),
        Slot("unembed.W_U", "head.weight", "v d -> d v", "embed", optional=True),
    ]
    return blocks, model


def _adapter_slots(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    """Families whose layout is derived from TransformerLens's adapter (:mod:`tv_lens.adapters`)."""
    from tv_lens.adapters import slots_for

    return slots_for(spec)


_FAMILY_SLOTS = {"llama": _llama_slots, "gpt2": _gpt2_slots, "native": _native_slots,
                 "adapter": _adapter_slots}

def _transposed_input(pattern: str) -> str:
    """``pattern`` for the transposed 2-D input (``d (h dh) -> …`` becomes ``(h dh) d -> …``)."""
    lhs, rhs = pattern.split("->")
    first, second = re.findall(r"\([^)]*\)|\S+", lhs)
    return f"{second} {first} ->{rhs}"


def _split_for_bridge(slot: Slot) -> Slot:
    """A fused slot re-pointed at the bridge's separate module for its block (``attn.q``,
    ``mlp.gate``, …, beside the fused module in the same parent).

    A TransformerBridge runs its forward pass through split ``nn.Linear`` modules that are views
    of the fused tensor (Phi-3) or independent copies (GPT-2's transposed ``Conv1D``, GPT-NeoX's
    de-interleaved rows), so reads and writes must go through them.
    """
    if slot.chunk is None or slot.expert is not None:  # stacked experts: used as they are
        return slot
    parent, _, kind = slot.hf_key.rsplit(".", 2)
    # the split modules are nn.Linear ([out, in]); a Conv1D's fused axis 1 holds its outputs
    pattern = slot.pattern if slot.chunk.dim == 0 else _transposed_input(slot.pattern)
    return replace(slot, hf_key=f"{parent}.{slot.chunk.split}.{kind}", pattern=pattern, chunk=None)


def _hooked(slot: Slot, available: set[str]) -> Slot:
    """A slot re-pointed at a HookedTransformer's own parameter: its TL name (``_W_K``, ``_W_V``,
    ``_b_K``, ``_b_V`` under grouped-query attention), already in TL orientation."""
    head, matrix = slot.tl_name.rsplit(".", 1)
    key = f"{head}._{matrix}" if f"{head}._{matrix}" in available else slot.tl_name
    rhs = slot.pattern.split("->")[1].strip()
    return replace(slot, hf_key=key, pattern=f"{rhs} -> {rhs}", chunk=None)


def layout(spec: ArchSpec, available: set[str] | None = None, *, bridge: bool = False,
           hooked: bool = False) -> list[Slot]:
    """All slots of a model, per layer filled in, in a stable order.

    Args:
        spec: the model's architecture.
        available: checkpoint keys that exist; optional slots whose key is missing are dropped.
            ``None`` keeps every slot.
        bridge: the keys are a TransformerBridge's (fused QKV read through its split q/k/v).
        hooked: the keys are a HookedTransformer's parameter names (TL names and shapes);
            needs ``available``.
    """
    per_block, per_model = _FAMILY_SLOTS[spec.family](spec)
    per_block = [x for s in per_block for x in (
        [s.for_expert(e) for e in range(spec.n_experts)] if "{e}" in s.tl_name else [s])]
    if bridge:
        per_block = [_split_for_bridge(s) for s in per_block]
    slots = [s.at(l) for l in range(spec.n_layers) for s in per_block] + per_model
    if hooked:
        slots = [_hooked(s, available or set()) for s in slots]
    if available is None:
        return slots
    return [s for s in slots if not s.optional or s.hf_key in available]
