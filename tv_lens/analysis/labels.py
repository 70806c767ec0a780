"""The analysis tables' schema and the words their rows get.

Every table of :func:`~tv_lens.analyze` has fixed columns (the lists below; a mixture of experts
adds ``expert``), whatever the model or the options. A row carries its raw shares, and a
``label`` that turns them into a word (METHODS.md "Labels"): with ``labels="fixed"`` the 0.5
thresholds of :class:`Thresholds` (:func:`label`), with ``labels="calibrated"`` each share's
Benjamini–Hochberg q-value against its unit's null (:func:`add_q_values`,
:func:`calibrated_labels`). The labels say how an update relates to the base's directions; they
do not say what the update does (that is what patching is for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tv_lens.stats import bh_adjust

LABELS = ("amplified", "dampened", "aligned", "new", "mixed", "unchanged")
LABEL_MODES = ("calibrated", "fixed")
#: significance columns of one tested share (``prefix`` + these)
_TEST = ["z", "p_value", "q_value", "family_size", "enrichment", "excess"]
_AMP_TEST = ["amplification_" + c for c in _TEST]
#: (share tested, its null mean, prefix of its columns) per table: what the effect sizes compare
EFFECTS = {"heads": (("subspace_share", "null_subspace_share", ""),
                     ("amplification_share", "null_amplification_share", "amplification_")),
           "neurons": (("amplification_share", "baseline_cos2", ""),),  # cos², tested by z
           "matrices": (("top_subspace_share", "baseline_top_subspace_share", ""),
                        ("amplification_share", "baseline_amplification_share", "amplification_"))}
HEAD_COLUMNS = ["component", "layer", "head", "circuit", "label", "delta_norm", "relative_norm",
                "subspace_share", "new_share", "amplification_share", "signed_scale",
                "baseline_subspace_share", "baseline_amplification_share",
                "baseline_subspace_share_weights", "null_subspace_share", *_TEST,
                "null_amplification_share", *_AMP_TEST]
NEURON_COLUMNS = ["component", "layer", "expert", "neuron", "matrix", "label", "delta_norm", "relative_norm", "cos",
                  "amplification_share", "new_share", "baseline_cos2", *_TEST]
MATRIX_COLUMNS = ["component", "param", "layer", "expert", "matrix", "label", "delta_norm", "relative_norm", "stable_rank",
                  "effective_rank", "rank_90", "n_new_directions", "n_amplified_directions",
                  "n_intruders", "top_match", "mean_match", "baseline_match", "baseline_match_p95",
                  "top_subspace_share", "baseline_top_subspace_share", *_TEST,
                  "amplification_share", "baseline_amplification_share", *_AMP_TEST,
                  "new_share", "signed_scale", "base_rank_90"]
#: the per-layer linear weights that get an intruder count (PEFT's nn.Linear targets)

SUMMARY_COLUMNS = ["component", "layer", "part", "update_energy", "energy_share", "new_frac",
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


def add_effect_sizes(table: pd.DataFrame, kind: str) -> None:
    """Effect sizes beside each tested share (``kind``: ``heads``, ``neurons`` or ``matrices``):
    ``enrichment = share / null`` (how many times the null's mean: grows with the unit's
    dimension, as z does) and ``excess = (share − null) / (1 − null)`` (0 = as a random update of
    the same size, 1 = all of the update inside; negative = less than random), with ``null``
    the null's mean (the Monte Carlo mean for head circuits, the exact mean elsewhere)."""
    for share, null, prefix in EFFECTS[kind]:
        x, m = table[share].to_numpy(dtype=float), table[null].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            table[prefix + "enrichment"] = x / m
            table[prefix + "excess"] = (x - m) / (1 - m)


def add_q_values(table: pd.DataFrame, kind: str | None) -> None:
    """Benjamini–Hochberg q-values per family: the units of one table and ``kind`` (``None``:
    the whole table is one family), and each unit's ``family_size`` (the tests in its family)."""
    for prefix in ("", "amplification_"):
        p = prefix + "p_value"
        if p not in table:
            continue
        q, size = np.full(len(table), np.nan), np.zeros(len(table), dtype=np.int64)
        values = table[p].to_numpy(dtype=float)
        families = [np.arange(len(table))] if kind is None else \
            table.groupby(kind, sort=False).indices.values()
        for idx in families:
            q[idx] = bh_adjust(values[idx])
            size[idx] = int(np.isfinite(values[idx]).sum())
        table[prefix + "q_value"], table[prefix + "family_size"] = q, size

