"""Planted structure with exact answers, through the Python API and through the CLI."""

import json
import math

import pandas as pd
import pytest
import torch

from conftest import gpt2_model, llama_model
from tv_lens import ModelPair, TuningVector
from tv_lens.analysis.labels import HEAD_COLUMNS, MATRIX_COLUMNS, NEURON_COLUMNS, SUMMARY_COLUMNS
from tv_lens.analysis.run import analyze
from tv_lens.cli import main
from tv_lens.sources import ModelWeights

C = 0.3


def plant(model):
    """Plant known updates in TL space; returns ``(tuned_model, expectations)``.

    - layer 1, head 0: W_O scaled by (1 + C)  -> OV amplified, shares exactly 1
    - layer 1, head 1: W_O scaled by (1 − C)  -> OV dampened
    - layer 0, head 2: rank-1 ΔW_O writing orthogonally to W_O's row space -> OV new, share 0
    - layer 1, last kv head: W_V changed -> exactly that group's query heads' OV change
    - layer 0, neuron 3: W_out scaled by 1.5 -> cos 1; layer 1, neuron 7: scaled by 0.5 ->
      cos −1 (dampened); layer 1, neuron 5: W_out += orthogonal vector -> cos 0
      (in a mixture-of-experts model: those neurons of expert 1)
    """
    weights = ModelWeights(model)
    spec = weights.spec
    g = torch.Generator().manual_seed(0)
    deltas = {name: torch.zeros_like(weights[name]) for name in weights}
    W_O1, W_O0 = weights["blocks.1.attn.W_O"], weights["blocks.0.attn.W_O"]
    deltas["blocks.1.attn.W_O"][0] = C * W_O1[0]
    deltas["blocks.1.attn.W_O"][1] = -C * W_O1[1]
    rows = W_O0[2]  # [d_head, d_model]; its row space is what head 2 writes into
    b = torch.randn(spec.d_model, generator=g)
    Q = torch.linalg.qr(rows.T).Q
    b = b - Q @ (Q.T @ b)
    deltas["blocks.0.attn.W_O"][2] = torch.outer(torch.randn(spec.d_head, generator=g), b)
    kv = spec.n_kv_heads - 1
    deltas["blocks.1.attn.W_V"][kv] = 0.1 * torch.randn(spec.d_model, spec.d_head, generator=g)
    out0, out1 = (f"blocks.{l}.mlp.{'experts.1.' if spec.n_experts else ''}W_out" for l in (0, 1))
    deltas[out0][3] = 0.5 * weights[out0][3]
    deltas[out1][7] = -0.5 * weights[out1][7]
    w5 = weights[out1][5]
    o = torch.randn(spec.d_model, generator=g)
    deltas[out1][5] = o - (o @ w5) / (w5 @ w5) * w5
    import copy

    tuned = TuningVector(deltas, spec).apply_(copy.deepcopy(model))
    group = [h for h in range(spec.n_heads) if spec.kv_head(h) == kv]
    expected_heads = {(1, 0, "OV"): "amplified", (1, 1, "OV"): "dampened", (0, 2, "OV"): "new"}
    changed_heads = set(expected_heads) | {(1, h, "OV") for h in group}
    expected_neurons = {(0, 3, "W_out"): "amplified", (1, 5, "W_out"): "new",
                        (1, 7, "W_out"): "dampened"}
    return tuned, expected_heads, changed_heads, expected_neurons


