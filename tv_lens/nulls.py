"""Null models: what each share looks like for a random update of the same size and structure.

One null per unit kind (``shared/METHODS.md``, "Labels (calibrated against a null)"):

- **neuron direction** (``d``-dimensional): a uniformly random update direction. Its
  ``cos²`` with the neuron's direction follows ``Beta(1/2, (d − 1)/2)`` exactly.
- **matrix**: a random matrix with Δ's singular values and Haar-random singular vectors (left
  and right independent), so a low-rank update is compared with random updates of the same
  spectrum. The mean and variance of a share ``‖Δ[P]‖²/‖Δ‖²`` over any set P of coordinate
  pairs in the base's singular bases (the amplification share's diagonal cluster blocks, the
  top-subspace share's ``a × b`` block) are in closed form from the fourth moments of Haar
  orthogonal matrices (:func:`haar_share_moments`).
- **head circuit**: the head's factors ``L`` (``[m, k]``: W_V, or W_Q) and ``Rt`` (``[k, n]``:
  W_O, or W_Kᵀ) perturbed by uniformly random directions with the actual Frobenius norms of
  their updates. No closed form: Monte Carlo, but in the head's ``k``-dimensional frames
  (:func:`circuit_nulls`), so a sample costs ``O(k³)`` instead of ``O(m·k²)``: with
  ``L = Qa Ra`` and ``Rtᵀ = Qb Rb``, a Gaussian ``dL`` splits into ``X = Qaᵀ dL`` (``k × k``)
  and an independent complement ``e`` (``(m − k) × k``) that enters every share only through
  ``eᵀe ~ Wishart_k(m − k)``; likewise ``dRt`` into ``Y`` and ``f fᵀ ~ Wishart_k(n − k)``.

Seeds are derived from the unit's name, so results do not depend on processing order or on how
many units run together. The heads of one layer share the draws of their circuit kind (seed
``(seed, layer, circuit)``): common random numbers, so each head's null is still an unbiased
Monte Carlo estimate, and the draws and their products with each other are made once per layer
instead of per head (a head then costs three ``[samples·k, k] × [k, k]`` products).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.stats import NullMoments

CIRCUIT_CODES = {"OV": 0, "QK": 1}


# --------------------------------------------------------------------------- neurons
def neuron_moments(n_units: int, d: int) -> NullMoments:
    """Exact null of ``cos²`` for ``d``-dimensional directions: ``Beta(1/2, (d − 1)/2)``, mean
    ``1/d``, variance ``2(d−1)/(d²(d+2))`` (the Beta matched to these moments is that Beta, so
    its p-values are exact)."""
    mean = torch.full((n_units,), 1.0 / d, dtype=torch.float64)
    var = torch.full((n_units,), 2.0 * (d - 1) / (d * d * (d + 2)), dtype=torch.float64)
    return NullMoments(mean, var)


# --------------------------------------------------------------------------- matrices
def _haar_fourth(m: int) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """Fourth moments ``E[O_ij O_il O_i'j' O_i'l']`` of a Haar orthogonal ``O(m)`` matrix for
    column patterns (all equal; j=l≠j'=l'; j=j'≠l=l'; j=l'≠l=j'), rows equal and rows distinct."""
    same = (3.0 / (m * (m + 2)),) + (1.0 / (m * (m + 2)),) * 3
    if m == 1:
        return same, (0.0, 0.0, 0.0, 0.0)
    q = m * (m - 1) * (m + 2)
    diff = (1.0 / (m * (m + 2)), (m + 1) / q, -1.0 / q, -1.0 / q)
    return same, diff


def haar_share_moments(spectrum: Float[Tensor, "r"], m: int, n: int, size: int, n_same_row: int,
                       n_same_col: int) -> tuple[float, float]:
    """Mean and variance of ``‖Δ[P]‖²/‖Δ‖²`` for ``Δ = U' diag(spectrum) V'ᵀ`` with Haar-random
    ``U'`` (``m × r``) and ``V'`` (``n × r``), P a fixed set of ``size`` coordinate pairs
    ``(i, k)`` of which ``n_same_row`` ordered pairs of pairs share the row and not the column
    (``n_same_col`` likewise). ``E‖Δ[P]‖² = size·‖Δ‖²/(mn)``; the variance follows from the
    Haar fourth moments (:func:`_haar_fourth`), with ``T1 = Σσ²`` and ``T2 = Σσ⁴``."""
    s2 = spectrum.double().pow(2)
    T1, T2 = float(s2.sum()), float(s2.pow(2).sum())
    if T1 <= 0:
        return float("nan"), float("nan")
    (ua, *up), (da, *dp) = _haar_fourth(m)
    (va, *vp), (ea, *ep) = _haar_fourth(n)
    rows = {"s": (ua, up), "d": (da, dp)}
    cols = {"s": (va, vp), "d": (ea, ep)}

    def E(x: str, y: str) -> float:  # E[Δ_ik² Δ_i'k'²], x/y: rows/columns same or distinct
        (a_x, p_x), (a_y, p_y) = rows[x], cols[y]
        return T2 * a_x * a_y + (T1 * T1 - T2) * sum(px * py for px, py in zip(p_x, p_y))

    n_dd = size * size - size - n_same_row - n_same_col
    second = size * E("s", "s") + n_same_row * E("s", "d") + n_same_col * E("d", "s") + n_dd * E("d", "d")
    first = size * T1 / (m * n)
    return first / T1, max(second - first * first, 0.0) / (T1 * T1)


def cluster_counts(sizes: list[int] | np.ndarray) -> tuple[int, int, int]:
    """``(size, n_same_row, n_same_col)`` of the block-diagonal set ``∪_C C × C``."""
    c = np.asarray(sizes, dtype=np.int64)
    same = int((c * c * (c - 1)).sum())
    return int((c * c).sum()), same, same


def block_counts(a: int, b: int) -> tuple[int, int, int]:
    """``(size, n_same_row, n_same_col)`` of the ``a × b`` block."""
    return a * b, a * b * (b - 1), a * (a - 1) * b


# --------------------------------------------------------------------------- head circuits
@dataclass(frozen=True)
class CircuitFrame:
    """One head circuit in its ``k``-dimensional frames (from
    :func:`tv_lens.shares.align_circuits`): ``L = Qa Ra``, ``Rtᵀ = Qb Rb``; ``ua``/``ub`` the
    read/write bases (``read``/``write`` masks drop null directions); ``u``, ``vh`` the base
    circuit's singular vectors, ``keep`` its non-null ones and ``ids`` their clusters."""

    Ra: Float[Tensor, "k k"]
    Rb: Float[Tensor, "k k"]
    ua: Float[Tensor, "k k"]
    ub: Float[Tensor, "k k"]
    read: Tensor
    write: Tensor
    u: Float[Tensor, "k k"]
    vh: Float[Tensor, "k k"]
    keep: Tensor
    ids: Tensor
    m: int
    n: int


