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
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tv_lens.linalg import (align, best_matches, cluster_ids, core_shares,
                            factored_svd, frob2_factored, gram_svd, matrix_overlap,
                            orthonormal_basis, random_match_baseline, spectrum_stats)
from tv_lens.vector import TuningVector

LABELS = ("amplified", "dampened", "new", "mixed", "unchanged")
HEAD_COLUMNS = ["layer", "head", "circuit", "label", "delta_norm", "relative_norm",
                "subspace_share", "new_share", "amplification_share", "signed_scale",
                "baseline_subspace_share", "baseline_amplification_share",
                "baseline_subspace_share_weights"]
NEURON_COLUMNS = ["layer", "neuron", "side", "label", "delta_norm", "relative_norm", "cos",
                  "amplification_share", "new_share", "baseline_cos2"]
MATRIX_COLUMNS = ["layer", "matrix", "label", "delta_norm", "relative_norm", "stable_rank",
                  "effective_rank", "rank_90", "n_new_directions", "n_amplified_directions",
                  "top_match", "mean_match", "baseline_match", "baseline_match_p95",
                  "top_subspace_share", "baseline_top_subspace_share", "amplification_share",
                  "new_share", "signed_scale", "base_rank_90"]
SUMMARY_COLUMNS = ["layer", "part", "update_energy", "energy_share", "new_frac",
                   "amplified_frac", "dampened_frac", "mixed_frac", "unchanged_frac",
                   "mean_new_share", "baseline_new_share", "baseline_new_share_weights",
                   "concentration_50",
                   "concentration_90", "n_units"]


@dataclass(frozen=True)
class Thresholds:
    """Label thresholds (METHODS.md "Labels"); tables always carry the raw shares too."""

    tol: float = 1e-6  # relative change below this: "unchanged"
    amplified: float = 0.5  # amplification_share at or above: amplified / dampened
    new: float = 0.5  # new_share at or above: new
    intruder: float = 0.5  # a Δ direction whose best base match is below this is new


def label(relative_norm: float, amplification_share: float, new_share: float,
          signed_scale: float, t: Thresholds = Thresholds()) -> str:
    """The METHODS.md label of one unit from its raw numbers."""
    if not relative_norm >= t.tol:  # also catches NaN
        return "unchanged"
    if amplification_share >= t.amplified:
        return "amplified" if signed_scale >= 0 else "dampened"
    if new_share >= t.new:
        return "new"
    return "mixed"


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
        ``summary.json`` (the summary plus ``info``: versions, arguments, timings)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("heads", "neurons", "matrices", "summary"):
            getattr(self, name).to_csv(folder / f"{name}.csv", index=False)
        payload = {"info": self.info,
                   "summary": json.loads(self.summary.to_json(orient="records"))}
        (folder / "summary.json").write_text(json.dumps(payload, indent=2))
        return folder


