"""The share metrics (tv_lens.shares) against the tests' direct oracles (``oracles.align``:
explicit projectors and SVDs) and numpy, on small random matrices with planted structure; and
their precision in float32 and on the ``--fast`` path."""

import math

import numpy as np
import pytest
import torch

from conftest import runs_once_in
from oracles import align, orthonormal_basis, projector, rand
from tv_lens import linalg, shares
from tv_lens.lazy import LowRank
from tv_lens.linalg import dense_svd, factored_svd, frob2_factored, gram_svd
from tv_lens.shares import (best_matches, cluster_ids, matrix_overlap, random_match_baseline,
                            spectrum_stats)

pytestmark = runs_once_in(3)  # linear algebra and statistics only

D, K = 12, 3


@pytest.mark.parametrize("seed", range(5))
def test_align_matches_explicit_projectors(seed):
    V, O = rand(D, K, seed=seed), rand(K, D, seed=seed + 10)
    dV, dO = 0.3 * rand(D, K, seed=seed + 20), 0.3 * rand(K, D, seed=seed + 30)
    A, B = torch.cat([V + dV, -V], 1), torch.cat([O + dO, O], 0)
    delta = (V + dV) @ (O + dO) - V @ O
    base = factored_svd(V, O)
    al = align(A, B, base, orthonormal_basis(V), orthonormal_basis(O.T))
    P_R, P_S = projector(V), projector(O.T)
    total = float(delta.pow(2).sum())
    assert math.isclose(al.subspace_share, float((P_R @ delta @ P_S).pow(2).sum()) / total,
                        rel_tol=1e-9, abs_tol=1e-12)
    U, S, Vh = np.linalg.svd((V @ O).numpy())
    U, S, Vh = U[:, :K], S[:K], Vh[:K]
    coef = np.einsum("di,de,ie->i", U, delta.numpy(), Vh)
    assert math.isclose(al.amplification_share, float((coef**2).sum()) / total, rel_tol=1e-9)
    assert math.isclose(al.signed_scale, float((S * coef).sum() / (S**2).sum()), rel_tol=1e-9,
                        abs_tol=1e-12)
    assert al.baseline_subspace_share == (K / D) ** 2
    assert al.baseline_amplification_share == K / D**2


def test_pure_scaling_and_orthogonal_write_have_exact_answers():
    V, O = rand(D, K, seed=3), rand(K, D, seed=4)
    base = factored_svd(V, O)
    R, S = orthonormal_basis(V), orthonormal_basis(O.T)
    c = 0.25  # W_O' = (1 + c) W_O
    al = align(torch.cat([V, -V], 1), torch.cat([(1 + c) * O, O], 0), base, R, S)
    assert math.isclose(al.subspace_share, 1.0, rel_tol=1e-9)
    assert math.isclose(al.amplification_share, 1.0, rel_tol=1e-9)
    assert math.isclose(al.signed_scale, c, rel_tol=1e-9)
    b = rand(D, seed=5)
    b = b - projector(O.T) @ b  # orthogonal to W_O's row space
    dO = torch.outer(rand(K, seed=6), b)
    al = align(torch.cat([V, -V], 1), torch.cat([O + dO, O], 0), base, R, S)
    assert al.subspace_share < 1e-12 and al.amplification_share < 1e-12


def test_degenerate_singular_values_use_cluster_subspaces():
    # base = identity on a 3-dim subspace: any rotation of its singular vectors is equally valid
    Q = torch.linalg.qr(rand(D, K, seed=7)).Q
    base = dense_svd(Q @ Q.T)
    assert torch.bincount(cluster_ids(base.S)).tolist() == [K]
    rot = torch.linalg.qr(rand(K, K, seed=8)).Q
    delta = Q @ rot @ Q.T  # rotates within the subspace: no change of "existing directions"
    al = align(delta, torch.eye(D, dtype=torch.float64), base, Q, Q)
    assert math.isclose(al.amplification_share, 1.0, rel_tol=1e-9)
    best, _ = best_matches(base.U.T @ (Q @ rot[:, :1]), cluster_ids(base.S))
    assert math.isclose(float(best[0]), 1.0, rel_tol=1e-9)


