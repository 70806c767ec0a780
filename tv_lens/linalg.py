"""Small, exact linear-algebra kernels behind the alignment metrics (``shared/METHODS.md``).

Everything works on factored matrices ``A @ B`` with a small inner dimension (a head's circuit,
rank ≤ 2·d_head, or a LoRA update) without forming the dense product, and in float64.

Dense weight matrices go through the eigendecomposition of their small Gram matrix
(:func:`gram_svd`). Precision: Gram products are accumulated in float64 over row chunks;
each chunk's product and the eigendecomposition run in :func:`work_dtype` (float64 up to
``n = 1024``, where it costs little; float32 above, where float64 doubles the cost of every
layer of a 7B model: the error this adds to the shares is measured in ``tests/test_linalg.py``).
:func:`randomized_svd` is the ``--fast`` path: the top singular triplets only. Large float32
products go through :func:`mm` (oneDNN's kernels where MKL's are the slower ones).

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

from tv_lens.lazy import LowRank
from tv_lens.nulls import CircuitFrame
from tv_lens.errors import InvalidArgumentError

#: Largest Gram size decomposed in float64 (above it: float32, see the module docstring).
FLOAT64_UP_TO = 1024
_CHUNK_ROWS = 8192
_SYMMETRIC_BLOCKS = 8


_ONEDNN: bool | None = None  # (decided on first use)


def _onednn_matmul() -> bool:
    """Whether :func:`mm` hands float32 products to oneDNN: on CPUs with AVX-512, where MKL's
    float32 GEMM runs its AVX2 kernels unless the CPU is Intel's (measured on an AMD EPYC
    Zen 5, one thread: 106 GFLOP/s for ``Aᵀ B`` at 5632 × 2048 against oneDNN's 193)."""
    global _ONEDNN
    if _ONEDNN is None:
        supported = getattr(torch.cpu, "_is_avx512_supported", None)
        ops = getattr(torch.ops, "mkldnn", None)
        _ONEDNN = bool(torch.backends.mkldnn.is_available() and supported is not None
                       and supported() and hasattr(ops, "_linear_pointwise"))
    return _ONEDNN


def mm(a: Float[Tensor, "p k"], b: Float[Tensor, "k q"]) -> Float[Tensor, "p q"]:
    """``a @ b``; a float32 CPU product runs in oneDNN's kernels where they are the fast ones
    (:func:`_onednn_matmul`; the same float32 accumulation in another summation order). oneDNN
    takes ``b`` as it is only when ``b`` or ``bᵀ`` is contiguous — any other layout (a column
    slice) it re-lays out element by element, ~2000× slower — so such a ``b`` is copied first."""
    if not (a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" == b.device.type
            and a.dim() == b.dim() == 2 and a.numel() and b.numel()
            and not (a.requires_grad or b.requires_grad) and _onednn_matmul()):
        return a @ b
    if b.shape[1] < 256 and not a.is_contiguous():  # skinny product of a transposed matrix:
        return a @ b  # MKL's is faster (5632 × 2048 times 42 columns: 17 against 30 ms)
    if not (b.is_contiguous() or b.T.is_contiguous()):
        b = b.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")


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


def _tall(W: Tensor) -> tuple[Tensor, bool]:
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
    Wt, transposed = _tall(W)
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


def sketch_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype :func:`randomized_svd`'s range finder multiplies in: bfloat16 where its matrix
    products are fast (a GPU; a CPU with AVX512-BF16, where they run 4–6× faster than float32),
    float32 elsewhere (on an AVX2-only CPU bfloat16 products are emulated and slower)."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else torch.float32


def randomized_svd(W: Float[Tensor, "a b"], rank: int, *, oversample: int = 10, iters: int = 1,
                   seed: int = 0, probes: Tensor | None = None, energy: float | None = None,
                   sketch: torch.dtype | None = None) -> GramSVD:
    """Top-``rank`` singular triplets of ``W`` by a randomized range finder (Halko, Martinsson
    & Tropp 2011: ``rank + oversample`` Gaussian probes, ``iters`` power iterations, QR between
    them), in float32 with float64 energies; ``energy`` is the exact ``‖W‖_F²``.

    The range finder's products run in ``sketch`` (default :func:`sketch_dtype`: bfloat16 on a
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
    Wt, transposed = _tall(W)
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


@dataclass(frozen=True)
class CircuitAlignments:
    """:func:`align` for a batch of circuits ``L @ Rt`` (one per head) and their updates.

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
    """Batched, exact :func:`align` of every head's circuit update at once (``d_model``-sized
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