# --------------------------------------------------------------------------- heads
def _head_rows(tv: TuningVector, layer: int, t: Thresholds) -> list[dict]:
    spec, base = tv.spec, tv.base
    a = f"blocks.{layer}.attn."
    W = {k: base[a + k].double() for k in ("W_Q", "W_K", "W_V", "W_O")}
    D = {k: tv[a + k].double() for k in ("W_Q", "W_K", "W_V", "W_O")}
    rows = []
    for head in range(spec.n_heads):
        kv = spec.kv_head(head)
        circuits = {
            # circuit: (left factor, right factor, their updates); circuit = L @ Rᵀ-style A @ B
            "OV": (W["W_V"][kv], W["W_O"][head], D["W_V"][kv], D["W_O"][head]),
            "QK": (W["W_Q"][head], W["W_K"][kv].T, D["W_Q"][head], D["W_K"][kv].T),
        }
        for circuit, (L, Rt, dL, dRt) in circuits.items():
            A = torch.cat([L + dL, -L], dim=1)
            B = torch.cat([Rt + dRt, Rt], dim=0)
            base_svd = factored_svd(L, Rt)
            read, write = orthonormal_basis(L), orthonormal_basis(Rt.T)
            al = align(A, B, base_svd, read, write)
            delta_norm = float(np.sqrt(max(frob2_factored(A, B), 0.0)))
            base_norm = float(base_svd.S.norm())
            rel = delta_norm / base_norm if base_norm > 0 else float("inf")
            if not rel >= t.tol:
                al = type(al)(float("nan"), float("nan"), 0.0, al.baseline_subspace_share,
                              al.baseline_amplification_share)
            new_share = 1.0 - al.subspace_share
            rows.append(dict(
                layer=layer, head=head, circuit=circuit,
                label=label(rel, al.amplification_share, new_share, al.signed_scale, t),
                delta_norm=delta_norm, relative_norm=rel, subspace_share=al.subspace_share,
                new_share=new_share, amplification_share=al.amplification_share,
                signed_scale=al.signed_scale, baseline_subspace_share=al.baseline_subspace_share,
                baseline_amplification_share=al.baseline_amplification_share,
                baseline_subspace_share_weights=read.shape[1] / spec.d_model))
    return rows


# --------------------------------------------------------------------------- neurons
def _neuron_rows(tv: TuningVector, layer: int, t: Thresholds) -> list[pd.DataFrame]:
    m = f"blocks.{layer}.mlp."
    sides = {"in": ("W_in", 1), "gate": ("W_gate", 1), "out": ("W_out", 0)}
    frames = []
    for side, (name, axis) in sides.items():
        if m + name not in tv:
            continue
        w = tv.base[m + name].double()
        d = tv[m + name].double()
        if axis == 1:  # columns are the neurons' directions
            w, d = w.T, d.T
        w_norm, d_norm = w.norm(dim=1), d.norm(dim=1)
        rel = (d_norm / w_norm).cpu().numpy()
        cos = ((w * d).sum(dim=1) / (w_norm * d_norm)).cpu().numpy()
        unchanged = ~(rel >= t.tol)
        cos = np.where(unchanged, np.nan, cos)
        amp = cos**2
        new = 1.0 - amp
        labels = np.where(unchanged, "unchanged",
                          np.where(amp >= t.amplified, np.where(cos >= 0, "amplified", "dampened"),
                                   np.where(new >= t.new, "new", "mixed")))
        frames.append(pd.DataFrame(dict(
            layer=layer, neuron=np.arange(w.shape[0]), side=side, label=labels,
            delta_norm=d_norm.cpu().numpy(), relative_norm=rel, cos=cos,
            amplification_share=amp, new_share=new, baseline_cos2=1.0 / w.shape[1])))
    return frames


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


def _matrix_row(name: str, W: Tensor, D: Tensor, top_k: int, t: Thresholds) -> dict:
    W, D = W.double(), D.double()
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    delta_norm, base_norm = float(D.norm()), float(W.norm())
    rel = delta_norm / base_norm if base_norm > 0 else float("inf")
    row: dict[str, Any] = dict(layer=layer, matrix=name.rsplit(".", 1)[-1] if layer is not None
                               else name, delta_norm=delta_norm, relative_norm=rel)
    base = gram_svd(W)  # once per matrix; Δ is then read in its singular bases
    base_r = spectrum_stats(base.S)["rank_90"]
    m, n = W.shape
    mean_b, p95_b = _match_baseline(m, n, base.S.numel())
    row.update(base_rank_90=base_r, baseline_match=mean_b, baseline_match_p95=p95_b,
               baseline_top_subspace_share=base_r * base_r / (m * n))
    if not rel >= t.tol:
        nan = float("nan")
        row.update(label="unchanged", stable_rank=nan, effective_rank=nan, rank_90=0,
                   n_new_directions=0, n_amplified_directions=0, top_match=nan, mean_match=nan,
                   top_subspace_share=nan, amplification_share=nan, new_share=nan,
                   signed_scale=0.0)
        return row
    overlap = matrix_overlap(base, D, top_k)
    row.update(spectrum_stats(overlap.delta_S))
    ids = cluster_ids(base.S)
    left, left_idx = best_matches(overlap.left, ids)
    right, right_idx = best_matches(overlap.right, ids)
    match = torch.minimum(left, right)
    is_new = match < t.intruder
    is_amp = (~is_new) & (left_idx == right_idx)
    total = float(overlap.delta_S.pow(2).sum())
    top_share = float(overlap.core[:base_r, :base_r].pow(2).sum()) / total
    amp, scale = core_shares(overlap.core, base.S, total, ids)
    new_share = 1.0 - top_share
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


