"""Component names: each granularity is a partition of τ, on every supported layout."""

import pytest
import torch

from tv_lens import ModelPair, TvLensError


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def pair(request, llama_dirs, gpt2_dirs, qwen2_dirs):
    dirs = {"llama": llama_dirs, "gpt2": gpt2_dirs, "qwen2": qwen2_dirs}[request.param]
    return ModelPair.from_pretrained(*dirs)


@pytest.mark.parametrize("granularity", ["parts", "units"])
def test_each_granularity_is_a_partition_of_tau(pair, granularity):
    tv = pair.tuning_vector()
    names = tv.components.names(granularity)
    pieces = [tv.component(n) for n in names]
    for key in tv:  # the components sum to τ ...
        total = torch.stack([p[key] for p in pieces]).sum(0)
        torch.testing.assert_close(total, tv[key], atol=1e-7, rtol=0)
    # ... and are disjoint: their squared norms add up to ‖τ‖² (no entry counted twice)
    squares = sum(p.norm() ** 2 for p in pieces)
    assert squares == pytest.approx(tv.norm() ** 2, rel=1e-6)
    # totals() (used by attribution) agrees with cutting each component out
    energy = tv.components.totals({k: v * v for k, v in tv.items()})
    for name, piece in zip(names, pieces):
        assert energy[name] == pytest.approx(piece.norm() ** 2, rel=1e-6, abs=1e-12)


def test_names_follow_the_architecture(pair):
    spec, index = pair.spec, pair.tuning_vector().components
    units, parts = index.names("units"), index.names("parts")
    assert f"L{spec.n_layers - 1}H{spec.n_heads - 1}" in units
    assert f"L0N{spec.d_mlp - 1}" in units and "L0.mlp" in parts and "L0.mlp" not in units
    assert "L0.norms" in parts and "L0.norms" in units and "final_norm" in units
    gqa = spec.n_kv_heads < spec.n_heads
    assert ("L0KV0" in units) == gqa
    has_b_o = spec.family == "gpt2"  # Llama and Qwen2 have no o_proj / down_proj bias
    assert ("L1.attn.shared" in units) == has_b_o and ("L1.mlp.shared" in units) == has_b_o
    assert "embed" in parts and ("unembed" in parts) == (spec.family != "gpt2")  # GPT-2 ties


def test_head_unit_owns_its_q_o_and_bias_slices(qwen2_dirs):
    tv = ModelPair.from_pretrained(*qwen2_dirs).tuning_vector()
    head = tv.component("L1H3")
    nonzero = {k for k, v in head.items() if v.abs().max() > 0}
    assert nonzero == {"blocks.1.attn.W_Q", "blocks.1.attn.W_O", "blocks.1.attn.b_Q"}
    assert torch.equal(head["blocks.1.attn.W_Q"][3], tv["blocks.1.attn.W_Q"][3])
    assert head["blocks.1.attn.W_Q"][:3].abs().max() == 0
    kv = tv.component("L1KV1")
    assert {k for k, v in kv.items() if v.abs().max() > 0} == {
        "blocks.1.attn.W_K", "blocks.1.attn.W_V", "blocks.1.attn.b_K", "blocks.1.attn.b_V"}
    assert torch.equal(kv["blocks.1.attn.b_V"][1], tv["blocks.1.attn.b_V"][1])


def test_mha_heads_own_their_k_and_v(gpt2_dirs):
    tv = ModelPair.from_pretrained(*gpt2_dirs).tuning_vector()
    nonzero = {k for k, v in tv.component("L0H2").items() if v.abs().max() > 0}
    assert {"blocks.0.attn.W_K", "blocks.0.attn.W_V", "blocks.0.attn.b_K"} <= nonzero
    assert "blocks.0.attn.b_O" not in nonzero
    neuron = {k for k, v in tv.component("L1N7").items() if v.abs().max() > 0}
    assert neuron == {"blocks.1.mlp.W_in", "blocks.1.mlp.b_in", "blocks.1.mlp.W_out"}


def test_bad_names_say_what_is_wrong(llama_dirs, gpt2_dirs):
    tv = ModelPair.from_pretrained(*llama_dirs).tuning_vector()
    with pytest.raises(TvLensError, match="layer 9 is out of range; the model has 2 layers"):
        tv.component("L9H0")
    with pytest.raises(TvLensError, match="head 4 is out of range; the model has 4 per layer"):
        tv.component("L0H4")
    with pytest.raises(TvLensError, match="Unknown component 'L0.mlps'.*Did you mean 'L0.mlp'"):
        tv.component("L0.mlps")
    with pytest.raises(TvLensError, match="has no b_O"):
        tv.component("L0.attn.shared")
    gpt = ModelPair.from_pretrained(*gpt2_dirs).tuning_vector()
    with pytest.raises(TvLensError, match="no grouped-query attention.*use 'L0H1'"):
        gpt.component("L0KV1")
    with pytest.raises(TvLensError, match="No components given"):
        tv.components.resolve([])


def test_groups_resolve_to_their_components(llama_dirs):
    index = ModelPair.from_pretrained(*llama_dirs).tuning_vector().components
    assert [c.name for c in index.resolve("heads")] == ["L0H0", "L0H1", "L0H2", "L0H3",
                                                        "L1H0", "L1H1", "L1H2", "L1H3"]
    assert len(index.resolve("neurons")) == 2 * 48 and len(index.resolve("kv_heads")) == 4
    assert [c.name for c in index.resolve("parts")] == index.names("parts")
