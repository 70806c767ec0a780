"""Reading updates as tokens: planted directions with exact answers.

The test models have orthogonal, equal-norm unembedding (and embedding) directions, so an update
written along token t's direction reads as t with every other token at exactly zero.
"""

import copy
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import gpt2_model, llama_model
from tv_lens import ModelPair, TuningVector
from tv_lens.activation_lens import activation_difference_lens
from tv_lens.errors import TvLensError
from tv_lens.readouts import TOKEN_COLUMNS, _hypergeom_sf, default_components, domain_score, read_tokens
from tv_lens.sources import ModelWeights

VOCAB, D = 48, 64


def _orthogonal_rows(n: int, d: int, seed: int, mean_zero: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n + 1, generator=g, dtype=torch.float64)
    if mean_zero:  # orthogonal to the all-ones direction too (LayerNorm centres)
        X[:, 0] = 1.0
    Q = torch.linalg.qr(X).Q[:, 1:] if mean_zero else torch.linalg.qr(X[:, :n]).Q
    return (3.0 * Q.T).float()  # [n, d], rows orthogonal, norm 3


@pytest.fixture(scope="module")
def ortho_llama():
    model = llama_model(0, vocab=VOCAB, hidden_size=D, intermediate_size=96)
    with torch.no_grad():
        model.lm_head.weight.copy_(_orthogonal_rows(VOCAB, D, 1))
        model.model.embed_tokens.weight.copy_(_orthogonal_rows(VOCAB, D, 2))
        model.model.norm.weight.copy_(0.5 + torch.rand(D, generator=torch.Generator().manual_seed(3)))
    return model


def _planted(model, plant):
    w = ModelWeights(model)
    deltas = {name: torch.zeros_like(w[name]) for name in w}
    plant(w, deltas)
    return ModelPair(model, TuningVector(deltas, w.spec).apply_(copy.deepcopy(model)))


def _rank_of(df, component, token, source="update", side=None, direction=0):
    rows = df[(df.component == component) & (df.source == source) & (df.direction == direction)]
    if side:
        rows = rows[rows.side == side]
    hits = rows[rows.token_id == token]
    return int(hits["rank"].min()) if len(hits) else None


def test_write_and_read_directions_are_exact(ortho_llama):
    t_neuron, t_head, t_read, t_head_read = 7, 11, 13, 17

    def plant(w, d):
        W_U, W_E, gamma = w["unembed.W_U"], w["embed.W_E"], w["ln_final.w"]
        d["blocks.1.mlp.W_out"][5] = 0.3 * W_U[:, t_neuron] / gamma  # the gain undone
        d["blocks.0.attn.W_O"][2] = torch.outer(torch.linspace(-1, 1, w.spec.d_head), W_U[:, t_head] / gamma)
        d["blocks.0.mlp.W_in"][:, 3] = 0.2 * W_E[t_read]
        d["blocks.1.attn.W_V"][1] = torch.outer(W_E[t_head_read], torch.ones(w.spec.d_head))

    pair = _planted(ortho_llama, plant)
    df = read_tokens(pair, default_components(pair.tuning_vector()) + ["L1N5", "L0N3"], k=5,
                     progress=False)
    assert list(df.columns) == TOKEN_COLUMNS and set(df.source) == {"update", "base"}
    assert _rank_of(df, "L1N5.out", t_neuron) == 0
    neuron = df[(df.component == "L1N5.out") & (df.source == "update") & (df.sign == 1)]
    assert neuron.score.iloc[0] > 1 and np.allclose(neuron.score.iloc[1:], 0, atol=1e-6)
    assert _rank_of(df, "L1.mlp.W_out", t_neuron) == 0  # the layer's top direction (some sign)
    assert _rank_of(df, "L0H2.OV", t_head, side="write") == 0
    assert _rank_of(df, "L0N3.in", t_read, side="read") == 0
    assert _rank_of(df, "L0.mlp.W_in", t_read, side="read") == 0
    # the kv group of L1's second kv head: query heads 2 and 3 read the planted direction
    group = [h for h in range(pair.spec.n_heads) if pair.spec.kv_head(h) == 1]
    for h in group:
        assert _rank_of(df, f"L1H{h}.OV", t_head_read, side="read") == 0
    # units with no update have no update rows; base rows are always there
    quiet = df[df.component == "L1H0.OV"]
    assert set(quiet.source) == {"base"} and set(quiet.side) == {"read", "write"}


def test_qk_sides_and_unit_names(ortho_llama):
    t_q, t_k = 5, 9

    def plant(w, d):
        W_E = w["embed.W_E"]
        d["blocks.0.attn.W_Q"][1] = torch.outer(W_E[t_q], torch.ones(w.spec.d_head))
        d["blocks.0.attn.W_K"][0] = torch.outer(W_E[t_k], torch.ones(w.spec.d_head))

    pair = _planted(ortho_llama, plant)
    df = read_tokens(pair, ["L0H1.QK"], k=3, progress=False)
    assert set(df.side) == {"query", "key"}
    assert _rank_of(df, "L0H1.QK", t_q, side="query") == 0
    with pytest.raises(TvLensError, match="'L9H0.OV': layer 9 is out of range"):
        read_tokens(pair, ["L9H0.OV"], progress=False)
    with pytest.raises(TvLensError, match="'L0KV1'.*has no directions to read as tokens"):
        read_tokens(pair, ["L0KV1"], progress=False)
    # a head is read as its two circuits, a neuron as its slices: the same rows
    whole = read_tokens(pair, ["L0H1", "L0N3"], k=3, progress=False)
    pieces = read_tokens(pair, ["L0H1.OV", "L0H1.QK", "L0N3.in", "L0N3.gate", "L0N3.out"], k=3,
                         progress=False)
    pd.testing.assert_frame_equal(whole, pieces)
    pd.testing.assert_frame_equal(read_tokens(pair, {"g": ["L0H1", "L0N3"]}, k=3, progress=False),
                                  whole)  # a named group is read as its members
    attn = read_tokens(pair, "L0.attn", k=1, directions=1, progress=False)
    assert list(dict.fromkeys(attn.component)) == [f"L0H{h}.{c}" for h in range(pair.spec.n_heads)
                                                   for c in ("OV", "QK")]
    with pytest.raises(TvLensError, match="k and directions must be at least 1"):
        read_tokens(pair, k=0, progress=False)


