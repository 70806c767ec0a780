"""Exact linear-algebra kernels: products, norms and decompositions of one matrix.

The rule for what lives here: a kernel knows nothing of a base and its update, or of what a
table reports; it multiplies, decomposes or measures one matrix (or a factored product ``A @ B``)
and says how precisely. The share metrics built from these kernels (how an update sits in its
base's singular structure) are :mod:`tv_lens.shares`; machine-specific kernels (oneDNN products,
bfloat16 sketches) are :mod:`tv_lens.speedups`.

Factored matrices ``A @ B`` with a small inner dimension (a head's circuit, rank ≤ 2·d_head, or a
LoRA update) are decomposed without forming the dense product, in float64
(:func:`factored_svd`, :func:`frob2_factored`).

Dense weight matrices go through the eigendecomposition of their small Gram matrix
(:func:`gram_svd`). Precision: Gram products are accumulated in float64 over row chunks;
each chunk's product and the eigendecomposition run in :func:`work_dtype` (float64 up to
``n = 1024``, where it costs little; float32 above, where float64 doubles the cost of every
layer of a 7B model: the error this adds to the shares is measured in ``tests/test_shares.py``).
:func:`randomized_svd` is the ``--fast`` path: the top singular triplets only. Large float32
products go through :func:`tv_lens.speedups.mm`. Eigenpairs of large symmetric matrices:
:func:`partial_eigh` (one tridiagonal reduction, top vectors only) and :func:`top_eigenpairs`
(a block Krylov space started near the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.speedups import mm, sketch_dtype

#: Largest Gram size decomposed in float64 (above it: float32, see the module docstring).
FLOAT64_UP_TO = 1024
_CHUNK_ROWS = 8192
_SYMMETRIC_BLOCKS = 8


def work_dtype(n: int) -> torch.dtype:
    """The dtype products and eigendecompositions of an ``n × n`` Gram matrix run in."""
    return torch.float64 if n <= FLOAT64_UP_TO else torch.float32


def frob2(x: Float[Tensor, "m n"]) -> float:
    """``‖x‖_F²`` as the float64 sum of its rows' squared norms (each row's norm accumulated in
    ``x``'s dtype by ``vector_norm``: 6× faster than a float64 sum of squares, relative error
    ~1e-8 at float32; never a float64 copy of a large matrix)."""
    if x.ndim < 2:
        return float(x.double().pow(2).sum())
    rows = torch.linalg.vector_norm(x.flatten(1), dim=1)
    return float(rows.double().pow(2).sum())


def gram(A: Float[Tensor, "m n"], B: Float[Tensor, "m p"] | None = None,
         dtype: torch.dtype | None = None) -> Float[Tensor, "n p"]:
    """``Aᵀ B`` (``Aᵀ A`` without ``B``) in float64, accumulated over row chunks whose products
    run in ``dtype`` (default :func:`work_dtype` of ``n``); memory: one chunk at a time."""
    dtype = dtype or work_dtype(A.shape[1])
    B_ = A if B is None else B
    n = A.shape[1]
    out = torch.zeros(n, B_.shape[1], dtype=torch.float64, device=A.device)
    # Aᵀ A is symmetric: compute the blocks on and above the diagonal only, 8 column blocks (9/16
    # of the work; 4 blocks: 5/8, 8% slower for 5632 × 2048 on one thread, 16: no faster)
    width = -(-n // _SYMMETRIC_BLOCKS)
    blocks = [slice(j, min(n, j + width)) for j in range(0, n, width)] if B is None else None
    for i in range(0, A.shape[0], _CHUNK_ROWS):
        a = A[i:i + _CHUNK_ROWS].to(dtype)
        if blocks is None:  # (add_ promotes into float64: no float64 temporary)
            out.add_(mm(a.T, B[i:i + _CHUNK_ROWS].to(dtype)))
            continue
        at = a.T.contiguous()  # the blocks' rows of aᵀ, each a contiguous slab (see mm)
        for rows in blocks:
            out[rows, rows.start:].add_(mm(at[rows], at[rows.start:].T))
    for rows in blocks or ():  # mirror the upper triangle below it (exactly symmetric)
        diag = out[rows, rows]
        out[rows, rows] = diag.triu() + diag.triu(1).T
        out[rows.stop:, rows] = out[rows, rows.stop:].T
    return out


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
    ``Wt = Wᵀ``) with ``Wt = U diag(S) Vᵀ``. ``V`` (``[n, r]``, or only the top ``v < r``
    columns where :func:`gram_svd` was asked for fewer vectors) is explicit; ``U = Wt V / S`` is
    never formed, because for an embedding matrix it would cost as much as the SVD itself.
    """

    Wt: Float[Tensor, "m n"]
    S: Float[Tensor, "r"]
    V: Float[Tensor, "n v"]
    transposed: bool
    energy: float = float("nan")  # ‖W‖_F²; S holds all of it unless ``partial``
    partial: bool = False  # S, V are only the top singular triplets (randomized_svd)
    gram: Tensor | None = None  # ``Wtᵀ Wt`` in float64 (exact mode)


