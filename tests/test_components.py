"""Component names: each granularity is a partition of τ, on every supported layout."""

import re

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


# --------------------------------------------------------------------------- one grammar
def _index_of(family: str):
    """A ComponentIndex of a tiny model: Llama with grouped-query attention, GPT-2 (tied
    embeddings, biases) or Mixtral (3 experts; its layout needs TransformerLens 4.x)."""
    from transformers import AutoConfig

    from conftest import _LLAMA_LIKE
    from tv_lens.components import ComponentIndex
    from tv_lens.layout import layout
    from tv_lens.spec import ArchSpec
    from tv_lens.tl_compat import tl_version

    configs = {"llama": ("llama", dict(_LLAMA_LIKE, architectures=["LlamaForCausalLM"])),
               "gpt2": ("gpt2", dict(n_embd=32, n_head=4, n_layer=2, n_positions=32,
                                     architectures=["GPT2LMHeadModel"])),
               "mixtral": ("mixtral", dict(_LLAMA_LIKE, num_experts_per_tok=2, num_local_experts=3,
                                           architectures=["MixtralForCausalLM"]))}
    if family == "mixtral" and tl_version() < (4,):
        pytest.skip("Mixtral's layout is derived from TransformerLens 4.x's adapters (3.x here)")
    model_type, config = configs[family]
    hf = AutoConfig.for_model(model_type, **config, vocab_size=96).to_dict()
    spec = ArchSpec.from_hf_config(hf)
    return ComponentIndex(spec, {s.tl_name: s for s in layout(spec)})


def _name_from_slices(index, kind: str, slices) -> str:
    """Rebuild a component's name from the weight slices it selects (what the test checks
    against: the index's own ownership tables are not used)."""
    from tv_lens.components import (circuit_name, matrix_name, neuron_matrix_name, expert_of)
    from tv_lens.sources import layer_of

    if kind == "matrix":
        (s,) = slices
        assert s.index is None
        return matrix_name(s.param)
    if kind == "circuit":
        by_matrix = {s.param.rsplit(".", 1)[-1]: s for s in slices}
        head = by_matrix["W_O"].index if "W_O" in by_matrix else by_matrix["W_Q"].index
        circuit = "OV" if "W_O" in by_matrix else "QK"
        kv = by_matrix["W_V" if circuit == "OV" else "W_K"].index
        assert kv == index.spec.kv_head(head)  # the kv group's shared slice under GQA
        return circuit_name(layer_of(slices[0].param), head, circuit)
    (s,) = slices  # a neuron's slice of one matrix
    return neuron_matrix_name(layer_of(s.param), s.index, s.param.rsplit(".", 1)[-1],
                              expert_of(s.param))


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_every_name_round_trips_through_its_weight_slices(family):
    """name -> slices -> name for every part, unit, expert, circuit, matrix and neuron slice;
    each part/unit owns exactly the entries whose owner is that name."""
    from tv_lens.components import NEURON_MATRICES, circuit_name, matrix_name, neuron_matrix_name
    from tv_lens.sources import layer_of

    index = _index_of(family)
    spec = index.spec
    owners = {}  # (param, index) -> the part and unit owning it, from the slots alone
    for name in index.names():
        c = index.parse(name)
        assert index.parse(c.name) == c and c.name == name
        for s in index.slices(name):
            if c.granularity in ("unit", "both"):
                owners.setdefault((s.param, s.index), set()).add(name)
    for param in index.slots:  # every entry of every weight has exactly one unit
        assert any(key[0] == param for key in owners), param
    groups = [circuit_name(l, h, c) for l in range(spec.n_layers) for h in range(spec.n_heads)
              for c in ("OV", "QK")]
    groups += [matrix_name(p) for p in index.slots if p.rsplit(".", 1)[-1].startswith("W_")]
    for param, slot in index.slots.items():
        matrix = param.rsplit(".", 1)[-1]
        if slot.unit == "neuron" and matrix in NEURON_MATRICES.values():
            size = spec.d_mlp_shared if spec.n_experts and ".experts." not in param else spec.d_mlp
            groups += [neuron_matrix_name(layer_of(param), n, matrix,
                                          index.parse(matrix_name(param)).expert)
                       for n in range(size)]
    assert len(groups) > 2 * spec.n_layers * spec.n_heads
    for name in groups:
        c = index.parse(name)
        assert c.granularity == "group"
        assert _name_from_slices(index, c.kind, index.slices(name)) == name
    if family == "mixtral":
        assert "L1E2.mlp.W_in" in groups and "L0E1N47.out" in groups


