"""From rows to an :class:`Analysis`: the tables, their q-values and labels, and the summary.

:func:`assemble` takes every layer's rows (from :mod:`tv_lens.analysis.run`, or from a zoo's
tasks) and makes the four tables of :func:`~tv_lens.analyze`; the q-values and calibrated labels
need every unit of a table at once, so they are made here, not per layer. The ``summary`` table
answers the research question at a glance: per layer and part, the update energy and how much
of it is labelled new / amplified / dampened / aligned / mixed, plus concentration (the smallest
fraction of units carrying half, or 90%, of the energy). Shares are weighted by each unit's
update energy; where no unit changed, by unit, so the fractions stay defined.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tv_lens.analysis.labels import (HEAD_COLUMNS, LABELS, MATRIX_COLUMNS, NEURON_COLUMNS,
                                     SUMMARY_COLUMNS, Thresholds, add_effect_sizes, add_q_values,
                                     calibrated_labels)
from tv_lens.analysis.options import AnalysisOptions
from tv_lens.components import circuit_name, matrix_name, neuron_matrix_name, part_name
from tv_lens.errors import TvLensWarning
from tv_lens.speedups import write_csv


@dataclass
class Analysis:
    """Tidy result tables of :func:`~tv_lens.analyze` (one row per unit, fixed columns)."""

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


def assemble(spec: Any, head_rows: list[dict], neuron_frames: list[pd.DataFrame],
             matrix_rows: list[dict], energies: dict[tuple[int, str], np.ndarray],
             options: AnalysisOptions, info: dict) -> Analysis:
    """The :class:`Analysis` of every layer's rows (in layer order; the embeddings' matrix rows
    last): tables, q-values, labels and summary."""
    fast, t = options.fast, options.t
    heads = pd.DataFrame(head_rows).reindex(columns=HEAD_COLUMNS)
    heads["component"] = [circuit_name(*key) for key in zip(heads.layer, heads["head"], heads.circuit)]
    # expert: whose expert a neuron or matrix is (<NA> on dense models and for a shared expert)
    neurons = pd.concat(neuron_frames, ignore_index=True).reindex(columns=NEURON_COLUMNS)
    neurons["expert"] = neurons["expert"].astype("Int64")
    neurons["component"] = [neuron_matrix_name(l, n, m, None if pd.isna(e) else int(e)) for l, e, n, m
                            in zip(neurons.layer, neurons.expert, neurons.neuron, neurons.matrix)]
    matrix_table = pd.DataFrame(matrix_rows).reindex(columns=MATRIX_COLUMNS)
    matrix_table["component"] = [matrix_name(p) for p in matrix_table.param]
    for col in ("layer", "expert"):
        matrix_table[col] = matrix_table[col].astype("Int64")
    if fast:  # the base's top directions were found with the update's as probes: biased
        for col in ("z", "p_value", "amplification_z", "amplification_p_value"):
            matrix_table[col] = np.nan  # towards Δ, so a random-subspace null does not apply
    # BH families: a table's units of one kind (OV or QK circuits; neurons' W_in, W_gate or W_out
    # directions); all matrices are one family, the embeddings included
    for table, kind in ((heads, "circuit"), (neurons, "matrix"), (matrix_table, None)):
        add_q_values(table, kind)
    for table, kind in ((heads, "heads"), (neurons, "neurons"), (matrix_table, "matrices")):
        add_effect_sizes(table, kind)
        if options.labels == "calibrated" and not (fast and table is matrix_table):
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


# --------------------------------------------------------------------------- summary
def _concentration(energy: np.ndarray, q: float) -> float:
    """Smallest fraction of units carrying ``q`` of the total energy."""
    total = energy.sum()
    if energy.size == 0 or total <= 0:
        return float("nan")
    cum = np.cumsum(np.sort(energy)[::-1]) / total
    return float((np.searchsorted(cum, q - 1e-12) + 1) / energy.size)



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
        rows.append(_summary_row(None, part, units,
                                 np.concatenate([energies[(l, part)] for l in range(spec.n_layers)]),
                                 base_new[part], total))
    summary = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    summary["component"] = [part_name(r["layer"], r["part"]) for r in rows]
    summary["layer"] = summary["layer"].astype("Int64")  # <NA>: every layer's attn or mlp
    return summary