def test_clusters_of_a_dense_spectrum_stay_narrow():
    """A dense, smoothly decaying spectrum (σ_i ∝ i^−0.5: tail gaps far below ``rtol · σ_max``)
    is not chained into one cluster: none spans more than ``rtol · σ_max``, and a random update
    of such a base reads as unaligned (amplification share near its baseline), as it does
    on distinct well-separated values."""
    n, rtol = 512, 1e-4
    S = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
    ids = cluster_ids(S, rtol)
    for c in range(int(ids.max()) + 1):
        members = S[ids == c]
        assert float(members.max() - members.min()) <= rtol * float(S[0])
    assert int(torch.bincount(ids).max()) <= 4 and torch.equal(ids, torch.sort(ids).values)
    U, V = (torch.linalg.qr(rand(n, n, seed=s)).Q for s in (21, 22))
    base = dense_svd((U * S) @ V.T)
    A, B = rand(n, 2, seed=23), rand(2, n, seed=24)
    al = align(A, B, base, U[:, :8], V[:, :8])
    assert al.baseline_amplification_share < 0.01 and al.amplification_share < 0.02


def test_spectrum_stats_against_numpy():
    W = rand(10, 7, seed=9)
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    stats = spectrum_stats(torch.from_numpy(s))
    assert math.isclose(stats["stable_rank"], (s**2).sum() / s[0] ** 2, rel_tol=1e-12)
    p = s / s.sum()
    assert math.isclose(stats["effective_rank"], float(np.exp(-(p * np.log(p)).sum())), rel_tol=1e-12)
    cum = np.cumsum(s**2) / (s**2).sum()
    assert stats["rank_90"] == int(np.argmax(cum >= 0.9)) + 1


def test_random_match_baseline_against_direct_monte_carlo():
    mean, p95 = random_match_baseline(16, 10, 10, samples=4000, seed=1)
    U = torch.linalg.qr(rand(16, 16, seed=11)).Q[:, :10]  # random bases, not coordinate axes
    V = torch.linalg.qr(rand(10, 10, seed=13)).Q
    x, y = rand(4000, 16, seed=12), rand(4000, 10, seed=14)
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    direct = torch.minimum((x @ U).abs().max(dim=1).values, (y @ V).abs().max(dim=1).values)
    assert abs(mean - float(direct.mean())) < 0.01
    assert abs(p95 - float(direct.quantile(0.95))) < 0.02


