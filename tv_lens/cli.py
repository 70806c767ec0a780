"""The ``tv-lens`` command. It composes public functions only; all logic lives in the library.

    tv-lens analyze BASE TUNED|ADAPTER --out DIR [-k K] [--fast] [--device D] [--dtype T]
                   [--vocab shared] [--allow-pickle] [--workers N] [--prompt TEXT]
    tv-lens demo [--domain medical|math] [--out DIR] [--prompt TEXT]
    tv-lens zoo BASE TUNED [TUNED …] --out DIR [--workers N] [--ray [ADDRESS]] [--rank R]

Both write the tables and ``DIR/report.html``, one self-contained HTML report. Weights are read
from the checkpoint files one layer at a time; the output folder appears only once complete.

Bad input ends with a one-paragraph message on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

DTYPES = ("float32", "float16", "bfloat16")
#: Held-out-phrasing questions the demo report runs the models on.
DEMO_PROMPTS = {"medical": "Question: For a patient with hypertension, what should be prescribed "
                           "first? Answer: ibuprofen.",
                "math": "Question: Lena has 3 plates and buys 12 more. How many plates does Lena "
                        "have now? Answer: 15."}
DEMO_PROMPTS["medical_lora"] = DEMO_PROMPTS["medical"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tv-lens", description="Mechanistic interpretability "
                                     "of fine-tuning: where did the tuning vector go?")
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser("analyze", help="amplified-vs-new tables for a base/tuned pair")
    analyze.add_argument("base", help="local checkpoint folder (or HF model name)")
    analyze.add_argument("tuned", help="local checkpoint folder, PEFT adapter folder (or HF name)")
    analyze.add_argument("--out", required=True, type=Path, help="folder for the CSV/JSON tables")
    _analysis_options(analyze)
    _worker_options(analyze, "layers worked on at once, in threads of one process (default 2 on "
                             "a CPU with two or more threads, 1 on a GPU; each holds one layer)")
    _prompt_option(analyze)
    analyze.add_argument("--device", default=None,
                         help="where the per-layer work and the models run: cpu, cuda, cuda:1")
    analyze.add_argument("--dtype", default="float32", choices=DTYPES,
                         help="dtype models are booted in for the report's prompt views; weight "
                              "analysis reads the files in their stored precision")
    analyze.add_argument("--vocab", default="error", choices=("error", "shared"),
                         help="'shared': compare embeddings on the shared vocabulary rows")
    analyze.add_argument("--allow-pickle", action="store_true",
                         help="read pytorch_model.bin checkpoints (torch.load weights_only=True)")
    demo = sub.add_parser("demo", help="analyze the shipped demo pair (offline)")
    demo.add_argument("--domain", default="medical", choices=("medical", "math", "medical_lora"))
    demo.add_argument("--out", type=Path, default=Path("tv_lens_demo_out"))
    _analysis_options(demo)
    _worker_options(demo, "layers worked on at once, in threads of one process (default 2 on "
                          "a CPU with two or more threads, 1 on a GPU; each holds one layer)")
    _prompt_option(demo)
    zoo = sub.add_parser("zoo", help="many fine-tunes of one base: per-model tables and the "
                                     "tables comparing them, each base layer decomposed once")
    zoo.add_argument("base", help="local checkpoint folder of the base model")
    zoo.add_argument("tuned", nargs="+", help="local checkpoint folders of its fine-tunes")
    zoo.add_argument("--out", required=True, type=Path,
                     help="folder for the tables; finished tasks are kept in it, so running the "
                          "same command again resumes")
    _analysis_options(zoo)
    _worker_options(zoo, "layers worked on at once, one process each (default 1: serial; each "
                         "holds one layer of the base and of every fine-tune)")
    zoo.add_argument("--ray", nargs="?", const=True, default=False, metavar="ADDRESS",
                     help="schedule the per-layer tasks on Ray: a local instance, or the cluster "
                          "at ADDRESS")
    zoo.add_argument("--rank", type=int, default=8,
                     help="update directions per matrix compared between fine-tunes (default 8)")
    zoo.add_argument("--neurons", type=int, default=20,
                     help="neurons per layer and fine-tune compared between fine-tunes (default 20)")
    zoo.add_argument("--allow-pickle", action="store_true",
                     help="read pytorch_model.bin checkpoints (torch.load weights_only=True)")
    return parser


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`~tv_lens.analysis.options.AnalysisOptions` (read by :func:`_options`)."""
    parser.add_argument("-k", type=int, default=10,
                        help="singular directions per matrix matched against the base (default 10)")
    parser.add_argument("--fast", action="store_true",
                        help="per-matrix rows from the top singular directions only (randomized "
                             "SVD): minutes instead of hours on 7B pairs; heads/neurons exact")
    parser.add_argument("--fast-rank", type=int, default=32,
                        help="singular directions per matrix with --fast (default 32)")
    parser.add_argument("--tol", type=float, default=1e-6,
                        help="relative change below which a unit is 'unchanged' (default 1e-6)")
    parser.add_argument("--labels", default="calibrated", choices=("calibrated", "fixed"),
                        help="calibrated: each share tested against its unit's null (default); "
                             "fixed: the 0.5 thresholds")
    parser.add_argument("--level", type=float, default=0.01,
                        help="q-value at or below which a share is significant (default 0.01)")
    parser.add_argument("--null-samples", type=int, default=200,
                        help="Monte Carlo draws per head circuit for its null (default 200; 0 "
                             "skips the head tests, only with --labels fixed)")


