"""How long does ``analyze`` take? ``python benchmarks/bench_analyze.py [--small]``.

Measures, in one run, on (1) the shipped demo medical pair and (2) a GPT-2-small-sized random
pair (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257; tuned = base + 1% noise), the
wall time of: building the tuning vector, ``analyze`` (all four tables), and the ``matrices``
table's share of it, and reports each as a ratio to one forward pass of the model on a
[8, 128] batch measured in the same run (these machines are noisy; ratios travel better).
"""

from __future__ import annotations

import argparse
import time

import torch


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _gpt2_small_pair(n_layer: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tv_lens import ModelPair

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()
    tuned = GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * p.std() * torch.randn_like(p))
    return ModelPair(base, tuned, names=("gpt2-small-random", "gpt2-small-random+noise"))


def bench(name: str, pair, vocab: int) -> None:
    from tv_lens.analysis.run import analyze

    tokens = torch.randint(0, vocab, (8, 128))
    with torch.no_grad():
        pair.base(tokens)  # warm-up
        _, forward = _timed(lambda: pair.base(tokens))
    pair._tuning_vector = None
    _, t_vector = _timed(pair.tuning_vector)
    result, t_analyze = _timed(lambda: analyze(pair, progress=False))
    n_units = len(result.heads) + len(result.neurons) + len(result.matrices)
    print(f"{name}: forward [8,128] {forward:.3f} s | tuning vector {t_vector:.2f} s "
          f"({t_vector / forward:.1f}x forward) | analyze {t_analyze:.2f} s "
          f"({t_analyze / forward:.1f}x forward, {n_units} table rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = GPT-2 small)")
    args = parser.parse_args()
    from tv_lens.demo import load_pair

    bench("demo medical pair", load_pair("medical"), 900)
    bench(f"GPT-2-small-sized random pair ({args.layers} layers)", _gpt2_small_pair(args.layers), 50257)


if __name__ == "__main__":
    main()
