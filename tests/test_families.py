"""Families whose layout is derived from TransformerLens's architecture adapters
(``tv_lens.adapters``): every parameter accounted for, base + τ reproduces the tuned model through
TransformerLens, planted head and neuron changes read correctly, streaming equals in-memory."""

import copy

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import _LLAMA_LIKE, perturb
from test_alignment import check_planted, plant
from test_streaming import assert_same_tables, loaded
from tv_lens import ModelPair, analyze
from tv_lens.adapters import DERIVED_ARCHITECTURES, UNIT_OFFSET_NORMS, derived_slots
from tv_lens.layout import layout
from tv_lens.spec import ArchSpec
from tv_lens.tl_compat import tl_version

needs_adapters = pytest.mark.skipif(
    tl_version() < (4,), reason="derived layouts need TransformerLens 4.x's architecture adapters "
                                "(this environment has 3.x; the hand-written families are tested here)")

_TINY = dict(_LLAMA_LIKE, head_dim=8)


#: config keys that differ from the tiny Llama-like default, per model type
_CONFIGS = {
    # GPT-style keys; parallel attention + MLP, biases in the MLP and lm_head
    "gptj": dict(n_embd=32, n_head=4, n_layer=2, n_positions=32, rotary_dim=4, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False),
    # no grouped-query attention; per-head interleaved fused QKV, parallel blocks
    "gpt_neox": {k: v for k, v in _TINY.items() if k not in ("num_key_value_heads", "head_dim")},
    # 3 experts, 2 per token; checkpoints store one tensor per expert
    "mixtral": dict(_TINY, num_experts_per_tok=2, num_local_experts=3),
    "olmoe": dict(_TINY, num_experts_per_tok=2, num_experts=3),
    # routed experts of width 24 beside an always-on shared expert of width 40 with its own gate
    "qwen2_moe": dict(_TINY, num_experts_per_tok=2, num_experts=3, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40),
    "qwen3_moe": dict(_TINY, num_experts_per_tok=2, num_experts=3, moe_intermediate_size=24),
}


