"""Small, exact linear-algebra kernels behind the alignment metrics (``shared/METHODS.md``).

Everything works on factored matrices ``A @ B`` with a small inner dimension (a head's circuit,
rank ≤ 2·d_head) without forming the ``d_model × d_model`` product, and in float64.

Degenerate singular values: when the base has (near-)equal singular values, individual singular
vectors are arbitrary within their cluster, so every "is this an existing direction?" question
is asked of the cluster's whole subspace (:func:`cluster_ids`). For distinct singular values this
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


@dataclass(frozen=True)
class GramSVD:
    """Thin SVD of a dense matrix, kept implicit on its long side.

    ``W`` is held in its tall orientation ``Wt`` (``m ≥ n``; ``transposed`` says whether
    ``Wt = Wᵀ``) with ``Wt = U diag(S) Vᵀ``. ``V`` (``[n, r]``) is explicit; ``U = Wt V / S`` is
    never formed, because for an embedding matrix it would cost as much as the SVD itself.
    """

    Wt: Float[Tensor, "m n"]
    S: Float[Tensor, "r"]
    V: Float[Tensor, "n r"]
    transposed: bool


def gram_svd(W: Float[Tensor, "a b"], rtol: float = 1e-6) -> GramSVD:
    """SVD through the eigendecomposition of the small Gram matrix, in float64: one
    ``m·n²`` product and one ``n``-sized ``eigh``, several times faster than a direct SVD for
    tall embedding and MLP matrices.

    Singular values below ``rtol · σ_max`` (the numerical null space: float64 Gram precision
    is about ``1e-8 · σ_max``) are dropped with their vectors.
    """
    W = W.double()
    transposed = W.shape[0] < W.shape[1]
    Wt = W.T if transposed else W
    evals, V = torch.linalg.eigh(Wt.T @ Wt)
    S = evals.flip(0).clamp(min=0).sqrt()
    V = V.flip(1)
    keep = S > rtol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    return GramSVD(Wt, S[keep], V[:, keep], transposed)


def dense_svd(W: Float[Tensor, "m n"], rtol: float = 1e-6) -> FactoredSVD:
    """Explicit thin SVD ``W = U diag(S) Vᵀ`` (via :func:`gram_svd`), null space dropped."""
    g = gram_svd(W, rtol)
    U = (g.Wt @ g.V) / g.S
    return FactoredSVD(g.V, g.S, U) if g.transposed else FactoredSVD(U, g.S, g.V)


@dataclass(frozen=True)
class MatrixOverlap:
    """An update ``Δ`` of a dense base ``W`` seen in ``W``'s singular bases.

    Attributes:
        core: ``Uᵀ Δ V`` (``[r, r]``), ``U, V`` the base's singular vectors.
        delta_S: all non-null singular values of Δ.
        left: ``Uᵀ P_k`` (``[r, k]``), P_k the top-k left singular vectors of Δ.
        right: ``Vᵀ Q_k`` (``[r, k]``), Q_k the top-k right singular vectors of Δ.
    """

    core: Float[Tensor, "r r"]
    delta_S: Float[Tensor, "rd"]
    left: Float[Tensor, "r k"]
    right: Float[Tensor, "r k"]


def matrix_overlap(base: GramSVD, D: Float[Tensor, "a b"], k: int, rtol: float = 1e-6) -> MatrixOverlap:
    """Everything the per-matrix table needs, with three ``m·n²`` products and no ``m``-sized
    singular vectors: ``Uᵀ Δ V = S⁻¹ Vᵀ (Wtᵀ Δt) V`` and ``Uᵀ P = S⁻¹ Vᵀ (Wtᵀ Δt) Q S_Δ⁻¹``."""
    Dt = D.double().T if base.transposed else D.double()
    delta = gram_svd(Dt, rtol)  # Dt is tall too: same orientation, not transposed again
    Q, S_d = delta.V[:, :k], delta.S[:k]
    C = base.Wt.T @ Dt  # [n, n]
    VtC = base.V.T @ C
    core = (VtC @ base.V) / base.S[:, None]
    left_t = (VtC @ Q) / base.S[:, None] / S_d
    right_t = base.V.T @ Q
    if base.transposed:
        return MatrixOverlap(core.T, delta.S, right_t, left_t)
    return MatrixOverlap(core, delta.S, left_t, right_t)


def cluster_ids(S: Float[Tensor, "r"], rtol: float = 1e-4) -> Tensor:
    """Cluster id of each singular value (descending ``S``): consecutive values whose gap is
    below ``rtol · σ_max`` share a cluster. Ids are ``0, 1, …`` in order."""
    if S.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=S.device)
    gaps = ((S[:-1] - S[1:]).abs() > rtol * S[0]).long()
    return torch.cat([torch.zeros(1, dtype=torch.long, device=S.device), torch.cumsum(gaps, 0)])


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


def core_shares(core: Float[Tensor, "r r"], S: Float[Tensor, "r"], total: float,
                ids: Tensor) -> tuple[float, float]:
    """Amplification share ``Σ_C ‖core[C, C]‖² / total`` and signed scale
    ``Σ_C σ̄_C tr(core[C, C]) / Σσ²`` of an update whose base-basis core is ``core``."""
    same = ids[:, None] == ids[None, :]
    amp = float((core.pow(2) * same).sum()) / total
    n = int(ids.max()) + 1
    mean_S = torch.zeros(n, dtype=S.dtype, device=S.device).index_add_(0, ids, S)
    mean_S = mean_S / torch.bincount(ids, minlength=n).to(S.dtype)
    return amp, float((mean_S[ids] * core.diagonal()).sum() / S.pow(2).sum())


def align(A: Float[Tensor, "m k"], B: Float[Tensor, "k n"], base: FactoredSVD,
          R: Float[Tensor, "m p"], S_right: Float[Tensor, "n q"], cluster_rtol: float = 1e-4) -> Alignment:
    """Alignment of the factored update ``Δ = A @ B`` with ``base`` and subspaces ``R``, ``S``.

    ``R`` and ``S_right`` must have orthonormal columns. Returns NaN shares for ``Δ = 0``.
    """
    A, B = A.double(), B.double()
    m, n = A.shape[0], B.shape[1]
    total = frob2_factored(A, B)
    ids = cluster_ids(base.S, cluster_rtol)
    base_amp = float(torch.bincount(ids).pow(2).sum()) / (m * n)
    base_sub = R.shape[1] * S_right.shape[1] / (m * n)
    if total == 0:
        nan = float("nan")
        return Alignment(nan, nan, 0.0, base_sub, base_amp)
    sub = float(((R.T @ A) @ (B @ S_right)).pow(2).sum()) / total
    core = (base.U.T @ A) @ (B @ base.V)  # [r, r]: Δ in the base's singular bases
    amp, scale = core_shares(core, base.S, total, ids)
    return Alignment(sub, amp, scale, base_sub, base_amp)


def spectrum_stats(S: Float[Tensor, "r"], q: float = 0.9) -> dict[str, float | int]:
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


def best_matches(proj: Float[Tensor, "r k"], ids: Tensor) -> tuple[Tensor, Tensor]:
    """For each column j of ``proj = Uᵀ P`` (P's columns projected on the base's singular
    vectors): ``max_C ‖proj[C, j]‖`` over clusters and the best cluster's first index. With
    distinct singular values this is ``max_i |⟨p_j, u_i⟩|``."""
    n = int(ids.max()) + 1
    energy = torch.zeros(n, proj.shape[1], dtype=proj.dtype, device=proj.device)
    energy.index_add_(0, ids, proj.pow(2))
    best, which = energy.sqrt().max(dim=0)
    first = torch.full((n,), proj.shape[0], dtype=torch.long, device=proj.device)
    first = first.scatter_reduce(0, ids, torch.arange(len(ids), device=proj.device), "amin")
    return best, first[which]


def random_match_baseline(m: int, n: int, n_vectors: int, samples: int = 256,
                          seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of ``min(max_i |⟨x, u_i⟩|, max_i |⟨y, v_i⟩|)`` for random unit
    ``x ∈ R^m``, ``y ∈ R^n`` against ``n_vectors`` orthonormal directions on each side (Monte
    Carlo, fixed seed; by rotation invariance only the dimensions matter, so the ``u_i`` are
    taken as coordinate axes)."""
    g = torch.Generator().manual_seed(seed)
    best = []
    for dim in (m, n):
        x = torch.randn(samples, dim, generator=g, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True)
        best.append(x[:, :n_vectors].abs().max(dim=1).values)
    match = torch.minimum(*best)
    return float(match.mean()), float(match.quantile(0.95))
