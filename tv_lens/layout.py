"""Where each TransformerLens weight lives in a checkpoint, and how to get there and back.

A tuning vector is keyed by TransformerLens names with TransformerLens shapes
(``blocks.3.attn.W_Q``: ``[n_heads, d_model, d_head]``), but checkpoints store Hugging Face
tensors (``model.layers.3.self_attn.q_proj.weight``: ``[n_heads*d_head, d_model]``, GPT-2's
fused ``c_attn`` holding Q, K and V side by side). A :class:`Slot` records, for one TL weight, the
checkpoint key, the chunk of a fused tensor it occupies, and an einops pattern from checkpoint
to TL orientation. Patterns are pure rearrangements, so the reverse pattern maps a TL-shaped
*delta* back onto the checkpoint tensor exactly: that is how tuning vectors are applied.

Reading goes through the same table for every source (a live bridge, an HF model, safetensors
shards), so a difference is always taken between two identically read raw weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import einops
import torch
from torch import Tensor

from tv_lens.spec import ArchSpec


@dataclass(frozen=True)
class Slot:
    """One TransformerLens weight and its place in a checkpoint.

    Attributes:
        tl_name: e.g. ``"blocks.{l}.attn.W_Q"`` (``{l}`` filled per layer).
        hf_key: checkpoint key, same ``{l}`` placeholder.
        pattern: einops pattern from the checkpoint chunk to TL orientation.
        part: ``"attn"``, ``"mlp"``, ``"norm"`` or ``"embed"``.
        unit: what the ``unit_axis`` of the TL tensor indexes: ``"head"``, ``"kv_head"``,
            ``"neuron"`` or ``None``.
        unit_axis: axis of the TL tensor along ``unit``.
        chunk: ``(dim, index, n_chunks)`` for a fused checkpoint tensor, else ``None``.
        optional: the key may be absent (biases of bias-free models, tied unembeddings).
        gain_offset: a norm gain the model uses as ``gain_offset + w`` (Gemma's ``(1 + w)``
            RMSNorm): the difference is the same, relative changes are taken against it.
    """

    tl_name: str
    hf_key: str
    pattern: str
    part: str
    unit: str | None = None
    unit_axis: int = 0
    chunk: tuple[int, int, int] | None = None
    optional: bool = False
    gain_offset: float = 0.0

    def at(self, layer: int | None) -> "Slot":
        """This slot with ``{l}`` filled in."""
        if layer is None:
            return self
        return replace(self, tl_name=self.tl_name.format(l=layer), hf_key=self.hf_key.format(l=layer))

    @property
    def matrix(self) -> str:
        """The short TL name: ``W_Q``, ``b_in``, ``w`` (norm gain), ``W_E``, …"""
        return self.tl_name.rsplit(".", 1)[-1]

    @property
    def matrix_transposed(self) -> bool:
        """Whether this weight as one TL matrix (heads side by side: ``W_Q`` as
        ``[d_model, n·d_head]``, ``W_O`` as ``[n·d_head, d_model]``) is the transpose of its 2-D
        checkpoint tensor (chunk). Only meaningful for 2-D checkpoint tensors."""
        lhs, rhs = (re.findall(r"\([^)]*\)|\S+", side) for side in self.pattern.split("->"))
        if rhs[0] == "h":  # [h, d, dh] -> [d, (h dh)];  [h, dh, d] -> [(h dh), d]
            first = "d" if rhs[1] == "d" else "(h dh)"
        else:
            first = rhs[0]
        return lhs[0] != first

    def sizes(self, spec: ArchSpec) -> dict[str, int]:
        heads = spec.n_kv_heads if self.unit == "kv_head" else spec.n_heads
        return {"h": heads, "dh": spec.d_head} if "dh" in self.pattern else {}

    def to_tl(self, hf_tensor: Tensor, spec: ArchSpec, dtype: torch.dtype | None = None) -> Tensor:
        """This slot's part of ``hf_tensor`` in TL orientation (and ``dtype``), contiguous: the
        same memory layout whatever the source's, so every source gives bit-identical results
        downstream. Rearranging and converting are one copy."""
        if self.chunk is not None:
            dim, index, n = self.chunk
            hf_tensor = hf_tensor.chunk(n, dim=dim)[index]
        out = einops.rearrange(hf_tensor, self.pattern, **self.sizes(spec))
        dtype = dtype or out.dtype
        if out.dtype == dtype and out.is_contiguous():
            return out
        # (``.to(dtype, memory_format=…)`` would keep a same-dtype view as it is)
        return torch.empty(out.shape, dtype=dtype, device=out.device).copy_(out)

    def add_to_hf(self, hf_delta: Tensor, tl_delta: Tensor, spec: ArchSpec) -> None:
        """Add a TL-oriented ``tl_delta`` into ``hf_delta`` (full checkpoint shape) in place."""
        lhs, rhs = self.pattern.split("->")
        back = einops.rearrange(tl_delta, f"{rhs} -> {lhs}", **self.sizes(spec))
        target = hf_delta
        if self.chunk is not None:
            dim, index, n = self.chunk
            target = hf_delta.chunk(n, dim=dim)[index]
        target.add_(back.to(target.dtype))


def linear_attention(p: str, q: str, k: str, v: str, o: str) -> list[Slot]:
    """Attention stored as four ``nn.Linear`` layers (``[out, in]`` weights, optional biases)."""
    return [
        Slot("blocks.{l}.attn.W_Q", f"{p}{q}.weight", "(h dh) d -> h d dh", "attn", "head"),
        Slot("blocks.{l}.attn.W_K", f"{p}{k}.weight", "(h dh) d -> h d dh", "attn", "kv_head"),
        Slot("blocks.{l}.attn.W_V", f"{p}{v}.weight", "(h dh) d -> h d dh", "attn", "kv_head"),
        Slot("blocks.{l}.attn.W_O", f"{p}{o}.weight", "d (h dh) -> h dh d", "attn", "head"),
        Slot("blocks.{l}.attn.b_Q", f"{p}{q}.bias", "(h dh) -> h dh", "attn", "head", optional=True),
        Slot("blocks.{l}.attn.b_K", f"{p}{k}.bias", "(h dh) -> h dh", "attn", "kv_head", optional=True),
        Slot("blocks.{l}.attn.b_V", f"{p}{v}.bias", "(h dh) -> h dh", "attn", "kv_head", optional=True),
        Slot("blocks.{l}.attn.b_O", f"{p}{o}.bias", "d -> d", "attn", optional=True),
    ]


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


def _gpt2_slots(spec: ArchSpec) -> tuple[list[Slot], list[Slot]]:
    p = "transformer.h.{l}."
    qkv_w, qkv_b = p + "attn.c_attn.weight", p + "attn.c_attn.bias"
    blocks = [
        Slot("blocks.{l}.attn.W_Q", qkv_w, "d (h dh) -> h d dh", "attn", "head", chunk=(1, 0, 3)),
        Slot("blocks.{l}.attn.W_K", qkv_w, "d (h dh) -> h d dh", "attn", "kv_head", chunk=(1, 1, 3)),
        Slot("blocks.{l}.attn.W_V", qkv_w, "d (h dh) -> h d dh", "attn", "kv_head", chunk=(1, 2, 3)),
        Slot("blocks.{l}.attn.W_O", p + "attn.c_proj.weight", "(h dh) d -> h dh d", "attn", "head"),
        Slot("blocks.{l}.attn.b_Q", qkv_b, "(h dh) -> h dh", "attn", "head", chunk=(0, 0, 3)),
        Slot("blocks.{l}.attn.b_K", qkv_b, "(h dh) -> h dh", "attn", "kv_head", chunk=(0, 1, 3)),
        Slot("blocks.{l}.attn.b_V", qkv_b, "(h dh) -> h dh", "attn", "kv_head", chunk=(0, 2, 3)),
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

#: TransformerBridge renames some wrapped modules; these map bridge names back to checkpoint keys.
BRIDGE_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt2": ((".attn.o.", ".attn.c_proj."),),
}


def _split_for_bridge(slot: Slot) -> Slot:
    """A fused-QKV slot re-pointed at the bridge's split ``q``/``k``/``v`` Linear parameters.

    A GPT-2 bridge runs its forward pass through split q/k/v ``nn.Linear`` weights that are
    transposed views of the fused ``c_attn`` (and independent copies after ``copy.deepcopy``),
    so reads and writes must go through them.
    """
    if slot.chunk is None:
        return slot
    part = "qkv"[slot.chunk[1]]
    kind = slot.hf_key.rsplit(".", 1)[-1]
    key = slot.hf_key.replace(f"attn.c_attn.{kind}", f"attn.{part}.{kind}")
    pattern = "(h dh) d -> h d dh" if kind == "weight" else "(h dh) -> h dh"
    return replace(slot, hf_key=key, pattern=pattern, chunk=None)


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
    if bridge:
        per_block = [_split_for_bridge(s) for s in per_block]
    slots = [s.at(l) for l in range(spec.n_layers) for s in per_block] + per_model
    if hooked:
        slots = [_hooked(s, available or set()) for s in slots]
    if available is None:
        return slots
    return [s for s in slots if not s.optional or s.hf_key in available]