def tall(W: Float[Tensor, "a b"]) -> tuple[Tensor, bool]:
    """``(W, False)`` when ``W`` has at least as many rows as columns, else ``(Wᵀ, True)``."""
    transposed = W.shape[0] < W.shape[1]
    return (W.T if transposed else W), transposed


def gram_svd(W: Float[Tensor, "a b"], rtol: float = 1e-6, *,
             vectors: bool | int = True) -> GramSVD:
    """SVD through the eigendecomposition of the small Gram matrix: one ``m·n²`` product and
    one ``n``-sized ``eigh``, several times faster than a direct SVD for tall embedding and MLP
    matrices. ``vectors=False`` computes singular values only (``V`` is then empty);
    ``vectors=k`` every singular value but only the top ``k`` vectors (:func:`partial_eigh`:
    0.35 s instead of a full ``eigh``'s 0.84 s at ``n = 2048``).

    Singular values below ``rtol · σ_max`` (the numerical null space: float64 Gram precision
    is about ``1e-8 · σ_max``) are dropped with their vectors. ``S`` and ``V`` are float64;
    ``Wt`` keeps ``W``'s dtype (see :func:`work_dtype` for the precision of large matrices).
    """
    Wt, transposed = tall(W)
    G64 = gram(Wt)
    energy = float(G64.diagonal().sum())
    n = G64.shape[0]
    G = G64.to(work_dtype(n))
    top = n if vectors is True else int(vectors)
    if top >= n or n <= FLOAT64_UP_TO and top > 0:
        evals, V = torch.linalg.eigh(G)
        evals, V = evals.double().flip(0), V.flip(1).double()[:, :top]
    elif top > 0:
        evals, V = partial_eigh(G, top)
    else:
        evals, V = torch.linalg.eigvalsh(G).double().flip(0), G.new_zeros(n, 0, dtype=torch.float64)
    S = evals.clamp(min=0).sqrt()
    keep = S > rtol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    return GramSVD(Wt, S[keep], V[:, keep[:V.shape[1]]], transposed, energy, gram=G64)


def randomized_svd(W: Float[Tensor, "a b"], rank: int, *, oversample: int = 10, iters: int = 1,
                   seed: int = 0, probes: Tensor | None = None, energy: float | None = None,
                   sketch: torch.dtype | None = None) -> GramSVD:
    """Top-``rank`` singular triplets of ``W`` by a randomized range finder (Halko, Martinsson
    & Tropp 2011: ``rank + oversample`` Gaussian probes, ``iters`` power iterations, QR between
    them), in float32 with float64 energies; ``energy`` is the exact ``‖W‖_F²``.

    The range finder's products run in ``sketch`` (default :func:`tv_lens.speedups.sketch_dtype`: bfloat16 on a
    CPU with AVX512-BF16, where a 5632 × 2048 matrix takes 3 instead of 17 ms per pass): a
    rounded sketch only tilts the subspace found, by ~1e-3, and the singular triplets are then
    computed from ``W`` itself in float32 (Rayleigh–Ritz), so their error is second order
    (``tests/test_linalg.py`` measures both dtypes against an exact SVD).

    ``probes`` (``[n, p]``, in the right space of ``W``'s tall orientation) are added to the
    range as ``W @ probes`` in float32, and their triplets kept beside the top ones: passing an
    update's top right singular vectors makes every base singular pair the update touches
    exactly recoverable (``W v_i = σ_i u_i`` lies in the range), even where ``W``'s spectrum is
    too flat for a range finder to separate its top directions. ``energy``: ``‖W‖_F²`` when the
    caller has it already (:func:`frob2` otherwise)."""
    Wt, transposed = tall(W)
    M = Wt.float()
    n = M.shape[1]
    width = min(n, rank + oversample)
    g = torch.Generator(device="cpu").manual_seed(seed)
    low = sketch or sketch_dtype(M.device)
    M_low = M.to(low)  # (M itself in float32)
    Y = M_low @ torch.randn(n, width, generator=g).to(M.device, low)
    for _ in range(iters):
        Q, _ = torch.linalg.qr(Y.float())
        Y = M_low @ (M_low.T @ Q.to(low))
    del M_low
    Y = Y.float()
    if probes is not None:
        Y = torch.cat([Y, mm(M, probes.to(M))], dim=1)
        rank += probes.shape[1]
    Qm, _ = torch.linalg.qr(Y)
    _, S, Vh = torch.linalg.svd(mm(Qm.T, M), full_matrices=False)
    energy = frob2(M) if energy is None else energy
    return GramSVD(Wt, S[:rank].double(), Vh[:rank].T.double(), transposed, energy, partial=True)


