"""TuningVector: known answers, algebraic laws, application and persistence."""

import pytest
import torch
from transformer_lens.FactoredMatrix import FactoredMatrix

from conftest import llama_model
from tv_lens import ModelPair, ShapeMismatchError, TuningVector, TvLensError, MissingBaseError


@pytest.fixture(scope="module")
def pair(family_dirs):
    family, (base, tuned) = family_dirs
    return ModelPair.from_pretrained(base, tuned)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------ known answers
def test_planted_head_and_neuron_are_the_only_nonzero_entries(save, tokenizer):
    base = llama_model()
    tuned = llama_model()
    d_head = 8
    with torch.no_grad():  # head (1, 2): its slice of o_proj; neuron (0, 5): its down_proj column
        tuned.model.layers[1].self_attn.o_proj.weight[:, 2 * d_head:3 * d_head] += 0.1
        tuned.model.layers[0].mlp.down_proj.weight[:, 5] += 0.2
    pair = ModelPair.from_pretrained(save(base, "plant_b"), save(tuned, "plant_t"))
    tv = pair.tuning_vector()
    nonzero = {name for name, delta in tv.items() if delta.abs().max() > 0}
    assert nonzero == {"blocks.1.attn.W_O", "blocks.0.mlp.W_out"}
    w_o = tv["blocks.1.attn.W_O"]
    assert torch.count_nonzero(w_o.abs().sum(dim=(1, 2))) == 1 and w_o[2].abs().min() > 0.09
    w_out = tv["blocks.0.mlp.W_out"]
    assert torch.count_nonzero(w_out.abs().sum(dim=1)) == 1
    torch.testing.assert_close(tv.neuron(0, 5).W_out, torch.full((32,), 0.2), atol=1e-6, rtol=0)
    assert tv.head(1, 2).W_O.abs().min() > 0.09 and tv.head(1, 3).W_O.abs().max() == 0


def test_gqa_kv_head_change_reaches_exactly_its_group(save):
    base, tuned = llama_model(), llama_model()
    with torch.no_grad():  # kv head 1 = rows 8..16 of v_proj; query heads 2 and 3 read it
        tuned.model.layers[0].self_attn.v_proj.weight[8:16] += 0.1
    tv = ModelPair.from_pretrained(save(base, "gqa_b"), save(tuned, "gqa_t")).tuning_vector()
    w_v = tv["blocks.0.attn.W_V"]
    assert w_v.shape[0] == 2 and w_v[0].abs().max() == 0 and w_v[1].abs().min() > 0
    changed = [h for h in range(4) if tv.ov(0, h).AB.abs().max() > 1e-6]  # factored: fp noise
    assert changed == [2, 3]
    assert [tv.head(0, h).kv_head for h in range(4)] == [0, 0, 1, 1]


# ------------------------------------------------------------------ algebraic laws
def test_base_plus_tau_reproduces_tuned_logits(pair, tokens):
    tv = pair.tuning_vector()
    with torch.no_grad():
        tuned_logits = pair.tuned(tokens)
        base_logits = pair.base(tokens)
        with tv.applied(pair.base):
            patched = pair.base(tokens)
    assert (tuned_logits - base_logits).abs().max() > 1e-2  # the test can fail
    torch.testing.assert_close(patched, tuned_logits, atol=1e-4, rtol=1e-4)


def test_zero_times_tau_leaves_base_bitwise_unchanged(pair, tokens):
    snap = _snapshot(pair.base)
    with torch.no_grad():
        before = pair.base(tokens)
        with (0.0 * pair.tuning_vector()).applied(pair.base):
            assert _same(pair.base, snap)
            during = pair.base(tokens)
    assert torch.equal(before, during)


def test_add_then_subtract_and_scalar_laws(pair):
    a = pair.tuning_vector()
    b = 0.5 * a.select(parts=("mlp",)) - a.select(layers=[0])
    for name in a:
        torch.testing.assert_close(((a + b) - b)[name], a[name], atol=1e-6, rtol=0)
        assert torch.equal((-a)[name], -a[name])
        torch.testing.assert_close((a / 2.0)[name], 0.5 * a[name])
    assert abs((2 * a).norm() - 2 * a.norm()) < 1e-6 * a.norm()


