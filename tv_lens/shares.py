"""Share metrics: how an update ``Δ`` sits in its base ``W``'s singular structure
(``shared/METHODS.md``).

The rule for what lives here: everything that takes a base and its update and says what the
tables report about them — ``Δ`` in the base's singular bases (:class:`CoreProduct`,
:func:`matrix_overlap`, :func:`align_circuits` for every head's circuit at once), the shares and
signed scale read from it (:func:`core_shares`), intruder dimensions (:func:`intruder_count`),
the update's own spectrum (:func:`spectrum_stats`), the best-matching base directions and their
random baseline (:func:`best_matches`, :func:`random_match_baseline`), and the clusters of equal
singular values every share is defined over (:func:`cluster_ids`). The decompositions they rest
on are :mod:`tv_lens.linalg`'s kernels.

Degenerate singular values: when the base has (near-)equal singular values, individual singular
vectors are arbitrary within their cluster, so every "is this an existing direction?" question
is asked of the cluster's whole subspace (:func:`cluster_ids`). For distinct singular values this
reduces exactly to the per-vector definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.errors import InvalidArgumentError
from tv_lens.lazy import LowRank
from tv_lens.linalg import (FLOAT64_UP_TO, GramSVD, factored_svd, frob2_factored, gram, gram_svd,
                            randomized_svd, top_eigenpairs, work_dtype)
from tv_lens.nulls import CircuitFrame
from tv_lens.speedups import mm


def cluster_ids(S: Float[Tensor, "r"], rtol: float = 1e-4) -> Tensor:
    """Cluster id of each singular value (descending ``S``): taken greedily from the top, a
    cluster holds the values within ``rtol · σ_max`` of its largest one, so none spans more
    than that. (Chaining every gap below ``rtol · σ_max`` instead merges a dense spectrum's
    whole tail into one cluster — for σ_i ∝ i^−0.5 at n = 2048 the last ~1 750 values — and
    makes any update look "amplified" within it.) Ids are ``0, 1, …`` in order."""
    if S.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=S.device)
    values = S.detach().double().cpu().numpy()
    tol, top = rtol * values[0], values[0]
    ids, cluster = np.empty(len(values), dtype=np.int64), 0
    for i, value in enumerate(values.tolist()):
        if top - value > tol:
            cluster, top = cluster + 1, value
        ids[i] = cluster
    return torch.from_numpy(ids).to(S.device)


@dataclass(frozen=True)
class CoreProduct:
    """``Uᵀ Δ V`` (``[r, r]``) kept as the product ``diag(row_scale) · left · right`` of an
    ``[r, p]`` and a ``[p, r]`` factor (``right=None``: ``left`` is the whole core;
    ``transposed``: the core is that product's transpose). The tables need only its diagonal,
    a top-left block and the blocks of clusters of equal singular values: ``O(p·r)`` for the
    diagonal and ``O(p·b²)`` per ``b``-sized block, against the ``O(p·r²)`` of the whole
    (:meth:`dense`). Results are float64 (the products run in the factors' dtype)."""

    left: Float[Tensor, "r p"]
    right: Float[Tensor, "p r"] | None = None
    row_scale: Float[Tensor, "r"] | None = None
    transposed: bool = False
    #: ``right`` is a square orthogonal matrix (a full-rank base's ``V``): see :meth:`leading_energy`
    orthogonal_right: bool = False

    def _block(self, rows: Tensor | slice, cols: Tensor | slice) -> Tensor:
        left = self.left[rows]
        out = (left[:, cols] if self.right is None else mm(left, self.right[:, cols])).double()
        return out if self.row_scale is None else out * self.row_scale[rows, None]

    def block(self, rows: Tensor | slice, cols: Tensor | slice) -> Float[Tensor, "a b"]:
        """``core[rows][:, cols]``."""
        return self._block(cols, rows).T if self.transposed else self._block(rows, cols)

    def entries(self, rows: Tensor, cols: Tensor) -> Float[Tensor, "p"]:
        """``core[rows[i], cols[i]]`` for each ``i`` (``O(p)`` per entry)."""
        if self.transposed:
            rows, cols = cols, rows
        if self.right is None:
            out = self.left[rows, cols].double()
        else:
            out = (self.left[rows] * self.right.T[cols]).sum(1).double()
        return out if self.row_scale is None else out * self.row_scale[rows]

    def diagonal(self) -> Float[Tensor, "r"]:
        if self.right is None:
            diag = self.left.diagonal().double()
        else:
            diag = (self.left * self.right.T).sum(1).double()
        return diag if self.row_scale is None else diag * self.row_scale

    def dense(self) -> Float[Tensor, "r r"]:
        """The whole core."""
        return self.block(slice(None), slice(None))

    def leading_energy(self, k: int) -> float:
        """``‖core[:k, :k]‖_F²``. With an orthogonal square ``right`` and ``k`` past half its
        width, from the complement: row ``i``'s energy over the first ``k`` columns is
        ``‖left_i‖² − ‖left_i right[:, k:]‖²``, a ``p × (p − k)`` product instead of ``p × k``
        (a Gaussian 5632 × 2048 base has ``rank_90`` = 1 466: 2.5× less work)."""
        top = slice(0, k)
        if not (self.orthogonal_right and 2 * k > self.right.shape[1]):
            return float(self.block(top, top).pow(2).sum())
        left = self.left[top]
        rest = mm(left, self.right[:, k:]).double().pow(2).sum(1)
        rows = left.double().pow(2).sum(1) - rest
        if self.row_scale is not None:
            rows = rows * self.row_scale[top].pow(2)
        return float(rows.sum())

    def transpose(self) -> CoreProduct:
        return CoreProduct(self.left, self.right, self.row_scale, not self.transposed,
                           self.orthogonal_right)


@dataclass(frozen=True)
class MatrixOverlap:
    """An update ``Δ`` of a dense base ``W`` seen in ``W``'s singular bases.

    Attributes:
        core: ``Uᵀ Δ V`` (``[r, r]``, unmultiplied: :class:`CoreProduct`), ``U, V`` the base's
            singular vectors.
        delta_S: the non-null singular values of Δ (all of them unless ``partial``).
        left: ``Uᵀ P_k`` (``[r, k]``), P_k the top-k left singular vectors of Δ.
        right: ``Vᵀ Q_k`` (``[r, k]``), Q_k the top-k right singular vectors of Δ.
        energy: ``‖Δ‖_F²`` (exact in every mode).
        partial: ``delta_S`` holds only Δ's top singular values (``--fast``).
        grams: ``(G, C, G_d) = (Wtᵀ Wt, Wtᵀ Δt, Δtᵀ Δt)`` in the base's tall orientation, float64
            (exact mode; ``None`` otherwise); the tuned matrix's Gram is formed from them on
            access only (:attr:`tuned_gram`).
    """

    core: CoreProduct
    delta_S: Float[Tensor, "rd"]
    left: Float[Tensor, "r k"]
    right: Float[Tensor, "r k"]
    energy: float
    partial: bool = False
    grams: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def tuned_gram(self) -> Float[Tensor, "n n"] | None:
        """``(Wt + Δt)ᵀ (Wt + Δt) = G + C + Cᵀ + G_d`` (exact mode; formed on each access)."""
        if self.grams is None:
            return None
        G, C, G_d = self.grams
        out = C + C.T
        out += G
        out += G_d
        return out


def _tall_factors(D: LowRank, transposed: bool) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``Dt = L @ R`` in the tall orientation of the base."""
    return (D.right.T, D.left.T) if transposed else (D.left, D.right)


def matrix_overlap(base: GramSVD, D: Float[Tensor, "a b"] | LowRank, k: int,
                   rtol: float = 1e-6, *, fast_rank: int | None = None,
                   delta: GramSVD | None = None) -> MatrixOverlap:
    """Everything the per-matrix table needs, without ``m``-sized singular vectors of the base.

    - dense Δ, exact: three ``m·n²`` products and one ``n³``, ``Uᵀ Δ V = S⁻¹ Vᵀ (Wtᵀ Δt) V``
      (the last product left to :class:`CoreProduct`) and ``Uᵀ P = S⁻¹ Vᵀ (Wtᵀ Δt) Q S_Δ⁻¹``;
    - Δ given as factors (:class:`~tv_lens.lazy.LowRank`, rank r): Δ's exact SVD from the factors
      and ``m·n·r`` products, never the dense Δ;
    - ``fast_rank`` (dense Δ): Δ's top singular triplets by :func:`randomized_svd` and products
      with ``m·n·(rank + k)`` cost; with a ``partial`` base only its top directions are used
      (``delta``: Δ's randomized SVD when the caller already has it).
    """
    grams: tuple[Tensor, Tensor, Tensor] | None = None
    if isinstance(D, LowRank):
        L, R = (f.double() for f in _tall_factors(D, base.transposed))
        delta = factored_svd(L, R, rtol)
        P, Q, S_d = delta.U[:, :k], delta.V[:, :k], delta.S[:k]
        WtL = gram(base.Wt, L, torch.float64)  # [n, r]
        core = CoreProduct(base.V.T @ WtL, R @ base.V, 1.0 / base.S)
        left_t = (base.V.T @ gram(base.Wt, P, torch.float64)) / base.S[:, None]
        out = (core, delta.S, left_t, base.V.T @ Q, frob2_factored(L, R), False)
        if base.gram is not None:
            cross = WtL @ R  # Wtᵀ Δt
            grams = (base.gram, cross, R.T @ (L.T @ L) @ R)
    elif fast_rank is not None or base.partial:
        Dt = D.T if base.transposed else D
        delta = delta or randomized_svd(Dt, max(fast_rank or 0, k))
        Q, S_d = delta.V[:, :k], delta.S[:k]
        U_b = mm(base.Wt.float(), base.V.float()) / base.S.float()  # [m, r_b]: the top U only
        VQ = torch.cat([base.V, Q], 1).float()  # one pass over Δ for both products
        DtV, DtQ = mm(Dt.float(), VQ).split([base.V.shape[1], Q.shape[1]], 1)
        core = CoreProduct(mm(U_b.T, DtV).double())
        P = DtQ / S_d.float()
        left_t = (U_b.T @ P).double()
        out = (core, delta.S, left_t, base.V.T @ Q, delta.energy, True)
    else:
        Dt = D.T if base.transposed else D
        delta = gram_svd(Dt, rtol, vectors=k)  # Dt is tall too: same orientation
        Q, S_d = delta.V[:, :k], delta.S[:k]
        wd = work_dtype(Dt.shape[1])
        V = base.V.to(wd)
        cross = gram(base.Wt, Dt)  # Wtᵀ Δt: [n, n]
        VtC = mm(V.T, cross.to(wd))  # [r, n]
        core = CoreProduct(VtC, V, 1.0 / base.S,  # never multiplied out: O(n³) saved
                           orthogonal_right=V.shape[0] == V.shape[1])
        left_t = (VtC @ Q.to(wd)).double() / base.S[:, None] / S_d
        out = (core, delta.S, left_t, base.V.T @ Q, delta.energy, False)
        if base.gram is not None:
            grams = (base.gram, cross, delta.gram)
    core, delta_S, left_t, right_t, energy, partial = out
    grams = None if partial else grams
    if base.transposed:
        return MatrixOverlap(core.transpose(), delta_S, right_t, left_t, energy, partial, grams)
    return MatrixOverlap(core, delta_S, left_t, right_t, energy, partial, grams)


def core_shares(core: Float[Tensor, "r r"] | CoreProduct, S: Float[Tensor, "r"], total: float,
                ids: Tensor, base_energy: float | None = None) -> tuple[float, float]:
    """Amplification share ``Σ_C ‖core[C, C]‖² / total`` and signed scale
    ``Σ_C σ̄_C tr(core[C, C]) / Σσ²`` of an update whose base-basis core is ``core``
    (``base_energy`` replaces ``Σσ²`` when ``S`` holds only the top singular values)."""
    diagonal = core.diagonal()
    if isinstance(core, CoreProduct):
        amp = _cluster_energy(core, ids, diagonal) / total
    else:
        amp = float((core.pow(2) * (ids[:, None] == ids[None, :])).sum()) / total
    n = int(ids.max()) + 1
    mean_S = torch.zeros(n, dtype=S.dtype, device=S.device).index_add_(0, ids, S)
    mean_S = mean_S / torch.bincount(ids, minlength=n).to(S.dtype)
    norm = S.pow(2).sum() if base_energy is None else base_energy
    return amp, float((mean_S[ids] * diagonal).sum() / norm)


#: Clusters up to this size are read entry by entry, all at once; larger ones block by block.
_ENTRYWISE_UP_TO = 16


def _cluster_energy(core: CoreProduct, ids: Tensor, diagonal: Tensor) -> float:
    """``Σ_C ‖core[C, C]‖²``: singleton clusters from the ``diagonal``, small ones from their
    entries gathered in one product (a dense spectrum has hundreds of 2–4-sized clusters), large
    ones block by block (``ids`` as :func:`cluster_ids` numbers them: each cluster a run)."""
    sizes = torch.bincount(ids)
    size_of = sizes[ids]
    energy = float(diagonal[size_of == 1].pow(2).sum())
    starts = torch.cumsum(sizes, 0) - sizes
    small = torch.nonzero((size_of > 1) & (size_of <= _ENTRYWISE_UP_TO)).flatten()
    if small.numel():
        width = size_of[small]
        rows = small.repeat_interleave(width)  # every (row, col) pair of each cluster
        first = (torch.cumsum(width, 0) - width).repeat_interleave(width)
        offset = torch.arange(rows.numel(), device=ids.device) - first
        energy += float(core.entries(rows, starts[ids[rows]] + offset).pow(2).sum())
    for cluster in torch.nonzero(sizes > _ENTRYWISE_UP_TO).flatten().tolist():
        members = slice(int(starts[cluster]), int(starts[cluster] + sizes[cluster]))
        energy += float(core.block(members, members).pow(2).sum())
    return energy


def intruder_count(base: GramSVD, overlap: MatrixOverlap, top_k: int = 10,
                   epsilon: float = 0.5, out_side: str = "right", *,
                   krylov_above: int = FLOAT64_UP_TO) -> tuple[int, Tensor]:
    """Intruder dimensions (Shuttleworth et al. 2024, as PEFT's ``reduce_intruder_dimension``
    counts them): among the tuned matrix's top-``top_k`` singular vectors on its output side,
    those whose largest ``|cos|`` with any of the base's singular vectors on that side is below
    ``epsilon``. Returns ``(count, best |cos| per vector)``.

    ``out_side`` says which side of the (un-transposed) matrix is the output: ``"right"`` for a
    TransformerLens weight ``x @ W`` (PEFT's ``[out, in]`` left side is its right side). Works
    from the Grams :func:`matrix_overlap` keeps (exact mode): the tuned matrix's short-side
    vectors as the top eigenvectors of ``(Wt + Δt)ᵀ(Wt + Δt)`` (:func:`top_eigenpairs`,
    started from the base's); long-side vectors only through
    ``u'ᵀ u_i = v'ᵀ (Wt + Δt)ᵀ Wt v_i / (s' σ_i)``, never formed.
    """
    if overlap.grams is None:
        raise InvalidArgumentError("intruder_count needs the exact-mode Grams (not available with --fast).")
    evals, vecs = top_eigenpairs(overlap.tuned_gram, top_k, start=base.V,
                                 start_values=base.S.pow(2), krylov_above=krylov_above)
    k = int((evals > 1e-12 * evals[0].clamp(min=0)).sum())
    v_t, s_t = vecs[:, :k], evals[:k].clamp(min=0).sqrt()
    # the output side is Wt's short side (V) unless W was transposed to make it tall
    short_side = (out_side == "right") != base.transposed
    if short_side:
        cos = (base.V.T @ v_t).abs()
    else:
        G, C, _ = overlap.grams  # (Wt + Δt)ᵀ Wt = G + Cᵀ, applied without forming it
        cos = (base.V.T @ (G @ v_t + C @ v_t)).abs() / base.S[:, None] / s_t[None, :]
    best = cos.max(dim=0).values if cos.numel() else torch.zeros(k, dtype=torch.float64)
    return int((best < epsilon).sum()), best


@dataclass(frozen=True)
class CircuitAlignments:
    """Every head's circuit ``L @ Rt`` and its update seen in the circuit's own singular bases
    (the per-circuit definition, unbatched, is the tests' oracle ``tests/oracles.py::align``).

    Attributes (one entry per circuit):
        delta_norm: ``‖(L + dL)(Rt + dRt) − L Rt‖_F``.
        base_S: the base circuit's singular values (null ones dropped).
        subspace: ``‖P_R ΔC P_S‖² / ‖ΔC‖²`` (NaN for ``ΔC = 0``); R = range(L), S = range(Rtᵀ).
        core: ``Uᵀ ΔC V`` in the base circuit's singular bases (``[r, r]``).
        read_rank, write_rank: ``dim R``, ``dim S``.
        frames: each circuit in its ``k``-dimensional frames (for :func:`tv_lens.nulls.circuit_null`).
    """

    delta_norm: list[float]
    base_S: list[Tensor]
    subspace: list[float]
    core: list[Tensor]
    read_rank: list[int]
    write_rank: list[int]
    frames: list[CircuitFrame]


def align_circuits(L: Float[Tensor, "hl m k"], Rt: Float[Tensor, "hr k n"],
                   dL: Float[Tensor, "hl m k"], dRt: Float[Tensor, "hr k n"],
                   rtol: float = 1e-6, *, left_heads: Tensor | None = None,
                   right_heads: Tensor | None = None) -> CircuitAlignments:
    """Batched, exact alignment of every head's circuit update at once (``d_model``-sized
    products in :func:`work_dtype`, everything ``k × k`` in float64).

    With ``L = Qa Ra`` and ``Rtᵀ = Qb Rb`` (QR), every quantity lives in the ``k × k`` matrix
    ``M = Qaᵀ ΔC Qb = (Qaᵀ dL) Rbᵀ + Ra (dRt Qb) + (Qaᵀ dL)(dRt Qb)``: the read/write bases are
    ``Qa ua``, ``Qb ub`` (``ua``, ``ub`` singular vectors of ``Ra``, ``Rb``; null directions
    dropped at ``rtol``), the base circuit is ``(Qa u) s (Qb vhᵀ)ᵀ`` with ``u s vh = Ra Rbᵀ``,
    so ``Uᵀ ΔC V = uᵀ M vhᵀ``. Cost: two batched QRs and ``O(m·k²)`` products per head.

    Heads that share a factor (grouped-query attention: a key-value head's ``W_V`` on the OV
    side, its ``W_K`` on the QK side) pass it once: ``left_heads`` / ``right_heads`` (``[h]``)
    give the row of ``L, dL`` / ``Rt, dRt`` each head uses, and everything of that side alone
    (its QR and SVD, its products with its update, its Grams) is computed once per shared factor.
    """
    wd = work_dtype(L.shape[1])  # float32 above d_model 1024; k × k results in float64
    L, Rt, dL, dRt = (x.to(wd) for x in (L, Rt, dL, dRt))
    Qa, Ra = torch.linalg.qr(L)
    Qb, Rb = torch.linalg.qr(Rt.mT)
    X, Y = Qa.mT @ dL, dRt @ Qb
    Rt2 = Rt + dRt

    def batched_gram(P: Tensor, Q: Tensor) -> Tensor:
        return (P.mT @ Q).double()

    # ‖ΔC‖² = ‖L2 Rt2 − L Rt‖²; the difference of squares cancels badly in float32, so it is
    # taken in float64 from k × k Grams: ‖ΔC‖² = ‖dL Rt2 + L dRt‖² expanded
    # (each factor's own singular frame, its read or write basis, also once per shared factor)
    left = [Ra, X, *torch.linalg.svd(Ra.double())[:2], batched_gram(dL, dL), batched_gram(dL, L),
            batched_gram(L, L)]
    right = [Rb, Y, *torch.linalg.svd(Rb.double())[:2], batched_gram(Rt2.mT, Rt2.mT),
             batched_gram(Rt2.mT, dRt.mT), batched_gram(dRt.mT, dRt.mT)]
    if left_heads is not None:
        left = [x[left_heads] for x in left]
    if right_heads is not None:
        right = [x[right_heads] for x in right]
    (Ra, X, ua, sa, dLdL, dLL, LL), (Rb, Y, ub, sb, R2R2, R2dR, dRdR) = left, right
    M = X @ Rb.mT + Ra @ Y + X @ Y
    Ra, Rb, M = Ra.double(), Rb.double(), M.double()
    total = ((dLdL * R2R2).sum((-1, -2)) + 2 * (dLL * R2dR).sum((-1, -2))
             + (LL * dRdR).sum((-1, -2))).clamp(min=0)
    read = sa > rtol * sa[:, :1]
    write = sb > rtol * sb[:, :1]
    sub_core = (ua.mT @ M @ ub) * read[:, :, None] * write[:, None, :]
    sub = sub_core.pow(2).sum((-1, -2))
    u, s, vh = torch.linalg.svd(Ra @ Rb.mT)
    core = u.mT @ M @ vh.mT
    out = CircuitAlignments([], [], [], [], [], [], [])
    m, n = L.shape[1], Rt.shape[2]
    for h in range(M.shape[0]):
        keep = s[h] > 1e-9 * s[h, 0] if s[h, 0] > 0 else torch.zeros_like(s[h], dtype=torch.bool)
        out.frames.append(CircuitFrame(Ra[h], Rb[h], ua[h], ub[h], read[h], write[h], u[h], vh[h],
                                       keep, cluster_ids(s[h][keep]), m, n))
        t = float(total[h])
        out.delta_norm.append(t ** 0.5)
        out.base_S.append(s[h][keep])
        out.subspace.append(float(sub[h]) / t if t > 0 else float("nan"))
        out.core.append(core[h][keep][:, keep])
        out.read_rank.append(int(read[h].sum()) if sa[h, 0] > 0 else 0)
        out.write_rank.append(int(write[h].sum()) if sb[h, 0] > 0 else 0)
    return out


def spectrum_stats(S: Float[Tensor, "r"], q: float = 0.9,
                   energy: float | None = None) -> dict[str, float | int]:
    """Stable rank ``‖Δ‖²/σ₁²``, effective rank ``exp(H(σ/Σσ))``, and ``rank@q``.

    ``energy`` (``‖Δ‖_F²``) marks ``S`` as only the *top* singular values (``--fast``): the
    stable rank is then still exact, ``rank@q`` is exact when the top values reach ``q`` of the
    energy (else NaN: it is larger than ``len(S)``), and the effective rank, which needs every
    singular value, is NaN."""
    S = S.double()
    if S.numel() == 0 or S[0] == 0:
        return {"stable_rank": float("nan"), "effective_rank": float("nan"), "rank_90": 0}
    if energy is not None:
        cum = torch.cumsum(S.pow(2), 0) / energy
        reached = cum >= q - 1e-12
        rank_q = int(reached.nonzero()[0, 0]) + 1 if reached.any() else float("nan")
        return {"stable_rank": float(energy / S[0] ** 2), "effective_rank": float("nan"),
                "rank_90": rank_q}
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