def dense_svd(W: Float[Tensor, "m n"], rtol: float = 1e-6) -> FactoredSVD:
    """Explicit thin SVD ``W = U diag(S) Vᵀ`` (via :func:`gram_svd`), null space dropped."""
    g = gram_svd(W, rtol)
    U = (g.Wt.double() @ g.V) / g.S
    return FactoredSVD(g.V, g.S, U) if g.transposed else FactoredSVD(U, g.S, g.V)


def frob2_factored(A: Float[Tensor, "m k"], B: Float[Tensor, "k n"]) -> float:
    """``‖A @ B‖_F²`` as ``trace((AᵀA)(BBᵀ))`` — O((m + n)·k²)."""
    A, B = A.double(), B.double()
    return float(((A.T @ A) * (B @ B.T)).sum())


def top_eigenpairs(G: Float[Tensor, "n n"], k: int, *, start: Tensor | None = None,
                   start_values: Tensor | None = None, tol: float = 1e-7,
                   max_dim: int | None = None,
                   krylov_above: int = FLOAT64_UP_TO) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenvalues (descending) and eigenvectors ``[n, k]`` of a symmetric
    positive semi-definite ``G``, in float64.

    Up to ``krylov_above`` a full ``eigh``. Above it, a block Krylov space grown from ``start``
    (e.g. the base's top singular vectors, which an update moves only a little; random
    otherwise) with Rayleigh–Ritz after every block; accepted once every residual
    ``‖G v − θ v‖ ≤ tol · θ₁`` (an eigenvector's error is at most that over its eigenvalue
    gap), else — past ``max_dim`` directions (default ``min(n/4, 4·(k + 10))``) — a direct
    :func:`partial_eigh`. Measured at n = 2048 on two CPU cores: 0.06 s instead of the ``eigh``'s 0.64 s for
    a power-law spectrum (σ_i ∝ i^−0.7, like trained weights); where the top of the spectrum is
    as flat as a random matrix's (it would need ~460 directions) the attempt stops at 80 and
    costs ~0.1 s on top of the :func:`partial_eigh`. ``start_values`` (descending eigenvalues
    of a nearby matrix, e.g. the base's ``S²``) let that case go straight to
    :func:`partial_eigh`: a top so flat that ``λ_(k+11) > 0.9 λ_k`` (a Gaussian matrix's
    top at n = 2048 has 0.97; a power-law spectrum σ_i ∝ i^−0.7 has 0.35)."""
    n = G.shape[0]
    k = min(k, n)
    G = G.double()
    if n <= krylov_above:
        evals, vecs = torch.linalg.eigh(G)
        return evals.flip(0)[:k], vecs.flip(1)[:, :k]
    p = min(n, k + 10)
    if start_values is not None and _flat_top(start_values, k, p):
        return partial_eigh(G.to(work_dtype(n)), k, all_values=False)
    max_dim = max_dim or min(n // 4, 4 * p)
    g = torch.Generator(device="cpu").manual_seed(0)
    block = torch.randn(n, p, generator=g, dtype=torch.float64).to(G.device)
    if start is not None:
        block[:, :min(p, start.shape[1])] = start[:, :p].to(block)
    K = torch.linalg.qr(block).Q
    GK = G @ K
    last = K.shape[1]  # width of the newest block
    while True:
        theta, w = torch.linalg.eigh(K.T @ GK)
        theta, w = theta.flip(0)[:k], w.flip(1)[:, :k]
        V = K @ w
        residual = (GK @ w - V * theta).norm(dim=0)
        if bool((residual <= tol * theta[0].clamp(min=1e-300)).all()):
            return theta, V
        if K.shape[1] + p > min(max_dim, n):
            break
        new = GK[:, -last:]
        for _ in range(2):  # block Gram–Schmidt, twice for stability
            new = new - K @ (K.T @ new)
        q, r = torch.linalg.qr(new)
        keep = r.diagonal().abs() > 1e-12 * r.diagonal().abs().max().clamp(min=1e-300)
        if not bool(keep.any()):
            break  # the space is invariant: Rayleigh–Ritz above was exact up to rounding
        last = int(keep.sum())
        K = torch.cat([K, q[:, keep]], dim=1)
        GK = torch.cat([GK, G @ q[:, keep]], dim=1)
    return partial_eigh(G.to(work_dtype(n)), k, all_values=False)


#: ``λ_(k+11) / λ_k`` above which :func:`top_eigenpairs` does not try a Krylov space
FLAT_TOP = 0.9


def _flat_top(values: Tensor, k: int, p: int) -> bool:
    """Whether descending eigenvalues ``values`` are too flat past the top ``k`` for a block
    Krylov space of block size ``p`` to separate them within its budget."""
    if values.numel() <= p or not float(values[k - 1]) > 0:
        return False
    return float(values[p]) > FLAT_TOP * float(values[k - 1])


def partial_eigh(G: Float[Tensor, "n n"], k: int, *,
                 all_values: bool = True) -> tuple[Tensor, Tensor]:
    """Every eigenvalue (descending; only the top ``k`` with ``all_values=False``) and the top
    ``k`` eigenvectors (``[n, k]``) of a symmetric ``G``, float64, from one tridiagonal
    reduction: LAPACK ``sytrd`` (scipy) in ``G``'s dtype, the tridiagonal eigenvalues and
    selected vectors in float64 (scipy), and the reflectors applied to those vectors only
    (``torch.ormqr``). 0.35 s at n = 2048 in float32 on two CPU cores against 0.84 s for a full
    ``eigh`` and 0.29 s for ``eigvalsh`` alone (every eigenvalue: 0.06 s of it). Without scipy
    or off the CPU: a full ``eigh``."""
    n = G.shape[0]
    k = min(k, n)
    if G.device.type == "cpu" and n > 2 and k > 0:
        try:
            from scipy.linalg import LinAlgError, eigh_tridiagonal, eigvalsh_tridiagonal, lapack
        except ImportError:  # scipy is a dependency; a bare environment still works
            lapack = None
        if lapack is not None:
            A = G.numpy()
            sytrd, sytrd_lwork = lapack.get_lapack_funcs(("sytrd", "sytrd_lwork"), (A,))
            lwork, _ = sytrd_lwork(n, lower=1)
            c, d, e, tau, info = sytrd(A, lower=1, lwork=int(lwork))
            if info == 0:
                d, e = d.astype("float64"), e.astype("float64")
                try:
                    top, vecs = eigh_tridiagonal(d, e, select="i", select_range=(n - k, n - 1))
                    evals = (eigvalsh_tridiagonal(d, e) if all_values else top)[::-1].copy()
                except LinAlgError:
                    evals = None
                if evals is not None:
                    # lower sytrd: Q = diag(1, Q'), Q' the geqrf-format reflectors of c[1:, :-1]
                    C = torch.from_numpy(c).double()
                    X = torch.from_numpy(vecs[:, ::-1].copy())
                    X[1:] = torch.ormqr(C[1:, :-1], torch.from_numpy(tau).double(), X[1:])
                    return torch.from_numpy(evals), X
    evals, vecs = torch.linalg.eigh(G)
    return evals.double().flip(0)[:n if all_values else k], vecs.double().flip(1)[:, :k]
