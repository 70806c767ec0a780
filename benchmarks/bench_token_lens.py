"""Runtime of the weight lens: ``python benchmarks/bench_token_lens.py``.

Measures in one run ``read_tokens`` over every unit (all head circuits and MLP matrices, 3
directions, k = 20) of the shipped medical pair and of a GPT-2-small-sized pair built here
(12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50257; the tuned model = base + 1%
Gaussian noise on every weight), plus 64 neurons' readouts on the latter, and prints the times
and the ratio to one ``analyze`` of the same pair (these machines are noisy; ratios travel).
"""

from __future__ import annotations

import copy
import time

import torch

import tv_lens
from tv_lens.components import neuron_name
from tv_lens.demo import load_pair
from tv_lens.readouts import read_tokens


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def gpt2_small_pair() -> tv_lens.ModelPair:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config())  # GPT-2 small's shapes
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    return tv_lens.ModelPair(base, tuned)


def main() -> None:
    for name, make in (("demo medical", lambda: load_pair("medical")), ("GPT-2 small", gpt2_small_pair)):
        pair = make()
        pair.tuning_vector()  # the difference itself is not what is timed
        df, t_read = _timed(lambda: read_tokens(pair, progress=False))
        _, t_neurons = _timed(lambda: read_tokens(pair, [neuron_name(l, n) for l in range(4)
                                                         for n in range(16)], progress=False))
        _, t_analyze = _timed(lambda: tv_lens.analyze(pair, progress=False))
        print(f"{name}: read_tokens of all {df.component.nunique()} components ({len(df)} rows) "
              f"{t_read:.2f} s; 64 neurons {t_neurons:.2f} s; analyze {t_analyze:.2f} s; "
              f"read_tokens / analyze = {t_read / t_analyze:.2f}")


if __name__ == "__main__":
    main()
