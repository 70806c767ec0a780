"""Are the calibrated labels calibrated? Pooled over many seeds of pure weight noise.

    python benchmarks/bench_calibration.py                 # 20 seeds x 2 shapes, ~1 min on 2 cores
    python benchmarks/bench_calibration.py --seeds 100     # tighter rates
    python benchmarks/bench_calibration.py --seeds 100 --shapes llama-gqa --null-samples 2000
                                                           # the head nulls' Monte Carlo error

The unit suite checks one noise pair per shape (``tests/test_calibration.py``:
``test_pure_weight_noise_reads_new``: at most 1% of units other than ``new``); this pools
``--seeds`` independent base/noise draws per shape (a Llama with grouped-query attention and a
GPT-2, both 4 layers, d_model 64, 8 heads, d_mlp 256) and reports, per table and shape, the
fraction of p-values below α = 0.05 / 0.01 / 0.001 (a calibrated null gives α, up to the Monte
Carlo error of the head nulls' moment-matched tails) and the fraction of units labelled other
than ``new``/``unchanged`` (false discoveries: at most about ``level`` = 0.01), each with its
binomial standard error.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import pandas as pd
import torch

ALPHAS = (0.05, 0.01, 0.001)


def _model(shape: str, seed: int):
    torch.manual_seed(seed)
    if shape == "llama-gqa":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=4, n_head=8,
                                      n_positions=32, n_inner=256,
                                      bos_token_id=1, eos_token_id=2))


def noise_pair(shape: str, seed: int, scale: float = 0.02):
    """A seeded random base and the base plus seeded Gaussian noise of std ``scale``."""
    from tv_lens import ModelPair

    base = _model(shape, seed)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ModelPair(base, tuned)


def rates(tables: dict[str, list[pd.DataFrame]]) -> pd.DataFrame:
    """Per table: pooled fractions of p-values below each α and of non-``new`` labels, each with
    its binomial standard error."""
    rows = []
    for name, frames in tables.items():
        table = pd.concat(frames, ignore_index=True)
        p = table["p_value"].to_numpy()
        n = int(np.isfinite(p).sum())
        row = dict(table=name, units=n)
        for alpha in ALPHAS:
            rate = float((p < alpha).sum() / n)
            row[f"p<{alpha}"], row[f"se{alpha}"] = rate, (alpha * (1 - alpha) / n) ** 0.5
        other = float((~table["label"].isin(["new", "unchanged"])).mean())
        row["not_new"], row["se_not_new"] = other, (max(other, 0.01) * 0.99 / len(table)) ** 0.5
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--shapes", nargs="+", default=["llama-gqa", "gpt2"])
    parser.add_argument("--null-samples", type=int, default=200,
                        help="Monte Carlo samples of each head null (analyze's default: 200)")
    args = parser.parse_args()
    from tv_lens import analyze

    started = time.perf_counter()
    for shape in args.shapes:
        tables: dict[str, list[pd.DataFrame]] = {"heads": [], "neurons": [], "matrices": []}
        for seed in range(args.seeds):
            result = analyze(noise_pair(shape, seed), progress=False,
                             null_samples=args.null_samples)
            for name, frames in tables.items():
                frames.append(getattr(result, name))
        print(f"== {shape}: {args.seeds} noise pairs, {args.null_samples} head-null samples "
              "(standard errors are those of a calibrated null)")
        with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
            print(rates(tables).to_string(index=False))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
