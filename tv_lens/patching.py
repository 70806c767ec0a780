"""Patching tuning-vector components: what each piece of τ does to a metric.

Three tools, all keyed by the component names of :mod:`tv_lens.components` (``L3H5``, ``L3KV1``,
``L3N100``, ``L3.mlp``, …) and returning tidy DataFrames (``shared/METHODS.md``, "Patching"):

- :func:`patch` — exact weight patching. ``mode="add"`` evaluates ``f(θ_base + α·τ_c)``,
  ``mode="remove"`` evaluates ``f(θ_tuned − α·τ_c)``; one evaluation per (component, α), the
  weights restored bit for bit after each (exceptions included).
- :func:`attribute` — first-order attribution of every component at once:
  ``add = ⟨∇θ f(θ_base), τ_c⟩`` and ``remove = ⟨∇θ f(θ_tuned), τ_c⟩`` from one forward and one
  backward pass per batch at each end. With ``steps > 1`` also ``path``, the gradient averaged
  at ``steps`` midpoints of the straight line from base to tuned (integrated gradients in weight
  space), whose sum over a partition of τ tends to ``f(tuned) − f(base)``; :func:`completeness`
  reports the gap.
- :func:`compare_attribution` — both, side by side, with Spearman and Pearson correlations, so
  one sees where the linear estimate holds.

Effects are normalised so that 0 = base and 1 = tuned: ``(f(patched) − f(base)) /
(f(tuned) − f(base))``. The raw effects follow METHODS.md: adding ``f(θ_base + τ_c) − f(θ_base)``,
removing ``f(θ_tuned) − f(θ_tuned − τ_c)``; ``add``/``remove`` attributions estimate exactly
these to first order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tv_lens.components import Component, Components
from tv_lens.errors import InvalidArgumentError
from tv_lens.protocols import LoadedPair
from tv_lens.metrics import Metric, MetricLike, as_metric, check_value
from tv_lens.sources import ModelWeights, compute_dtype
from tv_lens.vector import TuningVector, check_alpha

MODES = ("add", "remove")
#: the columns that say which component a row is about (``<NA>`` where they do not apply)
ID_COLUMNS = ["component", "kind", "granularity", "layer", "head", "kv_head", "neuron", "expert"]
_INDEX_COLUMNS = ("layer", "head", "kv_head", "neuron", "expert")


def id_columns(component: Component) -> dict[str, Any]:
    """A row's :data:`ID_COLUMNS` for ``component``."""
    return dict(component=component.name, kind=component.kind,
                granularity=component.granularity,
                **{col: getattr(component, col) for col in _INDEX_COLUMNS})


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for col in _INDEX_COLUMNS:
        if col in df:
            df[col] = df[col].astype("Int64")
    return df


def normalized_effect(patched: float, base: float, tuned: float) -> float:
    """``(patched − base) / (tuned − base)``: 0 = base, 1 = tuned (NaN when base == tuned)."""
    gap = tuned - base
    return (patched - base) / gap if gap != 0 else float("nan")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be 'add' (τ_c added to the base) or 'remove' (τ_c "
                          f"subtracted from the tuned model), got {mode!r}.")


def _target(pair: Any, mode: str) -> tuple[Any, ModelWeights, int]:
    """The model a mode patches, its weights, and the sign τ_c enters with."""
    model = pair.base if mode == "add" else pair.tuned
    return model, ModelWeights(model), 1 if mode == "add" else -1


