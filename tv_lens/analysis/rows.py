"""One layer's rows: what each head circuit, neuron and weight matrix of an update looks like.

The builders here turn one layer's base weights and updates (dense tensors, or :class:`LowRank`
factors of a LoRA update) into table rows, with the random-update baseline beside every share
(definitions: ``shared/METHODS.md``):

- heads (:func:`head_rows`): one row per (head, circuit ∈ {OV, QK}). ΔOV = W_V'W_O' − W_V W_O is
  kept factored; its shares are measured against the base head's read subspace (column space
  of W_V; of W_Q for QK) and write subspace (row space of W_O; column space of W_K for QK), and
  against the base circuit's singular pairs, and tested against a weight-perturbation null.
- neurons (:func:`neuron_rows`): one row per (neuron, matrix ∈ {W_in, W_gate, W_out}): the cosine
  between the update of the neuron's direction and the direction itself.
- matrices (:func:`matrix_row`): one weight matrix (per layer W_Q, W_K, W_V, W_O as
  ``[d_model, n·d_head]`` / ``[n·d_head, d_model]`` — K and V per key-value head as stored —
  W_in, W_gate, W_out, and the embeddings): spectrum of Δ and intruder-style matching of Δ's
  top singular directions against the base's singular vectors.
- energies (:func:`unit_energies`): each head's or neuron's squared update norm, for the summary.

Two baselines for head circuits. ``baseline_subspace_share`` is METHODS.md's: an isotropic
random ΔOV, ``(d_head/d_model)²``. But a random perturbation *of the head's weights* gives
ΔOV ≈ W_V·ΔW_O + ΔW_V·W_O, each term lying in the read (or write) subspace on one side by
construction, so its expected subspace share is ``d_head/d_model`` to first order
(``baseline_subspace_share_weights``). A head's share must beat the second, larger number before
"the update stays in the head's existing subspaces" means more than "the update is a weight
update". The per-matrix table has no such coupling and is the cross-check.

Nothing here reads a checkpoint or knows about workers: :mod:`tv_lens.analysis.run` streams
the layers in, and :mod:`tv_lens.zoo` does the same for many fine-tunes of one base.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tv_lens.analysis.labels import Thresholds, label
from tv_lens.components import expert_of
from tv_lens.lazy import LowRank
from tv_lens.linalg import GramSVD, frob2, gram_svd, randomized_svd
from tv_lens.nulls import (CIRCUIT_CODES, block_counts, circuit_nulls, cluster_counts,
                           haar_share_moments, neuron_moments)
from tv_lens.shares import (align_circuits, best_matches, cluster_ids, core_shares,
                            intruder_count, matrix_overlap, random_match_baseline, spectrum_stats)
from tv_lens.stats import NullMoments
from tv_lens.vector import TuningVector

LINEAR_MATRICES = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")


# --------------------------------------------------------------------------- heads
def head_rows(spec: Any, layer: int, base: dict[str, Tensor], delta: dict[str, Tensor],
               t: Thresholds, null_samples: int = 0, seed: int = 0) -> list[dict]:
    """Every head's OV and QK rows of one layer, all heads at once (:func:`align_circuits`);
    with ``null_samples`` each changed circuit is tested against its weight-perturbation null
    (:func:`tv_lens.nulls.circuit_nulls`; the layer's heads share the draws seeded by
    ``(seed, layer, circuit)``)."""
    a = f"blocks.{layer}.attn."
    W = {k: base[a + k] for k in ("W_Q", "W_K", "W_V", "W_O")}
    D = {k: delta[a + k] for k in ("W_Q", "W_K", "W_V", "W_O")}
    kv = torch.tensor([spec.kv_head(h) for h in range(spec.n_heads)], device=W["W_V"].device)
    # circuit = L @ Rt per head, with the updates dL, dRt; a key-value head's W_V / W_K is passed
    # once for the heads that share it (rows by `kv`)
    circuits = {"OV": ((W["W_V"], W["W_O"], D["W_V"], D["W_O"]), dict(left_heads=kv)),
                "QK": ((W["W_Q"], W["W_K"].mT, D["W_Q"], D["W_K"].mT), dict(right_heads=kv))}
    m, n = spec.d_model, spec.d_model
    by_circuit = {c: align_circuits(*factors, **heads) for c, (factors, heads) in circuits.items()}

    def head_norms(x: Tensor, heads: Tensor | None) -> Tensor:
        norms = torch.linalg.vector_norm(x, dim=(1, 2), dtype=torch.float64).cpu()
        return norms if heads is None else norms[heads.cpu()]

    factor_norms = {c: (head_norms(f[2], h.get("left_heads")),
                        head_norms(f[3], h.get("right_heads"))) for c, (f, h) in circuits.items()}
    rows, pending = [], []  # pending: (row index, circuit, head) of changed circuits to test
    for head in range(spec.n_heads):
        for circuit, al in by_circuit.items():
            S, core, delta_norm = al.base_S[head], al.core[head], al.delta_norm[head]
            ids = cluster_ids(S)
            base_norm = float(S.norm())
            rel = delta_norm / base_norm if base_norm > 0 else float("inf")
            base_sub = al.read_rank[head] * al.write_rank[head] / (m * n)
            base_amp = float(torch.bincount(ids).pow(2).sum()) / (m * n) if len(ids) else 0.0
            nan = float("nan")
            sub, amp, scale = nan, nan, 0.0
            if rel >= t.tol and delta_norm > 0:
                sub = al.subspace[head]
                amp, scale = core_shares(core, S, delta_norm**2, ids)
                pending.append((len(rows), circuit, head))
            new_share = 1.0 - sub
            rows.append(dict(
                layer=layer, head=head, circuit=circuit,
                label=label(rel, amp, new_share, scale, t),
                delta_norm=delta_norm, relative_norm=rel, subspace_share=sub,
                new_share=new_share, amplification_share=amp, signed_scale=scale,
                baseline_subspace_share=base_sub, baseline_amplification_share=base_amp,
                baseline_subspace_share_weights=al.read_rank[head] / spec.d_model,
                null_subspace_share=nan, z=nan, p_value=nan, null_amplification_share=nan,
                amplification_z=nan, amplification_p_value=nan))
    if null_samples and pending:
        nulls = circuit_nulls([by_circuit[c].frames[h] for _, c, h in pending],
                              [float(factor_norms[c][0][h]) for _, c, h in pending],
                              [float(factor_norms[c][1][h]) for _, c, h in pending], null_samples,
                              [[seed, layer, CIRCUIT_CODES[c]] for _, c, h in pending])
        stacked = tuple(NullMoments(torch.cat([n[j].mean for n in nulls]),
                                    torch.cat([n[j].var for n in nulls])) for j in (0, 1))
        shares = [[rows[i][c] for i, _, _ in pending] for c in ("subspace_share", "amplification_share")]
        fields = _test_fields(stacked, shares)  # one batched test per share kind
        for j, (i, _, _) in enumerate(pending):
            rows[i].update({k: v[j] for k, v in fields.items()},
                           null_subspace_share=float(stacked[0].mean[j]),
                           null_amplification_share=float(stacked[1].mean[j]))
    return rows


def _test_fields(nulls: tuple[NullMoments, NullMoments],
                 shares: Any) -> dict[str, list[float]]:
    """``z``/``p_value`` of (alignment, amplification) shares against their nulls (one entry
    per unit), keyed by row field (the amplification ones prefixed ``amplification_``)."""
    out = {}
    for null, share, prefix in zip(nulls, shares, ("", "amplification_")):
        z, p = null.test(torch.tensor(share, dtype=torch.float64).reshape(-1))
        out.update({prefix + "z": z.tolist(), prefix + "p_value": p.tolist()})
    return out


# --------------------------------------------------------------------------- neurons
def _unit_products(w: Tensor, d: Tensor | LowRank, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per neuron (the slices along ``axis``: columns for ``axis=1``, rows for ``0``): ``‖w_n‖``,
    ``‖d_n‖`` and ``⟨w_n, d_n⟩``, summed in float64 without transposing the weights. Factors
    ``d = L @ R`` are never formed: ``⟨w_n, L_n R⟩ = L_n · (w Rᵀ)_n``, ``‖L_n R‖² = L_n (R Rᵀ) L_nᵀ``
    (rows; columns likewise)."""
    w_norm = _slice_dots(w, w, axis).sqrt()
    if isinstance(d, LowRank):
        L, R, w = d.left.double(), d.right.double(), w.double()
        dot = ((w.T @ L).T * R).sum(dim=0) if axis == 1 else (L * (w @ R.T)).sum(dim=1)
        return w_norm, neuron_norm2(d, axis).clamp(min=0).sqrt(), dot
    return w_norm, _slice_dots(d, d, axis).sqrt(), _slice_dots(w, d, axis)