def test_any_name_works_where_components_are_taken(llama_dirs):
    """Circuits, matrices, neuron slices, 'mlp' and named groups cut exactly their slices."""
    tv = ModelPair.from_pretrained(*llama_dirs).tuning_vector()
    ov = {k: v for k, v in tv.component("L1H3.OV").items() if v.abs().max() > 0}
    assert set(ov) == {"blocks.1.attn.W_V", "blocks.1.attn.W_O"}
    assert torch.equal(ov["blocks.1.attn.W_V"][1], tv["blocks.1.attn.W_V"][1])  # kv head 3 // 2
    assert ov["blocks.1.attn.W_V"][0].abs().max() == 0
    assert torch.equal(ov["blocks.1.attn.W_O"][3], tv["blocks.1.attn.W_O"][3])
    out = tv.component("L0N5.out")
    assert {k for k, v in out.items() if v.abs().max() > 0} == {"blocks.0.mlp.W_out"}
    assert tv.components.weights_of("L0.attn.W_Q") == {"blocks.0.attn.W_Q"}
    mlp = tv.components.deltas(tv, "mlp")
    named = tv.components.deltas(tv, {"all_mlp": ["L0.mlp", "L1.mlp"]})
    assert set(mlp) == set(named) == {k for k in tv if ".mlp." in k}
    assert all(torch.equal(mlp[k], tv[k]) for k in mlp)
    [group] = tv.components.resolve({"early": ["L0H1", "L0N3", "L0N3.out"]})  # overlap: once
    assert group.kind == "named" and group.granularity == "group"
    energy = tv.components.total({k: v * v for k, v in tv.items()}, group)
    by_hand = tv.component(["L0H1", "L0N3"]).norm() ** 2
    assert energy == pytest.approx(float(by_hand), rel=1e-9)
    with pytest.raises(TvLensError, match="residual-stream point"):
        tv.components.deltas(tv, "L1.resid_pre")
    with pytest.raises(TvLensError, match="Unknown component 'L0H1.OW'"):
        tv.components.parse("L0H1.OW")
    with pytest.raises(TvLensError, match="head 9 is out of range"):
        tv.components.parse("L0H9.OV")
    with pytest.raises(TvLensError, match="neuron 480 is out of range"):
        tv.components.parse("L0N480.in")


def test_names_from_hooks_and_weights():
    from tv_lens.components import describe, matrix_name, param_of, stream_of_hook

    assert stream_of_hook("blocks.3.hook_resid_pre") == "L3.resid_pre"
    assert stream_of_hook("blocks.3.hook_mlp_out") == "L3.mlp"
    assert stream_of_hook("blocks.3.attn.hook_z") is None
    for param in ("blocks.3.mlp.experts.2.W_in", "blocks.0.attn.W_Q", "embed.W_E", "unembed.W_U",
                  "blocks.1.ln1.w", "ln_final.w"):
        assert param_of(matrix_name(param)) == param
    assert matrix_name("blocks.3.mlp.experts.2.W_in") == "L3E2.mlp.W_in"
    c = describe("L3E2N7.gate")
    assert (c.kind, c.layer, c.expert, c.neuron, c.matrix) == ("neuron_matrix", 3, 2, 7, "W_gate")


def test_one_spelling_per_name_and_group_names_that_cannot_be_confused(llama_dirs, gpt2_dirs):
    """Non-standard spellings get the standard one; a TL weight name gets its component name;
    a named group cannot take a component's or a selector's name; an empty selector says why."""
    index = ModelPair.from_pretrained(*llama_dirs).tuning_vector().components
    for odd, standard in (("L0H01.OV", "L0H1.OV"), ("L00N3.out", "L0N3.out"),
                          ("L0.mlp.experts.1.W_in", "L0E1.mlp.W_in")):
        with pytest.raises(TvLensError, match=f"did you mean '{re.escape(standard)}'"):
            index.parse(odd)
    with pytest.raises(TvLensError, match="TransformerLens weight name; its component name is "
                                          "'L0.attn.W_Q'"):
        index.parse("blocks.0.attn.W_Q")
    for name in ("L0H0", "heads", "L1.mlp.W_in", "mlp"):
        with pytest.raises(TvLensError, match=f"cannot be called '{re.escape(name)}'"):
            index.resolve({name: ["L1.mlp"]})
    with pytest.raises(TvLensError, match="no experts: its MLPs are dense"):
        index.resolve("experts")
    gpt = ModelPair.from_pretrained(*gpt2_dirs).tuning_vector().components
    with pytest.raises(TvLensError, match="no kv_heads: it has no grouped-query attention"):
        gpt.resolve("kv_heads")
    from tv_lens.components import hook_of, stream_of_hook

    for name in ("L1.resid_pre", "L1.resid_post", "L1.attn", "L1.mlp"):
        assert stream_of_hook(hook_of(name)) == name
    assert hook_of("L1H2") is None and hook_of("L01.attn") is None