# ---------------------------------------------------------------------- exact patching
def patch(pair: LoadedPair, metric: MetricLike, components: Components,
          mode: str = "add", alphas: Sequence[float | int] = (1.0,), *,
          progress: bool = True) -> pd.DataFrame:
    """Exact weight patching of tuning-vector components.

    Args:
        pair: a :class:`~tv_lens.ModelPair`.
        metric: a :mod:`tv_lens.metrics` metric or any ``f(model) -> scalar tensor``.
        components: names of any kind (``["L2H5", "L1N30", "L3.mlp", "L2H5.OV", "mlp"]``, a
            DataFrame column works), a selector (``"parts"``, ``"units"``, ``"heads"``,
            ``"kv_heads"``, ``"neurons"``, ``"experts"``) or a dict of named groups patched as
            one row each (``{"all_mlp": ["L0.mlp", "L1.mlp"]}``); :mod:`tv_lens.components`.
        mode: ``"add"`` patches ``θ_base + α·τ_c``; ``"remove"`` patches ``θ_tuned − α·τ_c``.
        alphas: the scales α to evaluate each component at (negative values allowed).
        progress: show a tqdm bar over components.

    Returns:
        One row per (component, α): ``component, kind, granularity, layer, head, kv_head,
        neuron, expert, mode, alpha, base, tuned, patched, effect, normalized`` where ``effect`` is ``patched − base``
        (add) or ``tuned − patched`` (remove) and ``normalized`` is
        ``(patched − base)/(tuned − base)``.
    """
    _check_mode(mode)
    alphas = list(alphas)
    if not alphas:
        raise InvalidArgumentError("alphas is empty: pass at least one scale, e.g. alphas=(1.0,).")
    for alpha in alphas:
        check_alpha(alpha)
    metric = as_metric(metric)
    tv = pair.tuning_vector()
    chosen = tv.components.resolve(components)
    model, weights, sign = _target(pair, mode)
    tv.check_fits(weights, tv.components.weights_of(chosen))
    f_base, f_tuned = metric.value(pair.base), metric.value(pair.tuned)
    rows = []
    for component in tqdm(chosen, desc=f"patch ({mode})", disable=not progress):
        cut = tv.components.deltas(tv, [component])  # one at a time: bounded memory
        for alpha in alphas:
            with weights.patched(cut, sign * alpha):
                value = metric.value(model)
            effect = value - f_base if mode == "add" else f_tuned - value
            rows.append(dict(**id_columns(component), mode=mode, alpha=float(alpha), base=f_base,
                             tuned=f_tuned, patched=value, effect=effect,
                             normalized=normalized_effect(value, f_base, f_tuned)))
    columns = ID_COLUMNS + ["mode", "alpha", "base", "tuned", "patched", "effect", "normalized"]
    return _frame(rows, columns)