def _unit_rng(seed: list[int]) -> tuple[np.random.Generator, torch.Generator]:
    """A numpy and a torch generator, both derived from one unit's seed list."""
    seq = np.random.SeedSequence(seed)
    torch_seed = int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return np.random.default_rng(seq), torch.Generator().manual_seed(torch_seed)


def _wishart(chi: np.random.Generator, normal: torch.Generator, dof: int, k: int,
             samples: int) -> Tensor:
    """``samples`` draws of ``eᵀe`` for ``e`` an iid standard Gaussian ``dof × k`` matrix
    (Bartlett's decomposition when ``dof ≥ k``), float32 ``[samples, k, k]``."""
    if dof <= 0:
        return torch.zeros(samples, k, k)
    if dof < k:
        e = torch.randn(samples, dof, k, generator=normal)
        return e.mT @ e
    rows, cols = torch.tril_indices(k, k, -1)
    A = torch.zeros(samples, k, k)
    A[:, rows, cols] = torch.randn(samples, rows.numel(), generator=normal)
    diag = np.sqrt(chi.chisquare(dof - np.arange(k), (samples, k))).astype(np.float32)
    A[:, torch.arange(k), torch.arange(k)] = torch.from_numpy(diag)
    return A @ A.mT


def _draws(frame: CircuitFrame, samples: int, seed: list[int]) -> tuple[Tensor, ...]:
    """One unit's draws ``(X, Y, We, Wf)`` for unit-variance Gaussian ``dL``, ``dRt`` (module
    docstring) and the Frobenius norms ``‖dL‖``, ``‖dRt‖`` they imply."""
    chi, normal = _unit_rng(seed)
    k = frame.Ra.shape[0]
    X, Y = torch.randn(2, samples, k, k, generator=normal)
    We = _wishart(chi, normal, frame.m - k, k, samples)
    Wf = _wishart(chi, normal, frame.n - k, k, samples)
    norm_L = (X.double().pow(2).sum((1, 2)) + We.double().diagonal(dim1=1, dim2=2).sum(1)).sqrt()
    norm_R = (Y.double().pow(2).sum((1, 2)) + Wf.double().diagonal(dim1=1, dim2=2).sum(1)).sqrt()
    return X, Y, We, Wf, norm_L, norm_R


