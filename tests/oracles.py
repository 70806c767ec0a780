"""Test oracles: direct, unoptimised computations of the share metrics, used only by the tests
to check :mod:`tv_lens.shares` (the library never calls them).

:func:`align` is the per-circuit definition that :func:`tv_lens.shares.align_circuits` batches;
:func:`orthonormal_basis` a rank-revealing basis by a plain SVD, :func:`projector` a projector
by numpy's pseudo-inverse; :func:`rand` the seeded float64 inputs they are checked on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.linalg import FactoredSVD, frob2_factored
from tv_lens.shares import cluster_ids, core_shares


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def projector(M):
    """Orthogonal projector onto the column space of M, via numpy pinv (independent path)."""
    M = M.numpy()
    return torch.from_numpy(M @ np.linalg.pinv(M))


def orthonormal_basis(M: Float[Tensor, "n k"], rtol: float = 1e-6) -> Float[Tensor, "n r"]:
    """Orthonormal basis of the column space of ``M`` (rank-revealing, via SVD of ``M``)."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    return U[:, S > rtol * S[0]]


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
