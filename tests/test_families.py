"""Families whose layout is derived from TransformerLens's architecture adapters
(``tv_lens.adapters``): every parameter accounted for, base + τ reproduces the tuned model through
TransformerLens, planted head and neuron changes read correctly, streaming equals in-memory."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import _LLAMA_LIKE, _build, perturb
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


def _model(name: str, seed: int = 0):
    import transformers as tf

    classes = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM"),
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
               "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
               "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"), "gptj": ("GPTJConfig", "GPTJForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_cls, model_cls = (getattr(tf, c) for c in classes[name])
    if name == "gptj":  # GPT-style config keys; parallel attention + MLP, biases in the MLP and lm_head
        return _build(config_cls, model_cls, dict(n_embd=32, n_head=4, n_layer=2, n_positions=32,
                                                  rotary_dim=4, bos_token_id=1, eos_token_id=2,
                                                  tie_word_embeddings=False), seed, vocab_size=96)
    return _build(config_cls, model_cls, _TINY, seed, vocab_size=96)


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
    assert {tv.slots[n].hf_key for n in tv} == set(base), name
    expected = sum(float((tuned[k].double() - base[k].double()).pow(2).sum()) for k in base)
    got = sum(float(tv[n].double().pow(2).sum()) for n in tv)
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(float(tv[n].abs().max()) > 0 for n in tv)  # every perturbed parameter changed
    # Gemma's norms multiply by (1 + w): relative changes are taken against 1 + w
    norms = tv.norms().set_index("name")
    gain = next(n for n in tv if n.startswith("blocks.0.") and n.endswith(".w"))  # ln1 or ln1_post
    w = base[tv.slots[gain].hf_key].double()
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


def test_readme_family_table_matches_the_code():
    """The README's table lists exactly the architectures tv_lens has a layout for, derived
    ones marked as such (so the table cannot drift from the code)."""
    import pathlib
    import re

    from tv_lens.spec import FAMILIES

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
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
