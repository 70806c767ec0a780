"""Figures of a model zoo (:func:`tv_lens.analyze_zoo`): how alike the fine-tunes are, and where."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from tv_lens.errors import InvalidArgumentError, TvLensError


def zoo_similarity(zoo) -> go.Figure:
    """Fine-tune × fine-tune cosine of the whole tuning vectors, rows and columns in the order
    of the average-linkage clustering (similar fine-tunes side by side)."""
    sim = zoo.similarity
    if len(sim) >= 2:
        from scipy.cluster.hierarchy import leaves_list

        order = [sim.index[i] for i in leaves_list(zoo.linkage)]
        sim = sim.loc[order, order]
    fig = go.Figure(go.Heatmap(z=sim.to_numpy(), x=list(sim.columns), y=list(sim.index),
                               zmin=-1, zmax=1, colorscale="RdBu_r", colorbar_title="cosine",
                               text=np.round(sim.to_numpy(), 3), texttemplate="%{text}"))
    fig.update_layout(title="Cosine similarity of the fine-tunes' tuning vectors (clustered order)",
                      yaxis_autorange="reversed")
    return fig


def zoo_heads(zoo, statistic: str = "min") -> go.Figure:
    """Layer × head heatmap of the pairwise query-head cosines over all pairs of fine-tunes:
    ``statistic`` ``"min"`` (high = every pair updated the head alike: a shared head),
    ``"mean"`` or ``"max"`` (a grouped-query model's key-value heads, ``L3KV1``, have their own
    rows in ``zoo.head_similarity``; the grid shows query heads)."""
    table = zoo.head_similarity
    if table.empty:
        raise TvLensError("The zoo has fewer than two fine-tunes: no head similarities to show.")
    if statistic not in ("min", "mean", "max"):
        raise InvalidArgumentError(f"statistic must be 'min', 'mean' or 'max', got {statistic!r}.")
    grid = table.groupby(["layer", "head"])["cosine"].agg(statistic).unstack("head")
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(dtype=float), x=list(grid.columns),
                               y=[int(x) for x in grid.index], zmin=-1, zmax=1,
                               colorscale="RdBu_r", colorbar_title="cosine"))
    fig.update_layout(title=f"Heads: {statistic} over pairs of fine-tunes of the cosine between "
                            "their head updates", xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed")
    return fig


def zoo_matrices(zoo) -> go.Figure:
    """Per matrix, the shared update dimensions of each pair of fine-tunes (``shared_dims``,
    Σ cos² of the principal angles between their top-r update subspaces) against the random
    baseline: above it, two fine-tunes write into common directions."""
    table = zoo.matrix_similarity
    if table.empty:
        raise TvLensError("The zoo has fewer than two fine-tunes: no matrix similarities to show.")
    df = table.assign(pair=table.model_a + " / " + table.model_b)
    fig = go.Figure()
    for pair, rows in df.groupby("pair", sort=False):
        fig.add_trace(go.Bar(x=rows.component, y=rows.shared_dims, name=pair))
    fig.add_trace(go.Scatter(x=df.component.unique(),
                             y=df.groupby("component", sort=False).baseline_shared_dims.first(),
                             mode="markers", marker_symbol="line-ew-open", marker_size=14,
                             name="random baseline"))
    fig.update_layout(title=f"Shared top-{zoo.info.get('rank')} update directions per matrix",
                      yaxis_title="shared dimensions Σ cos² θ", barmode="group")
    return fig
