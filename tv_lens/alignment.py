"""Directional alignment: does an update amplify existing directions or write new ones?

``analyze(pair)`` answers that per head circuit, per neuron and per weight matrix, with the
random-update baseline printed beside every share (definitions: ``shared/METHODS.md``):

- ``heads``: one row per (layer, head, circuit ∈ {OV, QK}). ΔOV = W_V'W_O' − W_V W_O is kept
  factored; its shares are measured against the base head's read subspace (column space of W_V;
  of W_Q for QK) and write subspace (row space of W_O; column space of W_K for QK), and against
  the base circuit's singular pairs.
- ``neurons``: one row per (layer, neuron, side ∈ {in, gate, out}): the cosine between the update
  of the neuron's direction and the direction itself.
- ``matrices``: one row per weight matrix (per layer W_Q, W_K, W_V, W_O as
  ``[d_model, n·d_head]`` / ``[n·d_head, d_model]`` — K and V per key-value head as stored — W_in,
  W_gate, W_out, and the embeddings): spectrum of Δ and intruder-style matching of Δ's top
  singular directions against the base's singular vectors.
- ``summary``: per layer and part, the update energy and how much of it is labelled new /
  amplified / dampened / mixed, plus concentration. This table answers the research question at
  a glance.

Two baselines for head circuits. ``baseline_subspace_share`` is METHODS.md's: an isotropic
random ΔOV, ``(d_head/d_model)²``. But a random perturbation *of the head's weights* gives
ΔOV ≈ W_V·ΔW_O + ΔW_V·W_O, each term lying in the read (or write) subspace on one side by
construction, so its expected subspace share is ``d_head/d_model`` to first order
(``baseline_subspace_share_weights``). A head's share must beat the second, larger number before
"the update stays in the head's existing subspaces" means more than "the update is a weight
update". The per-matrix table has no such coupling and is the cross-check.
"""

from __future__ import annotations

import json
import warnings
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tv_lens.components import expert_of
from tv_lens.errors import InvalidArgumentError, TvLensWarning
from tv_lens.lazy import LowRank
from tv_lens.memory import release_freed_memory
from tv_lens.linalg import (align_circuits, best_matches, cluster_ids, core_shares, frob2,
                            GramSVD, gram_svd, intruder_count, matrix_overlap, random_match_baseline,
                            randomized_svd, spectrum_stats)
from tv_lens.nulls import (CIRCUIT_CODES, block_counts, circuit_nulls, cluster_counts,
                           haar_share_moments, neuron_moments)
from tv_lens.stats import NullMoments, bh_adjust
from tv_lens.table_io import write_csv
from tv_lens.sources import layer_of
from tv_lens.vector import TuningVector
from tv_lens.workers import check_workers, ordered_map

LABELS = ("amplified", "dampened", "aligned", "new", "mixed", "unchanged")
LABEL_MODES = ("calibrated", "fixed")
#: significance columns of one tested share (``prefix`` + these)
_TEST = ["z", "p_value", "q_value"]
_AMP_TEST = ["amplification_" + c for c in _TEST]
HEAD_COLUMNS = ["layer", "head", "circuit", "label", "delta_norm", "relative_norm",
                "subspace_share", "new_share", "amplification_share", "signed_scale",
                "baseline_subspace_share", "baseline_amplification_share",
                "baseline_subspace_share_weights", "null_subspace_share", *_TEST,
                "null_amplification_share", *_AMP_TEST]
NEURON_COLUMNS = ["layer", "neuron", "side", "label", "delta_norm", "relative_norm", "cos",
                  "amplification_share", "new_share", "baseline_cos2", *_TEST]
MATRIX_COLUMNS = ["layer", "matrix", "label", "delta_norm", "relative_norm", "stable_rank",
                  "effective_rank", "rank_90", "n_new_directions", "n_amplified_directions",
                  "n_intruders", "top_match", "mean_match", "baseline_match", "baseline_match_p95",
                  "top_subspace_share", "baseline_top_subspace_share", *_TEST,
                  "amplification_share", "baseline_amplification_share", *_AMP_TEST,
                  "new_share", "signed_scale", "base_rank_90"]
#: the per-layer linear weights that get an intruder count (PEFT's nn.Linear targets)
LINEAR_MATRICES = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")
SUMMARY_COLUMNS = ["layer", "part", "update_energy", "energy_share", "new_frac",
                   "amplified_frac", "dampened_frac", "aligned_frac", "mixed_frac",
                   "unchanged_frac",
                   "mean_new_share", "baseline_new_share", "baseline_new_share_weights",
                   "concentration_50",
                   "concentration_90", "n_units"]


