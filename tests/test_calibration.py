"""Calibrated labels: the null models, their p-values and the labels built on them.

Independent checks: Beta tails against mpmath at high precision, the closed-form Haar moments and
the head null's reduced-basis Monte Carlo against brute-force sampling of dense matrices, and
the labels on pure weight noise (must read ``new``) and on planted updates of one size.
"""

import copy

import mpmath
import numpy as np
import pytest
import torch

from conftest import gpt2_model, llama_model, runs_once_in
from tv_lens import ModelPair, TuningVector
from tv_lens.analysis.labels import calibrated_labels
from tv_lens.analysis.run import analyze
from tv_lens.cli import main
from tv_lens.shares import align_circuits, cluster_ids, core_shares
from tv_lens.nulls import (_same_cluster, _shared_draws, _unit_shares, block_counts, circuit_null,
                            cluster_counts, haar_share_moments, neuron_moments)
from tv_lens.sources import ModelWeights
from tv_lens.stats import NullMoments, beta_sf, bh_adjust

pytestmark = runs_once_in(3)  # linear algebra, null models and labels: no TransformerLens

LEVEL = 0.01


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("x,a,b", [(0.3, 2, 3), (0.9, 2, 3), (0.01, 0.5, 1023.5), (0.2, 0.5, 1023.5),
                                   (0.6, 5.5, 30.2), (0.999, 200, 3), (1e-5, 0.5, 50000),
                                   (0.001, 0.5, 31.5), (0.05, 0.5, 50000), (0.7, 40.0, 60.0),
                                   (0.02, 3000.0, 200000.0)])
def test_beta_sf_matches_mpmath(x, a, b):
    with mpmath.workdps(600):
        ref = float(1 - mpmath.betainc(a, b, 0, x, regularized=True))
    got = float(beta_sf(x, a, b))
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-300), (got, ref)


def test_beta_sf_edges_and_broadcasting():
    out = beta_sf(torch.tensor([0.0, 1.0, -0.5, 1.5]), 0.5, 10.0)
    assert out.tolist() == [1.0, 0.0, 1.0, 0.0]
    grid = beta_sf(torch.linspace(0.01, 0.99, 5)[:, None], torch.tensor([1.0, 2.0]), 3.0)
    assert grid.shape == (5, 2) and (grid.diff(dim=0) <= 0).all()  # decreasing in x
    # Beta(1, 1) is uniform
    torch.testing.assert_close(beta_sf(torch.tensor([0.25, 0.5]), 1.0, 1.0),
                               torch.tensor([0.75, 0.5], dtype=torch.float64))


def test_moment_matching_recovers_the_beta_and_handles_degenerate_nulls():
    a, b = 0.5, 63.5
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    null = NullMoments(torch.tensor([mean]), torch.tensor([var]))
    ra, rb = null.beta()
    assert float(ra) == pytest.approx(a, rel=1e-9) and float(rb) == pytest.approx(b, rel=1e-9)
    z, p = null.test(torch.tensor([0.2]))
    assert float(p) == pytest.approx(float(beta_sf(0.2, a, b)), rel=1e-12)
    assert float(z) == pytest.approx((0.2 - mean) / var**0.5)
    flat = NullMoments(torch.tensor([0.3, 0.3]), torch.tensor([0.0, 0.0]))
    assert flat.test(torch.tensor([0.5, 0.1]))[1].tolist() == [0.0, 1.0]
    assert torch.isnan(null.test(torch.tensor([float("nan")]))[1]).all()


def test_bh_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=40), rng.uniform(0, 1e-4, size=10), [np.nan] * 3])
    q = bh_adjust(p)
    ok = ~np.isnan(p)
    ps = np.sort(p[ok])
    n = ps.size
    # q_i = min over ranks j ≥ rank(p_i) of n·p_(j)/j (O(n²), straight from the definition)
    direct = np.array([min(1.0, min(n * ps[j] / (j + 1) for j in range(int(np.searchsorted(ps, x)), n)))
                       for x in p[ok]])
    np.testing.assert_allclose(q[ok], direct, rtol=1e-12)
    assert np.isnan(q[~ok]).all() and (q[ok] >= p[ok] * (1 - 1e-12)).all()