# ---------------------------------------------------------------------- attribution
def gradient(metric: MetricLike, model: Any, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``∇θ f`` at ``model``'s current weights, in TL names and shapes (``TL name -> tensor``).

    One forward and one backward pass per batch of the metric; parameter ``requires_grad`` flags
    and ``.grad`` attributes are left as they were.
    """
    metric = as_metric(metric)
    if not metric.differentiable:
        check_value(torch.zeros(()), metric.name, need_grad=True)  # raises the explanation
    weights = ModelWeights(model)
    names = list(weights.slots if names is None else names)
    keys = sorted({weights.slots[n].hf_key for n in names})
    params = [weights.parameter(k) for k in keys]
    flags = [p.requires_grad for p in params]
    totals = [torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for term in metric.terms(model):
                term = check_value(term, metric.name, need_grad=True)
                grads = torch.autograd.grad(term, params, allow_unused=True)
                for total, g in zip(totals, grads):
                    if g is not None:
                        total.add_(g.to(total.dtype))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    by_key = dict(zip(keys, totals))
    return {n: weights.slots[n].to_tl(by_key[weights.slots[n].hf_key], weights.spec) for n in names}


def _products(tv: TuningVector, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``∇f ⊙ τ`` per weight (the gradient cut to τ's rows under ``vocab="shared"``)."""
    out = {}
    for name, delta in tv.items():
        g = grad[name][tuple(slice(0, n) for n in delta.shape)]
        out[name] = g.to(delta.device, torch.float64) * delta.double()
    return out


def _path_gradient(tv: TuningVector, metric: Metric, pair: Any, steps: int,
                   progress: bool) -> dict[str, Tensor]:
    """The gradient averaged at the midpoints ``s = (k + ½)/steps`` of ``θ_base + s·τ``."""
    weights = ModelWeights(pair.base)
    total: dict[str, Tensor] = {}
    for k in tqdm(range(steps), desc="path attribution", disable=not progress):
        with weights.patched(tv.deltas, (k + 0.5) / steps):
            grad = gradient(metric, pair.base, tv.deltas)
        for name, g in grad.items():
            total[name] = total[name] + g if name in total else g
    return {name: g / steps for name, g in total.items()}


def attribute(pair: LoadedPair, metric: MetricLike, steps: int = 1, *,
              components: Components | None = None, progress: bool = True) -> pd.DataFrame:
    """First-order attribution of every part, unit and expert of τ at once (or of the
    ``components`` given).

    Args:
        pair: a :class:`~tv_lens.ModelPair`.
        metric: a differentiable metric (not :func:`~tv_lens.metrics.answer_accuracy`) or any
            ``f(model) -> scalar tensor`` with a gradient.
        steps: ``1`` gives ``add`` and ``remove`` (``path`` is NaN); ``steps > 1`` also
            ``path``, the gradient averaged at ``steps`` midpoints between base and tuned.
        components: ``None`` for every part, unit and expert; else any names, selector or
            named groups (see :func:`patch`), e.g. circuits ``L2H5.OV`` or ``{"all_mlp": [...]}``.
        progress: show a tqdm bar over path steps.

    Returns:
        One row per component: ``component, kind, granularity, layer, head, kv_head, neuron,
        expert, add, remove, path``, ``base`` and ``tuned`` (the metric at each end,
        the same on every row). ``granularity`` is ``part``, ``unit``, ``both`` or ``group``
        (in neither partition: ``L3E5``, circuits, named groups): the rows of one granularity
        (``df[df.granularity.isin(["part", "both"])]`` for parts, ``isin(["unit", "both"])``
        for units) sum to ``⟨∇f, τ⟩``; :func:`completeness` checks this against
        ``tuned − base``.

    Precision: gradients are exactly as precise as the forward pass. Even a float64 bridge
    takes its attention softmax in float32 (TransformerLens 4.3), and HF's Llama RMSNorm
    normalises in float32, so attribution and a finite difference of a float64 Llama agree to
    about 1e-6 of the metric, not to float64 precision.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be a positive integer, got {steps!r}.")
    metric = as_metric(metric)
    tv = pair.tuning_vector()
    index = tv.components
    chosen = None if components is None else index.resolve(components)
    gradients = {"add": lambda: gradient(metric, pair.base, tv.deltas),
                 "remove": lambda: gradient(metric, pair.tuned, tv.deltas)}
    if steps > 1:
        gradients["path"] = lambda: _path_gradient(tv, metric, pair, steps, progress)
    columns = {}
    for column, grad in gradients.items():
        products = _products(tv, grad())
        columns[column] = (index.totals(products) if chosen is None else
                           {c.name: index.total(products, c) for c in chosen})
    chosen = list(index.components.values()) if chosen is None else chosen
    f_base, f_tuned = metric.value(pair.base), metric.value(pair.tuned)
    rows = [dict(**id_columns(c), **{k: v[c.name] for k, v in columns.items()},
                 base=f_base, tuned=f_tuned) for c in chosen]
    return _frame(rows, ID_COLUMNS + ["add", "remove", "path", "base", "tuned"])  # path: NaN at 1 step


def completeness(attribution: pd.DataFrame) -> dict[str, float]:
    """How well an :func:`attribute` table of every unit accounts for the metric's change:
    ``base``, ``tuned``, ``difference = tuned − base``, the units' ``add_sum`` and
    ``remove_sum`` and, for path attribution, ``path_sum``, ``gap = path_sum − difference`` and
    ``relative_gap = gap / difference`` (→ 0 as ``steps`` grows)."""
    units = attribution[attribution.granularity.isin(["unit", "both"])]  # one partition
    if units.empty:
        raise InvalidArgumentError("completeness needs the unit rows of attribute(pair, metric) "
                                   "(computed without components=).")
    base, tuned = float(units["base"].iloc[0]), float(units["tuned"].iloc[0])
    info = dict(base=base, tuned=tuned, difference=tuned - base,
                add_sum=float(units["add"].sum()), remove_sum=float(units["remove"].sum()))
    if units["path"].notna().all():
        path_sum = float(units["path"].sum())
        gap = path_sum - info["difference"]
        info.update(path_sum=path_sum, gap=gap,
                    relative_gap=gap / info["difference"] if info["difference"] else float("nan"))
    return info


# ---------------------------------------------------------------------- comparison
@dataclass
class AttributionComparison:
    """Attribution beside exact patching.

    Attributes:
        table: one row per (component, mode): the :data:`ID_COLUMNS`, ``mode,
            attribution, exact`` (``exact`` is :func:`patch`'s ``effect``).
        correlations: one row per mode: ``mode, n, spearman, pearson``.
    """

    table: pd.DataFrame
    correlations: pd.DataFrame

    def __repr__(self) -> str:
        lines = [f"AttributionComparison({len(self.table)} rows)"]
        for r in self.correlations.itertuples():
            lines.append(f"  {r.mode:6s} n={r.n:<4d} spearman={r.spearman:+.3f} "
                         f"pearson={r.pearson:+.3f}")
        return "\n".join(lines)


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    return float(a.rank().corr(b.rank()))


def compare_attribution(pair: LoadedPair, metric: MetricLike,
                        components: Components | None = None, *, k: int = 20,
                        modes: Sequence[str] = MODES, attribution: pd.DataFrame | None = None,
                        exact: pd.DataFrame | None = None,
                        progress: bool = True) -> AttributionComparison:
    """Exact patching of ``components`` beside their attribution, with rank and linear
    correlations per mode.

    Args:
        components: names, a selector or named groups (see :func:`patch`); ``None`` takes
            the ``k`` units with the largest ``|add|`` attribution.
        attribution: a result of :func:`attribute` on the same pair and metric, to reuse.
        exact: a result of :func:`patch` (or several, concatenated) on the same pair and
            metric, to reuse: its ``alpha == 1`` rows stand in for the (component, mode)
            evaluations they cover, and only the rest are patched.
    """
    for mode in modes:
        _check_mode(mode)
    att = attribute(pair, metric, progress=progress) if attribution is None else attribution
    if components is None:
        units = att[att.granularity.isin(["unit", "both"])]
        components = units.loc[units["add"].abs().nlargest(k).index, "component"].tolist()
    chosen = pair.tuning_vector().components.resolve(components)
    names = [c.name for c in chosen]
    missing = [c for c in chosen if c.name not in set(att["component"])]
    if missing:  # groups (circuits, named groups) the given attribution has no rows for
        att = pd.concat([att, attribute(pair, metric, components=missing, progress=progress)],
                        ignore_index=True)
    done = _reusable(exact)
    frames = []
    for mode in modes:
        have = done[(done["mode"] == mode) & done["component"].isin(names)]
        missing = [c for c in chosen if c.name not in set(have["component"])]  # parsed: named
        patched = [patch(pair, metric, missing, mode=mode, progress=progress)] if missing else []
        parts = [have] * (not have.empty) + patched
        rows = pd.concat(parts, ignore_index=True).set_index("component").loc[names]
        merged = rows.reset_index().merge(att[["component", mode]], on="component", how="left")
        merged = merged.rename(columns={mode: "attribution", "effect": "exact"})
        frames.append(merged[ID_COLUMNS + ["mode", "attribution", "exact"]])
    table = pd.concat(frames, ignore_index=True)
    correlations = pd.DataFrame(
        [dict(mode=mode, n=int((table["mode"] == mode).sum()),
              spearman=spearman(g["attribution"], g["exact"]),
              pearson=float(g["attribution"].corr(g["exact"])))
         for mode, g in table.groupby("mode", sort=False)])
    return AttributionComparison(table, correlations)


def _reusable(exact: pd.DataFrame | None) -> pd.DataFrame:
    """The ``alpha == 1`` rows of earlier :func:`patch` results, one per (component, mode)."""
    columns = ID_COLUMNS + ["mode", "effect"]
    if exact is None:
        return pd.DataFrame(columns=columns)
    lacking = [c for c in columns + ["alpha"] if c not in exact.columns]
    if lacking:
        raise InvalidArgumentError(f"exact= lacks the columns {lacking}: pass what "
                                   "tv_lens.patch returned (several results concatenated).")
    rows = exact[exact["alpha"] == 1.0]
    return rows.drop_duplicates(["component", "mode"], keep="last")[columns]