def _unit_energies(tv: TuningVector, layer: int, part: str) -> np.ndarray:
    """Per-head (attn) or per-neuron (mlp) squared update norm; K/V shared by a group are
    split evenly over the group's query heads."""
    spec = tv.spec
    if part == "attn":
        a = f"blocks.{layer}.attn."
        e = tv[a + "W_Q"].pow(2).sum((1, 2)) + tv[a + "W_O"].pow(2).sum((1, 2))
        kv = (tv[a + "W_K"].pow(2).sum((1, 2)) + tv[a + "W_V"].pow(2).sum((1, 2))) / spec.group_size
        e = e + kv.repeat_interleave(spec.group_size)
        return e.double().cpu().numpy()
    m = f"blocks.{layer}.mlp."
    e = tv[m + "W_in"].pow(2).sum(0) + tv[m + "W_out"].pow(2).sum(1)
    if m + "W_gate" in tv:
        e = e + tv[m + "W_gate"].pow(2).sum(0)
    return e.double().cpu().numpy()


def _summary_row(layer: Any, part: str, units: pd.DataFrame, unit_energy: np.ndarray,
                 baselines: tuple[float, float], total_energy: float) -> dict:
    weight = units["delta_norm"].to_numpy() ** 2
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
                dampened_frac=fracs["dampened"], mixed_frac=fracs["mixed"],
                unchanged_frac=fracs["unchanged"], mean_new_share=mean_new,
                baseline_new_share=baselines[0], baseline_new_share_weights=baselines[1],
                concentration_50=_concentration(unit_energy, 0.5),
                concentration_90=_concentration(unit_energy, 0.9), n_units=len(unit_energy))


