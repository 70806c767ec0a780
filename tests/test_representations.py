"""Representation comparison: identities and independent numpy computations."""

import math

import numpy as np
import pytest
import torch

from tv_lens import ModelPair
from tv_lens.representations import compare_activations, compare_representations, linear_cka


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_and_rotated_activations():
    X = rand(200, 16) @ torch.diag(torch.linspace(3, 0.1, 16, dtype=torch.float64))
    same = compare_activations(X, X)
    assert math.isclose(same["overlap"], 1, rel_tol=1e-9) and math.isclose(same["cka"], 1, rel_tol=1e-9)
    assert abs(same["outside_share"] - (1 - 0.9)) < 0.1  # only the top-90% subspace is "inside"
    Q = torch.linalg.qr(rand(16, 16, seed=1)).Q
    rotated = compare_activations(X, X @ Q)
    assert math.isclose(rotated["cka"], 1, rel_tol=1e-9)  # CKA is rotation invariant
    assert rotated["overlap"] < 0.9  # subspaces are not


def test_cka_against_numpy_formula():
    X, Y = rand(50, 8, seed=2), rand(50, 6, seed=3)
    Xc, Yc = X.numpy() - X.numpy().mean(0), Y.numpy() - Y.numpy().mean(0)
    K, L = Xc @ Xc.T, Yc @ Yc.T
    H = np.eye(50) - 1 / 50
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    expected = hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
    assert math.isclose(linear_cka(X, Y), expected, rel_tol=1e-9)


def test_pair_comparison_shapes_and_bounds(llama_dirs, tokens):
    pair = ModelPair.from_pretrained(*llama_dirs)
    df = compare_representations(pair, tokens)
    assert list(df.layer) == [0, 1] and (df.n_tokens == tokens.numel()).all()
    assert ((df.overlap >= 0) & (df.overlap <= 1 + 1e-9)).all() and ((df.cka > 0) & (df.cka <= 1 + 1e-9)).all()
    same = compare_representations(ModelPair(pair.base, pair.base), tokens, layers=[1])
    assert math.isclose(float(same.cka[0]), 1.0, rel_tol=1e-6)
    with pytest.raises(IndexError, match="layers \\[5\\] are out of range"):
        compare_representations(pair, tokens, layers=[5])
