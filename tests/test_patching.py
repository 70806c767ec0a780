"""Exact weight patching, attribution and composition grids: known answers and identities."""

import pandas as pd
import pytest
import torch

from conftest import gpt2_model, llama_model, perturb
from tv_lens import (ModelPair, TvLensError, attribute, compare_attribution, completeness,
                     composition_grid,
                     metrics, patch)
from tv_lens.patching import gradient
from tv_lens.sources import ModelWeights


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def planted(save):
    """A pair whose only difference is head (1, 2) of a GQA Llama and neuron (0, 5)."""
    base, tuned = llama_model(), llama_model()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight[16:24] += 0.3 * torch.randn(8, 32, generator=g)
        tuned.model.layers[1].self_attn.o_proj.weight[:, 16:24] += 0.3 * torch.randn(32, 8, generator=g)
        tuned.model.layers[0].mlp.down_proj.weight[:, 5] += 0.5 * torch.randn(32, generator=g)
        tuned.model.layers[0].mlp.up_proj.weight[5] += 0.5 * torch.randn(32, generator=g)
    return ModelPair.from_pretrained(save(base, "planted_b"), save(tuned, "planted_t"))


def test_planted_components_reproduce_tuned_and_base_logits(planted, tokens):
    tv = planted.tuning_vector()
    plant = ["L1H2", "L0N5"]
    with torch.no_grad():
        base, tuned = planted.base(tokens), planted.tuned(tokens)
        assert (tuned - base).abs().max() > 1e-2
        with tv.component(plant).applied(planted.base):
            torch.testing.assert_close(planted.base(tokens), tuned, atol=1e-5, rtol=1e-5)
        with tv.component(plant).applied(planted.tuned, alpha=-1):
            torch.testing.assert_close(planted.tuned(tokens), base, atol=1e-5, rtol=1e-5)
        for name in plant:  # each alone moves the logits, and nothing else does
            with tv.component(name).applied(planted.base):
                assert (planted.base(tokens) - base).abs().max() > 1e-3
        with tv.component([n for n in tv.components.names("units") if n not in plant]).applied(
                planted.base):
            assert torch.equal(planted.base(tokens), base)


def test_patch_finds_the_planted_components(planted, tokens):
    metric = metrics.loss(tokens)
    add = patch(planted, metric, "units", progress=False).set_index("component")
    remove = patch(planted, metric, "units", mode="remove", progress=False).set_index("component")
    both = patch(planted, metric, [["L1H2", "L0N5"]] and ["L1H2", "L0N5"], progress=False)
    assert set(add.columns) >= {"kind", "layer", "head", "neuron", "expert", "alpha", "base", "tuned", "patched",
                                "effect", "normalized"}
    moved = add.index[add.effect.abs() > 1e-7].tolist()
    assert sorted(moved) == ["L0N5", "L1H2"]
    assert remove.index[remove.effect.abs() > 1e-7].tolist() == moved
    assert add.loc["L1H2", "kind"] == "head" and add.loc["L0N5", "layer"] == 0
    # the two planted components alone are τ: together they reach exactly the tuned metric
    tv = planted.tuning_vector()
    with torch.no_grad(), tv.component(["L1H2", "L0N5"]).applied(planted.base):
        assert metric.value(planted.base) == pytest.approx(add.tuned.iloc[0], abs=1e-5)
    assert both.normalized.abs().max() > 0


def test_patch_alphas_modes_and_restoration(planted, tokens):
    metric = metrics.loss(tokens)
    snap_b, snap_t = _snapshot(planted.base), _snapshot(planted.tuned)
    df = patch(planted, metric, ["L0N5"], alphas=(0.0, 1.0, 2.0), progress=False)
    assert df.alpha.tolist() == [0.0, 1.0, 2.0]
    assert df.patched.iloc[0] == pytest.approx(df.base.iloc[0], abs=0)
    assert _same(planted.base, snap_b) and _same(planted.tuned, snap_t)
    whole = patch(planted, metric, ["L0.mlp", "L1.attn"], mode="remove", progress=False)
    assert _same(planted.tuned, snap_t)
    assert whole.normalized.between(-5, 5).all()

    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 4:  # base, tuned, then the second patched evaluation raises
            raise RuntimeError("metric failed")
        return metric(model)

    with pytest.raises(RuntimeError, match="metric failed"):
        patch(planted, flaky, ["L1H2", "L0N5"], progress=False)
    assert _same(planted.base, snap_b)
    with pytest.raises(TvLensError, match="mode must be 'add'"):
        patch(planted, metric, ["L0N5"], mode="subtract")


