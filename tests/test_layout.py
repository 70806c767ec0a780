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