def _options(args: argparse.Namespace):
    """The :class:`~tv_lens.analysis.options.AnalysisOptions` of the flags above."""
    from tv_lens.analysis.options import AnalysisOptions

    return AnalysisOptions(k=args.k, tol=args.tol, level=args.level, labels=args.labels,
                           null_samples=args.null_samples, fast=args.fast,
                           fast_rank=args.fast_rank)


def _worker_options(parser: argparse.ArgumentParser, workers: str) -> None:
    parser.add_argument("--workers", type=int, default=None, help=workers)
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads per worker (default: the CPU's threads shared out "
                             "evenly between the workers)")


def _prompt_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=None,
                        help="text for the report's attention patterns and per-token effects")


def _print_summary(analysis, out: Path) -> None:
    import pandas as pd

    cols = ["component", "energy_share", "new_frac", "amplified_frac", "dampened_frac",
            "aligned_frac" if analysis.info.get("labels") == "calibrated" else "mixed_frac",
            "mean_new_share", "baseline_new_share", "baseline_new_share_weights", "concentration_50"]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(analysis.summary[cols].to_string(index=False))
    print(f"\nanalysis took {analysis.info['seconds']:.2f} s; tables written to {out}/")


def _run_analyze(args: argparse.Namespace) -> int:
    """0 when everything was written; 1 when the tables were and the report failed."""
    import torch

    from tv_lens import ModelPair, __version__
    from tv_lens.analysis.run import analyze
    from tv_lens.errors import TvLensError
    from tv_lens.pair import check_order

    from tv_lens.reporting import report
    from tv_lens.staging import staged_folder

    device = _device(args.device)
    check_order(args.base, args.tuned)
    pair = ModelPair.from_pretrained(args.base, args.tuned, device=device,
                                     dtype=getattr(torch, args.dtype), vocab=args.vocab,
                                     allow_pickle=args.allow_pickle)
    pair.tokenizer  # (one that exists but fails to load is named now, before any work)
    if Path(args.base).expanduser().resolve() == Path(args.tuned).expanduser().resolve():
        raise TvLensError(f"BASE and TUNED are the same folder ({args.base}): there is no "
                          "fine-tune to analyse. Pass the base model's folder, then the "
                          "fine-tuned model's.")
    with staged_folder(args.out, inputs=(args.base, args.tuned), command=args.command) as stage:
        with warnings.catch_warnings():  # identical models: the error below says it
            warnings.filterwarnings("ignore", "The two models are identical")
            result = analyze(pair, _options(args), device=device, workers=args.workers,
                             threads=args.threads)
        if result.info.get("degenerate") == "identical":
            raise TvLensError("The two checkpoints are identical: every weight difference is "
                              "zero, so there is no update to analyse. Pass the fine-tuned "
                              "model's folder as TUNED, not a copy of the base.")
        result.info.update(command="analyze", tv_lens_version=__version__,
                           torch_version=torch.__version__,
                           arguments={k: str(v) for k, v in vars(args).items()})
        result.save(stage)
        try:  # the tables are computed: a failing report must not discard them
            size = report(result, stage / "report.html", pair=pair,
                          prompt=args.prompt).stat().st_size / 2**20
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            (stage / "report.html").unlink(missing_ok=True)
        else:
            failed = None
    _print_summary(result, args.out)
    if failed is not None:
        print(f"tv-lens: error: the report could not be made ({failed}); the tables were "
              f"written to {args.out}/ without it.", file=sys.stderr)
        return 1
    print(f"report: {args.out / 'report.html'} ({size:.1f} MiB, opens offline)")
    return 0


