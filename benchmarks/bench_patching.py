"""Attribution against exact patching: ``python benchmarks/bench_patching.py``.

On the shipped medical pair, with the held-out medical questions' answer log-probability as the
metric, measures in one run the wall time of

- ``attribute`` (steps=1): every head, kv head, neuron and part at once, both ends;
- exact ``patch`` of all query heads (one evaluation each, mode "add");
- one evaluation of the metric,

and prints the ratios (these machines are noisy; ratios travel better than seconds).
"""

from __future__ import annotations

import time

import tv_lens
from tv_lens.demo import load_pair
from tv_lens.demo.evaluate import domain_metrics


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    pair = load_pair("medical")
    metric = domain_metrics("medical", phrasing="held_out")["answer_logprob"]
    metric.value(pair.base)  # tokenise once, outside the timings
    _, t_eval = _timed(lambda: metric.value(pair.base))
    att, t_att = _timed(lambda: tv_lens.attribute(pair, metric, progress=False))
    exact, t_heads = _timed(lambda: tv_lens.patch(pair, metric, "heads", progress=False))
    n_units = int((att.granularity == "unit").sum())
    print(f"metric: {metric!r}; one evaluation {t_eval:.3f} s")
    print(f"attribute, {len(att)} components ({n_units} units incl. "
          f"{int((att.kind == 'neuron').sum())} neurons): {t_att:.2f} s "
          f"= {t_att / t_eval:.1f} evaluations")
    print(f"exact patching of all {len(exact)} heads: {t_heads:.2f} s "
          f"= {t_heads / t_eval:.1f} evaluations")
    print(f"ratio exact(all heads) / attribution(every component): {t_heads / t_att:.2f}")
    print(f"projected exact patching of every unit: {n_units * t_eval:.0f} s, "
          f"{n_units * t_eval / t_att:.0f}x attribution")


if __name__ == "__main__":
    main()