def _slice_dots(a: Tensor, b: Tensor, axis: int) -> Tensor:
    """``⟨a_n, b_n⟩`` per slice along ``axis``, as float64. Rows (``axis=0``): one product,
    or ``vector_norm`` for a norm² (8× faster); columns: summed over blocks of 256 rows, whose
    temporaries stay in cache (3–4× faster than one full product; an einsum is 10× slower)."""
    if axis == 0:
        if a is b:
            return torch.linalg.vector_norm(a, dim=1).double().pow(2)
        return (a * b).sum(dim=1).double()
    out = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], 256):
        out += (a[i:i + 256] * b[i:i + 256]).sum(dim=0)
    return out


def mlp_prefixes(spec: Any, layer: int) -> list[tuple[str, int | None]]:
    """``(TL name prefix, expert)`` of each set of neurons in a layer: the dense MLP's, or every
    expert's of a mixture-of-experts MLP and its shared expert's (``expert`` None)."""
    dense = [(f"blocks.{layer}.mlp.", None)]
    if spec.n_experts:
        experts = [(f"blocks.{layer}.mlp.experts.{e}.", e) for e in range(spec.n_experts)]
        return experts + (dense if spec.d_mlp_shared else [])
    return dense


def neuron_rows(spec: Any, layer: int, base: dict[str, Tensor], delta: dict[str, Tensor | LowRank],
                 t: Thresholds) -> list[pd.DataFrame]:
    """Every neuron's rows of one layer (per expert in a mixture of experts), one frame per
    matrix (``W_in``/``W_gate``: columns, ``W_out``: rows)."""
    axes = {"W_in": 1, "W_gate": 1, "W_out": 0}
    frames = []
    for m, expert in mlp_prefixes(spec, layer):
        for name, axis in axes.items():
            if m + name not in delta:
                continue
            frame = _side_rows(base[m + name], delta[m + name], axis, t)
            frame.insert(0, "layer", layer)
            frame.insert(1, "expert", expert)
            frame.insert(3, "matrix", name)
            frames.append(frame)
    return frames