def test_factored_circuits_equal_dense_products(pair):
    tv, base = pair.tuning_vector(), pair.tuning_vector().base
    spec = pair.spec
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            kv = spec.kv_head(head)
            a = f"blocks.{layer}.attn."
            V, O, Q, K = (base[a + "W_V"][kv], base[a + "W_O"][head], base[a + "W_Q"][head],
                          base[a + "W_K"][kv])
            h = tv.head(layer, head)
            dense_ov = (V + h.W_V) @ (O + h.W_O) - V @ O
            dense_qk = (Q + h.W_Q) @ (K + h.W_K).T - Q @ K.T
            ov, qk = tv.ov(layer, head), tv.qk(layer, head)
            assert isinstance(ov, FactoredMatrix) and ov.A.shape == (spec.d_model, 2 * spec.d_head)
            torch.testing.assert_close(ov.AB, dense_ov, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(qk.AB, dense_qk, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ application
def test_applied_restores_bitwise_after_an_exception(pair, tokens):
    snap = _snapshot(pair.base)
    with pytest.raises(RuntimeError, match="boom"):
        with pair.tuning_vector().applied(pair.base, alpha=3.0):
            assert not _same(pair.base, snap)
            raise RuntimeError("boom")
    assert _same(pair.base, snap)


def test_nested_applied_contexts_restore_in_order(pair):
    tv = pair.tuning_vector()
    snap = _snapshot(pair.base)
    with tv.applied(pair.base, alpha=0.5):
        mid = _snapshot(pair.base)
        with tv.select(parts=("attn",)).applied(pair.base, alpha=0.7):
            assert not _same(pair.base, mid)
        assert _same(pair.base, mid)
    assert _same(pair.base, snap)


def test_apply_to_returns_patched_copy_and_leaves_input(pair, tokens):
    snap = _snapshot(pair.base)
    patched = pair.tuning_vector().apply_to(pair.base)
    assert patched is not pair.base and _same(pair.base, snap)
    with torch.no_grad():
        torch.testing.assert_close(patched(tokens), pair.tuned(tokens), atol=1e-4, rtol=1e-4)


def test_apply_to_hf_model(llama_dirs, tokens):
    from transformers import AutoModelForCausalLM

    from tv_lens.pair import difference

    base = AutoModelForCausalLM.from_pretrained(llama_dirs[0])
    tuned = AutoModelForCausalLM.from_pretrained(llama_dirs[1])
    tv = difference(base, tuned)
    with torch.no_grad(), tv.applied(base):
        torch.testing.assert_close(base(tokens).logits, tuned(tokens).logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ select
def test_select_keeps_only_named_components(pair):
    tv = pair.tuning_vector()
    spec = pair.spec
    sel = tv.select(heads=[(1, 3)], neurons=[(0, 7)])
    kv = spec.kv_head(3)
    for name, delta in sel.items():
        if name in ("blocks.1.attn.W_Q", "blocks.1.attn.W_O", "blocks.1.attn.b_Q"):
            assert torch.equal(delta[3], tv[name][3])
            assert delta[[h for h in range(spec.n_heads) if h != 3]].abs().max() == 0
        elif name in ("blocks.1.attn.W_K", "blocks.1.attn.W_V", "blocks.1.attn.b_K",
                      "blocks.1.attn.b_V"):
            assert torch.equal(delta[kv], tv[name][kv])
            assert delta[[h for h in range(spec.n_kv_heads) if h != kv]].abs().max() == 0
        elif name in ("blocks.0.mlp.W_out", "blocks.0.mlp.b_in"):
            others = torch.cat([delta[:7], delta[8:]])
            assert torch.equal(delta[7], tv[name][7]) and others.abs().max() == 0
        elif name in ("blocks.0.mlp.W_in", "blocks.0.mlp.W_gate"):
            assert torch.equal(delta[:, 7], tv[name][:, 7])
            assert torch.cat([delta[:, :7], delta[:, 8:]], dim=1).abs().max() == 0
        else:  # other layers, b_O / b_out (no head or neuron owns them), norms, embeddings
            assert delta.abs().max() == 0, name
    by_part = tv.select(parts=("norms",), layers=[1])
    nonzero = {n for n, d in by_part.items() if d.abs().max() > 0}
    assert nonzero and all(n.startswith("blocks.1.ln") for n in nonzero)


def test_select_rejects_bad_input(pair):
    tv = pair.tuning_vector()
    with pytest.raises(IndexError, match="layers \\[7\\] are out of range"):
        tv.select(layers=[7])
    with pytest.raises(ValueError, match="Unknown part"):
        tv.select(parts=("mlps",))
    with pytest.raises(ValueError, match="The part 'norm' was renamed: use 'norms'"):
        tv.select(parts=("norm",))
    with pytest.raises(IndexError, match="head 9 is out of range"):
        tv.select(heads=[(0, 9)])


def test_norms_table(pair):
    df = pair.tuning_vector().norms()
    assert {"name", "layer", "part", "matrix", "delta_norm", "relative_norm"} <= set(df.columns)
    row = df[df.name == "blocks.0.attn.W_Q"].iloc[0]
    expected = pair.tuning_vector()["blocks.0.attn.W_Q"].norm().item()
    assert abs(row.delta_norm - expected) < 1e-5 and row.relative_norm > 0
    total = (df.delta_norm ** 2).sum() ** 0.5
    assert abs(total - pair.tuning_vector().norm()) < 1e-4


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip(pair, tmp_path, tokens):
    tv = pair.tuning_vector()
    path = tv.save(tmp_path / "tv.safetensors")
    loaded = TuningVector.load(path)
    assert loaded.spec == tv.spec and set(loaded) == set(tv)
    assert all(torch.equal(loaded[n], tv[n]) for n in tv)
    assert loaded.metadata["base"] == tv.metadata["base"] and loaded.metadata["saved_with"]
    with pytest.raises(MissingBaseError, match="carries no base weights"):
        loaded.ov(0, 0)
    torch.testing.assert_close(loaded.with_base(pair.base).ov(0, 1).AB, tv.ov(0, 1).AB)
    with torch.no_grad(), loaded.applied(pair.base):
        torch.testing.assert_close(pair.base(tokens), pair.tuned(tokens), atol=1e-4, rtol=1e-4)


def test_load_refuses_a_model_of_other_shape(pair, tmp_path, save):
    path = pair.tuning_vector().save(tmp_path / "tv.safetensors")
    other = ModelPair.from_pretrained(*([save(llama_model(vocab=80), "other_vocab")] * 2))
    loaded = TuningVector.load(path)
    if pair.spec.family != "llama":
        with pytest.raises(TvLensError, match="does not fit the model it is applied to"):
            loaded.applied(other.base).__enter__()
        return
    with pytest.raises(ShapeMismatchError, match=r"embed.W_E: vector \(96, 32\), model \(80, 32\)"):
        with loaded.applied(other.base):
            pass


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(TvLensError, match="not a tv_lens tuning vector"):
        TuningVector.load(tmp_path / "x.safetensors")
