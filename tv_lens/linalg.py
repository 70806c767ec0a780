"""Small, exact linear-algebra kernels behind the alignment metrics (``shared/METHODS.md``).

Everything works on factored matrices ``A @ B`` with a small inner dimension (a head's circuit,
rank ≤ 2·d_head) without forming the ``d_model × d_model`` product, and in float64.

Degenerate singular values: when the base has (near-)equal singular values, individual singular
vectors are arbitrary within their cluster, so every "is this an existing direction?" question
is asked of the cluster's whole subspace (:func:`clusters`). For distinct singular values this
reduces exactly to the per-vector definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


def orthonormal_basis(M: Float[Tensor, "n k"], rtol: float = 1e-6) -> Float[Tensor, "n r"]:
    """Orthonormal basis of the column space of ``M`` (rank-revealing, via SVD of ``M``)."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    return U[:, S > rtol * S[0]]


@dataclass(frozen=True)
class FactoredSVD:
    """Thin SVD ``A @ B = U diag(S) Vhᵀ`` (``V`` holds right singular vectors as columns)."""

    U: Float[Tensor, "m r"]
    S: Float[Tensor, "r"]
    V: Float[Tensor, "n r"]


def factored_svd(A: Float[Tensor, "m k"], B: Float[Tensor, "k n"], rtol: float = 1e-9) -> FactoredSVD:
    """SVD of ``A @ B`` through QR of the factors: O((m + n)·k²), never forming ``A @ B``.

    Singular values below ``rtol · σ_max`` (and their vectors) are dropped.
    """
    A, B = A.double(), B.double()
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.T)
    u, s, vh = torch.linalg.svd(Ra @ Rb.T)
    keep = s > rtol * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return FactoredSVD(Qa @ u[:, keep], s[keep], Qb @ vh.T[:, keep])


def dense_svd(W: Float[Tensor, "m n"], rtol: float = 1e-6) -> FactoredSVD:
    """Thin SVD of a dense matrix in float64, through the eigendecomposition of its small Gram
    matrix (``WᵀW`` or ``WWᵀ``): two matrix products and one ``min(m, n)``-sized ``eigh``, several
    times faster than a direct SVD for the tall embedding and MLP matrices.

    Singular values below ``rtol · σ_max`` (the numerical null space: float64 Gram precision
    is about ``1e-8 · σ_max``) are dropped with their vectors.
    """
    W = W.double()
    if W.shape[0] < W.shape[1]:
        t = dense_svd(W.T, rtol)
        return FactoredSVD(t.V, t.S, t.U)
    evals, V = torch.linalg.eigh(W.T @ W)
    S = evals.flip(0).clamp(min=0).sqrt()
    V = V.flip(1)
    keep = S > rtol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    S, V = S[keep], V[:, keep]
    return FactoredSVD((W @ V) / S, S, V)


def clusters(S: Float[Tensor, "r"], rtol: float = 1e-4) -> list[Tensor]:
    """Index groups of (near-)equal singular values: consecutive values whose gap is below
    ``rtol · σ_max`` share a cluster."""
    if S.numel() == 0:
        return []
    gaps = (S[:-1] - S[1:]).abs() > rtol * S[0]
    starts = [0] + [i + 1 for i in torch.nonzero(gaps).flatten().tolist()] + [S.numel()]
    return [torch.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]


def frob2_factored(A: Float[Tensor, "m k"], B: Float[Tensor, "k n"]) -> float:
    """``‖A @ B‖_F²`` as ``trace((AᵀA)(BBᵀ))`` — O((m + n)·k²)."""
    A, B = A.double(), B.double()
    return float(((A.T @ A) * (B @ B.T)).sum())


