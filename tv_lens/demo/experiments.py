"""Do the demo's tuning vectors compose? ``python -m tv_lens.demo.experiments``.

A thin user of :func:`tv_lens.composition_grid`: applies ``α·merge(τ_medical, τ_math)`` to the
base (task arithmetic, TIES, DARE), chooses ``α`` per method on the validation half of both
domains' eval splits (and, for the plain sum, per-domain weights on a 4×4 grid), and reports
answer accuracy and loss on the test half for the base, each single fine-tune and the merges.
Writes ``composition.json`` next to the shipped checkpoints when run with ``--write``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import pandas as pd

from tv_lens.demo import CHECKPOINTS, load_pair
from tv_lens.demo.evaluate import domain_metrics
from tv_lens.merging import composition_grid

ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
WEIGHTS = (0.4, 0.7, 1.0, 1.3)
DOMAINS = ("medical", "math")
#: per method, compose's settings (mergekit's names): TIES keeps 20%, DARE keeps half (seeded)
MERGES = {"sum": {}, "ties": dict(density=0.2), "dare": dict(density=0.5, seed=0)}


def _metrics(tokenizer, half: str, domains, kinds) -> dict:
    return {f"{d} {k}": m for d in domains
            for k, m in domain_metrics(d, tokenizer, half=half).items() if k in kinds}


def _best(grid: pd.DataFrame, by: list[str]):
    """The setting with the best mean metric (the first one among equals)."""
    means = grid.groupby(by, sort=False)["value"].mean()
    best = means.idxmax()
    best = tuple(map(float, best)) if isinstance(best, tuple) else float(best)
    return best, {str(k): float(v) for k, v in means.items()}


def compose_domains(alphas=ALPHAS, progress: bool = False) -> dict:
    """Choose α (and weights) on validation, report the test half. Returns a JSON-ready dict."""
    med, mth = load_pair("medical"), load_pair("math")
    base, tok = med.base, med.base.tokenizer
    vectors = {"medical": med.tuning_vector(), "math": mth.tuning_vector()}
    validation = _metrics(tok, "validation", DOMAINS, ("answer_acc",))
    grid = pd.concat([composition_grid(base, vectors, validation, methods=(m,), alphas=alphas,
                                       include_base=False, progress=progress, **kw)
                      for m, kw in MERGES.items()], ignore_index=True)
    chosen, validation_acc = {}, {}
    for method, g in grid.groupby("method", sort=False):
        chosen[method], validation_acc[method] = _best(g, ["alpha"])
    by_weight = composition_grid(base, vectors, validation,
                                 weights=itertools.product(WEIGHTS, WEIGHTS),
                                 include_base=False, progress=progress)
    best_w, weight_acc = _best(by_weight, ["w_medical", "w_math"])
    test = _metrics(tok, "test", ("general", *DOMAINS), ("loss", "answer_acc"))
    runs = [composition_grid(base, vectors, test, weights=[(1, 0), (0, 1)], progress=progress)]
    runs += [composition_grid(base, vectors, test, methods=(m,), alphas=(a,), include_base=False,
                              progress=progress, **MERGES[m]) for m, a in chosen.items()]
    runs.append(composition_grid(base, vectors, test, weights=[best_w], include_base=False,
                                 progress=progress))
    table = pd.concat(runs, ignore_index=True)
    return {"alphas_tried": list(alphas), "chosen_alpha": chosen,
            "validation_mean_acc": validation_acc, "chosen_weights": list(best_w),
            "validation_mean_acc_weights": weight_acc,
            "test": table.to_dict(orient="records")}


def test_table(result: dict) -> pd.DataFrame:
    """The test rows as one line per setting and one column per metric."""
    df = pd.DataFrame(result["test"])
    df["setting"] = df.apply(lambda r: f"{r.method} w=({r.w_medical:g},{r.w_math:g}) "
                                       f"α={r.alpha:g}", axis=1)
    return df.pivot_table(index="setting", columns="metric", values="value", sort=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write checkpoints/composition.json")
    args = parser.parse_args(argv)
    result = compose_domains(progress=True)
    print(test_table(result).round(3).to_string())
    print("chosen α:", result["chosen_alpha"], "chosen weights:", result["chosen_weights"])
    if args.write:
        (CHECKPOINTS / "composition.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