# --------------------------------------------------------------------------- nulls
def _haar_frames(d: int, k: int, count: int, g: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(count, d, d, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :])[:, :, :k]


def test_haar_share_moments_match_sampled_matrices():
    g = torch.Generator().manual_seed(0)
    m, n, spectrum = 9, 6, torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    sizes = [1, 2, 1, 2]
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    samples = 60_000
    U, V = _haar_frames(m, 4, samples, g), _haar_frames(n, 4, samples, g)
    D = U @ torch.diag(spectrum) @ V.mT
    total = D.pow(2).sum((1, 2))
    amp = (D[:, :6, :6].pow(2) * (ids[:, None] == ids[None, :])).sum((1, 2)) / total
    top = D[:, :3, :4].pow(2).sum((1, 2)) / total
    for x, counts in ((amp, cluster_counts(sizes)), (top, block_counts(3, 4))):
        mean, var = haar_share_moments(spectrum, m, n, *counts)
        se_mean, se_var = (var / samples) ** 0.5, var * (2.5 / samples) ** 0.5 * 2
        assert abs(float(x.mean()) - mean) < 4 * se_mean
        assert abs(float(x.var()) - var) < 4 * se_var, (float(x.var()), var)


def test_neuron_null_is_the_exact_beta():
    d, samples = 20, 200_000
    x = torch.randn(samples, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos2 = x[:, 0] ** 2 / x.pow(2).sum(1)
    null = neuron_moments(1, d)
    assert float(cos2.mean()) == pytest.approx(float(null.mean[0]), rel=0.01)
    assert float(cos2.var()) == pytest.approx(float(null.var[0]), rel=0.02)
    p = null.test(torch.tensor([0.3]))[1]
    assert float(p) == pytest.approx(float((cos2 >= 0.3).double().mean()), rel=0.05)


def test_head_null_matches_dense_perturbations():
    g = torch.Generator().manual_seed(2)
    m, k, norms = 24, 4, (0.7, 1.3)
    L = torch.randn(1, m, k, generator=g, dtype=torch.float64)
    Rt = torch.randn(1, k, m, generator=g, dtype=torch.float64)
    frame = align_circuits(L, Rt, torch.zeros_like(L), torch.zeros_like(Rt)).frames[0]
    sub_null, amp_null = circuit_null(frame, *norms, 20_000, [0, 1, 2])
    S = 4000
    dL = torch.randn(S, m, k, generator=g, dtype=torch.float64)
    dR = torch.randn(S, k, m, generator=g, dtype=torch.float64)
    dL = dL / dL.norm(dim=(1, 2), keepdim=True) * norms[0]
    dR = dR / dR.norm(dim=(1, 2), keepdim=True) * norms[1]
    al = align_circuits(L.expand(S, -1, -1), Rt.expand(S, -1, -1), dL, dR)
    sub = torch.tensor(al.subspace)
    amp = torch.tensor([core_shares(al.core[h], al.base_S[h], al.delta_norm[h] ** 2,
                                    cluster_ids(al.base_S[h]))[0] for h in range(S)])
    for brute, null in ((sub, sub_null), (amp, amp_null)):
        assert float(brute.mean()) == pytest.approx(float(null.mean[0]), rel=0.03)
        assert float(brute.var()) == pytest.approx(float(null.var[0]), rel=0.12)


def _dense_shares(frame, c, d, s):
    """The head null's shares of each draw straight from its definition: ``A = Ra + cX``,
    ``B = Rbᵀ + dY``, ``‖ΔC‖² = ‖M‖² + tr(A Wf Aᵀ) + tr(Bᵀ We B) + tr(We Wf)``, every share's
    numerator as the masked block of ``M`` in its bases."""
    Ra, Rb, ua, ub, u, vh = (getattr(frame, n).double() for n in ("Ra", "Rb", "ua", "ub", "u", "vh"))
    X, Y, We, Wf = (x.double() for x in (s.X, s.Y, s.We, s.Wf))
    A, B = Ra + c * X, Rb.T + d * Y
    M = c * X @ Rb.T + A @ (d * Y)
    total = (M.pow(2).sum((1, 2)) + ((A @ (d * d * Wf)) * A).sum((1, 2))
             + (((c * c * We) @ B) * B).sum((1, 2)) + (c * c * d * d * We * Wf).sum((1, 2)))
    read_write = frame.read[:, None] & frame.write[None, :]
    sub = ((ua.T @ M @ ub) * read_write).pow(2).sum((1, 2))
    amp = ((u.T @ M @ vh.T) * _same_cluster(frame)).pow(2).sum((1, 2))
    return sub / total, amp / total


@pytest.mark.parametrize("degenerate", [False, True], ids=["generic", "rank-deficient-equal-values"])
def test_head_null_shares_reduce_exactly(degenerate):
    """The null's per-draw shares (products of draws shared by a layer's heads, ``‖M‖²`` for a
    full-rank frame, the diagonal for distinct values) equal the dense definition."""
    g = torch.Generator().manual_seed(3)
    m, k = 40, 6
    L = torch.randn(1, m, k, generator=g, dtype=torch.float64)
    Rt = torch.randn(1, k, m, generator=g, dtype=torch.float64)
    if degenerate:  # read side of rank 5, circuit singular values (2, 2, 1, 1, 1)
        Qa = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
        Qb = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
        L = (Qa * torch.tensor([2.0, 2, 1, 1, 1, 0], dtype=torch.float64))[None]
        Rt = Qb.T[None]
    frame = align_circuits(L, Rt, torch.zeros_like(L), torch.zeros_like(Rt)).frames[0]
    assert bool(frame.read.all()) != degenerate
    assert (len(frame.ids) == len(set(frame.ids.tolist()))) != degenerate
    draws = _shared_draws(frame, 64, [0, 1, 2])
    for c, d in ((0.7, 1.3), (2.0, 0.1)):
        got = _unit_shares(frame, c, d, draws)
        for x, want in zip(got, _dense_shares(frame, c, d, draws)):
            torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-7)


