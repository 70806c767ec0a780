"""Composition experiments: evaluate ``base + λ·compose(τ_1, …, τ_n)`` over a grid.

``composition_grid`` answers "do these domains' tuning vectors compose?" in one tidy table:
for every merge method, weighting and scale it applies the merged vector to the base model
(restored afterwards) and evaluates every metric. Merges follow :func:`tv_lens.compose`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from tv_lens.merges import compose
from tv_lens.errors import InvalidArgumentError
from tv_lens.metrics import MetricLike, as_metric
from tv_lens.vector import TuningVector


def _named(items: Mapping[str, Any] | Sequence[Any], what: str, default: str) -> dict[str, Any]:
    if isinstance(items, Mapping):
        return dict(items)
    items = list(items)
    names = [getattr(x, "name", None) or f"{default}{i}" for i, x in enumerate(items)]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"Two {what} share the name {names}; pass a dict name -> {what[:-1]}.")
    return dict(zip(names, items))


def composition_grid(pair: Any, vectors: Mapping[str, TuningVector] | Sequence[TuningVector],
                     metrics: Mapping[str, MetricLike] | Sequence[MetricLike], *,
                     weights: Iterable[Sequence[float | int]] | None = None,
                     methods: Sequence[str] = ("sum",), alphas: Sequence[float | int] = (1.0,),
                     include_base: bool = True, progress: bool = True,
                     **compose_kwargs: Any) -> pd.DataFrame:
    """Every metric of ``base + α·compose(vectors, weights, method)`` over a grid.

    Args:
        pair: a :class:`~tv_lens.ModelPair` (its base is used) or a base model.
        vectors: ``name -> TuningVector`` (e.g. ``{"medical": τ_med, "math": τ_math}``).
        metrics: ``name -> metric`` (a list of metrics uses their ``name``).
        weights: weight tuples, one weight per vector (default ``(1, …, 1)``); a one-hot tuple
            applies a single vector.
        methods: merge methods of :func:`tv_lens.compose` (``"task_arithmetic"``/``"sum"``,
            ``"ties"``, ``"dare_linear"``/``"dare"``, ``"dare_ties"``).
        alphas: overall scales λ.
        include_base: add the rows of the base model itself (``method="base"``, ``alpha=0``).
        compose_kwargs: passed to :func:`tv_lens.compose` (``density``, ``normalize``,
            ``rescale``, ``seed``); ``alphas`` play the role of its ``lambda_``.

    Returns:
        One row per (method, weighting, α, metric): ``method``, one ``w_<name>`` column per
        vector, ``alpha``, ``metric``, ``value``.
    """
    base = pair.base if hasattr(pair, "tuning_vector") else pair
    vectors = _named(vectors, "vectors", "tau")
    metrics = {k: as_metric(m) for k, m in _named(metrics, "metrics", "metric").items()}
    if not vectors or not metrics:
        raise InvalidArgumentError("composition_grid needs at least one tuning vector and one metric.")
    weights = [tuple(map(float, w)) for w in (weights or [(1.0,) * len(vectors)])]
    wrong = [w for w in weights if len(w) != len(vectors)]
    if wrong:
        raise InvalidArgumentError(f"Each weighting needs one weight per vector ({list(vectors)}); got "
                          f"{wrong[0]}.")
    tvs = list(vectors.values())
    w_cols = [f"w_{name}" for name in vectors]
    rows = []

    def record(method: str, w: Sequence[float], alpha: float | int) -> None:
        for metric_name, metric in metrics.items():
            rows.append(dict(method=method, **dict(zip(w_cols, map(float, w))), alpha=float(alpha),
                             metric=metric_name, value=metric.value(base)))

    if include_base:
        record("base", [0.0] * len(vectors), 0.0)
    grid = list(itertools.product(methods, weights))
    for method, w in tqdm(grid, desc="composition grid", disable=not progress):
        merged = compose(tvs, w, method=method, **compose_kwargs)
        for alpha in alphas:
            with merged.applied(base, alpha=alpha):
                record(method, w, alpha)
    return pd.DataFrame(rows, columns=["method", *w_cols, "alpha", "metric", "value"])