def _side_rows(w: Tensor, d: Tensor | LowRank, axis: int, t: Thresholds) -> pd.DataFrame:
    """One side's neuron rows (without ``layer``/``side``): each neuron's slice of ``w`` along
    ``axis`` against its update."""
    w_norm, d_norm, dot = _unit_products(w, d, axis)
    rel = (d_norm / w_norm).cpu().numpy()
    cos = (dot / (w_norm * d_norm)).cpu().numpy()
    unchanged = ~(rel >= t.tol)
    cos = np.where(unchanged, np.nan, cos)
    amp = cos**2
    new = 1.0 - amp
    labels = np.where(unchanged, "unchanged",
                      np.where(amp >= t.amplified, np.where(cos >= 0, "amplified", "dampened"),
                               np.where(new >= t.new, "new", "mixed")))
    z, p = neuron_moments(len(amp), w.shape[1 - axis]).test(torch.from_numpy(amp))
    return pd.DataFrame(dict(
        neuron=np.arange(w.shape[axis]), label=labels,
        delta_norm=d_norm.cpu().numpy(), relative_norm=rel, cos=cos,
        amplification_share=amp, new_share=new, baseline_cos2=1.0 / w.shape[1 - axis],
        z=z.numpy(), p_value=p.numpy()))


# --------------------------------------------------------------------------- matrices
def as_2d(name: str, W: Tensor) -> Tensor:
    """A layer's weight as one matrix in TL orientation: heads concatenated."""
    kind = name.rsplit(".", 1)[-1]
    if kind in ("W_Q", "W_K", "W_V"):  # [n, d_model, d_head] -> [d_model, n·d_head]
        return W.permute(1, 0, 2).reshape(W.shape[1], -1)
    if kind == "W_O":  # [n, d_head, d_model] -> [n·d_head, d_model]
        return W.reshape(-1, W.shape[-1])
    return W


