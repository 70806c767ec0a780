"""Which components' tuning vectors carry the medical skill? ``python examples/patching_medical.py``.

On the shipped medical pair, with the answer log-probability of the held-out medical questions
(the validation half: 60 questions) as the metric:

1. attribution of every component (one backward pass at each end, plus 32 path steps);
2. the components that carry most of the effect, adding τ_c to the base and removing it from
   the tuned model, and attention against MLP;
3. how well attribution ranks components, against exact patching of every head and of the 100
   neurons with the largest |add| attribution (Spearman and Pearson, per mode).

Each step is a function taking the pair, the metric and the attribution, so a notebook (or a
test) can run one step on its own.
"""

from __future__ import annotations

import time

import pandas as pd

import tv_lens
from tv_lens.demo import load_pair
from tv_lens.demo.evaluate import domain_metrics


def medical_pair_and_metric() -> tuple[tv_lens.ModelPair, tv_lens.metrics.Metric]:
    """The shipped medical pair and the answer log-probability of the validation half of its
    held-out-phrasing questions (60)."""
    return load_pair("medical"), domain_metrics("medical", phrasing="held_out",
                                                half="validation")["answer_logprob"]


def parts_table(pair, metric, att: pd.DataFrame) -> pd.DataFrame:
    """Per part: normalised exact effects of adding τ_c to the base and removing it from the
    tuned model, beside the path attribution and its share of the whole change."""
    info = tv_lens.completeness(att)
    added = tv_lens.patch(pair, metric, "parts", progress=False)
    removed = tv_lens.patch(pair, metric, "parts", mode="remove", progress=False)
    table = added[["component", "normalized"]].rename(columns={"normalized": "add_exact"})
    table["remove_exact"] = removed["normalized"].to_numpy()
    table = table.merge(att[["component", "kind", "path"]], on="component")
    table["path_share"] = table["path"] / info["difference"]
    return table


def ranking(pair, metric, att: pd.DataFrame) -> tuple[tv_lens.AttributionComparison,
                                                     tv_lens.AttributionComparison]:
    """Attribution against exact patching: every head, and the 100 neurons of largest |add|."""
    heads = tv_lens.compare_attribution(pair, metric, "heads", attribution=att, progress=False)
    neurons = att[(att.granularity == "unit") & (att.kind == "neuron")]
    top100 = neurons.loc[neurons["add"].abs().nlargest(100).index, "component"]
    return heads, tv_lens.compare_attribution(pair, metric, top100, attribution=att,
                                              progress=False)


def main() -> None:
    pair, metric = medical_pair_and_metric()
    started = time.perf_counter()
    att = tv_lens.attribute(pair, metric, steps=32, progress=False)
    info = tv_lens.completeness(att)
    print(f"1. answer log-prob: base {info['base']:.2f}, tuned {info['tuned']:.2f}; "
          f"path attribution (32 steps) sums to {info['path_sum']:.2f} "
          f"(gap {100 * info['relative_gap']:+.2f}%), first-order add {info['add_sum']:.2f}, "
          f"remove {info['remove_sum']:.2f}  [{time.perf_counter() - started:.1f} s]")

    table = parts_table(pair, metric, att)
    print("\n2. parts (normalised exact effects: add = base + τ_c, remove = tuned − τ_c; "
          "path_share = path attribution / total):")
    print(table.drop(columns="kind").round(3).to_string(index=False))
    units = att[att.granularity == "unit"]
    for kind in ("head", "kv_head", "neuron"):
        top = units[units.kind == kind].nlargest(5, "path")
        print(f"   top {kind}s by path attribution: "
              + ", ".join(f"{r.component} {r.path:.2f}" for r in top.itertuples()))
    attn, mlp = (table.loc[table.kind == kind, "path"].sum() for kind in ("attn", "mlp"))
    print(f"   attention parts carry {attn:.2f} ({100 * attn / info['difference']:.0f}%), MLP parts "
          f"{mlp:.2f} ({100 * mlp / info['difference']:.0f}%) of the {info['difference']:.2f} "
          "gain (path attribution)")

    heads, neurons = ranking(pair, metric, att)
    best = heads.table[heads.table["mode"] == "add"].nlargest(1, "exact").iloc[0]
    print(f"   adding one head recovers at most {100 * best.exact / info['difference']:.1f}% "
          f"({best.component})")
    corr = pd.concat([heads.correlations.assign(set="all 32 heads"),
                      neurons.correlations.assign(set="top-100 neurons by |add|")])
    print("\n3. attribution vs exact patching:")
    print(corr[["set", "mode", "n", "spearman", "pearson"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