def check_planted(heads, neurons, expected_heads, changed_heads, expected_neurons):
    heads = heads.set_index(["layer", "head", "circuit"])
    for key, lab in expected_heads.items():
        assert heads.loc[key, "label"] == lab, (key, heads.loc[key].to_dict())
    for key in [(1, 0, "OV"), (1, 1, "OV")]:
        assert abs(heads.loc[key, "amplification_share"] - 1) < 1e-5
        assert abs(heads.loc[key, "subspace_share"] - 1) < 1e-5
    assert abs(heads.loc[(1, 0, "OV"), "signed_scale"] - C) < 1e-5
    # effect sizes: an amplification with all of its energy on the base's directions is an excess
    # of 1 whatever the null; a head written entirely outside its subspaces is below random
    null = heads.loc[(1, 0, "OV"), "null_amplification_share"]
    assert heads.loc[(1, 0, "OV"), "amplification_excess"] == pytest.approx(1.0, abs=1e-5)
    assert heads.loc[(1, 0, "OV"), "amplification_enrichment"] == pytest.approx(1 / null, rel=1e-4)
    new_head = heads.loc[(0, 2, "OV")]
    assert new_head["enrichment"] < 1e-5 and new_head["excess"] == pytest.approx(
        -new_head["null_subspace_share"] / (1 - new_head["null_subspace_share"]), abs=1e-5)
    assert abs(heads.loc[(1, 1, "OV"), "signed_scale"] + C) < 1e-5
    assert heads.loc[(0, 2, "OV"), "subspace_share"] < 1e-6
    changed = {k for k, row in heads.iterrows() if row["label"] != "unchanged"}
    assert changed == changed_heads
    unchanged = heads[heads.label == "unchanged"]
    assert unchanged["subspace_share"].isna().all()
    if neurons.expert.notna().any():  # mixture of experts: planted in expert 1, every other one unchanged
        assert set(neurons.loc[neurons.label != "unchanged", "expert"]) == {1}
        neurons = neurons[neurons.expert == 1]
    neurons = neurons.set_index(["layer", "neuron", "matrix"])
    assert abs(neurons.loc[(0, 3, "W_out"), "cos"] - 1) < 1e-5
    d = 1 / neurons.loc[(0, 3, "W_out"), "baseline_cos2"]  # the neuron's dimension
    assert neurons.loc[(0, 3, "W_out"), "enrichment"] == pytest.approx(d, rel=1e-4)
    assert neurons.loc[(0, 3, "W_out"), "excess"] == pytest.approx(1.0, abs=1e-5)
    assert abs(neurons.loc[(1, 5, "W_out"), "excess"] + 1 / (d - 1)) < 1e-5  # orthogonal: below random
    assert abs(neurons.loc[(1, 5, "W_out"), "cos"]) < 1e-5
    assert abs(neurons.loc[(1, 7, "W_out"), "cos"] + 1) < 1e-5
    assert {k: r["label"] for k, r in neurons.iterrows() if r["label"] != "unchanged"} == expected_neurons


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def planted(request, save):
    base = llama_model() if request.param == "llama" else gpt2_model()
    tuned, *expected = plant(base)
    return save(base, f"plant_{request.param}_b"), save(tuned, f"plant_{request.param}_t"), expected


def test_planted_structure_python_api(planted):
    base, tuned, expected = planted
    result = analyze(ModelPair.from_pretrained(base, tuned), progress=False)
    assert list(result.heads.columns) == HEAD_COLUMNS
    assert list(result.neurons.columns) == NEURON_COLUMNS
    assert list(result.matrices.columns) == MATRIX_COLUMNS
    assert list(result.summary.columns) == SUMMARY_COLUMNS
    check_planted(result.heads, result.neurons, *expected)
    m = result.matrices.set_index(["layer", "matrix"])
    assert m.loc[(0, "W_Q"), "label"] == "unchanged" and m.loc[(1, "W_V"), "label"] != "unchanged"


def test_planted_structure_through_the_cli(planted, tmp_path, capsys):
    base, tuned, expected = planted
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path), "-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "new_frac" in printed and "attn" in printed
    heads, neurons = pd.read_csv(tmp_path / "heads.csv"), pd.read_csv(tmp_path / "neurons.csv")
    check_planted(heads, neurons, *expected)
    assert list(pd.read_csv(tmp_path / "matrices.csv").columns) == MATRIX_COLUMNS
    info = json.loads((tmp_path / "summary.json").read_text())["info"]
    assert info["arguments"]["k"] == "5" and info["tv_lens_version"]


