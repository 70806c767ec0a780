"""Check the three claims of Tanwar et al. 2025 (arXiv 2510.09359) on a model pair.

    python examples/research_claims.py                      # the shipped medical pair
    python examples/research_claims.py math                 # another shipped pair
    python examples/research_claims.py BASE TUNED [PROMPTS]  # any pair (HF names or folders)

0. Labels per part under calibrated labels (each share tested against its unit's null, level
   0.01) beside the fixed 0.5 thresholds: what the label column says about each claim.

1. MLP updates write *new* directions: neuron-direction new_share vs its random baseline.
2. Attention updates *amplify existing* directions: head-circuit subspace/amplification shares
   vs both baselines (isotropic ΔOV, and random perturbations of the head's weights).
3. The representation changes only in a small subspace: per-layer principal-subspace overlap,
   CKA and the tuned variance outside the base's principal subspace, on domain prompts.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch

import tv_lens
from tv_lens.analysis.labels import LABELS


def energy_weighted(df: pd.DataFrame, column: str) -> float:
    changed = df[df.label != "unchanged"]
    w = changed.delta_norm ** 2
    return float((changed[column] * w).sum() / w.sum())


def label_counts(calibrated: tv_lens.Analysis, fixed: tv_lens.Analysis) -> pd.DataFrame:
    """Units per label, per part and kind, under both labelings (one row per part/kind/mode)."""
    rows = []
    for mode, result in (("calibrated", calibrated), ("fixed", fixed)):
        for part, table, kind in (("attn", result.heads, "circuit"), ("mlp", result.neurons, "matrix"),
                                  ("matrix", result.matrices, "matrix")):
            for k, labels in table.groupby(kind, sort=False).label:
                rows.append({"part": part, "kind": k, "mode": mode, **labels.value_counts().to_dict()})
    cols = ["part", "kind", "mode", *[c for c in LABELS if any(c in r for r in rows)]]
    return pd.DataFrame(rows).reindex(columns=cols).fillna(0).astype({c: int for c in cols[3:]})


def main(argv: list[str]) -> None:
    if len(argv) == 1:
        from tv_lens.demo import load_pair
        from tv_lens.demo.corpus import build_corpora

        pair = load_pair(argv[0])
        domain = "medical" if argv[0].startswith("medical") else argv[0]
        prompts = [ex.text for ex in build_corpora(0)[domain].eval[:64]]
    elif len(argv) >= 2:
        pair = tv_lens.ModelPair.from_pretrained(argv[0], argv[1])
        prompts = open(argv[2]).read().splitlines() if len(argv) > 2 else ["Hello world."] * 8
    else:
        from tv_lens.demo import load_pair
        from tv_lens.demo.corpus import build_corpora

        pair = load_pair("medical")
        prompts = [ex.text for ex in build_corpora(0)["medical"].eval[:64]]
    analysis = tv_lens.analyze(pair, progress=False)
    fixed = tv_lens.analyze(pair, progress=False, labels="fixed", null_samples=0)
    heads, neurons, summary = analysis.heads, analysis.neurons, analysis.summary
    print(pair)
    counts = label_counts(analysis, fixed)
    print("0. labels per part (calibrated: level 0.01 against each unit's null; fixed: 0.5 "
          "thresholds)")
    print(counts.to_string(index=False))
    for part, table, kind in (("attention", heads, "circuit"), ("MLP", neurons, "matrix")):
        changed = table[table.label != "unchanged"]
        w = changed.delta_norm ** 2
        share = {lab: float(w[changed.label == lab].sum() / w.sum()) for lab in ("new", "aligned", "amplified", "dampened")}
        print(f"   {part}: update energy labelled new {share['new']:.3f}, aligned "
              f"{share['aligned']:.3f}, amplified {share['amplified']:.3f}, dampened "
              f"{share['dampened']:.3f} (calibrated)")
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(summary.to_string(index=False))
    allrow = summary.set_index("component")
    print("\n1. MLP: update energy share {:.3f}; energy-weighted neuron new_share {:.3f} "
          "(random direction: {:.3f}); mean cos² {:.4f} vs 1/d_model = {:.4f}".format(
              allrow.loc["mlp", "energy_share"], energy_weighted(neurons, "new_share"),
              allrow.loc["mlp", "baseline_new_share"],
              energy_weighted(neurons, "amplification_share"), 1 / pair.spec.d_model))
    for circuit in ("OV", "QK"):
        h = heads[heads.circuit == circuit]
        print("2. attention {}: subspace_share {:.3f} (isotropic baseline {:.4f}, weight-"
              "perturbation baseline {:.3f}); amplification_share {:.3f} (baseline {:.4f}); "
              "labels {}".format(
                  circuit, energy_weighted(h, "subspace_share"), h.baseline_subspace_share.mean(),
                  h.baseline_subspace_share_weights.mean(), energy_weighted(h, "amplification_share"),
                  h.baseline_amplification_share.mean(), h.label.value_counts().to_dict()))
    tok = pair.base.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True)
    reps = tv_lens.compare_representations(pair, batch.input_ids,
                                           mask=batch.attention_mask.bool())
    print("3. representations on", len(prompts), "prompts:")
    print(reps.round(3).to_string(index=False))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1:])
