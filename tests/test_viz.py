"""Figures by structure, circuits and readouts against dense computations, views by props."""

import numpy as np
import pandas as pd
import pytest
import torch

import tv_lens
from tv_lens import ModelPair, TvLensError, viz
from tv_lens.errors import InvalidArgumentError
from tv_lens.readouts import ov_tokens


@pytest.fixture(scope="module")
def pair(llama_dirs):
    return ModelPair.from_pretrained(*llama_dirs)


@pytest.fixture(scope="module")
def analysis(pair):
    return tv_lens.analyze(pair, progress=False)


def _dense_circuits(weights, spec, layer, head):
    a = f"blocks.{layer}.attn."
    kv, g = spec.kv_head(head), weights[f"blocks.{layer}.ln1.w"].double()[:, None]
    Q, K = g * weights[a + "W_Q"][head].double(), g * weights[a + "W_K"][kv].double()
    V, O = g * weights[a + "W_V"][kv].double(), weights[a + "W_O"][head].double()
    return Q @ K.T, V @ O


def _score(left, right):  # transformer_lens.utilities.composition_scores, dense
    return float((left @ right).norm() / (left.norm() * right.norm()))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_composition_scores_equal_dense_products(family, llama_dirs, gpt2_dirs):
    pair = ModelPair.from_pretrained(*(llama_dirs if family == "llama" else gpt2_dirs))
    tv, spec = pair.tuning_vector(), pair.spec
    df = tv_lens.composition(pair)
    n = spec.n_heads
    assert len(df) == 3 * n * n * spec.n_layers * (spec.n_layers - 1) // 2
    tuned = {k: tv.base[k] + tv[k] for k in tv}
    for model, column in ((tv.base, "base"), (tuned, "tuned")):
        for r in df.sample(40, random_state=0).itertuples():
            qk_b, ov_b = _dense_circuits(model, spec, r.layer_b, r.head_b)
            _, ov_a = _dense_circuits(model, spec, r.layer_a, r.head_a)
            right = {"Q": qk_b, "K": qk_b.T, "V": ov_b}[r.edge]
            assert (r.component_a, r.component_b) == (f"L{r.layer_a}H{r.head_a}", f"L{r.layer_b}H{r.head_b}")
            assert getattr(r, column) == pytest.approx(_score(ov_a, right), rel=1e-6)
    assert np.allclose(df.change, df.tuned - df.base)


def test_head_and_neuron_figures_have_their_structure(analysis):
    fig = viz.heads(analysis, "OV", "subspace_share")
    (trace,) = fig.data
    assert trace.type == "heatmap" and np.asarray(trace.z).shape == (2, 4)
    assert trace.zmid == pytest.approx(analysis.heads.baseline_subspace_share_weights.iloc[0])
    assert "baseline_subspace_share_weights" in trace.text[1][2] and "label" in trace.text[0][0]
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    row = analysis.heads[(analysis.heads.circuit == "OV") & (analysis.heads.layer == 1)
                         & (analysis.heads["head"] == 2)].iloc[0]
    assert np.asarray(fig.data[0].z)[1, 2] == pytest.approx(row.subspace_share)
    fig = viz.neurons(analysis, "W_out", layer=0)
    assert {t.type for t in fig.data} == {"scatter"}
    assert sum(len(t.x) for t in fig.data) == 48
    assert {t.name for t in fig.data} <= set(viz.figures.LABEL_COLORS)
    assert len(fig.layout.shapes) == 2  # the ±√E[cos²] band
    labels = viz.heads(analysis, "QK", "label").data[0]
    codes = {int(c) for c in np.asarray(labels.z).ravel()}
    assert codes <= set(range(len(viz.figures.LABEL_COLORS)))
    assert list(labels.colorbar.ticktext) == list(viz.figures.LABEL_COLORS)
    with pytest.raises(TvLensError, match="No rows for circuit 'XY'"):
        viz.heads(analysis, "XY")


def test_summary_spectrum_and_circuit_figures(pair, analysis):
    fig = viz.summary(analysis)
    assert [t.type for t in fig.data].count("bar") == 2
    assert fig.layout.yaxis.title.text == "energy share"
    spec_df = tv_lens.matrix_spectrum(pair, "L1.mlp.W_out", k=5)
    W = pair.tuning_vector().base["blocks.1.mlp.W_out"].double().numpy()
    assert np.allclose(spec_df.sigma_base.dropna(), np.linalg.svd(W, compute_uv=False))
    assert spec_df.match.notna().sum() == 5 and set(spec_df.param) == {"blocks.1.mlp.W_out"}
    assert spec_df.equals(tv_lens.matrix_spectrum(pair, "blocks.1.mlp.W_out", k=5))
    fig = viz.spectrum(spec_df)
    assert [t.type for t in fig.data] == ["scatter"] * 3 and fig.layout.yaxis.type == "log"


