"""Which components' tuning vectors carry the medical skill? ``python examples/patching_medical.py``.

On the shipped medical pair, with the answer log-probability of the held-out medical questions
as the metric:

1. attribution of every component (one backward pass at each end, plus 32 path steps);
2. the components that carry most of the effect, adding τ_c to the base and removing it from
   the tuned model, and attention against MLP;
3. how well attribution ranks components, against exact patching of every head and of the 100
   neurons with the largest |add| attribution (Spearman and Pearson, per mode).
"""

from __future__ import annotations

import time

import pandas as pd

import tv_lens
from tv_lens.demo import load_pair
from tv_lens.demo.evaluate import domain_metrics


def main() -> None:
    pair = load_pair("medical")
    metric = domain_metrics("medical", phrasing="held_out")["answer_logprob"]
    started = time.perf_counter()
    att = tv_lens.attribute(pair, metric, steps=32, progress=False)
    info = att.attrs["completeness"]
    print(f"1. answer log-prob: base {info['f_base']:.2f}, tuned {info['f_tuned']:.2f}; "
          f"path attribution (32 steps) sums to {info['path_sum']:.2f} "
          f"(gap {100 * info['relative_gap']:+.2f}%), first-order add {info['add_sum']:.2f}, "
          f"remove {info['remove_sum']:.2f}  [{time.perf_counter() - started:.1f} s]")

    parts = att[att.granularity != "unit"].copy()
    parts["part"] = parts.kind.where(~parts.kind.isin(["attn", "mlp"]), parts.kind)
    exact_parts = tv_lens.patch(pair, metric, "parts", progress=False)
    removed = tv_lens.patch(pair, metric, "parts", mode="remove", progress=False)
    table = exact_parts[["component", "normalized"]].rename(columns={"normalized": "add_exact"})
    table["remove_exact"] = removed["normalized"].to_numpy()
    table = table.merge(parts[["component", "path"]], on="component")
    table["path_share"] = table["path"] / info["difference"]
    print("\n2. parts (normalised exact effects: add = base + τ_c, remove = tuned − τ_c; "
          "path_share = path attribution / total):")
    print(table.round(3).to_string(index=False))
    units = att[att.granularity == "unit"]
    for kind in ("head", "kv_head", "neuron"):
        top = units[units.kind == kind].nlargest(5, "path")
        print(f"   top {kind}s by path attribution: "
              + ", ".join(f"{r.component} {r.path:.2f}" for r in top.itertuples()))
    attn = parts[parts.kind == "attn"]["path"].sum()
    mlp = parts[parts.kind == "mlp"]["path"].sum()
    print(f"   attention parts carry {attn:.2f} ({100 * attn / info['difference']:.0f}%), MLP parts "
          f"{mlp:.2f} ({100 * mlp / info['difference']:.0f}%) of the {info['difference']:.2f} "
          "gain (path attribution)")

    heads = tv_lens.compare_attribution(pair, metric, "heads", attribution=att, progress=False)
    neurons = units[units.kind == "neuron"]
    top100 = neurons.loc[neurons["add"].abs().nlargest(100).index, "component"]
    neuron_cmp = tv_lens.compare_attribution(pair, metric, top100, attribution=att, progress=False)
    corr = pd.concat([heads.correlations.assign(set="all 32 heads"),
                      neuron_cmp.correlations.assign(set="top-100 neurons by |add|")])
    print("\n3. attribution vs exact patching:")
    print(corr[["set", "mode", "n", "spearman", "pearson"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