@dataclass(frozen=True)
class Thresholds:
    """Label thresholds (METHODS.md "Labels"); tables always carry the raw shares too."""

    tol: float = 1e-6  # relative change below this: "unchanged"
    amplified: float = 0.5  # amplification_share at or above: amplified / dampened
    new: float = 0.5  # new_share at or above: new (fixed labels)
    intruder: float = 0.5  # a Δ direction whose best base match is below this is new
    level: float = 0.01  # calibrated labels: q-value at or below this is significant


def label(relative_norm: float, amplification_share: float, new_share: float,
          signed_scale: float, t: Thresholds = Thresholds()) -> str:
    """The METHODS.md fixed-threshold label of one unit from its raw numbers."""
    if not relative_norm >= t.tol:  # also catches NaN
        return "unchanged"
    if amplification_share >= t.amplified:
        return "amplified" if signed_scale >= 0 else "dampened"
    if new_share >= t.new:
        return "new"
    return "mixed"


def calibrated_labels(table: pd.DataFrame, t: Thresholds) -> np.ndarray:
    """METHODS.md calibrated labels of a table with ``q_value`` (alignment: subspace share, or
    ``cos²`` for neurons) and, where it has them, ``amplification_q_value`` columns:
    ``amplified``/``dampened`` (amplification share ≥ ``t.amplified`` and significant),
    ``aligned`` (alignment significant, not an amplification), ``new`` (not more aligned than
    the null), ``unchanged`` (relative change below ``t.tol``)."""
    rel = table["relative_norm"].to_numpy(dtype=float)
    amp = table["amplification_share"].to_numpy(dtype=float)
    q_align = table["q_value"].to_numpy(dtype=float)
    q_amp = table["amplification_q_value"].to_numpy(dtype=float) if "amplification_q_value" in table \
        else q_align
    sign = table["cos"].to_numpy(dtype=float) if "cos" in table else table["signed_scale"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        amplified = (amp >= t.amplified) & (q_amp <= t.level)
        aligned = q_align <= t.level
    out = np.where(amplified, np.where(sign >= 0, "amplified", "dampened"),
                   np.where(aligned, "aligned", "new"))
    return np.where(~(rel >= t.tol), "unchanged", out).astype(object)


def _add_q_values(table: pd.DataFrame, kind: str) -> None:
    """Benjamini–Hochberg q-values per family: the units of one table and ``kind``."""
    for prefix in ("", "amplification_"):
        p = prefix + "p_value"
        if p not in table:
            continue
        q = np.full(len(table), np.nan)
        for _, idx in table.groupby(kind, sort=False).indices.items():
            q[idx] = bh_adjust(table[p].to_numpy(dtype=float)[idx])
        table[prefix + "q_value"] = q


@dataclass
class Analysis:
    """Tidy result tables of :func:`analyze` (one row per unit, fixed columns)."""

    heads: pd.DataFrame
    neurons: pd.DataFrame
    matrices: pd.DataFrame
    summary: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(getattr(self, n))} rows"
                          for n in ("heads", "neurons", "matrices", "summary"))
        return f"Analysis({sizes}; {self.info.get('seconds', float('nan')):.2f} s)"

    def save(self, folder: str | Path) -> Path:
        """Write ``heads.csv``, ``neurons.csv``, ``matrices.csv``, ``summary.csv`` and
        ``summary.json`` (the summary plus ``info``: versions, arguments, timings) into a new,
        empty or tv_lens-written folder (:mod:`tv_lens.staging`'s rule; others are refused)."""
        from tv_lens.staging import check_destination, write_marker

        folder = Path(folder)
        check_destination(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("heads", "neurons", "matrices", "summary"):
            write_csv(getattr(self, name), folder / f"{name}.csv")
        payload = {"info": self.info,
                   "summary": json.loads(self.summary.to_json(orient="records"))}
        (folder / "summary.json").write_text(json.dumps(payload, indent=2))
        write_marker(folder, "Analysis.save")
        return folder


# --------------------------------------------------------------------------- heads
def _head_rows(spec: Any, layer: int, base: dict[str, Tensor], delta: dict[str, Tensor],
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
        return w_norm, _neuron_norm2(d, axis).clamp(min=0).sqrt(), dot
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


def _mlp_prefixes(spec: Any, layer: int) -> list[tuple[str, int | None]]:
    """``(TL name prefix, expert)`` of each set of neurons in a layer: the dense MLP's, or every
    expert's of a mixture-of-experts MLP and its shared expert's (``expert`` None)."""
    dense = [(f"blocks.{layer}.mlp.", None)]
    if spec.n_experts:
        experts = [(f"blocks.{layer}.mlp.experts.{e}.", e) for e in range(spec.n_experts)]
        return experts + (dense if spec.d_mlp_shared else [])
    return dense


def _neuron_rows(spec: Any, layer: int, base: dict[str, Tensor], delta: dict[str, Tensor | LowRank],
                 t: Thresholds) -> list[pd.DataFrame]:
    sides = {"in": ("W_in", 1), "gate": ("W_gate", 1), "out": ("W_out", 0)}
    frames = []
    for m, expert in _mlp_prefixes(spec, layer):
        for side, (name, axis) in sides.items():
            if m + name not in delta:
                continue
            frame = _side_rows(base[m + name], delta[m + name], axis, t)
            frame.insert(0, "layer", layer)
            frame.insert(2, "side", side)
            if expert is not None:
                frame.insert(1, "expert", expert)
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
def _as_2d(name: str, W: Tensor) -> Tensor:
    """A layer's weight as one matrix in TL orientation: heads concatenated."""
    kind = name.rsplit(".", 1)[-1]
    if kind in ("W_Q", "W_K", "W_V"):  # [n, d_model, d_head] -> [d_model, n·d_head]
        return W.permute(1, 0, 2).reshape(W.shape[1], -1)
    if kind == "W_O":  # [n, d_head, d_model] -> [n·d_head, d_model]
        return W.reshape(-1, W.shape[-1])
    return W


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


def _decompose(W: Tensor, D: Tensor | LowRank, top_k: int, fast_rank: int | None,
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


def _matrix_row(name: str, W: Tensor, D: Tensor | LowRank, top_k: int, t: Thresholds,
                fast_rank: int | None = None, intruders: tuple[int, float] = (10, 0.5),
                base: GramSVD | None = None) -> dict:
    """One weight matrix's row (``intruders``: PEFT's ``(top_k, threshold_epsilon)``;
    ``base``: ``gram_svd(W)`` computed already, exact mode only — a model zoo decomposes each
    base matrix once for all its fine-tunes)."""
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    delta_e, base_e = _frob2(D), _frob2(W)
    delta_norm, base_norm = delta_e ** 0.5, base_e ** 0.5
    rel = delta_norm / base_norm if base_norm > 0 else float("inf")
    row: dict[str, Any] = dict(layer=layer, matrix=name.rsplit(".", 1)[-1] if layer is not None
                               else name, delta_norm=delta_norm, relative_norm=rel,
                               expert=expert_of(name))
    base, fast_delta = _decompose(W, D, top_k, fast_rank, base, (base_e, delta_e),
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


def _matrix_names(tv: TuningVector) -> list[str]:
    names = []
    for name, slot in tv.slots.items():
        if name in tv and slot.matrix.startswith("W_"):
            names.append(name)
    return names


# --------------------------------------------------------------------------- summary
def _concentration(energy: np.ndarray, q: float) -> float:
    """Smallest fraction of units carrying ``q`` of the total energy."""
    total = energy.sum()
    if energy.size == 0 or total <= 0:
        return float("nan")
    cum = np.cumsum(np.sort(energy)[::-1]) / total
    return float((np.searchsorted(cum, q - 1e-12) + 1) / energy.size)


def _neuron_norm2(d: Tensor | LowRank, axis: int) -> Tensor:
    """Squared norm of each neuron's slice (columns for ``axis=1``, rows for ``axis=0``)."""
    if isinstance(d, LowRank):
        L, R = d.left.double(), d.right.double()
        if axis == 1:
            return ((L.T @ L) @ R * R).sum(dim=0)
        return ((L @ (R @ R.T)) * L).sum(dim=1)
    return _slice_dots(d, d, axis)


def _unit_energies(spec: Any, layer: int, part: str, delta: dict[str, Tensor | LowRank]) -> np.ndarray:
    """Per-head (attn) or per-neuron (mlp) squared update norm; K/V shared by a group are
    split evenly over the group's query heads."""
    if part == "attn":
        a = f"blocks.{layer}.attn."
        e = delta[a + "W_Q"].pow(2).sum((1, 2)) + delta[a + "W_O"].pow(2).sum((1, 2))
        kv = (delta[a + "W_K"].pow(2).sum((1, 2)) + delta[a + "W_V"].pow(2).sum((1, 2))) / spec.group_size
        e = e + kv.repeat_interleave(spec.group_size)
        return e.double().cpu().numpy()
    energies = []
    for m, _ in _mlp_prefixes(spec, layer):
        e = _neuron_norm2(delta[m + "W_in"], 1) + _neuron_norm2(delta[m + "W_out"], 0)
        if m + "W_gate" in delta:
            e = e + _neuron_norm2(delta[m + "W_gate"], 1)
        energies.append(e.double().cpu().numpy())
    return np.concatenate(energies)


def _summary_row(layer: Any, part: str, units: pd.DataFrame, unit_energy: np.ndarray,
                 baselines: tuple[float, float], total_energy: float) -> dict:
    weight = units["delta_norm"].to_numpy() ** 2
    if not weight.sum() > 0:  # no update energy (every unit unchanged): shares of units instead
        weight = np.ones(len(units))
    wsum = weight.sum()
    fracs = {lab: float(weight[units["label"].to_numpy() == lab].sum() / wsum) if wsum > 0
             else float("nan") for lab in LABELS}
    changed = units["label"] != "unchanged"
    mean_new = (float(np.average(units.loc[changed, "new_share"], weights=weight[changed.to_numpy()]))
                if changed.any() and weight[changed.to_numpy()].sum() > 0 else float("nan"))
    energy = float(unit_energy.sum())
    return dict(layer=layer, part=part, update_energy=energy,
                energy_share=energy / total_energy if total_energy > 0 else float("nan"),
                new_frac=fracs["new"], amplified_frac=fracs["amplified"],
                dampened_frac=fracs["dampened"], aligned_frac=fracs["aligned"],
                mixed_frac=fracs["mixed"],
                unchanged_frac=fracs["unchanged"], mean_new_share=mean_new,
                baseline_new_share=baselines[0], baseline_new_share_weights=baselines[1],
                concentration_50=_concentration(unit_energy, 0.5),
                concentration_90=_concentration(unit_energy, 0.9), n_units=len(unit_energy))


def _summary(spec: Any, heads: pd.DataFrame, neurons: pd.DataFrame,
             energies: dict[tuple[int, str], np.ndarray]) -> pd.DataFrame:
    total = float(sum(e.sum() for e in energies.values()))
    base_new = {"attn": (1.0 - float(heads["baseline_subspace_share"].mean()),
                         1.0 - float(heads["baseline_subspace_share_weights"].mean())),
                "mlp": (1.0 - float(neurons["baseline_cos2"].mean()),) * 2}
    rows = []
    for part, units in (("attn", heads), ("mlp", neurons)):
        for layer in range(spec.n_layers):
            rows.append(_summary_row(layer, part, units[units.layer == layer],
                                     energies[(layer, part)], base_new[part], total))
        rows.append(_summary_row("all", part, units,
                                 np.concatenate([energies[(l, part)] for l in range(spec.n_layers)]),
                                 base_new[part], total))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# --------------------------------------------------------------------------- entry point
def layer_tensors(tv: TuningVector, names: list[str], device: Any) -> tuple[dict, dict]:
    """One layer's base weights and updates (factors where the vector has them and no dense
    form is needed: attention heads slice their weights densely, d_model × d_head each)."""
    base, delta = {}, {}
    for name in names:
        factors = tv.factors(name)
        if factors is not None and ".attn." not in name:
            base[name], delta[name] = tv.base[name].to(device), factors.to(device)
        else:
            base[name], delta[name] = (x.to(device) for x in tv.base_and_update(name))
    return base, delta


def _as_matrix(name: str, D: Tensor | LowRank) -> Tensor | LowRank:
    return D if isinstance(D, LowRank) else _as_2d(name, D)


@dataclass(frozen=True)
class LayerOptions:
    """What :func:`layer_rows` needs of :func:`analyze`'s arguments."""

    top_k: int
    t: Thresholds
    fast_rank: int | None
    intruders: tuple[int, float]
    null_samples: int
    seed: int
    device: torch.device


@dataclass
class LayerRows:
    """One layer's rows of every table, and its per-unit update energies."""

    heads: list[dict]
    neurons: list[pd.DataFrame]
    matrices: list[dict]
    energies: dict[tuple[int, str], np.ndarray]


def names_by_layer(tv: TuningVector) -> dict[int | None, list[str]]:
    """The vector's weight names per block (``None``: embeddings, final norm)."""
    out: dict[int | None, list[str]] = {}
    for name in tv.slots:
        if name in tv:
            out.setdefault(layer_of(name), []).append(name)
    return out


def base_decompositions(tv: TuningVector, layer: int | None,
                        device: torch.device | None = None) -> dict[str, GramSVD]:
    """``gram_svd`` of each of a layer's base matrices (``None``: the embeddings), what the
    matrices table needs of the base in exact mode, for :func:`layer_rows` /
    :func:`model_rows` to reuse across fine-tunes of one base."""
    names = [n for n in names_by_layer(tv).get(layer, []) if n in set(_matrix_names(tv))]
    return {n: gram_svd(_as_2d(n, tv.base[n].to(device or "cpu"))) for n in names}


def layer_rows(tv: TuningVector, layer: int, names: list[str], o: LayerOptions,
               bases: dict[str, GramSVD] | None = None,
               tensors: tuple[dict, dict] | None = None) -> LayerRows:
    """Heads, neurons and matrices rows of one layer (``bases``: the layer's
    :func:`base_decompositions`, computed once for a zoo of fine-tunes; ``tensors``: the
    layer's :func:`layer_tensors`, read already by a caller that needs them too).

    Memory: one part's weights (attention, then MLP) are held at a time, each weight let go
    once its matrix row is made, so that several workers (:mod:`tv_lens.workers`) fit."""
    names = [n for n in names if ".attn." in n or ".mlp." in n]
    spec, matrices = tv.spec, set(_matrix_names(tv))
    out = LayerRows([], [], [], {})
    for part in dict.fromkeys(n.split(".")[2] for n in names):  # attn, mlp in stored order
        part_names = [n for n in names if n.split(".")[2] == part]
        base, delta = ((tensors[0] | {}, tensors[1] | {}) if tensors is not None
                       else layer_tensors(tv, part_names, o.device))
        release_freed_memory()  # the raw reads
        if part == "attn":
            out.heads = _head_rows(spec, layer, base, delta, o.t, o.null_samples, o.seed)
        else:
            out.neurons = _neuron_rows(spec, layer, base, delta, o.t)
        out.energies[(layer, part)] = _unit_energies(spec, layer, part, delta)
        release_freed_memory()
        for name in part_names:
            if name in matrices:
                W, D = base.pop(name), delta.pop(name)
                out.matrices.append(_matrix_row(name, _as_2d(name, W), _as_matrix(name, D),
                                                o.top_k, o.t, o.fast_rank, o.intruders,
                                                (bases or {}).get(name)))
                del W, D
                release_freed_memory()
        del base, delta
    return out


def model_rows(tv: TuningVector, names: list[str], o: LayerOptions,
               bases: dict[str, GramSVD] | None = None) -> list[dict]:
    """The matrices rows of the weights outside the blocks (embeddings), one at a time."""
    rows = []
    matrices = set(_matrix_names(tv))
    for name in names:
        if name in matrices:
            base, delta = layer_tensors(tv, [name], o.device)
            rows.append(_matrix_row(name, base[name], delta[name], o.top_k, o.t, o.fast_rank,
                                    base=(bases or {}).get(name)))
            del base, delta
            release_freed_memory()
    return rows


def analyze(pair_or_vector: Any, *, top_k: int = 10, tol: float = 1e-6,
            thresholds: Thresholds | None = None, progress: bool = True, fast: bool = False,
            fast_rank: int = 32, device: str | torch.device | None = None,
            labels: str = "calibrated", level: float | None = None, null_samples: int = 200,
            seed: int = 0, intruder_top_k: int = 10, intruder_epsilon: float = 0.5,
            workers: int | None = None) -> "Analysis":
    """Directional-alignment tables for a :class:`~tv_lens.ModelPair` (or a tuning vector with
    base weights attached).

    Args:
        pair_or_vector: a ``ModelPair`` or a ``TuningVector`` that carries its base.
        top_k: singular directions of each matrix update matched against the base.
        tol: relative change below which a unit is ``unchanged`` (its shares are NaN).
        thresholds: label thresholds; ``tol`` overrides ``thresholds.tol``.
        progress: show a tqdm bar over layers (with an ETA).
        fast: per-matrix rows from the top ``fast_rank`` singular triplets of the base and of
            the update (randomized SVD) instead of full decompositions; heads and neurons are
            exact either way. What changes: ``amplification_share``, ``signed_scale``, matches
            and ``top_subspace_share`` use the base's top ``fast_rank`` directions only
            (``top_subspace_share`` within the top ``min(rank_90, fast_rank)``), ``rank_90`` is
            NaN where it exceeds ``fast_rank`` and ``effective_rank`` is NaN (it needs every
            singular value). ``info["fast"]`` records the choice. The matrix table has no
            z/p/q then and keeps the fixed-threshold labels: its base directions were found
            with the update's top directions as probes, so they lean towards the update and a
            random-subspace null would call every update aligned.
        fast_rank: singular triplets per matrix in ``fast`` mode (at least ``top_k``).
        device: where the per-layer work runs (e.g. ``"cuda"``); weights are read on the CPU
            one layer at a time and moved there.
        labels: ``"calibrated"`` (default: each share tested against its unit's null,
            ``shared/METHODS.md``) or ``"fixed"`` (the 0.5 thresholds of ``thresholds``). Every
            table carries ``z``, ``p_value`` and ``q_value`` (Benjamini–Hochberg over one table's
            units of one kind: heads per circuit, neurons per side, matrices per matrix name)
            for its alignment share, and heads and matrices the same for the amplification
            share (``amplification_z`` …), in both modes.
        level: q-value at or below which a share is significant (default
            ``thresholds.level`` = 0.01).
        null_samples: Monte Carlo draws per head circuit for its null (neurons and matrices
            have closed forms); 0 skips the head tests (only with ``labels="fixed"``).
        seed: seed of the head nulls (the draws of one layer's OV or QK circuits are seeded by
            ``(seed, layer, circuit)`` and shared by its heads, so results do not depend on
            processing order).
        intruder_top_k, intruder_epsilon: ``n_intruders`` in ``matrices`` (PEFT's ``top_k`` and
            ``threshold_epsilon``): how many of the tuned matrix's top singular vectors on the
            output side have no base singular vector with ``|cos| ≥ ε``. Computed for the
            per-layer linear weights (``[out, in]`` = TransformerLens ``Wᵀ``) in exact mode;
            NaN for embeddings and with ``fast``. GPT-2's fused ``c_attn`` is split into W_Q,
            W_K, W_V here, so its counts differ from PEFT's count on the fused Conv1D tensor.
        workers: layers analysed at once, in threads that share torch's CPU threads
            (:mod:`tv_lens.workers`; default 2 on a CPU with at least two torch threads, 1 on a
            GPU). Each worker holds one layer. The tables do not depend on it beyond float
            rounding: BLAS rounds differently with another thread count, which moves the
            clusters of nearly equal singular values of a flat spectrum (README, scale).

    Returns:
        :class:`Analysis` with ``heads``, ``neurons``, ``matrices`` and ``summary`` tables.

    Memory: weights are read one layer at a time (a pair from ``ModelPair.from_pretrained``
    reads them straight from the checkpoint files), so peak memory is about one layer of the
    base and of the update plus the work on its largest matrix per worker, whatever the model
    size. LoRA updates (:meth:`TuningVector.factors`) are analysed from their factors.

    Degenerate singular values: where the base has (near-)equal singular values (relative gap
    below 1e-4), single singular vectors are arbitrary within their cluster, so amplification
    shares and direction matches are measured against the cluster's whole subspace
    (:func:`tv_lens.linalg.cluster_ids`); for distinct values this is the per-vector definition.

    Cost: head circuits stay factored (QR of ``[d_model, 2·d_head]`` factors, never a dense
    ``d_model²`` per head), neuron cosines are batched, and each matrix's base decomposition is
    computed once (precision: :mod:`tv_lens.linalg`).
    """
    import time

    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be at least 1, got {top_k}.")
    if labels not in LABEL_MODES:
        raise InvalidArgumentError(f"labels must be one of {LABEL_MODES}, got {labels!r}.")
    if level is not None and not 0 < level < 1:
        raise InvalidArgumentError(f"level must be in (0, 1), got {level}.")
    if null_samples < (2 if labels == "calibrated" else 0) or null_samples == 1:
        raise InvalidArgumentError(f"null_samples must be at least 2 for calibrated labels (or 0 with "
                         f"labels='fixed'), got {null_samples}.")
    if intruder_top_k < 1 or not 0 < intruder_epsilon <= 1:
        raise InvalidArgumentError(f"intruder_top_k must be ≥ 1 and intruder_epsilon in (0, 1], got "
                         f"{intruder_top_k} and {intruder_epsilon}.")
    if fast and fast_rank < top_k:
        raise InvalidArgumentError(f"fast_rank ({fast_rank}) must be at least top_k ({top_k}).")
    tv = pair_or_vector.tuning_vector() if hasattr(pair_or_vector, "tuning_vector") else pair_or_vector
    if tv.base is None:
        tv._base_tensor("embed.W_E")  # raises MissingBaseError with the fix
    t = replace(thresholds or Thresholds(), tol=tol)
    bad = {k: v for k, v in t.__dict__.items() if not (0 <= v <= 1 and (k != "level" or v > 0))}
    if bad:
        raise InvalidArgumentError(f"Thresholds must lie in [0, 1] (tol ≥ 0, level > 0); got {bad}. "
                                   "Shares are fractions: e.g. Thresholds(amplified=0.5, new=0.5).")
    t = replace(t, level=level) if level is not None else t
    device = torch.device(device) if device is not None else torch.device("cpu")
    workers = check_workers(workers, device)
    rank = fast_rank if fast else None
    spec = tv.spec
    started = time.perf_counter()
    head_rows: list[dict] = []
    neuron_frames: list[pd.DataFrame] = []
    matrix_rows: list[dict] = []
    energies: dict[tuple[int, str], np.ndarray] = {}
    by_layer = names_by_layer(tv)
    options = LayerOptions(top_k, t, rank, (intruder_top_k, intruder_epsilon), null_samples, seed,
                           device)
    matrices = set(_matrix_names(tv))
    unread = [n for names in by_layer.values() for n in names  # norms: in no table, but a
              if ".attn." not in n and ".mlp." not in n and n not in matrices]

    def rows_of(layer: int | None) -> LayerRows:
        if layer is None:  # the embeddings, and every weight no table reads (a NaN or inf
            for name in unread:  # there is refused too, with its name)
                tv[name]
            return LayerRows([], [], model_rows(tv, by_layer.get(None, []), options), {})
        return layer_rows(tv, layer, by_layer.get(layer, []), options)

    # with several workers the embeddings (the largest matrices) go first, beside the first
    # layers; their rows still follow the layers'. (The bar is closed, its line ended, and work
    # not yet started is cancelled, also when a weight turns out broken mid-way.)
    layers = list(range(spec.n_layers))
    items = [None, *layers] if workers > 1 else [*layers, None]
    outside: list[dict] = []
    bar = tqdm(total=spec.n_layers, desc="analyze layers", disable=not progress)
    with torch.no_grad(), bar, closing(ordered_map(rows_of, items, workers)) as results:
        for item, rows in zip(items, results):
            if item is None:
                outside = rows.matrices
                continue
            head_rows += rows.heads
            neuron_frames += rows.neurons
            matrix_rows += rows.matrices
            energies.update(rows.energies)
            bar.update()
    matrix_rows += outside
    return assemble(spec, head_rows, neuron_frames, matrix_rows, energies, fast=fast,
                    labels=labels, t=t, info={
                        "top_k": top_k, "thresholds": t.__dict__, "spec": spec.to_dict(),
                        "fast": fast, "fast_rank": rank, "device": str(device), "labels": labels,
                        "null_samples": null_samples, "seed": seed, "workers": workers,
                        "intruders": {"top_k": intruder_top_k, "epsilon": intruder_epsilon},
                        "metadata": {k: v for k, v in tv.metadata.items()
                                     if isinstance(v, (str, int, float))},
                        "seconds": round(time.perf_counter() - started, 3)})


def assemble(spec: Any, head_rows: list[dict], neuron_frames: list[pd.DataFrame],
             matrix_rows: list[dict], energies: dict[tuple[int, str], np.ndarray], *, fast: bool,
             labels: str, t: Thresholds, info: dict) -> "Analysis":
    """The :class:`Analysis` of every layer's rows: tables, q-values, labels and summary."""
    heads = pd.DataFrame(head_rows, columns=HEAD_COLUMNS)
    # a mixture-of-experts model's neurons and matrices say whose expert they are
    expert = ["expert"] if spec.n_experts else []
    neurons = pd.concat(neuron_frames, ignore_index=True).reindex(
        columns=NEURON_COLUMNS[:1] + expert + NEURON_COLUMNS[1:])
    if expert:  # <NA> for a shared expert's neurons
        neurons["expert"] = neurons["expert"].astype("Int64")
    matrix_table = pd.DataFrame(matrix_rows).reindex(
        columns=MATRIX_COLUMNS[:2] + expert + MATRIX_COLUMNS[2:])
    if expert:
        matrix_table["expert"] = matrix_table["expert"].astype("Int64")
    matrix_table["layer"] = matrix_table["layer"].astype("Int64")
    if fast:  # the base's top directions were found with the update's as probes: biased
        for col in ("z", "p_value", "amplification_z", "amplification_p_value"):
            matrix_table[col] = np.nan  # towards Δ, so a random-subspace null does not apply
    for table, kind in ((heads, "circuit"), (neurons, "side"), (matrix_table, "matrix")):
        _add_q_values(table, kind)
        if labels == "calibrated" and not (fast and table is matrix_table):
            table["label"] = calibrated_labels(table, t)
    summary = _summary(spec, heads, neurons, energies)
    _warn_if_degenerate((heads, neurons, matrix_table), t, info)
    return Analysis(heads, neurons, matrix_table, summary, info)


def _warn_if_degenerate(tables: tuple[pd.DataFrame, ...], t: Thresholds, info: dict) -> None:
    """Say so where no unit changed: the two models identical (τ = 0), or every update below
    ``t.tol`` (``info["degenerate"]`` records which)."""
    rows = pd.concat([x[["delta_norm", "relative_norm", "label"]] for x in tables])
    if rows.empty or (rows["label"] != "unchanged").any():
        return
    if (rows["delta_norm"] == 0).all():
        info["degenerate"] = "identical"
        message = ("The two models are identical: every weight difference is zero (τ = 0), so "
                   "every unit is 'unchanged' and every share is NaN. Check that the fine-tune is "
                   "not a copy of the base.")
    else:
        info["degenerate"] = "below_tol"
        message = (f"Every unit's relative change is below tol={t.tol:g} (the largest is "
                   f"{rows['relative_norm'].max():.3g}), so every unit is 'unchanged' and every "
                   "share is NaN. Pass a smaller tol to analyse an update this small.")
    warnings.warn(message, TvLensWarning, stacklevel=3)


def matrix_spectrum(pair_or_vector: Any, name: str, top_k: int = 10,
                    fast_rank: int | None = None) -> pd.DataFrame:
    """Singular values of the base matrix W and of its update Δ, with Δ's top ``top_k`` left
    singular directions matched against W's (``match_j = max_i |⟨p_j, u_i⟩|``, METHODS.md
    level 3), for one weight, e.g. ``"blocks.2.mlp.W_out"`` (per-head weights as
    ``[d_model, n·d_head]`` like the matrices table). Computed as the matrices table does
    (:func:`tv_lens.linalg.matrix_overlap`, factors for LoRA targets): one matrix at a time.
    ``fast_rank``: as ``analyze(fast=True)`` does, only the top ``fast_rank`` singular values
    of each (randomized SVD; the base's range finder probed with Δ's top directions).

    Returns:
        One row per index: ``index, sigma_base, sigma_delta, match, matched_index`` (``match``
        is NaN past ``top_k``); ``attrs["matrix"]`` holds ``name``.
    """
    tv = pair_or_vector.tuning_vector() if hasattr(pair_or_vector, "tuning_vector") else pair_or_vector
    if fast_rank is not None and not (isinstance(fast_rank, int) and fast_rank >= 1):
        raise InvalidArgumentError(f"fast_rank must be a positive integer or None, got "
                                   f"{fast_rank!r}.")
    if name not in tv:
        from tv_lens.errors import TvLensError, close_matches

        raise TvLensError(f"No weight {name!r} in this tuning vector." + close_matches(name, list(tv)))
    with torch.no_grad():
        W = _as_2d(name, tv.base[name])
        factors = tv.factors(name)
        D = factors if factors is not None else _as_2d(name, tv[name])
        base, fast_delta = _decompose(W, D, top_k, fast_rank)
        overlap = matrix_overlap(base, D, top_k, fast_rank=fast_rank, delta=fast_delta)
        match, index = overlap.left.abs().max(dim=0)
    S, S_d, k = base.S.cpu().numpy(), overlap.delta_S.cpu().numpy(), match.numel()
    n = max(len(S), len(S_d))
    df = pd.DataFrame({"index": range(n),
                       "sigma_base": np.pad(S, (0, n - len(S)), constant_values=np.nan),
                       "sigma_delta": np.pad(S_d, (0, n - len(S_d)), constant_values=np.nan),
                       "match": np.pad(match.cpu().numpy(), (0, n - k), constant_values=np.nan),
                       "matched_index": np.pad(index.cpu().numpy().astype(float), (0, n - k),
                                               constant_values=np.nan)})
    df.attrs["matrix"] = name
    return df