def test_fast_spectrum_is_the_top_of_the_exact_one(pair):
    """``matrix_spectrum(fast_rank=r)`` (what a --fast report draws) holds only the top ``r``
    values of Δ (and the range plus probes of W); with ``r`` = the matrix's width the range
    finder spans everything, and the values and matches equal the exact spectrum's."""
    name = "blocks.1.mlp.W_out"
    exact = tv_lens.matrix_spectrum(pair, name, k=3)
    fast = tv_lens.matrix_spectrum(pair, name, k=3, fast_rank=6)
    assert fast.sigma_delta.notna().sum() == 6 < exact.sigma_delta.notna().sum()
    assert fast.sigma_base.notna().sum() == 6 + 3  # the range plus Δ's 3 probe directions
    assert fast.match.notna().sum() == 3
    width = int(min(pair.tuning_vector().base[name].shape))
    full = tv_lens.matrix_spectrum(pair, name, k=3, fast_rank=width)
    n = exact.sigma_delta.notna().sum()
    for col in ("sigma_delta", "sigma_base"):  # (a bfloat16 sketch tilts the range ~1e-3·σ_max)
        np.testing.assert_allclose(full[col][:n], exact[col][:n], atol=1e-4 * exact[col].max())
    np.testing.assert_allclose(full.match[:3], exact.match[:3], atol=1e-4)
    with pytest.raises(InvalidArgumentError, match="fast_rank"):
        tv_lens.matrix_spectrum(pair, name, fast_rank=0)
    with pytest.raises(InvalidArgumentError, match="'L0H1.OV' is a circuit"):
        tv_lens.matrix_spectrum(pair, "L0H1.OV")


def test_circuit_edges_are_the_largest_composition_changes(pair, analysis):
    from tv_lens.components import describe

    scores = tv_lens.composition(pair)
    fig = viz.circuit(analysis, scores, k_edges=6)
    (edge_markers,) = [t for t in fig.data if t.name == "composition change"]
    shown = sorted(abs(float(row[3])) for row in edge_markers.customdata)
    assert shown == sorted(scores.change.abs().nlargest(6))
    spec, tv = pair.spec, pair.tuning_vector()
    tuned = {k: tv.base[k] + tv[k] for k in tv}
    for name_a, name_b, edge, change in edge_markers.customdata:  # against dense products
        a, b = describe(name_a), describe(name_b)
        dense = []
        for model in (tv.base, tuned):
            qk_b, ov_b = _dense_circuits(model, spec, b.layer, b.head)
            _, ov_a = _dense_circuits(model, spec, a.layer, a.head)
            dense.append(_score(ov_a, {"Q": qk_b, "K": qk_b.T, "V": ov_b}[edge]))
        assert float(change) == pytest.approx(dense[1] - dense[0], abs=1e-9)
    nodes = [t for t in fig.data if t.name == "heads"][0]
    assert len(nodes.x) == 8 and "all 8 heads" in fig.layout.title.text
    few = viz.circuit(analysis, scores, k=3)
    assert "3 of 8 heads" in few.layout.title.text
    effects = tv_lens.attribute(pair, tv_lens.metrics.loss(torch.tensor([[1, 5, 9, 17]])),
                                progress=False)
    sized = viz.circuit(analysis, scores, effects)
    assert "|path|" not in sized.layout.title.text and "|add|" in sized.layout.title.text


def test_patching_and_grid_figures(pair):
    metric = tv_lens.metrics.loss(torch.tensor([[1, 5, 9, 17, 33, 40]]))
    exact = tv_lens.patch(pair, metric, "units", progress=False)
    fig = viz.patching(exact)
    assert fig.data[0].type == "heatmap" and np.asarray(fig.data[0].z).shape == (2, 4)
    assert fig.data[1].type == "bar" and len(fig.data[1].y) == 30
    cmp = tv_lens.compare_attribution(pair, metric, "heads", modes=("add",), progress=False)
    fig = viz.attribution_vs_exact(cmp)
    assert "Spearman" in fig.layout.title.text and fig.layout.xaxis.title.text == "exact effect"
    grid = tv_lens.composition_grid(pair, {"a": pair.tuning_vector()}, {"loss": metric},
                                    alphas=(0.5, 1.0), progress=False)
    fig = viz.composition_grid(grid)
    assert np.asarray(fig.data[0].z).shape == (3, 1)
    with pytest.raises(TvLensError, match="needs a table with columns"):
        viz.patching(grid)