@dataclass(frozen=True)
class _SharedDraws:
    """One seed's draws, each scaled to a unit-norm ``dL`` (``X``, ``We``) and ``dRt`` (``Y``,
    ``Wf``), with the products every unit of that seed needs (float32; the inner products
    ``⟨·,·⟩`` per sample in float64).

    ``Xi``, ``XYi`` hold ``X``, ``X Y`` row by row across samples (``[k·S, k]``, row ``(i, s)``
    = row ``i`` of sample ``s``) and ``Yi`` holds ``Y`` as ``[k, S·k]`` (``Y_1 … Y_S`` side by
    side), so that a unit's ``X Rbᵀ``, ``Ra Y`` and ``X Y`` come out in one layout
    ``[k, S, k]`` from one GEMM each, added in place."""

    X: Tensor
    Y: Tensor
    We: Tensor
    Wf: Tensor
    XY: Tensor  # X Y
    XWf: Tensor  # X Wf
    WeY: Tensor  # We Y
    Xi: Tensor
    Yi: Tensor
    XYi: Tensor
    XWf_X: Tensor  # ⟨X Wf, X⟩
    WeY_Y: Tensor  # ⟨We Y, Y⟩
    We_Wf: Tensor  # ⟨We, Wf⟩


def _shared_draws(frame: CircuitFrame, samples: int, seed: list[int]) -> _SharedDraws:
    """:func:`_draws` of one seed, normalised per sample, with their products."""
    X, Y, We, Wf, norm_L, norm_R = _draws(frame, samples, seed)
    a, b = (1 / norm_L).float()[:, None, None], (1 / norm_R).float()[:, None, None]
    X, Y, We, Wf = X * a, Y * b, We * a**2, Wf * b**2
    XWf, WeY, XY = X @ Wf, We @ Y, X @ Y
    k = X.shape[-1]

    def rows_across_samples(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(k * samples, k)

    return _SharedDraws(X, Y, We, Wf, XY, XWf, WeY, rows_across_samples(X),
                        Y.transpose(0, 1).reshape(k, samples * k), rows_across_samples(XY),
                        _inner(XWf, X), _inner(WeY, Y), _inner(We, Wf))


def _inner(a: Tensor, b: Tensor) -> Float[Tensor, " samples"]:
    """``⟨a_s, b_s⟩`` per sample (``b`` may be one ``[k, k]`` matrix for every sample)."""
    return (a * b).sum((-1, -2)).double()


def _frame_inners(frames: list[CircuitFrame], s: _SharedDraws) -> Float[Tensor, "4 samples units"]:
    """The four inner products of :func:`_unit_shares`' ``‖ΔC‖²`` that pair a draw with one
    unit's frame, ``⟨Wf, RaᵀRa⟩``, ``⟨X Wf, Ra⟩``, ``⟨We, RbᵀRb⟩``, ``⟨We Y, Rbᵀ⟩``, for every
    unit of one seed at once (one ``[S, k²] × [k², units]`` product each)."""
    Ra = torch.stack([f.Ra.float().cpu() for f in frames])
    Rb = torch.stack([f.Rb.float().cpu() for f in frames])
    samples = s.X.shape[0]
    pairs = ((s.Wf, Ra.mT @ Ra), (s.XWf, Ra), (s.We, Rb.mT @ Rb), (s.WeY, Rb.mT))
    return torch.stack([draw.reshape(samples, -1) @ unit.reshape(len(frames), -1).T
                        for draw, unit in pairs]).double()


def _unit_shares(frame: CircuitFrame, c: float, d: float, s: _SharedDraws,
                 inners: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One circuit's ``(subspace_share, amplification_share)`` per sample, for ``dL`` of norm
    ``c`` and ``dRt`` of norm ``d``: ``A = Ra + cX``, ``B = Rbᵀ + dY`` and
    ``M = c X Rbᵀ + d Ra Y + c d X Y`` (module docstring). ``‖ΔC‖²`` is expanded so that only
    ``M`` needs per-unit ``k³`` products: ``tr(A Wf Aᵀ) = ⟨RaᵀRa, Wf⟩ + 2c⟨X Wf, Ra⟩ +
    c²⟨X Wf, X⟩`` (``d²`` times), likewise ``tr(Bᵀ We B)`` (``inners``: this unit's column of
    :func:`_frame_inners`, computed here without it). Where every read/write direction is kept
    (the usual case) the subspace share's numerator is ``‖M‖²``, and where the base circuit's
    singular values are distinct the amplification share needs only the diagonal of
    ``uᵀ M vhᵀ``. ``M`` is held as ``[k, S, k]`` (:class:`_SharedDraws`)."""
    Ra, Rb, u, vh = (getattr(frame, n).float().cpu() for n in ("Ra", "Rb", "u", "vh"))
    k, samples = Ra.shape[0], s.X.shape[0]
    if inners is None:
        inners = _frame_inners([frame], s)[:, :, 0]
    M = torch.addmm(s.XYi, s.Xi, Rb.T, beta=c * d, alpha=c)  # c X Rbᵀ + c d X Y
    M.view(k, samples * k).addmm_(Ra, s.Yi, alpha=d)  # + d Ra Y
    M3 = M.view(k, samples, k)
    M2 = M3.pow(2).sum((0, 2)).double()
    wf_ra, xwf_ra, we_rb, wey_rb = inners
    total = (M2 + d * d * (wf_ra + 2 * c * xwf_ra + c * c * s.XWf_X)
             + c * c * (we_rb + 2 * d * wey_rb + d * d * s.WeY_Y) + (c * d) ** 2 * s.We_Wf)
    if bool(frame.read.all()) and bool(frame.write.all()):
        sub = M2
    else:
        mask = (frame.read[:, None] & frame.write[None, :]).cpu()
        ua, ub = frame.ua.float().cpu(), frame.ub.float().cpu()
        read_write = (ua.T @ (M @ ub).view(k, -1)).view(k, samples, k)  # uaᵀ M ub
        sub = (read_write * mask[:, None, :]).pow(2).sum((0, 2)).double()
    same = _same_cluster(frame)
    right = (M @ vh.T).view(k, samples, k)  # M vhᵀ
    if bool(torch.equal(same, torch.eye(same.shape[0], dtype=torch.bool))):
        amp = (right * u[:, None, :]).sum(0).double().pow(2).sum(-1)
    else:
        rotated = (u.T @ right.view(k, -1)).view(k, samples, k)  # uᵀ M vhᵀ
        amp = (rotated * same[:, None, :]).pow(2).sum((0, 2)).double()
    return sub / total, amp / total


def circuit_nulls(frames: list[CircuitFrame], norms_L: list[float], norms_R: list[float],
                  samples: int, seeds: list[list[int]]) -> list[tuple[NullMoments, NullMoments]]:
    """Monte Carlo null of each circuit's ``(subspace_share, amplification_share)`` when its
    ``L`` and ``Rt`` move by uniformly random directions of norms ``norms_L[i]``,
    ``norms_R[i]``: the sample mean and variance of each share over ``samples`` draws seeded by
    ``seeds[i]`` (so a unit's result does not depend on which others run with it). Units given
    the same seed (and of the same sizes) share their Gaussian draws: common random numbers,
    each unit's moments still an unbiased estimate, drawn once, and the products of draws with
    draws computed once (:func:`_unit_shares`). Draws are float32 (the Monte Carlo error,
    ~``1/√samples`` of a standard deviation, dwarfs rounding). Cost at ``d_head = 64`` and 200
    samples on two CPU cores: ~8 ms per circuit plus ~35 ms per seed."""
    groups: dict[tuple, list[int]] = {}
    for i, (frame, seed) in enumerate(zip(frames, seeds)):
        groups.setdefault((*seed, frame.Ra.shape[0], frame.m, frame.n), []).append(i)
    out: list[tuple[NullMoments, NullMoments] | None] = [None] * len(frames)
    for members in groups.values():
        draws = _shared_draws(frames[members[0]], samples, seeds[members[0]])
        inners = _frame_inners([frames[i] for i in members], draws)
        for column, i in enumerate(members):
            sub, amp = _unit_shares(frames[i], norms_L[i], norms_R[i], draws, inners[:, :, column])
            out[i] = (_moments(sub), _moments(amp))
    return out


def _same_cluster(frame: CircuitFrame) -> Tensor:
    """``[k, k]`` mask of singular-pair indices (i, j) that are both kept and in one cluster."""
    k = frame.keep.shape[0]
    ids = torch.full((k,), -1, dtype=torch.long)
    ids[frame.keep.cpu()] = frame.ids.cpu()
    return (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)


def _moments(x: Tensor) -> NullMoments:
    x = x[torch.isfinite(x)]
    return NullMoments(x.mean().reshape(1), x.var().reshape(1))


def circuit_null(frame: CircuitFrame, norm_L: float, norm_R: float, samples: int,
                 seed: list[int]) -> tuple[NullMoments, NullMoments]:
    """:func:`circuit_nulls` of a single circuit."""
    return circuit_nulls([frame], [norm_L], [norm_R], samples, [seed])[0]
