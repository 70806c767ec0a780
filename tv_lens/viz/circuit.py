"""The circuit view: the model as a graph of heads and MLPs, drawn by what fine-tuning changed.

Layers run left to right (each layer's attention heads, then its MLP). A node's colour is its
update's ``new_share`` (red: new directions, blue: within existing ones; the colour scale is
centred on the weight-perturbation baseline), its size the update's norm (or, given patching or
attribution results, the size of its effect). Edges are the largest changes of composition
between heads (``score_tuned − score_base`` from :func:`tv_lens.composition`), solid for an
increase and dotted for a decrease; hovering a node or an edge midpoint shows its numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tv_lens.components import head_name, layer_name
from tv_lens.viz.figures import effect_column as best_effect
from tv_lens.viz.figures import hover_text, require_columns, with_tokens

_EDGE_COLORS = {"Q": "#2ca02c", "K": "#9467bd", "V": "#ff7f0e"}


def _sizes(values: pd.Series, lo: float = 8.0, hi: float = 36.0) -> np.ndarray:
    v = values.abs().to_numpy(dtype=float)
    top = np.nanmax(v) if len(v) and np.nanmax(v) > 0 else 1.0
    return lo + (hi - lo) * np.sqrt(np.nan_to_num(v) / top)


def circuit(analysis, composition: pd.DataFrame | None = None,
            effects: pd.DataFrame | None = None, *, effect_column: str | None = None,
            k: int = 48, k_edges: int = 30, min_change: float = 0.0,
            circuit_kind: str = "OV", tokens: pd.DataFrame | None = None) -> go.Figure:
    """Draw the model as a graph of heads and MLPs.

    Args:
        analysis: an :class:`~tv_lens.Analysis` (node colours and default sizes).
        composition: :func:`tv_lens.composition` result (edges); ``None`` draws no edges.
        effects: optional :func:`tv_lens.patch` / :func:`tv_lens.attribute` result: node sizes
            become ``|effect|`` of ``L{l}H{h}`` and ``L{l}.mlp``.
        effect_column: which column of ``effects`` (default ``normalized``, else ``path``,
            else ``add``).
        k: show at most this many heads, the ones with the largest update (the title
            says how many were left out).
        k_edges: draw the ``k_edges`` largest ``|change|`` edges among shown heads …
        min_change: … that also exceed this threshold.
        circuit_kind: which head circuit colours the nodes (``OV`` or ``QK``).
        tokens: a :func:`tv_lens.readouts.read_tokens` table: each node's hover then lists the
            tokens its update writes (heads: the circuit's top direction; MLPs: W_out's).
    """
    heads = analysis.heads[analysis.heads.circuit == circuit_kind].copy()
    require_columns(heads, ["layer", "head", "new_share", "delta_norm"], "viz.circuit")
    n_heads_total = len(heads)
    heads = heads.nlargest(min(k, len(heads)), "delta_norm")
    heads = with_tokens(heads, tokens, heads.component)  # the circuit's tokens …
    heads["component"] = [head_name(l, h) for l, h in zip(heads.layer, heads["head"])]  # … the node
    mlp = analysis.summary[(analysis.summary.part == "mlp") & analysis.summary.layer.notna()].copy()
    mlp["layer"] = mlp.layer.astype(int)
    mlp["new_share"], mlp["delta_norm"] = mlp.mean_new_share, np.sqrt(mlp.update_energy)
    # an MLP node's tokens: its W_out's (in a mixture of experts, the most-changed expert's)
    writers = analysis.matrices[analysis.matrices.matrix == "W_out"]
    writers = writers.sort_values("delta_norm", ascending=False).drop_duplicates("layer")
    by_layer = dict(zip(writers.layer, writers.component))
    mlp = with_tokens(mlp, tokens, [by_layer.get(l, "") for l in mlp.layer])
    n_heads = int(analysis.heads["head"].max()) + 1

    size_h, size_m = _sizes(heads.delta_norm), _sizes(mlp.delta_norm)
    size_label = "‖update‖"
    if effects is not None:
        column = effect_column or best_effect(effects)
        by_name = effects.drop_duplicates("component").set_index("component")[column]
        heads["effect"] = heads.component.map(by_name)
        mlp["effect"] = mlp.component.map(by_name)
        both = _sizes(pd.concat([heads.effect, mlp.effect]))
        size_h, size_m = both[:len(heads)], both[len(heads):]
        size_label = f"|{column}|"

    x_head = {(l, h): 2 * l for l, h in zip(heads.layer, heads["head"])}
    fig = go.Figure()
    edges = pd.DataFrame()
    if composition is not None:
        require_columns(composition, ["layer_a", "head_a", "layer_b", "head_b", "edge", "change"],
                 "viz.circuit")
        shown = set(x_head)
        keep = [(la, ha) in shown and (lb, hb) in shown for la, ha, lb, hb in
                zip(composition.layer_a, composition.head_a, composition.layer_b, composition.head_b)]
        edges = composition[pd.Series(keep, index=composition.index, dtype=bool)]  # (a plain
        # empty list would select no columns: a 1-layer model has no composition rows)
        edges = edges[edges.change.abs() > min_change]
        edges = edges.reindex(edges.change.abs().sort_values(ascending=False).index).head(k_edges)
        widest = float(edges.change.abs().max()) if len(edges) else 1.0
        for r in edges.itertuples():
            fig.add_trace(go.Scatter(
                x=[2 * r.layer_a, 2 * r.layer_b], y=[r.head_a, r.head_b], mode="lines",
                line=dict(width=1 + 5 * abs(r.change) / widest, color=_EDGE_COLORS[r.edge],
                          dash="solid" if r.change > 0 else "dot"),
                hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(
            x=[(2 * a + 2 * b) / 2 for a, b in zip(edges.layer_a, edges.layer_b)],
            y=[(a + b) / 2 for a, b in zip(edges.head_a, edges.head_b)], mode="markers",
            marker=dict(size=6, color=[_EDGE_COLORS[k] for k in edges.edge]),
            name="composition change", text=hover_text(edges, list(edges.columns)), hoverinfo="text",
            customdata=edges[["component_a", "component_b", "edge", "change"]].to_numpy()))
    mid = float(analysis.heads.baseline_subspace_share_weights.iloc[0]) \
        if "baseline_subspace_share_weights" in analysis.heads else 0.5
    color = dict(colorscale="RdBu_r", cmin=0, cmax=1, cmid=1 - mid,
                 colorbar=dict(title="new_share"))
    fig.add_trace(go.Scatter(x=[x_head[(l, h)] for l, h in zip(heads.layer, heads["head"])],
                             y=heads["head"], mode="markers+text", text=heads.component,
                             textposition="top center", name="heads",
                             marker=dict(size=size_h, color=heads.new_share, **color),
                             hovertext=hover_text(heads, list(heads.columns)), hoverinfo="text"))
    fig.add_trace(go.Scatter(x=2 * mlp.layer + 1, y=[(n_heads - 1) / 2] * len(mlp),
                             mode="markers+text", text=mlp.component, textposition="top center",
                             name="MLPs", marker=dict(size=size_m, symbol="square",
                                                      color=mlp.new_share, **color),
                             hovertext=hover_text(mlp, ["component", "new_share", "delta_norm",
                                                    "energy_share", "effect", "tokens"]),
                             hoverinfo="text"))
    shown_note = (f"{len(heads)} of {n_heads_total} heads (largest updates)"
                  if len(heads) < n_heads_total else f"all {n_heads_total} heads")
    fig.update_layout(
        title=f"Circuit view: {shown_note}; size = {size_label}; edges = {len(edges)} largest "
              "composition changes (green Q, purple K, orange V; dotted = decrease)",
        xaxis=dict(title="layer (attention, then MLP)", tickvals=[2 * l + 0.5 for l in mlp.layer],
                   ticktext=[layer_name(l) for l in mlp.layer]),
        yaxis=dict(title="head", autorange="reversed"), showlegend=False,
        height=min(1200, 250 + 55 * int(heads["head"].nunique())))
    return fig