def _summary(tv: TuningVector, heads: pd.DataFrame, neurons: pd.DataFrame) -> pd.DataFrame:
    spec = tv.spec
    energies = {(l, p): _unit_energies(tv, l, p) for l in range(spec.n_layers)
                for p in ("attn", "mlp")}
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
def analyze(pair_or_vector: Any, *, top_k: int = 10, tol: float = 1e-6,
            thresholds: Thresholds | None = None, progress: bool = True) -> "Analysis":
    """Directional-alignment tables for a :class:`~tv_lens.ModelPair` (or a tuning vector with
    base weights attached).

    Args:
        pair_or_vector: a ``ModelPair`` or a ``TuningVector`` that carries its base.
        top_k: singular directions of each matrix update matched against the base.
        tol: relative change below which a unit is ``unchanged`` (its shares are NaN).
        thresholds: label thresholds; ``tol`` overrides ``thresholds.tol``.
        progress: show a tqdm bar over layers.

    Returns:
        :class:`Analysis` with ``heads``, ``neurons``, ``matrices`` and ``summary`` tables.

    Degenerate singular values: where the base has (near-)equal singular values (relative gap
    below 1e-4), single singular vectors are arbitrary within their cluster, so amplification
    shares and direction matches are measured against the cluster's whole subspace
    (:func:`tv_lens.linalg.cluster_ids`); for distinct values this is the per-vector definition.

    Cost: head circuits stay factored (QR of ``[d_model, 2·d_head]`` factors, never a dense
    ``d_model²`` per head), neuron cosines are batched, and each matrix's base SVD is computed
    once, all in float64 whatever the checkpoint dtype.
    """
    import time

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    tv = pair_or_vector.tuning_vector() if hasattr(pair_or_vector, "tuning_vector") else pair_or_vector
    if tv.base is None:
        tv._base_tensor("embed.W_E")  # raises MissingBaseError with the fix
    t = replace(thresholds or Thresholds(), tol=tol)
    started = time.perf_counter()
    head_rows: list[dict] = []
    neuron_frames: list[pd.DataFrame] = []
    matrix_rows: list[dict] = []
    names = _matrix_names(tv)
    by_layer: dict[Any, list[str]] = {}
    for name in names:
        by_layer.setdefault(name.split(".")[1] if name.startswith("blocks.") else "model", []).append(name)
    with torch.no_grad():
        for layer in tqdm(range(tv.spec.n_layers), desc="analyze layers", disable=not progress):
            head_rows += _head_rows(tv, layer, t)
            neuron_frames += _neuron_rows(tv, layer, t)
            for name in by_layer.get(str(layer), []):
                matrix_rows.append(_matrix_row(name, _as_2d(name, tv.base[name]),
                                               _as_2d(name, tv[name]), top_k, t))
        for name in by_layer.get("model", []):
            matrix_rows.append(_matrix_row(name, tv.base[name], tv[name], top_k, t))
    heads = pd.DataFrame(head_rows, columns=HEAD_COLUMNS)
    neurons = pd.concat(neuron_frames, ignore_index=True)[NEURON_COLUMNS]
    matrices = pd.DataFrame(matrix_rows)[MATRIX_COLUMNS]
    matrices["layer"] = matrices["layer"].astype("Int64")
    summary = _summary(tv, heads, neurons)
    info = {"top_k": top_k, "thresholds": t.__dict__, "spec": tv.spec.to_dict(),
            "metadata": {k: v for k, v in tv.metadata.items() if isinstance(v, (str, int, float))},
            "seconds": round(time.perf_counter() - started, 3)}
    return Analysis(heads, neurons, matrices, summary, info)


def matrix_spectrum(pair_or_vector: Any, name: str, top_k: int = 10) -> pd.DataFrame:
    """Singular values of the base matrix W and of its update Δ, with Δ's top ``top_k`` left
    singular directions matched against W's (``match_j = max_i |⟨p_j, u_i⟩|``, METHODS.md
    level 3), for one weight, e.g. ``"blocks.2.mlp.W_out"`` (per-head weights as
    ``[d_model, n·d_head]`` like the matrices table). Dense SVD in float64: one matrix at a time.

    Returns:
        One row per index: ``index, sigma_base, sigma_delta, match, matched_index`` (``match``
        is NaN past ``top_k``); ``attrs["matrix"]`` holds ``name``.
    """
    tv = pair_or_vector.tuning_vector() if hasattr(pair_or_vector, "tuning_vector") else pair_or_vector
    if name not in tv:
        from tv_lens.errors import TvLensError, close_matches

        raise TvLensError(f"No weight {name!r} in this tuning vector." + close_matches(name, list(tv)))
    with torch.no_grad():
        W = _as_2d(name, tv.base[name]).double().cpu()
        D = _as_2d(name, tv[name]).double().cpu()
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        P, S_d, _ = torch.linalg.svd(D, full_matrices=False)
        k = min(top_k, P.shape[1])
        overlap = (P[:, :k].T @ U).abs()
        match, index = overlap.max(dim=1)
    n = max(len(S), len(S_d))
    df = pd.DataFrame({"index": range(n),
                       "sigma_base": np.pad(S.numpy(), (0, n - len(S)), constant_values=np.nan),
                       "sigma_delta": np.pad(S_d.numpy(), (0, n - len(S_d)), constant_values=np.nan),
                       "match": np.pad(match.numpy(), (0, n - k), constant_values=np.nan),
                       "matched_index": np.pad(index.numpy().astype(float), (0, n - k),
                                               constant_values=np.nan)})
    df.attrs["matrix"] = name
    return df