def _model(name: str, seed: int = 0, **overrides):
    """A tiny random ``transformers`` causal LM of model type ``name`` (vocabulary 96)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = {**_CONFIGS.get(name, _TINY), **overrides, "vocab_size": 96}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **config))


# the derived families, and Mistral (hand-written like Llama, tested here at checkpoint level)
FAMILIES = sorted(set(DERIVED_ARCHITECTURES.values())) + ["mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, save):
    base = _model(request.param)
    tuned = perturb(copy.deepcopy(base), scale=0.02)
    return request.param, base, save(base, f"{request.param}_b"), save(tuned, f"{request.param}_t")


@needs_adapters
def test_every_parameter_is_in_the_vector(family):
    """Every tensor of the checkpoint is in a slot, and ‖τ‖² is the sum of the checkpoint's
    squared differences (each stored tensor once: tied embeddings are one tensor)."""
    name, _, base_dir, tuned_dir = family
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(tuned_dir / "model.safetensors")
    tv = ModelPair.from_pretrained(base_dir, tuned_dir).tuning_vector()
    # the checkpoint's keys (transformers renames some and stacks experts in memory: GPT-NeoX's
    # embed_out is lm_head, Mixtral's experts.{e}.w1/w3 are blocks of experts.gate_up_proj)
    assert {tv.base.slots[n].hf_key for n in tv} == set(base), name
    expected = sum(float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in base)
    got = sum(float(tv[n].double().pow(2).sum()) for n in tv)
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(float(tv[n].abs().max()) > 0 for n in tv)  # every perturbed parameter changed
    # Gemma's norms multiply by (1 + w): relative changes are taken against 1 + w
    norms = tv.norms().set_index("name")
    gain = next((n for n in tv if n.startswith("blocks.0.") and n.endswith(".w")), None)  # ln1, …
    if gain is None:  # OLMo's LayerNorm and NanoChat's RMSNorm have no parameters
        assert name in ("olmo", "nanochat") and not any(tv.slots[n].part == "norm" for n in tv)
        return
    w = base[tv.base.slots[gain].hf_key].double()
    offset = 1.0 if name in UNIT_OFFSET_NORMS else 0.0
    assert norms.loc[gain, "base_norm"] == pytest.approx(float((w + offset).norm()))


@needs_adapters
def test_base_plus_tau_reproduces_the_tuned_logits(family):
    from transformer_lens.model_bridge import TransformerBridge

    name, _, base_dir, tuned_dir = family
    pair = ModelPair.from_pretrained(base_dir, tuned_dir)
    base_bridge = TransformerBridge.boot_transformers(str(base_dir))
    tuned_bridge = TransformerBridge.boot_transformers(str(tuned_dir))
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        want, before = tuned_bridge(tokens), base_bridge(tokens)
        with pair.tuning_vector().applied(base_bridge):
            got = base_bridge(tokens)
    assert (want - before).abs().max() > 1e-3  # the fine-tune changes the logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


@needs_adapters
def test_planted_head_and_neuron_changes(family, save):
    name, base, base_dir, _ = family
    tuned, *expected = plant(base)
    pair = ModelPair.from_pretrained(base_dir, save(tuned, f"{name}_planted"))
    streamed = analyze(pair, progress=False)
    check_planted(streamed.heads, streamed.neurons, *expected)
    assert_same_tables(streamed, analyze(loaded(base_dir, save(tuned, f"{name}_planted2")),
                                         progress=False))


@needs_adapters
def test_derived_layouts_equal_the_hand_written_ones():
    """The walk over TransformerLens's Llama/Mistral/Qwen2 adapters gives the hand-written table."""
    from tv_lens.adapters import adapter_for

    for arch, model_type in (("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"),
                             ("Qwen2ForCausalLM", "qwen2")):
        config = {"architectures": [arch], "model_type": model_type, "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 64}
        spec = ArchSpec.from_hf_config(config)
        per_block, per_model = derived_slots(adapter_for(config))
        optional = {s.tl_name for s in per_block + per_model if s.optional}
        derived = {(s.tl_name, s.hf_key, s.pattern) for s in per_block + per_model}
        hand = {(s.tl_name, s.hf_key, s.pattern) for s in layout(spec) if "{l}" not in s.tl_name}
        hand_block = {(s.tl_name.replace("blocks.0.", "blocks.{l}."), s.hf_key.replace(".0.", ".{l}."),
                       s.pattern) for s in layout(spec) if s.tl_name.startswith("blocks.0.")}
        hand_model = {x for x in hand if not x[0].startswith("blocks.")}
        # the derived table may name optional biases the hand-written one leaves out
        assert hand_block | hand_model <= derived, arch
        extra = derived - hand_block - hand_model
        assert all(t.rsplit(".", 1)[-1].startswith("b") and t in optional for t, _, _ in extra), extra


@needs_adapters
def test_norm_and_mlp_kinds_agree_with_the_adapters():
    """The norm kind and gating ``ArchSpec`` records for each derived family are what its
    TransformerLens adapter's config says."""
    from tv_lens.adapters import adapter_for

    for arch, model_type in DERIVED_ARCHITECTURES.items():
        config = dict(_CONFIGS.get(model_type, _TINY), architectures=[arch], model_type=model_type,
                      vocab_size=96)
        spec, cfg = ArchSpec.from_hf_config(config), adapter_for(config).cfg
        assert (spec.normalization, spec.gated_mlp) == (cfg.normalization_type, cfg.gated_mlp), arch


@needs_adapters
def test_a_checkpoint_tensor_the_derived_layout_does_not_read_is_refused(save, tmp_path):
    """A derived layout is checked against every tensor of the checkpoint, so τ cannot silently
    miss one (here: an extra tensor a newer revision of the architecture might add)."""
    from safetensors.torch import save_file

    from tv_lens.errors import UnsupportedArchitectureError

    folder = save(_model("qwen3"), "qwen3_extra")
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "model.layers.0.mlp.act_fn.alpha": torch.ones(1)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedArchitectureError, match=r"does not read.*act_fn\.alpha"):
        ModelPair.from_pretrained(folder, folder).tuning_vector()
    # Cohere's optional per-head q/k norm gains ([n_heads, d_head]) are refused by name
    folder = save(_model("cohere", use_qk_norm=True), "cohere_qk_norm")
    with pytest.raises(UnsupportedArchitectureError, match="per-head norm gains"):
        ModelPair.from_pretrained(folder, folder).tuning_vector()


def test_docs_family_table_matches_the_code():
    """docs/families.md's table lists exactly the architectures tv_lens has a layout for, derived
    ones marked as such (so the table cannot drift from the code)."""
    import pathlib
    import re

    from tv_lens.spec import FAMILIES

    text = (pathlib.Path(__file__).parents[1] / "docs" / "families.md").read_text()
    table = text.split("<!-- families-table -->")[1].split("<!-- /families-table -->")[0]
    listed, derived = set(), set()
    for row in table.strip().splitlines()[2:]:
        _, archs, how = (c.strip() for c in row.strip("|").split("|"))
        names = set(re.split(r",\s*", archs))
        listed |= names
        if how.startswith("derived"):
            derived |= names
    assert listed == {k for k in FAMILIES if k[0].isupper()}
    assert derived == set(DERIVED_ARCHITECTURES)