def as_matrix(name: str, D: Tensor | LowRank) -> Tensor | LowRank:
    """An update as one matrix (:func:`as_2d`); LoRA factors stay factors."""
    return D if isinstance(D, LowRank) else as_2d(name, D)


@lru_cache(maxsize=64)
def _match_baseline(m: int, n: int, n_vectors: int) -> tuple[float, float]:
    return random_match_baseline(m, n, n_vectors)


def _frob2(x: Tensor | LowRank) -> float:
    """``‖x‖_F²`` accumulated in float64 over row chunks (no float64 copy of an embedding)."""
    return max(x.frob2(), 0.0) if isinstance(x, LowRank) else frob2(x)


def _null_spectrum(overlap: Any, m: int, n: int) -> Tensor:
    """Δ's singular values for the matrix null; with only the top ones (``--fast``) the
    remaining energy is spread evenly over the remaining ``min(m, n) − len(top)`` values."""
    S = overlap.delta_S.double().cpu()
    if not overlap.partial:
        return S
    rest, count = overlap.energy - float(S.pow(2).sum()), min(m, n) - S.numel()
    if rest <= 0 or count <= 0:
        return S
    return torch.cat([S, torch.full((count,), (rest / count) ** 0.5, dtype=torch.float64)])


def _matrix_tests(overlap: Any, ids: Tensor, r_used: int, m: int, n: int,
                  shares: tuple[float, float]) -> dict[str, float]:
    """Row fields testing (top_subspace_share, amplification_share) against random matrices
    with Δ's spectrum and Haar singular vectors (:func:`tv_lens.nulls.haar_share_moments`)."""
    spectrum = _null_spectrum(overlap, m, n)
    sizes = torch.bincount(ids).cpu().numpy() if ids.numel() else np.zeros(0, dtype=np.int64)
    nulls = [NullMoments(*(torch.tensor([v], dtype=torch.float64)
                           for v in haar_share_moments(spectrum, m, n, *counts)))
             for counts in (block_counts(r_used, r_used), cluster_counts(sizes))]
    return {k: v[0] for k, v in _test_fields(tuple(nulls), shares).items()}


def decompose(W: Tensor, D: Tensor | LowRank, top_k: int, fast_rank: int | None,
               base: GramSVD | None = None, energies: tuple[float, float] | None = None, *,
               changed: bool = True) -> tuple[GramSVD, GramSVD | None]:
    """The base's decomposition for :func:`matrix_overlap` (``base`` where the caller has it),
    and with ``fast_rank`` also Δ's randomized SVD: Δ's top triplets come first, so the base's
    range finder can be probed with them (every base pair Δ touches is recovered).
    ``energies``: ``(‖W‖², ‖Δ‖²)`` where the caller has them."""
    if fast_rank is None:
        return (base if base is not None else gram_svd(W)), None
    base_e, delta_e = energies or (None, None)
    delta = (randomized_svd(D, max(fast_rank, top_k), energy=delta_e)
             if changed and not isinstance(D, LowRank) else None)
    probes = delta.V[:, :top_k] if delta is not None else None
    return randomized_svd(W, fast_rank, probes=probes, energy=base_e), delta


