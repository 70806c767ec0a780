"""What a slot is: one TransformerLens weight and its place in a checkpoint.

A tuning vector is keyed by TransformerLens names with TransformerLens shapes
(``blocks.3.attn.W_Q``: ``[n_heads, d_model, d_head]``), but checkpoints store Hugging Face
tensors (``model.layers.3.self_attn.q_proj.weight``: ``[n_heads*d_head, d_model]``, GPT-2's
fused ``c_attn`` holding Q, K and V side by side). A :class:`Slot` records, for one TL weight, the
checkpoint key, the chunk of a fused tensor it occupies (:class:`Fused`), and an einops pattern
from checkpoint to TL orientation. Patterns are pure rearrangements, so the reverse pattern maps
a TL-shaped *delta* back onto the checkpoint tensor exactly: that is how tuning vectors are
applied. Which slots a model has is :mod:`tv_lens.layout`'s business (hand-written tables, or
derived from TransformerLens's adapters by :mod:`tv_lens.adapters`); both build them from the
pieces here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import einops
import torch
from torch import Tensor

from tv_lens.spec import ArchSpec
from tv_lens.speedups import empty


#: what each size name of a fused tensor's blocks stands for
_BLOCK_SIZES = {"q": lambda s: s.n_heads * s.d_head, "kv": lambda s: s.n_kv_heads * s.d_head,
                "m": lambda s: s.d_mlp, "dh": lambda s: s.d_head}


@dataclass(frozen=True)
class Fused:
    """Where one weight sits inside a fused checkpoint tensor (QKV, gate-up).

    Attributes:
        dim: the fused axis of the checkpoint tensor.
        index: which block along it this weight is.
        blocks: the blocks' sizes by name (``"q"``: n_heads·d_head, ``"kv"``: n_kv_heads·d_head,
            ``"m"``: d_mlp, ``"dh"``: d_head): GPT-2's ``c_attn`` is ``("q", "kv", "kv")``
            along axis 1, Phi-3's ``qkv_proj`` the same along axis 0 (grouped-query sizes),
            its ``gate_up_proj`` ``("m", "m")``.
        per_head: the blocks repeat per head (GPT-NeoX's ``query_key_value``: rows
            ``[q_h0, k_h0, v_h0, q_h1, …]``, ``blocks = ("dh", "dh", "dh")``).
        split: the name a TransformerBridge gives the separate module it splits this block
            into (``q``, ``k``, ``v``, ``gate``, ``in``), beside the fused one.
    """

    dim: int
    index: int
    blocks: tuple[str, ...]
    split: str
    per_head: bool = False

    def length(self, spec: ArchSpec) -> int:
        """The fused tensor's size along :attr:`dim`."""
        total = sum(_BLOCK_SIZES[b](spec) for b in self.blocks)
        return total * spec.n_heads if self.per_head else total

    def positions(self, spec: ArchSpec) -> slice | Tensor:
        """This block's positions along ``dim``: a slice, or indices when ``per_head``."""
        sizes = [_BLOCK_SIZES[b](spec) for b in self.blocks]
        start = sum(sizes[:self.index])
        if not self.per_head:
            return slice(start, start + sizes[self.index])
        heads = torch.arange(spec.n_heads)[:, None] * sum(sizes)
        return (heads + start + torch.arange(sizes[self.index])).flatten()

    def take(self, tensor: Tensor, spec: ArchSpec, dim: int | None = None) -> Tensor:
        """This block of ``tensor`` along ``dim`` (default :attr:`dim`); a view unless
        ``per_head``."""
        dim = self.dim if dim is None else dim
        where = self.positions(spec)
        if isinstance(where, slice):
            return tensor.narrow(dim, where.start, where.stop - where.start)
        return tensor.index_select(dim, where.to(tensor.device))

    def add_into(self, fused: Tensor, block: Tensor, spec: ArchSpec) -> None:
        """``fused[this block] += block`` in place."""
        where = self.positions(spec)
        if isinstance(where, slice):
            self.take(fused, spec).add_(block.to(fused.dtype))
        else:
            fused.index_add_(self.dim, where.to(fused.device), block.to(fused.dtype))


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
        chunk: where the weight sits in a fused checkpoint tensor (:class:`Fused`), else
            ``None``.
        optional: the key may be absent (biases of bias-free models, tied unembeddings).
        expert: for one expert's weight held in a tensor stacking every expert's (axis 0, as
            ``transformers`` holds a mixture-of-experts MLP in memory), which expert; ``None``
            otherwise. Layout tables write ``{e}`` in ``tl_name`` for "one slot per expert".
        gain_offset: a norm gain the model uses as ``gain_offset + w`` (Gemma's ``(1 + w)``
            RMSNorm): the difference is the same, relative changes are taken against it.
    """

    tl_name: str
    hf_key: str
    pattern: str
    part: str
    unit: str | None = None
    unit_axis: int = 0
    chunk: Fused | None = None
    optional: bool = False
    gain_offset: float = 0.0
    expert: int | None = None

    def for_expert(self, expert: int) -> "Slot":
        """This per-expert template (``{e}`` in ``tl_name``) for one expert."""
        return replace(self, tl_name=self.tl_name.replace("{e}", str(expert)), expert=expert)

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
        if self.expert is not None:
            hf_tensor = hf_tensor[self.expert]
        if self.chunk is not None:
            hf_tensor = self.chunk.take(hf_tensor, spec)
        out = einops.rearrange(hf_tensor, self.pattern, **self.sizes(spec))
        dtype = dtype or out.dtype
        if out.dtype == dtype and out.is_contiguous():
            return out
        return contiguous_copy(out, dtype)

    def add_to_hf(self, hf_delta: Tensor, tl_delta: Tensor, spec: ArchSpec) -> None:
        """Add a TL-oriented ``tl_delta`` into ``hf_delta`` (full checkpoint shape) in place."""
        lhs, rhs = self.pattern.split("->")
        back = einops.rearrange(tl_delta, f"{rhs} -> {lhs}", **self.sizes(spec))
        if self.expert is not None:
            hf_delta = hf_delta[self.expert]  # a view: the stacked tensor is written in place
        if self.chunk is not None:
            self.chunk.add_into(hf_delta, back, spec)
        else:
            hf_delta.add_(back.to(hf_delta.dtype))


#: elements of the source one slab of :func:`contiguous_copy` reads (256 KiB of bf16)
_SLAB = 1 << 17


def contiguous_copy(view: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous ``dtype`` copy of ``view`` (e.g. a transposed checkpoint tensor), made in
    slabs along ``view``'s largest-stride dimension, so that each slab's reads stay within
    ``_SLAB`` consecutive source elements: one strided pass over a whole transposed weight
    misses the cache on every read (measured for a 5632 × 2048 bf16 ``down_proj`` → float32
    ``W_out``: 79 ms in one pass, 62 ms in slabs; the same values)."""
    out = (empty(view.shape, dtype) if view.device.type == "cpu"
           else torch.empty(view.shape, dtype=dtype, device=view.device))
    if view.is_contiguous() or view.dim() < 2:
        return out.copy_(view)
    dim = max(range(view.dim()), key=view.stride)
    step, size = max(1, _SLAB // max(1, view.stride(dim))), view.shape[dim]
    for start in range(0, size, step):
        width = min(step, size - start)
        out.narrow(dim, start, width).copy_(view.narrow(dim, start, width))
    return out


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


def fused_blocks(dim: int, blocks: tuple[str, ...], splits: str | tuple[str, ...],
                 per_head: bool = False) -> list[Fused]:
    """One :class:`Fused` per block of a fused tensor (``splits``: the bridge's names of them)."""
    return [Fused(dim, i, blocks, split, per_head) for i, split in enumerate(splits)]