def _table(marker: str) -> list[tuple[set[str], str]]:
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "families.md").read_text()
    table = text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    rows = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table.strip().splitlines()[2:]]
    return [(set(re.split(r",\s*", row[-2])), row[-1]) for row in rows]


@needs_adapters
def test_every_adapted_causal_lm_is_listed_as_supported_or_not():
    """Each TransformerLens 4.x-adapted ``transformers`` causal LM is in docs/families.md's
    family table or in its not-yet table (with a reason), and the not-yet ones are refused."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tv_lens.errors import UnsupportedArchitectureError
    from tv_lens.spec import FAMILIES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | {"Gemma3ForConditionalGeneration",
                                                                "Gemma3nForConditionalGeneration",
                                                                "Gemma4ForConditionalGeneration",
                                                                "Gemma4UnifiedForConditionalGeneration"}
    supported = set().union(*(names for names, _ in _table("families-table")))
    not_yet = set().union(*(names for names, _ in _table("unsupported-table")))
    adapted = set(SUPPORTED_ARCHITECTURES) & causal
    assert adapted - supported - not_yet == set()
    assert not not_yet & supported and not not_yet & set(FAMILIES)
    for arch in not_yet:
        with pytest.raises(UnsupportedArchitectureError, match="no weight layout"):
            ArchSpec.from_hf_config({"architectures": [arch], "model_type": "?"})


@needs_adapters
def test_expert_components_partition_the_mixture_of_experts_mlp(save):
    """Mixtral: per-expert neurons and the router are units inside ``L0.mlp``, ``L0E1`` is all
    of expert 1; sums over them add up, cut-outs hold exactly their entries, bad names say why."""
    from tv_lens.errors import TvLensError

    base = _model("mixtral")
    tuned = perturb(copy.deepcopy(base), scale=0.02)
    tv = ModelPair.from_pretrained(save(base, "moe_b"), save(tuned, "moe_t")).tuning_vector()
    index = tv.components
    units = index.names("units")
    assert {"L0.router", "L0E2N47", "L1E0N0"} <= set(units) and "L0E1" not in units
    assert "L0E1" in index.names() and "L0E1" not in index.names("parts")
    assert index.parse("L0E1N3").expert == 1 and index.parse("L0E1").kind == "expert"
    assert len(index.resolve("experts")) == 2 * 3
    energy = index.totals({n: tv[n].double().pow(2) for n in tv})
    mlp = sum(float(tv[n].double().pow(2).sum()) for n in tv if n.startswith("blocks.0.mlp."))
    assert energy["L0.mlp"] == pytest.approx(mlp, rel=1e-12)
    assert energy["L0.mlp"] == pytest.approx(energy["L0.router"] + sum(energy[f"L0E{e}"] for e in range(3)))
    assert energy["L0E1"] == pytest.approx(sum(energy[f"L0E1N{n}"] for n in range(48)))
    expert = tv.component("L0E1")
    assert {n for n in expert if expert[n].any()} == {f"blocks.0.mlp.experts.1.{w}" for w in ("W_in", "W_gate", "W_out")}
    neuron = tv.component("L0E1N3")
    assert torch.equal(neuron["blocks.0.mlp.experts.1.W_out"][3], tv["blocks.0.mlp.experts.1.W_out"][3])
    assert float(neuron["blocks.0.mlp.experts.1.W_out"].abs().sum(1)[torch.arange(48) != 3].max()) == 0
    with pytest.raises(TvLensError, match="expert 7 is out of range; the model has 3 experts"):
        index.parse("L0E7N1")
    analysis = analyze(tv, progress=False)
    assert list(analysis.neurons.columns[:5]) == ["component", "layer", "expert", "neuron", "matrix"]
    assert analysis.neurons.set_index("component").loc["L0E1N3.out", "expert"] == 1
    assert len(analysis.neurons) == 2 * 3 * 48 * 3  # layers × experts × neurons × sides
    experts = analysis.matrices.dropna(subset=["expert"])
    assert set(experts["matrix"]) == {"W_in", "W_gate", "W_out"} and len(experts) == 2 * 3 * 3
    assert "W_router" in set(analysis.matrices["matrix"])
    # token readouts and views name experts' units the same way
    from tv_lens import viz
    from tv_lens.readouts import read_tokens

    tokens = read_tokens(tv, ["L0E1.mlp.W_out", "L0E1N3.out"], k=3, progress=False)
    assert set(tokens.component) == {"L0E1.mlp.W_out", "L0E1N3.out"}
    w = tv["blocks.0.mlp.experts.1.W_out"][3].double()  # the neuron's write direction: its top token
    top = int((tv.base["unembed.W_U"].double().T @ (w / w.norm())).argmax())
    row = tokens[(tokens.component == "L0E1N3.out") & (tokens.source == "update") & (tokens["sign"] == 1)]
    assert int(row.sort_values("rank").token_id.iloc[0]) == top
    with pytest.raises(TvLensError, match="expert 9 is out of range"):
        read_tokens(tv, ["L0E9N3.out"], progress=False)
    mlp_tokens = read_tokens(tv, "mlp", k=3, directions=1, progress=False)  # every expert's matrices
    mlp_nodes = next(t for t in viz.circuit(analysis, tokens=mlp_tokens).data if t.name == "MLPs")
    assert len(mlp_nodes.hovertext) == 2 and all("tokens: write:" in h for h in mlp_nodes.hovertext)
    figure = viz.neurons(analysis, layer=0, tokens=tokens)
    hovers = [t for trace in figure.data for t in trace.text]
    assert sum("expert: 1" in t and "neuron: 3<" in t for t in hovers) == 1


@needs_adapters
def test_a_shared_expert_is_the_layers_always_on_mlp(save):
    """Qwen2-MoE: the shared expert's neurons are ``L0N{n}`` (expert <NA> in the tables, its own
    width), its sigmoid gate belongs to ``L0.router``."""
    base = _model("qwen2_moe")
    tuned = perturb(copy.deepcopy(base), scale=0.02)
    tv = ModelPair.from_pretrained(save(base, "qmoe_b"), save(tuned, "qmoe_t")).tuning_vector()
    assert tv.spec.d_mlp == 24 and tv.spec.d_mlp_shared == 40
    units = tv.components.names("units")
    assert "L0N39" in units and "L0N40" not in units and "L0E2N23" in units and "L0E2N24" not in units
    assert tv.components.weights_of("L0.router") == {"blocks.0.mlp.W_router", "blocks.0.mlp.W_shared_gate"}
    neurons = analyze(tv, progress=False).neurons
    shared = neurons[neurons.expert.isna()]
    assert len(shared) == 2 * 40 * 3 and len(neurons) - len(shared) == 2 * 3 * 24 * 3


def test_dense_models_name_no_experts():
    """A dense model refuses expert names with the reason."""
    from tv_lens.components import ComponentIndex
    from tv_lens.errors import TvLensError
    from tv_lens.layout import layout

    spec = ArchSpec("LlamaForCausalLM", "llama", 2, 32, 4, 2, 8, 48, 96, True, "RMS", "rotary")
    index = ComponentIndex(spec, {s.tl_name: s for s in layout(spec)})
    with pytest.raises(TvLensError, match="dense"):
        index.parse("L0E1N3")
    with pytest.raises(TvLensError, match="no router"):
        index.parse("L0.router")


@needs_adapters
def test_attribution_sums_leave_expert_groups_out(save):
    """In a mixture of experts, ``L0E1`` (a group of expert 1's neurons) is in neither
    partition: the completeness sums add each partition once, so the units' and the parts'
    sums agree and equal ⟨∇f, τ⟩ (before, the groups' rows were added on top)."""
    from tv_lens import attribute, completeness, metrics

    base = _model("mixtral")
    tuned = perturb(copy.deepcopy(base), scale=0.05)
    pair = ModelPair.from_pretrained(save(base, "moe_att_b"), save(tuned, "moe_att_t"))
    att = attribute(pair, metrics.loss(torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])),
                    progress=False)
    info = completeness(att)
    groups = att[att.granularity == "group"]
    assert len(groups) == 2 * 3 and groups["add"].abs().sum() > 0
    parts = att[att.granularity.isin(["part", "both"])]
    assert info["add_sum"] == pytest.approx(float(parts["add"].sum()), rel=1e-6)
    assert info["remove_sum"] == pytest.approx(float(parts["remove"].sum()), rel=1e-6)


@needs_adapters
def test_report_when_an_experts_matrix_changed_most(save, tmp_path):
    """The report's spectrum names the most-changed matrix with its expert
    (``blocks.1.mlp.experts.2.W_out``); it rebuilt the name without the expert and crashed."""
    import tv_lens

    base = _model("mixtral")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            p.add_((0.5 if "experts" in name else 0.001) * torch.randn_like(p))
    pair = ModelPair.from_pretrained(save(base, "moe_rep_b"), save(tuned, "moe_rep_t"))
    analysis = analyze(pair, progress=False)
    top = analysis.matrices.dropna(subset=["layer"]).nlargest(1, "relative_norm").iloc[0]
    assert not pd.isna(top.expert)
    text = tv_lens.report(analysis, tmp_path / "r.html", pair=pair).read_text()
    assert f"blocks.{int(top.layer)}.mlp.experts.{int(top.expert)}.{top.matrix}" in text