@dataclass(frozen=True)
class Alignment:
    """How an update ``Δ`` sits relative to a base matrix's singular structure.

    Attributes:
        subspace_share: ``‖P_R Δ P_S‖² / ‖Δ‖²`` with R, S the given left/right subspaces.
        amplification_share: ``Σ_C ‖U_Cᵀ Δ V_C‖² / ‖Δ‖²`` over clusters C of base singular
            pairs (``Σ_i (u_iᵀ Δ v_i)²`` when singular values are distinct).
        signed_scale: ``Σ_C σ_C tr(U_Cᵀ Δ V_C) / Σ σ²`` — the relative rescaling of the existing
            directions: exactly ``c`` when ``Δ = c · W``; its sign tells amplify from dampen.
        baseline_subspace_share: expected subspace share of an isotropic random Δ,
            ``dim R · dim S / (m · n)``.
        baseline_amplification_share: the same for amplification, ``Σ_C |C|² / (m · n)``.
    """

    subspace_share: float
    amplification_share: float
    signed_scale: float
    baseline_subspace_share: float
    baseline_amplification_share: float


def align(A: Float[Tensor, "m k"], B: Float[Tensor, "k n"], base: FactoredSVD,
          R: Float[Tensor, "m p"], S_right: Float[Tensor, "n q"], cluster_rtol: float = 1e-4) -> Alignment:
    """Alignment of the factored update ``Δ = A @ B`` with ``base`` and subspaces ``R``, ``S``.

    ``R`` and ``S_right`` must have orthonormal columns. Returns NaN shares for ``Δ = 0``.
    """
    A, B = A.double(), B.double()
    m, n = A.shape[0], B.shape[1]
    total = frob2_factored(A, B)
    groups = clusters(base.S, cluster_rtol)
    base_amp = sum(len(g) ** 2 for g in groups) / (m * n)
    base_sub = R.shape[1] * S_right.shape[1] / (m * n)
    if total == 0:
        nan = float("nan")
        return Alignment(nan, nan, 0.0, base_sub, base_amp)
    sub = float(((R.T @ A) @ (B @ S_right)).pow(2).sum()) / total
    core = (base.U.T @ A) @ (B @ base.V)  # [r, r]: Δ in the base's singular bases
    amp = sum(float(core[g][:, g].pow(2).sum()) for g in groups) / total
    scale = sum(float(base.S[g].mean() * core[g][:, g].trace()) for g in groups)
    scale /= float(base.S.pow(2).sum())
    return Alignment(sub, amp, scale, base_sub, base_amp)


def spectrum_stats(S: Float[Tensor, "r"], q: float = 0.9) -> dict[str, float]:
    """Stable rank ``‖Δ‖²/σ₁²``, effective rank ``exp(H(σ/Σσ))``, and ``rank@q``."""
    S = S.double()
    if S.numel() == 0 or S[0] == 0:
        return {"stable_rank": float("nan"), "effective_rank": float("nan"), "rank_90": 0}
    energy = S.pow(2)
    p = S / S.sum()
    p = p[p > 0]
    cum = torch.cumsum(energy, 0) / energy.sum()
    rank_q = int(torch.searchsorted(cum, torch.tensor(q, dtype=cum.dtype) - 1e-12).item()) + 1
    return {"stable_rank": float(energy.sum() / energy[0]),
            "effective_rank": float(torch.exp(-(p * p.log()).sum())),
            "rank_90": min(rank_q, S.numel())}


def best_matches(P: Float[Tensor, "m k"], U: Float[Tensor, "m r"], groups: list[Tensor]) -> tuple[Tensor, Tensor]:
    """For each column p_j of ``P``: ``max_C ‖U_Cᵀ p_j‖`` over clusters and the best cluster's
    first index. With distinct singular values this is ``max_i |⟨p_j, u_i⟩|``."""
    proj = U.T.double() @ P.double()  # [r, k]
    per_cluster = torch.stack([proj[g].norm(dim=0) for g in groups])  # [n_clusters, k]
    best, which = per_cluster.max(dim=0)
    first = torch.tensor([int(groups[c][0]) for c in which.tolist()], device=P.device)
    return best, first


def random_match_baseline(m: int, n_vectors: int, samples: int = 256, seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of ``max_i |⟨x, u_i⟩|`` for random unit ``x ∈ R^m`` against
    ``n_vectors`` orthonormal directions (Monte Carlo, fixed seed; by rotation invariance the
    distribution depends only on ``m`` and ``n_vectors``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, m, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    best = x[:, :n_vectors].abs().max(dim=1).values  # the u_i taken as coordinate axes
    return float(best.mean()), float(best.quantile(0.95))