def test_head_nulls_of_a_batch_equal_each_alone():
    """Circuits run together (sharing a seed's draws, their frame products batched) get the
    moments each gets alone; units of another seed or size are kept apart."""
    from tv_lens.nulls import circuit_nulls

    g = torch.Generator().manual_seed(4)
    frames = []
    for k in (5, 5, 5, 3):
        L = torch.randn(1, 30, k, generator=g, dtype=torch.float64)
        Rt = torch.randn(1, k, 30, generator=g, dtype=torch.float64)
        frames.append(align_circuits(L, Rt, torch.zeros_like(L), torch.zeros_like(Rt)).frames[0])
    norms_L, norms_R = [0.5, 1.0, 2.0, 0.7], [1.5, 0.2, 1.0, 0.9]
    seeds = [[0, 1, 0], [0, 1, 0], [0, 2, 0], [0, 1, 0]]
    together = circuit_nulls(frames, norms_L, norms_R, 128, seeds)
    for i, moments in enumerate(together):
        alone = circuit_null(frames[i], norms_L[i], norms_R[i], 128, seeds[i])
        for got, want in zip(moments, alone):
            torch.testing.assert_close(got.mean, want.mean, rtol=1e-5, atol=0)
            torch.testing.assert_close(got.var, want.var, rtol=1e-4, atol=0)
    assert float(together[0][0].mean) != pytest.approx(float(together[1][0].mean), rel=1e-3)


# --------------------------------------------------------------------------- labels
def _bigger_llama(seed=0):
    return llama_model(seed, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2)


def _noise_pair(model, scale=0.02, seed=5):
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ModelPair(model, tuned)


@pytest.mark.parametrize("build", [_bigger_llama, lambda: gpt2_model(0, n_embd=64, n_layer=4, n_head=8)],
                         ids=["llama-gqa", "gpt2"])