def test_cli_bad_input_exits_with_one_paragraph(tmp_path, capsys):
    assert main(["analyze", "/no/such/base", "/no/such/tuned", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tv-lens: error: No checkpoint at '/no/such/base'") and "Traceback" not in err


def test_unchanged_pair_is_all_unchanged(save):
    """τ = 0 (and τ below tol): every unit unchanged with NaN shares, the summary's fractions
    defined (unchanged_frac = 1), and a warning saying which of the two it is."""
    import copy

    from tv_lens import TvLensWarning

    folder = save(llama_model(), "same")
    with pytest.warns(TvLensWarning, match=r"The two models are identical: every weight "
                                           r"difference is zero \(τ = 0\)"):
        result = analyze(ModelPair.from_pretrained(folder, folder), progress=False)
    assert (result.heads.label == "unchanged").all() and (result.neurons.label == "unchanged").all()
    assert (result.matrices.label == "unchanged").all() and result.info["degenerate"] == "identical"
    assert result.heads.subspace_share.isna().all() and result.heads.p_value.isna().all()
    summary = result.summary
    assert (summary.unchanged_frac == 1).all() and (summary.update_energy == 0).all()
    fracs = ["new_frac", "amplified_frac", "dampened_frac", "aligned_frac", "mixed_frac"]
    assert (summary[fracs] == 0).all().all()
    # energy_share, mean_new_share and concentration: 0/0, NaN (the README's column list says)
    assert summary[["energy_share", "mean_new_share", "concentration_50"]].isna().all().all()
    base = llama_model()
    tiny = copy.deepcopy(base)
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(1 + 3e-7)  # a few float32 ulps: relative change ~3e-7 < tol
    with pytest.warns(TvLensWarning, match=r"Every unit's relative change is below tol=1e-06 "
                                           r"\(the largest is .*\).*Pass a smaller tol"):
        result = analyze(ModelPair(base, tiny), progress=False)
    assert result.info["degenerate"] == "below_tol" and (result.summary.unchanged_frac == 1).all()


def test_neuron_cosines_match_direct_computation(llama_dirs):
    pair = ModelPair.from_pretrained(*llama_dirs)
    tv = pair.tuning_vector()
    neurons = analyze(pair, progress=False).neurons.set_index(["layer", "neuron", "matrix"])
    for layer, n in [(0, 0), (1, 17)]:
        w, d = tv.base[f"blocks.{layer}.mlp.W_gate"][:, n], tv[f"blocks.{layer}.mlp.W_gate"][:, n]
        cos = float(torch.nn.functional.cosine_similarity(w.double(), d.double(), dim=0))
        assert math.isclose(neurons.loc[(layer, n, "W_gate"), "cos"], cos, rel_tol=1e-6)
        assert neurons.loc[(layer, n, "W_gate"), "baseline_cos2"] == 1 / 32


def test_matrix_row_against_dense_svd(llama_dirs):
    pair = ModelPair.from_pretrained(*llama_dirs)
    tv = pair.tuning_vector()
    row = analyze(pair, progress=False).matrices.set_index(["layer", "matrix"]).loc[(1, "W_out")]
    W, D = tv.base["blocks.1.mlp.W_out"].double(), tv["blocks.1.mlp.W_out"].double()
    s = torch.linalg.svdvals(D)
    assert math.isclose(row.stable_rank, float((s**2).sum() / s[0] ** 2), rel_tol=1e-9)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    P, _, Qh = torch.linalg.svd(D, full_matrices=False)
    left = (U.T @ P[:, 0]).abs().max()
    right = (Vh @ Qh[0]).abs().max()
    assert math.isclose(row.top_match, float(min(left, right)), rel_tol=1e-6)
    r = int(row.base_rank_90)
    share = float((U[:, :r].T @ D @ Vh[:r].T).pow(2).sum() / D.pow(2).sum())
    assert math.isclose(row.top_subspace_share, share, rel_tol=1e-6)


def test_summary_energy_and_concentration(llama_dirs):
    pair = ModelPair.from_pretrained(*llama_dirs)
    summary = analyze(pair, progress=False).summary
    per_layer = summary[summary.layer.notna()]
    assert summary[summary.layer.isna()].component.tolist() == ["attn", "mlp"]
    assert math.isclose(per_layer.energy_share.sum(), 1.0, rel_tol=1e-9)
    fracs = per_layer[["new_frac", "amplified_frac", "dampened_frac", "mixed_frac", "unchanged_frac"]]
    assert ((fracs.sum(axis=1) - 1).abs() < 1e-9).all()
    assert ((summary.concentration_50 > 0) & (summary.concentration_50 <= summary.concentration_90)).all()


@pytest.mark.parametrize("args, expected", [
    ((0.0, 0.9, 0.1, 1.0), "unchanged"), ((float("nan"), 0.9, 0.1, 1.0), "unchanged"),
    ((0.1, 0.6, 0.4, 0.2), "amplified"), ((0.1, 0.6, 0.4, -0.2), "dampened"),
    ((0.1, 0.2, 0.7, 0.2), "new"), ((0.1, 0.3, 0.4, 0.2), "mixed"),
])
def test_label_rules(args, expected):
    from tv_lens.analysis.labels import label

    assert label(*args) == expected


def test_thresholds_are_parameters(llama_dirs):
    from tv_lens.analysis.labels import Thresholds

    pair = ModelPair.from_pretrained(*llama_dirs)
    strict = analyze(pair, thresholds=Thresholds(new=0.999), progress=False).heads
    loose = analyze(pair, thresholds=Thresholds(new=0.0), progress=False).heads
    assert (loose.label == "new").sum() >= (strict.label == "new").sum()
    assert set(strict.label) <= {"new", "mixed", "amplified", "dampened"}
    assert (strict.subspace_share == loose.subspace_share).all()  # raw shares do not move


def test_cli_dtype_and_vocab_options(save, tmp_path, capsys):
    from conftest import perturb

    base_model, tuned_model = llama_model(), perturb(llama_model())
    tuned_model.resize_token_embeddings(100, mean_resizing=False)
    base, tuned = save(base_model, "cli_vocab_b"), save(tuned_model, "cli_vocab_t")
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "a")]) == 2
    assert "d_vocab differs: base=96, tuned=100" in capsys.readouterr().err
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "b"),
                 "--vocab", "shared", "--dtype", "bfloat16"]) == 0
    bf16 = pd.read_csv(tmp_path / "b" / "matrices.csv").set_index("component")
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "c"),
                 "--vocab", "shared"]) == 0
    fp32 = pd.read_csv(tmp_path / "c" / "matrices.csv").set_index("component")
    # bf16 weights round the update, but the picture is the same
    assert ((bf16.relative_norm - fp32.relative_norm).abs() < 0.05 * fp32.relative_norm).all()
    assert "unembed.W_U" in set(fp32.index)  # compared on the shared rows


def test_benjamini_hochberg_families_and_their_sizes(llama_dirs):
    """One BH family per table and kind: a circuit's heads, a matrix's neuron directions, every
    matrix of the model (embeddings included); each row says how many tests its family holds."""
    result = analyze(ModelPair.from_pretrained(*llama_dirs), progress=False)

    def bh(p):  # the step-up rule, written out: q_(i) = min over j ≥ i of p_(j)·n/j
        order = sorted(range(len(p)), key=lambda i: p[i])
        q, running = [0.0] * len(p), 1.0
        for rank in range(len(p), 0, -1):
            i = order[rank - 1]
            running = min(running, p[i] * len(p) / rank)
            q[i] = running
        return q

    for table, kind in ((result.heads, "circuit"), (result.neurons, "matrix"), (result.matrices, None)):
        groups = [table] if kind is None else [g for _, g in table.groupby(kind)]
        for group in groups:
            assert (group.family_size == len(group)).all()
            assert group.q_value.tolist() == pytest.approx(bh(group.p_value.tolist()), rel=1e-12)
    assert set(result.matrices.family_size) == {len(result.matrices)}
    assert {"embed.W_E", "unembed.W_U"} <= set(result.matrices.component)
