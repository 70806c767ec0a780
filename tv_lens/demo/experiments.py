"""Do the demo's tuning vectors compose? ``python -m tv_lens.demo.experiments``.

Applies ``α·(τ_medical + τ_math)`` to the base (task arithmetic), with ``α`` chosen on the
validation half of both domains' eval splits (and, for the plain sum, per-domain weights on a
4×4 grid), and reports answer accuracy and loss on the test half for the base, each single
fine-tune and the merges (sum, TIES, DARE). Writes
``composition.json`` next to the shipped checkpoints when run with ``--write``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import pandas as pd

from tv_lens.compose import compose
from tv_lens.demo import CHECKPOINTS, load_pair
from tv_lens.demo.evaluate import evaluate

ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
WEIGHTS = (0.4, 0.7, 1.0, 1.3)
DOMAINS = ("medical", "math")


def _mean_acc(model, tokenizer, half: str) -> float:
    df = evaluate(model, tokenizer, domains=DOMAINS, half=half)
    return float(df["answer_acc"].mean())


def compose_domains(alphas=ALPHAS) -> dict:
    """Choose α on validation, report the test half. Returns a JSON-ready dict."""
    med, mth = load_pair("medical"), load_pair("math")
    base, tok = med.base, med.base.tokenizer
    tau_med, tau_math = med.tuning_vector(), mth.tuning_vector()
    merges = {"sum": compose([tau_med, tau_math]),
              "ties": compose([tau_med, tau_math], method="ties", top_k=0.2),
              "dare": compose([tau_med, tau_math], method="dare", drop_rate=0.5, seed=0)}
    chosen, validation = {}, {}
    for name, tau in merges.items():
        scores = {}
        for alpha in alphas:
            with tau.applied(base, alpha=alpha):
                scores[alpha] = _mean_acc(base, tok, "validation")
        chosen[name] = max(scores, key=scores.get)
        validation[name] = scores
    weight_scores = {}
    for w in itertools.product(WEIGHTS, WEIGHTS):  # per-domain weights for task arithmetic
        with compose([tau_med, tau_math], weights=w).applied(base):
            weight_scores[w] = _mean_acc(base, tok, "validation")
    best_w = max(weight_scores, key=weight_scores.get)
    rows = [evaluate({"base": base, "medical": med.tuned, "math": mth.tuned}, tok,
                     domains=("general", *DOMAINS), half="test")]
    for name, tau in merges.items():
        with tau.applied(base, alpha=chosen[name]):
            rows.append(evaluate({f"{name} α={chosen[name]}": base}, tok,
                                 domains=("general", *DOMAINS), half="test"))
    with compose([tau_med, tau_math], weights=best_w).applied(base):
        rows.append(evaluate({f"sum w_med={best_w[0]} w_math={best_w[1]}": base}, tok,
                             domains=("general", *DOMAINS), half="test"))
    table = pd.concat(rows, ignore_index=True)
    return {"alphas_tried": list(alphas), "chosen_alpha": chosen,
            "validation_mean_acc": {k: {str(a): v for a, v in s.items()} for k, s in validation.items()},
            "chosen_weights": list(best_w),
            "validation_mean_acc_weights": {f"{a},{b}": v for (a, b), v in weight_scores.items()},
            "test": table.to_dict(orient="records")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write checkpoints/composition.json")
    args = parser.parse_args(argv)
    result = compose_domains()
    table = pd.DataFrame(result["test"]).pivot(index="model", columns="domain",
                                               values=["answer_acc", "loss"])
    print(table.round(3).to_string())
    print("chosen α:", result["chosen_alpha"])
    if args.write:
        (CHECKPOINTS / "composition.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