def test_pure_weight_noise_reads_new(build):
    result = analyze(_noise_pair(build()), progress=False)
    for name in ("heads", "neurons", "matrices"):
        table = getattr(result, name)
        assert table["p_value"].notna().all() and table["q_value"].notna().all()
        other = ~table.label.isin(["new", "unchanged"])
        assert other.mean() <= 0.01, (name, table.label.value_counts().to_dict())
    # the raw p-values are roughly uniform under the null: not piled up near 0
    assert (result.neurons.p_value < 0.05).mean() < 0.1
    assert (result.heads.p_value < 0.05).mean() < 0.2
    # effect sizes of noise: as much inside as a random update (excess 0, enrichment 1) on average
    for name in ("heads", "neurons", "matrices"):
        table = getattr(result, name)
        assert abs(table["excess"].mean()) < 0.02 and abs(table["enrichment"].mean() - 1) < 0.05, name


def _plant(model, rho=0.2, cos2_aligned=0.25):
    """Every head's W_O and every neuron's W_out row gets an update of relative size ``rho``:
    amplified (a multiple of itself), aligned (inside its subspace, not along its singular
    pairs) or new (orthogonal to it), by index mod 3."""
    w = ModelWeights(model)
    spec = w.spec
    g = torch.Generator().manual_seed(0)
    deltas = {name: torch.zeros_like(w[name]) for name in w}
    kinds = ("amplified", "aligned", "new")
    expected = {}
    for layer in range(spec.n_layers):
        W_O, W_V = w[f"blocks.{layer}.attn.W_O"].double(), w[f"blocks.{layer}.attn.W_V"].double()
        for h in range(spec.n_heads):
            kind = kinds[h % 3]
            Wv, Wo = W_V[spec.kv_head(h)], W_O[h]
            if kind == "amplified":
                d = Wo.clone()
            elif kind == "aligned":  # ΔOV = U B Vᵀ with B off-diagonal: in R × S, no diagonal
                U, _, Vh = torch.linalg.svd(Wv @ Wo, full_matrices=False)
                B = torch.randn(spec.d_head, spec.d_head, generator=g, dtype=torch.float64)
                B.fill_diagonal_(0)
                k = spec.d_head
                d = torch.linalg.pinv(Wv) @ U[:, :k] @ B @ Vh[:k]
            else:  # rows orthogonal to W_O's row space: ΔOV leaves the write subspace
                Q = torch.linalg.qr(Wo.T).Q
                d = torch.randn(spec.d_head, spec.d_model, generator=g, dtype=torch.float64)
                d = d - (d @ Q) @ Q.T
            deltas[f"blocks.{layer}.attn.W_O"][h] = (d * rho * Wo.norm() / d.norm()).float()
            expected[(layer, h, "OV")] = kind
        W_out = w[f"blocks.{layer}.mlp.W_out"].double()
        for n in range(spec.d_mlp):
            kind, v = kinds[n % 3], W_out[n]
            r = torch.randn(spec.d_model, generator=g, dtype=torch.float64)
            r = r - (r @ v) / (v @ v) * v
            u, r = v / v.norm(), r / r.norm()
            d = {"amplified": u, "aligned": cos2_aligned**0.5 * u + (1 - cos2_aligned) ** 0.5 * r,
                 "new": r}[kind]
            deltas[f"blocks.{layer}.mlp.W_out"][n] = (d * rho * v.norm()).float()
            expected[(layer, n, "out")] = kind
    tuned = TuningVector(deltas, spec).apply_(copy.deepcopy(model))
    return ModelPair(model, tuned), expected


def test_planted_updates_of_one_size_get_their_labels():
    pair, expected = _plant(_bigger_llama())
    result = analyze(pair, progress=False)
    heads = result.heads.set_index(["layer", "head", "circuit"]).label
    neurons = result.neurons.set_index(["layer", "neuron", "matrix"]).label
    for table, kinds in ((heads, {k: v for k, v in expected.items() if k[2] == "OV"}),
                         (neurons, {k[:2] + ("W_out",): v for k, v in expected.items()
                                    if k[2] == "out"})):
        hits = np.mean([table[k] == v for k, v in kinds.items()])
        assert hits >= 0.99, (hits, table.loc[list(kinds)].value_counts().to_dict())
    assert (result.heads[result.heads.circuit == "QK"].label == "unchanged").all()
    # the fixed thresholds cannot tell aligned from new: the aligned heads read "mixed" there
    fixed = analyze(pair, progress=False, labels="fixed", null_samples=0)
    aligned = [k for k, v in expected.items() if v == "aligned" and k[2] == "OV"]
    assert set(fixed.heads.set_index(["layer", "head", "circuit"]).label[aligned]) == {"mixed"}
    out_side = fixed.neurons[fixed.neurons.matrix == "W_out"]
    assert fixed.heads["p_value"].isna().all() and out_side["p_value"].notna().all()