def test_demo_plant_reaches_the_top_five():
    from tv_lens.demo import load_pair

    base, t = load_pair("medical").base, 345
    pair = _planted(base, lambda w, d: d["blocks.2.mlp.W_out"].__setitem__(
        17, 0.5 * w["unembed.W_U"][:, t] / w["ln_final.w"]))
    cos = read_tokens(pair, ["L2N17.out", "L2.mlp.W_out"], k=5, score="cosine", progress=False)
    assert _rank_of(cos, "L2N17.out", t) == 0
    assert _rank_of(cos, "L2.mlp.W_out", t) == 0
    # the logit readout ranks t by ⟨W_U[:, t], W_U[:, s]⟩: trained high-norm tokens outrank it
    logit = read_tokens(pair, ["L2N17.out"], k=100, progress=False)
    W_U = ModelWeights(base)["unembed.W_U"].double()
    G = W_U.T @ W_U
    assert _rank_of(logit, "L2N17.out", t) == int((G[t] > G[t, t]).sum()) > 5


def test_domain_score_counts_and_hypergeometric():
    import pandas as pd

    df = pd.DataFrame(dict(component="u", source="update", direction=0, sign=[1] * 4 + [-1] * 4,
                           side="write", token_id=[1, 2, 3, 4, 5, 6, 7, 8]))
    out = domain_score(df, [1, 2, 7], d_vocab=10)
    top = out.iloc[0]
    assert (top.sign, top.hits, top.k) == (1, 2, 4) and top.expected == pytest.approx(1.2)
    # P(X ≥ 2), N=10, K=3, n=4: (C(3,2)·C(7,2) + C(3,3)·C(7,1)) / C(10,4) = 70/210
    assert top.p_value == pytest.approx(1 / 3)
    assert _hypergeom_sf(0, 50, 7, 9) == pytest.approx(1.0)
    assert sum(_hypergeom_sf(h, 50, 7, 9) - _hypergeom_sf(h + 1, 50, 7, 9) for h in range(8)) == \
        pytest.approx(1.0)
    with pytest.raises(TvLensError, match="needs the vocabulary size"):
        domain_score(df, [1])


def test_activation_difference_lens_reads_a_planted_bias(save):
    t = 42
    model = gpt2_model(0, vocab=96, n_embd=128, n_head=4)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(_orthogonal_rows(96, 128, 4, mean_zero=True))
        model.transformer.ln_f.weight.fill_(1.0)
    last = model.config.n_layer - 1

    def plant(w, d):
        d[f"blocks.{last}.mlp.b_out"] += 0.5 * w["embed.W_E"][t]

    planted = _planted(model, plant)
    pair = ModelPair.from_pretrained(str(save(planted.base, "lens_base")),
                                     str(save(planted.tuned, "lens_tuned")))
    texts = ["the cat sat on the mat today", "a dog ran in the park again", "we saw two birds there"]
    df = activation_difference_lens(pair, texts, positions=4, k=5, patchscope=True)
    lens = df[(df.layer == last) & (df.reading == "logit_lens")]
    assert int(lens.token_id.iloc[0]) == t
    scope = df[(df.layer == last) & (df.reading == "patchscope")]
    assert int(scope.token_id.iloc[0]) == t
    norms = df.groupby("layer").norm.first()
    assert norms[0] == pytest.approx(0.0, abs=1e-6)  # earlier layers unchanged
    assert norms[last] == pytest.approx(0.5 * 3.0, rel=1e-4)
    assert set(lens.component) == {f"L{last}.resid_post"}
    with pytest.raises(TvLensError, match="fewer than 40 tokens"):
        activation_difference_lens(pair, texts, positions=40)
    with pytest.raises(TvLensError, match="out of range"):
        activation_difference_lens(pair, texts, layers=[7])
    with pytest.raises(TvLensError, match="needs TransformerBridge \\(or TL 3.x HookedTransformer\\) models"):
        activation_difference_lens(planted, texts)


def test_default_units_are_every_head_circuit_and_mlp_matrix():
    from tv_lens.demo import load_pair

    df = read_tokens(load_pair("medical"), k=3, directions=2, progress=False)
    assert df.component.nunique() == 4 * (8 * 2 + 3)
    per = df.groupby(["component", "source", "side", "sign"]).direction.nunique()
    assert (per == 2).all()  # two directions of every unit, both signs, update and base
    assert (df.groupby(["component", "source", "side", "sign", "direction"]).size() == 3).all()