def _run_zoo(args: argparse.Namespace) -> int:
    import pandas as pd

    from tv_lens.zoo import analyze_zoo

    zoo = analyze_zoo(args.base, args.tuned, _options(args), out=args.out,
                      workers=1 if args.workers is None else args.workers, threads=args.threads,
                      ray=args.ray, rank=args.rank, neurons=args.neurons,
                      allow_pickle=args.allow_pickle)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print("cosine similarity of the tuning vectors:")
        print(zoo.similarity.to_string())
    for name, why in zoo.failed.items():
        print(f"failed: {name}: {why}")
    print(f"\n{len(zoo.analyses)} fine-tunes analysed; tables written to {args.out}/")
    return 0


def _device(name: str | None):
    """``--device`` checked: an unknown string or CUDA without a GPU is a clear error."""
    import torch

    from tv_lens.errors import TvLensError

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TvLensError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise TvLensError(f"--device {name} holds no weights tv_lens can compute with (a "
                          f"{device.type!r} device); use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TvLensError(f"--device {name} asks for a GPU but PyTorch sees none here "
                          f"(torch {torch.__version__}). Drop --device or use --device cpu.")
    return device


def _run_demo(args: argparse.Namespace) -> int:
    from tv_lens.demo import checkpoint_dir

    args.base, args.tuned = str(checkpoint_dir("base")), str(checkpoint_dir(args.domain))
    args.device, args.dtype, args.vocab, args.allow_pickle = None, "float32", "error", False
    if args.prompt is None:
        args.prompt = DEMO_PROMPTS[args.domain]
    print(f"tv-lens demo: base -> {args.domain} fine-tune (shipped with tv_lens)\n")
    return _run_analyze(args)


def _unknown_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The first ``--flag`` that the command does not know (nor abbreviates), with the closest
    known one: argparse would report a missing required argument first (``--ouput`` for
    ``--out`` says "--out is required")."""
    import difflib

    commands = parser._subparsers._group_actions[0].choices  # argparse's own sub-parsers
    command = next((a for a in argv if a in commands), None)
    options = set((commands[command] if command else parser)._option_string_actions)
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag != "--" and flag not in options and \
                not any(o.startswith(flag) for o in options):
            close = difflib.get_close_matches(flag, sorted(options), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            return f"unknown option {flag}.{hint} ('tv-lens {command or ''} --help' lists them)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tv-lens`` console script; returns the exit status."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_option(parser, argv)
    if unknown:
        print(f"tv-lens: error: {unknown.replace('  ', ' ')}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from tv_lens.errors import TvLensError

    if getattr(args, "k", 1) < 1:
        print("tv-lens: error: -k must be at least 1.", file=sys.stderr)
        return 2
    if hasattr(args, "level") and not 0 < args.level < 1:
        print(f"tv-lens: error: --level must be between 0 and 1 (e.g. 0.01), got {args.level}.",
              file=sys.stderr)
        return 2
    if hasattr(args, "null_samples") and (args.null_samples == 1 or args.null_samples < (
            2 if args.labels == "calibrated" else 0)):
        print(f"tv-lens: error: --null-samples must be at least 2 (default 200; 0 skips the "
              f"head tests with --labels fixed), got {args.null_samples}.", file=sys.stderr)
        return 2
    if getattr(args, "fast", False) and args.fast_rank < args.k:
        print(f"tv-lens: error: --fast-rank ({args.fast_rank}) must be at least -k "
              f"({args.k}).", file=sys.stderr)
        return 2
    try:
        with _signals_interrupt(), _one_line_warnings():
            return {"analyze": _run_analyze, "demo": _run_demo, "zoo": _run_zoo}[args.command](args)
    except TvLensError as exc:
        print(f"tv-lens: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        signum = exc.signum if isinstance(exc, Terminated) else 2  # SIGINT
        print("tv-lens: interrupted; " + (
            f"finished tasks are kept in {args.out}/: run the same command again to resume."
            if args.command == "zoo" else f"nothing was written to {args.out}/."), file=sys.stderr)
        return 128 + signum


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """tv_lens's own warnings as ``tv-lens: warning: …`` lines (no source line)."""
    from tv_lens.errors import TvLensWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TvLensWarning):
            print(f"tv-lens: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so that it unwinds like Ctrl-C: staging
    folders removed, nothing half-written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` while the command runs (main thread only;
    the previous handlers come back after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    # a signal the caller ignores (SIGHUP under nohup) stays ignored
    previous = {s: signal.signal(s, handler) for s in wanted
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