def test_calibrated_label_rules():
    import pandas as pd

    table = pd.DataFrame(dict(
        relative_norm=[0.1, 0.1, 0.1, 0.1, 0.0], amplification_share=[0.9, 0.9, 0.2, 0.2, np.nan],
        q_value=[1e-5, 1e-5, 1e-5, 0.5, np.nan], amplification_q_value=[1e-5, 0.5, 1e-5, 0.5, np.nan],
        signed_scale=[-1.0, 1.0, 1.0, 1.0, 0.0]))
    from tv_lens.analysis.labels import Thresholds

    assert list(calibrated_labels(table, Thresholds())) == ["dampened", "aligned", "aligned", "new",
                                                            "unchanged"]


def test_head_nulls_are_seeded_per_unit():
    pair, _ = _plant(_bigger_llama())
    full = analyze(pair, progress=False).heads.set_index(["layer", "head", "circuit"])
    part = analyze(pair.tuning_vector().select(layers=[2]), progress=False).heads
    part = part[part.layer == 2].set_index(["layer", "head", "circuit"])
    for col in ("null_subspace_share", "z", "p_value", "amplification_p_value"):
        np.testing.assert_array_equal(part[col].to_numpy(), full.loc[part.index, col].to_numpy())
    other = analyze(pair, progress=False, seed=1).heads
    assert not np.array_equal(other.z.to_numpy(), full.z.to_numpy())


def test_summary_and_cli_options(llama_dirs, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "fixed"
    assert main(["analyze", *map(str, llama_dirs), "--out", str(out), "--labels", "fixed",
                 "--null-samples", "0"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert {"aligned_frac", "mixed_frac"} <= set(summary.columns)
    assert (summary.aligned_frac.fillna(0) == 0).all()
    calibrated = analyze(ModelPair.from_pretrained(*map(str, llama_dirs)), progress=False)
    assert (calibrated.summary.mixed_frac.fillna(0) == 0).all()
    assert set(calibrated.heads.label) <= {"amplified", "dampened", "aligned", "new", "unchanged"}
    for bad, message in ((["--level", "2"], "--level must be between 0 and 1"),
                         (["--null-samples", "1"], "--null-samples must be at least 2"),
                         (["--null-samples", "0"], "0 skips the head tests with --labels fixed")):
        assert main(["analyze", *map(str, llama_dirs), "--out", str(tmp_path / "x"), *bad]) == 2
        assert message in capsys.readouterr().err
    for kwargs, message in ((dict(labels="nope"), "labels must be one of"),
                            (dict(level=0.0), "level must be in"),
                            (dict(null_samples=0), "null_samples must be at least 2")):
        with pytest.raises(ValueError, match=message):
            analyze(calibrated_pair := ModelPair.from_pretrained(*map(str, llama_dirs)), **kwargs)
    del calibrated_pair


def test_fast_mode_keeps_fixed_matrix_labels():
    """--fast finds the base's top directions with the update's as probes, so a random-subspace
    null would call every matrix aligned: no matrix tests there, fixed labels instead."""
    from tv_lens.analysis.labels import label
    from tv_lens import Thresholds

    pair = _noise_pair(_bigger_llama())
    fast = analyze(pair, progress=False, fast=True, fast_rank=12).matrices
    assert fast[["z", "p_value", "q_value"]].isna().all().all()
    expected = [label(r.relative_norm, r.amplification_share, r.new_share, r.signed_scale, Thresholds())
                for r in fast.itertuples()]
    assert fast.label.tolist() == expected
