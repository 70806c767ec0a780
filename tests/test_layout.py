"""The weight layout reads exactly what TransformerLens's own accessors show."""

import pytest
import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from tv_lens.sources import ModelWeights

STACKED = ["W_Q", "W_K", "W_V", "W_O"]
MLP = ["W_in", "W_out"]


def _check_against_accessors(bridge):
    weights = ModelWeights(bridge)
    with torch.no_grad():
        for layer in range(bridge.cfg.n_layers):
            for name in STACKED:
                ours = weights[f"blocks.{layer}.attn.{name}"]
                torch.testing.assert_close(ours, getattr(bridge, name)[layer].float(), rtol=0, atol=0)
            for name in MLP + (["W_gate"] if bridge.cfg.gated_mlp else []):
                ours = weights[f"blocks.{layer}.mlp.{name}"]
                torch.testing.assert_close(ours, getattr(bridge, name)[layer].float(), rtol=0, atol=0)
        torch.testing.assert_close(weights["embed.W_E"], bridge.W_E.float(), rtol=0, atol=0)
        if "unembed.W_U" in weights:
            torch.testing.assert_close(weights["unembed.W_U"], bridge.W_U.float(), rtol=0, atol=0)
        else:  # tied embeddings: the unembedding is the embedding
            torch.testing.assert_close(bridge.W_U.float(), weights["embed.W_E"].T, rtol=0, atol=0)
    return weights


def test_llama_layout_matches_transformerlens(llama_dirs):
    bridge = TransformerBridge.boot_transformers(str(llama_dirs[0]))
    weights = _check_against_accessors(bridge)
    assert weights["blocks.0.attn.W_K"].shape == (2, 32, 8)  # per key-value head, not repeated
    assert weights["blocks.0.attn.W_Q"].shape == (4, 32, 8)
    assert "unembed.W_U" in weights and "blocks.1.ln2.w" in weights


def test_gpt2_layout_matches_transformerlens(gpt2_dirs):
    bridge = TransformerBridge.boot_transformers(str(gpt2_dirs[0]))
    weights = _check_against_accessors(bridge)
    assert "unembed.W_U" not in weights  # tied to W_E: counted once
    assert weights["blocks.1.attn.b_V"].shape == (4, 8)
    assert weights["pos_embed.W_pos"].shape == (32, 32)


@pytest.mark.parametrize("gated", [True, False])
def test_native_layout_matches_transformerlens(gated):
    cfg = TransformerBridgeConfig(
        d_model=32, d_head=8, n_layers=2, n_ctx=16, d_vocab=50, n_heads=4, n_key_value_heads=2,
        d_mlp=64, act_fn="silu" if gated else "gelu", gated_mlp=gated,
        normalization_type="RMS" if gated else "LN",
        positional_embedding_type="rotary" if gated else "standard", seed=0)
    bridge = TransformerBridge.boot_native(cfg)
    _check_against_accessors(bridge)


def test_hf_model_and_bridge_read_identically(llama_dirs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dirs[0])
    bridge = TransformerBridge.boot_transformers(str(llama_dirs[0]))
    a, b = ModelWeights(hf), ModelWeights(bridge)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fused_blocks_against_direct_splits():
    """Fused block positions: GPT-NeoX's per-head interleaving and Phi-3's grouped-query
    [q | k | v] against splits written out by hand; writing a block back touches only it."""
    import pytest

    from tv_lens.slots import Fused, fused_blocks
    from tv_lens.spec import ArchSpec

    spec = ArchSpec("x", "adapter", 1, 12, 3, 3, 4, 10, 20, False, "LN", "rotary")
    fused = torch.randn(3 * 12, 5)
    per_head = fused_blocks(0, ("dh", "dh", "dh"), "qkv", per_head=True)
    by_hand = fused.view(3, 3, 4, 5)  # [head, q|k|v, d_head, in]
    for i, block in enumerate(per_head):
        assert torch.equal(block.take(fused, spec), by_hand[:, i].reshape(12, 5))
    gqa = ArchSpec("x", "adapter", 1, 12, 4, 2, 3, 10, 20, True, "RMS", "rotary")
    fused = torch.randn(4 * 3 + 2 * 2 * 3, 5)
    q, k, v = (b.take(fused, gqa) for b in fused_blocks(0, ("q", "kv", "kv"), "qkv"))
    assert torch.equal(torch.cat([q, k, v]), fused) and q.shape[0] == 12 and k.shape[0] == 6
    target = torch.zeros(36, 5)
    per_head[1].add_into(target, torch.ones(12, 5), spec)
    assert torch.equal(target.view(3, 3, 4, 5)[:, 1], torch.ones(3, 4, 5))
    assert target.sum() == 60
    with pytest.raises(KeyError):
        Fused(0, 0, ("nope",), "q").positions(spec)


def test_an_unknown_fused_order_is_refused():
    """The adapter walk asks the adapter's split function where each block lies and refuses
    an order it cannot write back."""
    from tv_lens.adapters import _fused_layout
    from tv_lens.errors import UnsupportedArchitectureError
    from tv_lens.slots import fused_blocks
    from tv_lens.spec import ArchSpec

    spec = ArchSpec("x", "adapter", 1, 8, 2, 2, 4, 10, 20, True, "RMS", "rotary")

    def reversed_split(module):  # [v | k | q]: not one tv_lens knows
        parts = zip(reversed(module.qkv.weight.chunk(3)), reversed(module.qkv.bias.chunk(3)))
        return tuple(_linear(w, b) for w, b in parts)

    def _linear(w, b):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.weight, lin.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
        return lin

    candidates = [fused_blocks(0, ("q", "kv", "kv"), "qkv")]
    with pytest.raises(UnsupportedArchitectureError, match="order tv_lens does not know"):
        _fused_layout(reversed_split, "qkv", spec, candidates)

    def blocks_split(module):
        return tuple(_linear(w, b) for w, b in zip(module.qkv.weight.chunk(3), module.qkv.bias.chunk(3)))

    assert _fused_layout(blocks_split, "qkv", spec, candidates) == candidates[0]


@pytest.mark.parametrize("shape,pattern,sizes", [
    ((48, 20), "(h dh) d -> h d dh", dict(dh=8)),  # W_Q: one slab per head
    ((20, 48), "d (h dh) -> h dh d", dict(dh=8)),  # W_O
    ((37, 20), "m d -> d m", {}),  # W_in: slabs of source rows, a partial last one
    ((20, 37), "d m -> m d", {}),  # W_out
    ((37, 20), "v d -> v d", {}),  # contiguous already: converted in one pass
])
def test_contiguous_copy_in_slabs_equals_one_pass(monkeypatch, shape, pattern, sizes):
    """Reading a transposed checkpoint tensor in slabs gives the one-pass copy's values and
    a contiguous tensor of the asked dtype, whatever the slab size."""
    import einops

    from tv_lens import slots

    view = einops.rearrange(torch.randn(shape).bfloat16(), pattern, **sizes)
    expected = torch.empty(view.shape).copy_(view)
    for slab in (1, 7, 64, 1 << 17):
        monkeypatch.setattr(slots, "_SLAB", slab)
        got = slots.contiguous_copy(view, torch.float32)
        assert got.is_contiguous() and got.dtype == torch.float32
        assert torch.equal(got, expected), slab
