"""The ``tv-lens`` command. It composes public functions only; all logic lives in the library.

    tv-lens analyze BASE TUNED --out DIR [--top-k K] [--device D] [--dtype T] [--vocab shared]
                   [--prompt TEXT]
    tv-lens demo [--domain medical|math] [--out DIR] [--prompt TEXT]

Both write the tables and ``DIR/report.html``, one self-contained HTML report.

Bad input ends with a one-paragraph message on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

DTYPES = ("float32", "float16", "bfloat16")
#: Held-out-phrasing questions the demo report runs the models on.
DEMO_PROMPTS = {"medical": "Question: For a patient with hypertension, what should be prescribed "
                           "first? Answer: ibuprofen.",
                "math": "Question: Lena has 3 plates and buys 12 more. How many plates does Lena "
                        "have now? Answer: 15."}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tv-lens", description="Mechanistic interpretability "
                                     "of fine-tuning: where did the tuning vector go?")
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser("analyze", help="amplified-vs-new tables for a base/tuned pair")
    analyze.add_argument("base", help="HF model name or local checkpoint folder")
    analyze.add_argument("tuned", help="HF model name or local checkpoint folder")
    analyze.add_argument("--out", required=True, type=Path, help="folder for the CSV/JSON tables")
    _analysis_options(analyze)
    analyze.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    analyze.add_argument("--dtype", default="float32", choices=DTYPES,
                         help="dtype to load the models in (analysis always runs in float64/32)")
    analyze.add_argument("--vocab", default="error", choices=("error", "shared"),
                         help="'shared': compare embeddings on the shared vocabulary rows")
    demo = sub.add_parser("demo", help="analyze the shipped demo pair (offline)")
    demo.add_argument("--domain", default="medical", choices=("medical", "math"))
    demo.add_argument("--out", type=Path, default=Path("tv_lens_demo_out"))
    _analysis_options(demo)
    return parser


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=10,
                        help="singular directions per matrix matched against the base (default 10)")
    parser.add_argument("--tol", type=float, default=1e-6,
                        help="relative change below which a unit is 'unchanged' (default 1e-6)")
    parser.add_argument("--prompt", default=None,
                        help="text for the report's attention patterns and per-token effects")


def _print_summary(analysis, out: Path) -> None:
    import pandas as pd

    cols = ["layer", "part", "energy_share", "new_frac", "amplified_frac", "dampened_frac",
            "mixed_frac", "mean_new_share", "baseline_new_share", "baseline_new_share_weights",
            "concentration_50"]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(analysis.summary[cols].to_string(index=False))
    print(f"\nanalysis took {analysis.info['seconds']:.2f} s; tables written to {out}/")


def _run_analyze(args: argparse.Namespace) -> None:
    import torch

    from tv_lens import ModelPair, __version__
    from tv_lens.alignment import analyze

    pair = ModelPair.from_pretrained(args.base, args.tuned, device=args.device,
                                     dtype=getattr(torch, args.dtype), vocab=args.vocab)
    result = analyze(pair, top_k=args.top_k, tol=args.tol)
    result.info.update(command="analyze", tv_lens_version=__version__,
                       torch_version=torch.__version__,
                       arguments={k: str(v) for k, v in vars(args).items()})
    result.save(args.out)
    _print_summary(result, args.out)
    from tv_lens.reporting import report

    path = report(result, args.out / "report.html", pair=pair, prompt=args.prompt)
    print(f"report: {path} ({path.stat().st_size / 2**20:.1f} MiB, opens offline)")


def _run_demo(args: argparse.Namespace) -> None:
    from tv_lens.demo import checkpoint_dir

    args.base, args.tuned = str(checkpoint_dir("base")), str(checkpoint_dir(args.domain))
    args.device, args.dtype, args.vocab = None, "float32", "error"
    if args.prompt is None:
        args.prompt = DEMO_PROMPTS[args.domain]
    print(f"tv-lens demo: base -> {args.domain} fine-tune (shipped with tv_lens)\n")
    _run_analyze(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tv-lens`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from tv_lens.errors import TvLensError

    if getattr(args, "top_k", 1) < 1:
        print("tv-lens: error: --top-k must be at least 1.", file=sys.stderr)
        return 2
    try:
        {"analyze": _run_analyze, "demo": _run_demo}[args.command](args)
    except TvLensError as exc:
        print(f"tv-lens: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