def test_float64_models_are_patched_in_float64(save):
    pair = ModelPair.from_pretrained(save(llama_model(), "f64_b"),
                                     save(perturb(llama_model()), "f64_t"), dtype=torch.float64)
    weights = ModelWeights(pair.base)
    original = weights["blocks.0.mlp.W_out"].clone()
    tiny = torch.full_like(original, 1e-12, dtype=torch.float64)
    assert (original + tiny - original).abs().min() > 0  # representable in float64 only
    with weights.patched({"blocks.0.mlp.W_out": tiny}):
        torch.testing.assert_close(weights["blocks.0.mlp.W_out"] - original, tiny, rtol=1e-3,
                                   atol=1e-20)
    assert torch.equal(weights["blocks.0.mlp.W_out"], original)
    tv = pair.tuning_vector()
    assert tv["blocks.0.mlp.W_out"].dtype == torch.float64


# ------------------------------------------------------------------------ attribution
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair64(request, save):
    make = llama_model if request.param == "llama" else gpt2_model
    base = save(make(), f"{request.param}_64b")
    tuned = save(perturb(make(), scale=0.05), f"{request.param}_64t")
    return ModelPair.from_pretrained(base, tuned, dtype=torch.float64)


@pytest.fixture
def true_float64(monkeypatch):
    """Make the forward pass float64 throughout. The bridge's attention takes its softmax in
    float32 (every TransformerLens line, by different code paths, all through
    ``torch.nn.functional.softmax(..., dtype=torch.float32)``) and HF's LlamaRMSNorm normalises
    in float32 whatever the model's dtype; their rounding (~1e-7) would swamp a finite
    difference at ε = 1e-4."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    softmax = torch.nn.functional.softmax

    def float64_softmax(scores, dim=None, _stacklevel=3, dtype=None):
        return softmax(scores, dim=dim, dtype=None if scores.dtype == torch.float64 else dtype)

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(torch.nn.functional, "softmax", float64_softmax)
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm)


def test_attribution_is_the_directional_derivative(pair64, tokens, true_float64):
    """⟨∇f(θ), τ_c⟩ = (f(θ + ετ_c) − f(θ − ετ_c)) / 2ε, by exact patching, at both ends."""
    metric = metrics.loss(tokens)
    tv = pair64.tuning_vector()
    att = attribute(pair64, metric, progress=False).set_index("component")
    index = tv.components
    chosen = [c for c in index.names() if index.components[c].kind in (
        "head", "kv_head", "attn_shared", "mlp_shared", "attn", "mlp", "norms", "embed",
        "unembed", "final_norm")] + ["L0N0", "L0N17", "L1N3", "L1N47"]
    kinds = {index.components[c].kind for c in chosen}
    assert {"head", "neuron", "attn", "mlp", "norms", "embed"} <= kinds
    assert ("kv_head" in kinds) == (pair64.spec.family == "llama")
    eps = 1e-4
    for mode, model in (("add", pair64.base), ("remove", pair64.tuned)):
        grad_norm = sum(float((g.double() ** 2).sum())
                        for g in gradient(metric, model, tv.deltas).values()) ** 0.5
        exact = patch(pair64, metric, chosen, mode=mode, alphas=(eps, -eps), progress=False)
        for name, rows in exact.groupby("component"):
            plus, minus = rows.set_index("alpha").patched.loc[[eps, -eps]]
            # remove patches θ_tuned − α·τ_c, so α = −ε is the + side
            derivative = (plus - minus) / (2 * eps) * (1 if mode == "add" else -1)
            scale = max(abs(derivative), 1e-3 * grad_norm * tv.component(name).norm())
            assert abs(att.loc[name, mode] - derivative) <= 1e-4 * scale, (mode, name)


def test_attribution_partition_sums_and_errors(pair64, tokens):
    metric = metrics.loss(tokens)
    att = attribute(pair64, metric, progress=False)
    info = completeness(att)
    parts, units = att[att.granularity != "unit"], att[att.granularity != "part"]
    assert parts["add"].sum() == pytest.approx(units["add"].sum(), rel=1e-9)
    assert info["add_sum"] == pytest.approx(units["add"].sum())
    assert list(att.columns) == ["component", "kind", "granularity", "layer", "head", "kv_head",
                                 "neuron", "expert", "add", "remove", "path", "base", "tuned"]
    assert att["path"].isna().all() and "path_sum" not in info  # path attribution needs steps > 1
    assert info["difference"] == pytest.approx(metric.value(pair64.tuned) - metric.value(pair64.base))
    snap = _snapshot(pair64.base)
    flags = {n: p.requires_grad for n, p in pair64.base.named_parameters()}
    with pytest.raises(TvLensError, match="has no gradient.*answer_logprob"):
        attribute(pair64, metrics.answer_accuracy(["the cat"], [" sat"]), progress=False)
    with pytest.raises(TvLensError, match="has no gradient"):
        attribute(pair64, lambda m: torch.tensor(1.0), progress=False)
    with pytest.raises(TvLensError, match="steps must be a positive integer"):
        attribute(pair64, metric, steps=0)
    assert _same(pair64.base, snap)
    assert {n: p.requires_grad for n, p in pair64.base.named_parameters()} == flags
    assert all(p.grad is None for p in pair64.base.parameters())


def test_plain_function_metric_works_for_patching_and_attribution(pair64, tokens):
    def mean_logit(model):
        return model(tokens)[:, -1, 5].mean()

    att = attribute(pair64, mean_logit, progress=False).set_index("component")
    exact = patch(pair64, mean_logit, ["L0.mlp"], progress=False)
    assert att.loc["L0.mlp", "add"] != 0 and exact.effect.iloc[0] != 0


def test_compare_attribution_tracks_exact_patching_in_the_linear_regime(save, tokens):
    pair = ModelPair.from_pretrained(save(llama_model(), "lin_b"),
                                     save(perturb(llama_model(), scale=0.002), "lin_t"))
    result = compare_attribution(pair, metrics.loss(tokens), "heads", progress=False)
    assert set(result.table.columns) == {"component", "kind", "granularity", "layer", "head",
                                         "kv_head", "neuron", "expert", "mode", "attribution",
                                         "exact"}
    assert len(result.table) == 2 * 8 and result.correlations["mode"].tolist() == ["add", "remove"]
    assert (result.correlations.spearman > 0.9).all() and (result.correlations.pearson > 0.99).all()
    assert "spearman" in repr(result)
    top = compare_attribution(pair, metrics.loss(tokens), k=5, modes=("add",), progress=False)
    assert len(top.table) == 5



def test_compare_attribution_reuses_earlier_patching(llama_dirs, tokens, monkeypatch):
    """Rows of an earlier ``patch`` stand in for the evaluations they cover: the same table as
    patching afresh, and only the uncovered (component, mode) pairs are evaluated again."""
    import tv_lens.patching as patching

    pair = ModelPair.from_pretrained(*llama_dirs)
    metric = metrics.loss(tokens)
    att = attribute(pair, metric, progress=False)
    fresh = compare_attribution(pair, metric, "heads", attribution=att, progress=False)
    added = patch(pair, metric, "heads", mode="add", alphas=(0.5, 1.0), progress=False)
    half = patch(pair, metric, ["L0H1", "L1H2"], mode="remove", progress=False)
    calls = []
    real = patching.patch
    monkeypatch.setattr(patching, "patch", lambda p, m, names, **kw: calls.append(
        ([c.name for c in names], kw["mode"])) or real(p, m, names, **kw))
    reused = compare_attribution(pair, metric, "heads", attribution=att,
                                 exact=pd.concat([added, half]), progress=False)
    pd.testing.assert_frame_equal(reused.table, fresh.table)
    pd.testing.assert_frame_equal(reused.correlations, fresh.correlations)
    assert calls == [([f"L{l}H{h}" for l in range(2) for h in range(4)
                       if (l, h) not in ((0, 1), (1, 2))], "remove")]
    with pytest.raises(ValueError, match=r"exact= lacks the columns \['effect'\]"):
        compare_attribution(pair, metric, "heads", attribution=att,
                            exact=added.drop(columns="effect"), progress=False)


# path attribution's completeness on the demo pair: tests/test_examples.py::test_patching_example


# ------------------------------------------------------------------------ composition grid
def test_composition_grid_one_hot_weights_reproduce_each_fine_tune(llama_dirs, save, tokens):
    base_dir, tuned_dir = llama_dirs
    other_dir = save(perturb(llama_model(), seed=7), "llama_other")
    a, b = ModelPair.from_pretrained(base_dir, tuned_dir), ModelPair.from_pretrained(base_dir, other_dir)
    metric_list = {"loss": metrics.loss(tokens), "logit": lambda m: m(tokens)[:, -1, 3].mean()}
    grid = composition_grid(a, {"a": a.tuning_vector(), "b": b.tuning_vector()}, metric_list,
                            weights=[(1, 0), (0, 1), (1, 1)], methods=("sum", "ties"),
                            alphas=(0.5, 1.0), progress=False)
    assert list(grid.columns) == ["method", "w_a", "w_b", "alpha", "metric", "value"]
    assert len(grid) == 2 + 2 * 3 * 2 * 2  # base rows + methods × weights × alphas × metrics
    loss = grid[grid.metric == "loss"].set_index(["method", "w_a", "w_b", "alpha"]).value
    assert loss["base", 0, 0, 0] == pytest.approx(metrics.loss(tokens).value(a.base))
    assert loss["sum", 1, 0, 1.0] == pytest.approx(metrics.loss(tokens).value(a.tuned), abs=1e-5)
    assert loss["sum", 0, 1, 1.0] == pytest.approx(metrics.loss(tokens).value(b.tuned), abs=1e-5)
    assert loss["sum", 1, 1, 1.0] != pytest.approx(loss["sum", 1, 0, 1.0], abs=1e-4)
    with pytest.raises(TvLensError, match="one weight per vector"):
        composition_grid(a, [a.tuning_vector(), b.tuning_vector()], [metrics.loss(tokens)],
                         weights=[(1,)])


def test_named_groups_and_circuits_patch_and_attribute_as_one_row(pair64, tokens):
    """A dict of named groups patches its members together as one row (equal to 'mlp' and to
    removing every MLP update by hand); a circuit's attribution is ∇f ⊙ τ summed over exactly
    W_V's kv-head slice and W_O's head slice."""
    metric = metrics.loss(tokens)
    spec, tv = pair64.spec, pair64.tuning_vector()
    mlps = {"all_mlp": [f"L{layer}.mlp" for layer in range(spec.n_layers)]}
    grouped = patch(pair64, metric, mlps, mode="remove", progress=False)
    assert grouped.component.tolist() == ["all_mlp"] and grouped.kind.tolist() == ["named"]
    assert patch(pair64, metric, "mlp", mode="remove", progress=False).patched.iloc[0] == \
        grouped.patched.iloc[0]
    by_hand = {k: v for k, v in tv.items() if ".mlp." in k}
    with ModelWeights(pair64.tuned).patched(by_hand, -1.0):
        expect = metric.value(pair64.tuned)
    assert grouped.patched.iloc[0] == pytest.approx(expect, rel=1e-9, abs=1e-9)

    att = attribute(pair64, metric, components=["L1H2.OV", "L1H2"], progress=False)
    assert att.component.tolist() == ["L1H2.OV", "L1H2"] and att.granularity.iloc[0] == "group"
    grad = gradient(metric, pair64.base)
    kv = spec.kv_head(2)
    manual = float((grad["blocks.1.attn.W_V"][kv].double() * tv["blocks.1.attn.W_V"][kv].double()).sum()
                   + (grad["blocks.1.attn.W_O"][2].double() * tv["blocks.1.attn.W_O"][2].double()).sum())
    assert att["add"].iloc[0] == pytest.approx(manual, rel=1e-9, abs=1e-12)
    full = attribute(pair64, metric, progress=False).set_index("component")
    assert att["add"].iloc[1] == pytest.approx(full.loc["L1H2", "add"], rel=1e-12)


def test_compare_attribution_takes_named_groups_and_circuits(pair64, tokens):
    """Groups the attribution table has no rows for are attributed on the way; their exact
    effects are patch's."""
    metric = metrics.loss(tokens)
    att = attribute(pair64, metric, progress=False)
    groups = {"early": ["L0.mlp", "L0H1"]}
    result = compare_attribution(pair64, metric, groups, attribution=att, modes=("add",),
                                 progress=False)
    row = result.table.set_index("component").loc["early"]
    assert row["kind"] == "named"
    assert row["exact"] == pytest.approx(patch(pair64, metric, groups, progress=False).effect.iloc[0])
    expect = attribute(pair64, metric, components=groups, progress=False)["add"].iloc[0]
    assert row["attribution"] == pytest.approx(expect, rel=1e-12)
    circuit = compare_attribution(pair64, metric, ["L1H2.OV"], modes=("add",), progress=False)
    assert circuit.table.component.tolist() == ["L1H2.OV"]