@pytest.mark.parametrize("shape", [(30, 9), (9, 30), (12, 12)])
def test_matrix_overlap_against_explicit_svds(shape):
    W, D = rand(*shape, seed=31), 0.2 * rand(*shape, seed=32)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    P, _, Qh = torch.linalg.svd(D, full_matrices=False)
    ov = matrix_overlap(gram_svd(W), D, k=3)
    # singular pairs are defined up to a joint sign flip: compare sign-invariant quantities
    core = U.T @ D @ Vh.T
    torch.testing.assert_close(ov.core.dense().abs(), core.abs(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ov.core.diagonal(), core.diagonal(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ov.left.abs(), (U.T @ P[:, :3]).abs(), rtol=0, atol=1e-7)
    torch.testing.assert_close(ov.right.abs(), (Vh @ Qh[:3].T).abs(), rtol=0, atol=1e-7)
    torch.testing.assert_close(ov.delta_S, torch.linalg.svdvals(D), rtol=1e-9, atol=0)


@pytest.mark.parametrize("transpose", [False, True])
def test_core_product_blocks_and_shares_equal_the_dense_core(transpose, monkeypatch):
    """The unmultiplied core (exact mode) against its dense form, on a base with clusters of
    equal singular values: blocks, entries, diagonal, and the shares computed from them (small
    clusters read entry by entry, and block by block)."""
    U = torch.linalg.qr(rand(14, 10, seed=41)).Q
    V = torch.linalg.qr(rand(10, 10, seed=42)).Q
    S = torch.tensor([3.0, 3.0, 2.0, 2.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.2], dtype=torch.float64)
    W = (U * S) @ V.T
    W, D = (W.T, 0.3 * rand(10, 14, seed=43)) if transpose else (W, 0.3 * rand(14, 10, seed=43))
    base = gram_svd(W)
    ov = matrix_overlap(base, D, k=3)
    ids = cluster_ids(base.S)
    assert isinstance(ov.core, shares.CoreProduct) and ov.core.transposed == transpose
    assert torch.bincount(ids).max() == 3  # the clusters the block path must handle
    dense = ov.core.dense()
    explicit = linalg.dense_svd(W)  # the same singular vectors, made explicit
    torch.testing.assert_close(dense, explicit.U.T @ D @ explicit.V, rtol=0, atol=1e-10)
    rows, cols = torch.tensor([4, 0, 7]), torch.tensor([2, 9])
    torch.testing.assert_close(ov.core.block(rows, cols), dense[rows][:, cols], rtol=0, atol=1e-12)
    torch.testing.assert_close(ov.core.entries(rows, torch.tensor([2, 9, 9])),
                               dense[rows, torch.tensor([2, 9, 9])], rtol=0, atol=1e-12)
    torch.testing.assert_close(ov.core.diagonal(), dense.diagonal(), rtol=0, atol=1e-12)
    want = shares.core_shares(dense, base.S, ov.energy, ids)
    for entrywise_up_to in (16, 1):
        monkeypatch.setattr(shares, "_ENTRYWISE_UP_TO", entrywise_up_to)
        got = shares.core_shares(ov.core, base.S, ov.energy, ids)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    # the top-left block's energy, directly (k ≤ 5) and from the complement (k > 5)
    assert ov.core.orthogonal_right  # a full-rank base: V is square
    for k in (1, 4, 6, 9, 10):
        assert ov.core.leading_energy(k) == pytest.approx(float(dense[:k, :k].pow(2).sum()),
                                                          rel=1e-12, abs=1e-14)
    lora = matrix_overlap(base, LowRank(rand(10 if transpose else 14, 2, seed=44),
                                        rand(2, 14 if transpose else 10, seed=45)), k=2)
    assert not lora.core.orthogonal_right  # factors: no orthogonal right factor
    assert lora.core.leading_energy(8) == pytest.approx(
        float(lora.core.dense()[:8, :8].pow(2).sum()), rel=1e-12)


def test_isotropic_baselines_by_monte_carlo():
    V, O = rand(D, K, seed=13), rand(K, D, seed=14)
    base = factored_svd(V, O)
    R, S = orthonormal_basis(V), orthonormal_basis(O.T)
    eye = torch.eye(D, dtype=torch.float64)
    samples = [align(rand(D, D, seed=100 + i), eye, base, R, S) for i in range(3000)]
    sub = np.mean([a.subspace_share for a in samples])
    amp = np.mean([a.amplification_share for a in samples])
    assert abs(sub - samples[0].baseline_subspace_share) < 0.01
    assert abs(amp - samples[0].baseline_amplification_share) < 0.005


def test_weight_space_baseline_by_monte_carlo():
    """Random perturbations of W_V and W_O (not of the circuit) land at d_head/d_model."""
    V, O = rand(D, K, seed=15), rand(K, D, seed=16)
    base = factored_svd(V, O)
    R, S = orthonormal_basis(V), orthonormal_basis(O.T)
    samples = []
    for i in range(2000):
        dV, dO = 1e-3 * rand(D, K, seed=200 + i), 1e-3 * rand(K, D, seed=5000 + i)
        al = align(torch.cat([V + dV, -V], 1), torch.cat([O + dO, O], 0), base, R, S)
        samples.append(al.subspace_share)
    assert abs(np.mean(samples) - K / D) < 0.02


@pytest.mark.parametrize("side", ["left", "right"])
def test_align_circuits_shared_factors_equal_expanded(side):
    """Grouped-query attention: a factor shared by several heads, passed once with the heads'
    rows, gives what passing it once per head gives."""
    heads = torch.tensor([0, 0, 1, 1, 2, 2])
    shared = (rand(3, D, K, seed=5), 0.3 * rand(3, D, K, seed=6))
    own = (rand(6, K, D, seed=7), 0.3 * rand(6, K, D, seed=8))
    if side == "right":
        shared, own = tuple(x.mT for x in shared), tuple(x.mT for x in own)
        L, dL, Rt, dRt = own[0], own[1], shared[0], shared[1]
        grouped = shares.align_circuits(L, Rt, dL, dRt, right_heads=heads)
        expanded = shares.align_circuits(L, Rt[heads], dL, dRt[heads])
    else:
        L, dL, Rt, dRt = shared[0], shared[1], own[0], own[1]
        grouped = shares.align_circuits(L, Rt, dL, dRt, left_heads=heads)
        expanded = shares.align_circuits(L[heads], Rt, dL[heads], dRt)
    assert len(grouped.core) == 6
    np.testing.assert_allclose(grouped.delta_norm, expanded.delta_norm, rtol=1e-12)
    np.testing.assert_allclose(grouped.subspace, expanded.subspace, rtol=1e-12)
    assert grouped.read_rank == expanded.read_rank and grouped.write_rank == expanded.write_rank
    for a, b in zip(grouped.core, expanded.core):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_align_circuits_matches_align_per_head():
    H = 5
    L, Rt = rand(H, D, K, seed=1), rand(H, K, D, seed=2)
    dL, dRt = 0.3 * rand(H, D, K, seed=3), 0.3 * rand(H, K, D, seed=4)
    L[1, :, 2] = L[1, :, 0]  # a rank-deficient head
    dL[3], dRt[3] = 0, 0  # an unchanged head
    batched = shares.align_circuits(L, Rt, dL, dRt)
    for h in range(H):
        A, B = torch.cat([L[h] + dL[h], -L[h]], 1), torch.cat([Rt[h] + dRt[h], Rt[h]], 0)
        base = factored_svd(L[h], Rt[h])
        one = align(A, B, base, orthonormal_basis(L[h]), orthonormal_basis(Rt[h].T))
        assert batched.read_rank[h] == orthonormal_basis(L[h]).shape[1]
        assert math.isclose(batched.delta_norm[h] ** 2, frob2_factored(A, B), rel_tol=1e-9, abs_tol=1e-12)
        np.testing.assert_allclose(batched.base_S[h].numpy(), base.S.numpy(), rtol=1e-9)
        if h == 3:
            assert math.isnan(batched.subspace[h])
            continue
        assert math.isclose(batched.subspace[h], one.subspace_share, rel_tol=1e-9)
        ids = cluster_ids(batched.base_S[h])
        amp, scale = shares.core_shares(batched.core[h], batched.base_S[h],
                                        batched.delta_norm[h] ** 2, ids)
        assert math.isclose(amp, one.amplification_share, rel_tol=1e-8)
        assert math.isclose(scale, one.signed_scale, rel_tol=1e-8, abs_tol=1e-12)


def test_low_rank_overlap_equals_dense():
    W = rand(50, 30, seed=11)
    L, R = rand(50, 3, seed=12), rand(3, 30, seed=13)
    for M, factors in ((W, LowRank(L, R)), (W.T, LowRank(R.T, L.T))):
        base = gram_svd(M)
        a, b = matrix_overlap(base, factors, 3), matrix_overlap(base, factors.dense(), 3)
        np.testing.assert_allclose(a.delta_S.numpy(), b.delta_S[:3].numpy(), rtol=1e-8)
        torch.testing.assert_close(a.core.dense(), b.core.dense(), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(a.left.abs(), b.left.abs(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(a.right.abs(), b.right.abs(), rtol=1e-6, atol=1e-8)
        assert math.isclose(a.energy, b.energy, rel_tol=1e-10)


def _planted(m, n, seed):
    """A base with a decaying spectrum and an update: amplification of the top directions plus a
    rank-3 new part plus small noise (a stand-in for a fine-tune)."""
    W = rand(m, n, seed=seed) * torch.linspace(1.0, 0.05, n, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    D_ = 0.3 * (U[:, :4] * S[:4]) @ Vh[:4] + 0.5 * rand(m, 3, seed=seed + 1) @ rand(3, n, seed=seed + 2) / n
    return W, D_ + 1e-3 * rand(m, n, seed=seed + 3)


def _shares(W, D_, fast_rank=None):
    """What analyze's matrix rows compute (``fast_rank``: the --fast path, probes included)."""
    if fast_rank is None:
        base, delta = gram_svd(W), None
    else:
        delta = linalg.randomized_svd(D_, fast_rank)
        base = linalg.randomized_svd(W, fast_rank, probes=delta.V[:, :10])
    ov = matrix_overlap(base, D_, 10, fast_rank=fast_rank, delta=delta)
    ids = cluster_ids(base.S)
    amp, scale = shares.core_shares(ov.core, base.S, ov.energy, ids, base.energy if base.partial else None)
    left, _ = best_matches(ov.left, ids)
    return amp, scale, left, ov.delta_S[:10]


def test_float32_work_above_1024_against_float64(monkeypatch):
    """Precision policy of linalg: Grams and eigh run in float32 above n = 1024. Measured on a
    1200 × 1100 planted pair: every share within 1e-5 of float64 (observed ~1e-7)."""
    W, D_ = _planted(1200, 1100, seed=7)
    W32, D32 = W.float(), D_.float()
    amp32, scale32, left32, s32 = _shares(W32, D32)
    monkeypatch.setattr(linalg, "FLOAT64_UP_TO", 4096)
    amp64, scale64, left64, s64 = _shares(W32, D32)
    assert linalg.work_dtype(1100) == torch.float64
    assert abs(amp32 - amp64) < 1e-5 and abs(scale32 - scale64) < 1e-5
    # the 4 planted directions; the noise directions behind them have near-equal singular
    # values, so each of them is arbitrary within its cluster in any precision
    assert (left32[:4] - left64[:4]).abs().max() < 1e-5
    torch.testing.assert_close(s32[:4], s64[:4], rtol=1e-5, atol=0)
    # a float32 Gram resolves σ² to ~1e-7·σ_max²: small singular values (here the noise,
    # 150× below σ_max) lose digits, by ~1e-7·(σ_max/σ)² relative
    assert ((s32 - s64).abs() / s64).max() < 1e-2


@pytest.mark.parametrize("sketch", [torch.float32, torch.bfloat16])
def test_randomized_svd_and_fast_overlap_errors(monkeypatch, sketch):
    """--fast on a planted 600 × 400 pair whose base spectrum is flat at the top (as random-like
    weights are): a plain range finder misses the top base directions by several percent, but
    probed with the update's directions the shares match exact mode (measured: amplification
    share 0.99630 vs 0.99630, matches of the planted directions equal to 1e-4). Both range
    finder dtypes (bfloat16 is the default on CPUs with AVX512-BF16) meet the same bounds."""
    monkeypatch.setattr(linalg, "sketch_dtype", lambda device="cpu": sketch)
    W, D_ = _planted(600, 400, seed=9)
    exact_S = torch.linalg.svdvals(W)
    plain = linalg.randomized_svd(W, 32)
    assert plain.partial and math.isclose(plain.energy, float(W.pow(2).sum()), rel_tol=1e-6)
    assert ((plain.S[:10] - exact_S[:10]).abs() / exact_S[:10]).max() < 0.1
    low_rank = rand(600, 5, seed=1) @ rand(5, 400, seed=2)  # a decaying spectrum: exact
    np.testing.assert_allclose(linalg.randomized_svd(low_rank, 8).S[:5].numpy(),
                               torch.linalg.svdvals(low_rank)[:5].numpy(), rtol=1e-5)
    amp, scale, left, s = _shares(W, D_)
    amp_f, scale_f, left_f, s_f = _shares(W, D_, fast_rank=32)
    assert abs(amp - amp_f) < 1e-4 and abs(scale - scale_f) < 1e-4
    np.testing.assert_allclose(s_f[:4].numpy(), s[:4].numpy(), rtol=1e-4)
    assert (left[:4] - left_f[:4]).abs().max() < 1e-4