def matrix_row(name: str, W: Tensor, D: Tensor | LowRank, top_k: int, t: Thresholds,
                fast_rank: int | None = None, intruders: tuple[int, float] = (10, 0.5),
                base: GramSVD | None = None) -> dict:
    """One weight matrix's row (``intruders``: PEFT's ``(top_k, threshold_epsilon)``;
    ``base``: ``gram_svd(W)`` computed already, exact mode only — a model zoo decomposes each
    base matrix once for all its fine-tunes)."""
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    delta_e, base_e = _frob2(D), _frob2(W)
    delta_norm, base_norm = delta_e ** 0.5, base_e ** 0.5
    rel = delta_norm / base_norm if base_norm > 0 else float("inf")
    row: dict[str, Any] = dict(param=name, layer=layer, matrix=name.rsplit(".", 1)[-1],
                               delta_norm=delta_norm, relative_norm=rel, expert=expert_of(name))
    base, fast_delta = decompose(W, D, top_k, fast_rank, base, (base_e, delta_e),
                                  changed=rel >= t.tol)
    base_r = spectrum_stats(base.S, energy=base.energy if base.partial else None)["rank_90"]
    r_used = base.S.numel() if base_r != base_r else base_r  # NaN: rank_90 > the top found
    m, n = W.shape
    mean_b, p95_b = _match_baseline(m, n, base.S.numel())
    ids = cluster_ids(base.S)
    linear = layer is not None and row["matrix"] in LINEAR_MATRICES
    row.update(base_rank_90=base_r, baseline_match=mean_b, baseline_match_p95=p95_b,
               baseline_top_subspace_share=r_used * r_used / (m * n),
               baseline_amplification_share=float(torch.bincount(ids).pow(2).sum()) / (m * n)
               if ids.numel() else 0.0)
    if not rel >= t.tol:
        nan = float("nan")
        row.update(label="unchanged", stable_rank=nan, effective_rank=nan, rank_90=0,
                   n_new_directions=0, n_amplified_directions=0, top_match=nan, mean_match=nan,
                   top_subspace_share=nan, amplification_share=nan, new_share=nan,
                   signed_scale=0.0, n_intruders=0 if linear else nan,
                   **{c: nan for c in ("z", "p_value", "amplification_z", "amplification_p_value")})
        return row
    overlap = matrix_overlap(base, D, top_k, fast_rank=fast_rank, delta=fast_delta)
    row.update(spectrum_stats(overlap.delta_S, energy=overlap.energy if overlap.partial else None))
    left, left_idx = best_matches(overlap.left, ids)
    right, right_idx = best_matches(overlap.right, ids)
    match = torch.minimum(left, right)
    is_new = match < t.intruder
    is_amp = (~is_new) & (left_idx == right_idx)
    total = overlap.energy
    top_share = overlap.core.leading_energy(r_used) / total
    amp, scale = core_shares(overlap.core, base.S, total, ids,
                             base.energy if base.partial else None)
    new_share = 1.0 - top_share
    tall = (max(m, n), min(m, n))
    row.update(_matrix_tests(overlap, ids, r_used, *tall, (top_share, amp)))
    row["n_intruders"] = (intruder_count(base, overlap, *intruders)[0]
                          if linear and overlap.grams is not None else float("nan"))
    row.update(n_new_directions=int(is_new.sum()), n_amplified_directions=int(is_amp.sum()),
               top_match=float(match[0]), mean_match=float(match.mean()),
               top_subspace_share=top_share, amplification_share=amp, new_share=new_share,
               signed_scale=scale, label=label(rel, amp, new_share, scale, t))
    return row


def matrix_names(tv: TuningVector) -> list[str]:
    """The vector's weight matrices (``W_…``: the rows of the matrices table), in stored order."""
    names = []
    for name, slot in tv.slots.items():
        if name in tv and slot.matrix.startswith("W_"):
            names.append(name)
    return names


# --------------------------------------------------------------------------- energies
def neuron_norm2(d: Tensor | LowRank, axis: int) -> Tensor:
    """Squared norm of each neuron's slice (columns for ``axis=1``, rows for ``axis=0``)."""
    if isinstance(d, LowRank):
        L, R = d.left.double(), d.right.double()
        if axis == 1:
            return ((L.T @ L) @ R * R).sum(dim=0)
        return ((L @ (R @ R.T)) * L).sum(dim=1)
    return _slice_dots(d, d, axis)


def unit_energies(spec: Any, layer: int, part: str, delta: dict[str, Tensor | LowRank]) -> np.ndarray:
    """Per-head (attn) or per-neuron (mlp) squared update norm; K/V shared by a group are
    split evenly over the group's query heads."""
    if part == "attn":
        a = f"blocks.{layer}.attn."
        e = delta[a + "W_Q"].pow(2).sum((1, 2)) + delta[a + "W_O"].pow(2).sum((1, 2))
        kv = (delta[a + "W_K"].pow(2).sum((1, 2)) + delta[a + "W_V"].pow(2).sum((1, 2))) / spec.group_size
        e = e + kv.repeat_interleave(spec.group_size)
        return e.double().cpu().numpy()
    energies = []
    for m, _ in mlp_prefixes(spec, layer):
        e = neuron_norm2(delta[m + "W_in"], 1) + neuron_norm2(delta[m + "W_out"], 0)
        if m + "W_gate" in delta:
            e = e + neuron_norm2(delta[m + "W_gate"], 1)
        energies.append(e.double().cpu().numpy())
    return np.concatenate(energies)
