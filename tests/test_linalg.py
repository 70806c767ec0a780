"""linalg's kernels (products, Grams, SVDs, eigensolvers) against LAPACK and float64 products on
small random matrices."""

import math

import numpy as np
import pytest
import torch

from conftest import runs_once_in
from oracles import rand
from tv_lens import linalg
from tv_lens.linalg import dense_svd, factored_svd, frob2_factored, gram_svd

pytestmark = runs_once_in(3)  # linear algebra only

D, K = 12, 3


def test_factored_svd_and_norm_match_dense():
    A, B = rand(D, 2 * K, seed=1), rand(2 * K, D, seed=2)
    f = factored_svd(A, B)
    dense = np.linalg.svd((A @ B).numpy(), compute_uv=False)
    np.testing.assert_allclose(f.S.numpy(), dense[: f.S.numel()], rtol=1e-10)
    torch.testing.assert_close(f.U @ torch.diag(f.S) @ f.V.T, A @ B)
    assert math.isclose(frob2_factored(A, B), float((A @ B).pow(2).sum()), rel_tol=1e-12)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
def test_dense_svd_matches_lapack(shape):
    W = rand(*shape, seed=21) @ torch.diag(torch.logspace(0, -3, shape[1], dtype=torch.float64))
    ours = dense_svd(W)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(ours.S, S[: ours.S.numel()], rtol=1e-9, atol=0)
    torch.testing.assert_close(ours.U @ torch.diag(ours.S) @ ours.V.T, W, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.U.T @ ours.U, torch.eye(ours.S.numel(), dtype=torch.float64),
                               rtol=0, atol=1e-8)
    low_rank = dense_svd(rand(shape[0], 2, seed=22) @ rand(2, shape[1], seed=23))
    assert low_rank.S.numel() == 2  # the numerical null space is dropped


def test_symmetric_chunked_gram_is_exact():
    A, B = rand(300, 37, seed=5), rand(300, 11, seed=6)
    torch.testing.assert_close(linalg.gram(A), A.T @ A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linalg.gram(A, B), A.T @ B, rtol=1e-12, atol=1e-12)


def test_float32_gram_blocks_against_float64():
    """The float32 Gram (n > 1024: ``work_dtype`` float32; symmetric blocks of uneven width and
    two row chunks) against float64 products: ~1e-7 relative."""
    A = rand(9000, 1030, seed=33).float()
    B = rand(9000, 70, seed=34).float()
    want = A.double().T @ A.double()
    got = linalg.gram(A)
    assert torch.equal(got, got.T)
    assert (got - want).abs().max() / want.abs().max() < 1e-6
    want_c = A.double().T @ B.double()
    assert (linalg.gram(A, B) - want_c).abs().max() / want_c.abs().max() < 1e-6


def test_gram_svd_top_vectors_only(monkeypatch):
    """``vectors=k`` above the float64 size: all singular values, the top k vectors."""
    W = rand(90, 60, seed=5)
    W[:, :3] *= torch.tensor([8.0, 6.0, 4.0], dtype=torch.float64)
    monkeypatch.setattr(linalg, "FLOAT64_UP_TO", 10)
    top = gram_svd(W, vectors=4)
    _, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert top.V.shape == (60, 4) and top.S.shape == (60,)
    torch.testing.assert_close(top.S, S, rtol=1e-5, atol=0)  # float32 work above the limit
    assert ((Vh[:4] @ top.V).diagonal().abs() > 1 - 1e-5).all()


def test_randomized_svd_sketch_dtypes_against_svd():
    """The range finder's dtype moves the subspace it finds, not how the triplets are computed
    from it. On a decaying spectrum (σ_i = i^−1, 800 × 300, rank 20, one power iteration) the
    range finder's own error dominates: the top 10 singular values are off by up to 6.6e-4
    relative with a float32 sketch and 9.0e-4 with a bfloat16 one (measured), the top 3 by
    < 1e-5 with either, and the top vectors are within 1.1e-4 of ±1 in both."""
    U, _ = torch.linalg.qr(rand(800, 300, seed=21))
    V, _ = torch.linalg.qr(rand(300, 300, seed=22))
    W = ((U / torch.arange(1, 301, dtype=torch.float64)) @ V.T).float()
    exact_S = torch.linalg.svdvals(W.double())[:10]
    errors = {}
    for sketch in (torch.float32, torch.bfloat16):
        got = linalg.randomized_svd(W, 20, sketch=sketch)
        assert got.V.dtype == torch.float64 and got.partial
        errors[sketch] = ((got.S[:10] - exact_S) / exact_S).abs()
        assert errors[sketch].max() < 2e-3 and errors[sketch][:3].max() < 1e-5, sketch
        cos = (got.V[:, :10].T @ V[:, :10]).diagonal().abs()
        assert (1 - cos).max() < 1e-3, sketch
    assert errors[torch.bfloat16].max() < 2 * errors[torch.float32].max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, k", [(40, 5), (300, 10), (7, 7)])
def test_partial_eigh_matches_full_eigh(dtype, n, k):
    """One tridiagonal reduction (scipy's sytrd + tridiagonal solvers + torch.ormqr) against
    LAPACK's full eigh: every eigenvalue and the top-k eigenvectors (up to sign)."""
    A = rand(2 * n, n, seed=n)
    A[:, 0] *= 5.0  # one well-separated top direction besides the random bulk
    G = (A.T @ A).to(dtype)
    vals, vecs = linalg.partial_eigh(G, k)
    ref_vals, ref_vecs = torch.linalg.eigh(G.double())
    ref_vals, ref_vecs = ref_vals.flip(0), ref_vecs.flip(1)[:, :k]
    scale = float(ref_vals[0])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert vals.dtype == vecs.dtype == torch.float64 and vecs.shape == (n, k)
    assert ((vals - ref_vals).abs() / scale).max() < tol
    # eigenvectors whose eigenvalue gap is resolved in this precision: equal up to sign
    gaps = torch.cat([ref_vals[:-1] - ref_vals[1:], ref_vals[-1:]])[:k] / scale
    gaps = torch.minimum(gaps, torch.cat([gaps[:1], gaps[:-1]]))
    ok = gaps > 1e3 * tol
    cos = (ref_vecs.T @ vecs).diagonal().abs()
    assert ok.any() and (cos[ok] > 1 - 1e3 * tol).all()
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e3 * tol)


def test_partial_eigh_top_values_only():
    """``all_values=False``: the top k eigenvalues (from the selected-vector solve) and the
    same vectors as with every eigenvalue."""
    G = rand(80, 40, seed=5).T @ rand(80, 40, seed=5)
    vals, vecs = linalg.partial_eigh(G, 6)
    top, top_vecs = linalg.partial_eigh(G, 6, all_values=False)
    assert vals.shape == (40,) and top.shape == (6,)
    torch.testing.assert_close(top, vals[:6], rtol=1e-12, atol=0)
    torch.testing.assert_close(top_vecs, vecs, rtol=0, atol=0)


def test_partial_eigh_without_scipy_is_the_full_eigh(monkeypatch):
    import builtins

    G = rand(50, 20, seed=3).T @ rand(50, 20, seed=3)
    with_scipy = linalg.partial_eigh(G, 4)
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    without = linalg.partial_eigh(G, 4)
    torch.testing.assert_close(with_scipy[0], without[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_scipy[1].abs(), without[1].abs(), rtol=0, atol=1e-10)