def test_ov_tokens_equal_the_dense_readout(pair, tokenizer):
    tv = pair.tuning_vector()
    table = ov_tokens(pair, "L1H2", k=5)
    pd.testing.assert_frame_equal(ov_tokens(pair, "L1H2.OV", k=5), table)
    assert set(table.component) == {"L1H2.OV"} and table["rank"].tolist() == list(range(5))
    with pytest.raises(InvalidArgumentError, match="one query head's OV circuit"):
        ov_tokens(pair, "L1H2.QK")
    W_U = tv.base["ln_final.w"].double()[:, None] * tv.base["unembed.W_U"].double()
    dense = (tv.ov(1, 2).AB.double() @ W_U).norm(dim=0)
    top = torch.topk(dense, 5)
    assert table.token_id.tolist() == top.indices.tolist()
    assert np.allclose(table.score, top.values.numpy())
    assert table.token.tolist() == tokenizer.convert_ids_to_tokens(top.indices.tolist())


def test_views_are_circuitsvis_html_with_the_right_numbers(pair):
    from circuitsvis.utils.render import RenderedHTML

    prompt = "the cat sat on a mat"
    view = viz.attention(pair, prompt, ["L0H1", "L1H3.OV"])  # a circuit stands for its head
    assert view.props["attentionHeadNames"][3] == "L1H3 base"
    assert isinstance(view, RenderedHTML) and view.element == "AttentionHeads"
    maps = torch.tensor(view.props["attention"])
    n = len(view.props["tokens"])
    assert maps.shape == (6, n, n)
    torch.testing.assert_close(maps[2], maps[1] - maps[0])
    assert torch.allclose(maps[0].sum(-1), torch.ones(n), atol=1e-5)  # patterns are rows of 1
    loss = viz.token_loss_difference(pair, prompt)
    assert len(loss.props["values"]) == len(loss.props["tokens"]) == n and loss.props["values"][0] == 0
    none = viz.token_effect(pair, prompt, "L0N5")
    assert any(abs(v) > 0 for v in none.props["values"])
    assert "CircuitsVis.render" in view.snippet() and "<script" in view._repr_html_()
    tokens = viz.head_tokens(pair, "L1H2", k=4)
    with pytest.raises(TvLensError, match="not attention heads"):
        viz.attention(pair, prompt, ["L0N3"])
    assert len(tokens.props["tokens"]) == 4


def test_reprs_are_short(pair, analysis):
    tv = pair.tuning_vector()
    for obj in (tv.neuron(0, 3), tv.head(1, 2), analysis, tv, tv.components, pair):
        text = repr(obj)
        assert len(text) < 200 and "\n" not in text, text


def test_token_readouts_in_figure_hovers(pair, analysis):
    from tv_lens.readouts import default_components, read_tokens, top_token_text

    tokens = read_tokens(pair, default_components(pair.tuning_vector()) + ["L0N1"], k=5,
                         directions=1, progress=False)
    text = top_token_text(tokens, "L1H2.OV")
    rows = tokens[(tokens.component == "L1H2.OV") & (tokens.source == "update") & (tokens.side == "write")
                  & (tokens.sign == 1) & (tokens["rank"] < 5)].sort_values("rank")
    assert text.startswith("write: + " + " ".join(rows.token))
    heat = viz.heads(analysis, "OV", "subspace_share", tokens=tokens)
    hover = heat.data[0].text[1][2]  # layer 1, head 2
    assert "tokens: " + text.split(" / ")[0].replace("<", "&lt;") in hover.replace("&gt;", ">")
    fig = viz.circuit(analysis, tokens=tokens)
    mlp = next(t for t in fig.data if t.name == "MLPs")
    assert all("tokens: write:" in h for h in mlp.hovertext)
    cloud = viz.neurons(analysis, "W_out", tokens=tokens)
    assert any("tokens: write:" in h for t in cloud.data for h in t.text)
    assert top_token_text(tokens, "L9H9.OV") == ""


def test_hover_text_column_by_column_equals_row_by_row():
    """Hover texts built column by column read each value as ``iterrows`` gives it: floats to 4
    significant digits, integers, booleans and missing values as text, strings escaped."""
    import html

    import pandas as pd

    from tv_lens.viz.figures import hover_text

    mixed = pd.DataFrame({"layer": [1, 2, 100000], "share": [0.123456, np.nan, 1e-9],
                          "token": ["<b>&", "z", None], "flag": [True, False, True],
                          "expert": pd.array([1, None, 3], dtype="Int64")})

    def row_by_row(rows, columns):
        def fmt(v):
            return f"{v:.4g}" if isinstance(v, (float, np.floating)) else html.escape(str(v))
        return ["<br>".join(f"{c}: {fmt(r[c])}" for c in columns if c in rows.columns)
                for _, r in rows.iterrows()]

    for frame in (mixed, mixed[["layer", "share"]], mixed.iloc[:0], mixed.iloc[[2, 0]]):
        columns = ["share", "nope", *frame.columns]
        assert hover_text(frame, columns) == row_by_row(frame, columns)
    assert hover_text(mixed, ["token"])[0] == "token: &lt;b&gt;&amp;"
    assert hover_text(mixed, ["nope"]) == ["", "", ""]
