"""Tuning vectors read in SAE latents: planted directions with exact answers, the hook's
writers, the chance level, SAELens's folder format, and the shipped demo SAE."""

import copy

import numpy as np
import pytest
import torch

from conftest import llama_model
from tv_lens import ModelPair, TuningVector
from tv_lens.errors import (CheckpointNotFoundError, InvalidArgumentError, ShapeMismatchError,
                            TvLensError)
from tv_lens.sae import (SAE_COLUMNS, SAEWeights, chance_cosine, check_shapes, sae_readout,
                         writing_layers)
from tv_lens.sources import ModelWeights

D, D_SAE = 32, 96


def random_sae(hook: str = "blocks.1.hook_resid_post", d: int = D, seed: int = 0) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, d, generator=g)
    W_enc = torch.randn(d, D_SAE, generator=g)
    return SAEWeights(W_enc, W_dec / W_dec.norm(dim=1, keepdim=True), torch.zeros(D_SAE),
                      torch.zeros(d), hook)


@pytest.fixture(scope="module")
def model():
    return llama_model(0)


def planted_pair(model, plant):
    w = ModelWeights(model)
    deltas = {name: torch.zeros_like(w[name]) for name in w}
    plant(w, deltas)
    return ModelPair(model, TuningVector(deltas, w.spec).apply_(copy.deepcopy(model)))


def top(df, component, side, source="update", direction=0):
    rows = df[(df.component == component) & (df.source == source) & (df.side == side)
              & (df.direction == direction) & (df["rank"] == 0)]
    best = rows.loc[rows.cosine.idxmax()]
    return int(best.latent), float(best.cosine)


def test_an_update_along_a_decoder_direction_reads_as_that_latent(model):
    sae = random_sae()
    j_neuron, j_head, i_read = 5, 41, 77

    def plant(w, d):
        d["blocks.1.mlp.W_out"][7] = 0.4 * sae.W_dec[j_neuron]
        d["blocks.0.attn.W_O"][3] = torch.outer(torch.linspace(-1, 1, w.spec.d_head), sae.W_dec[j_head])
        d["blocks.1.mlp.W_in"][:, 2] = 0.3 * sae.W_enc[:, i_read]

    pair = planted_pair(model, plant)
    df = sae_readout(pair, sae, k=5, progress=False)  # the hook's writers: layers 0 and 1
    assert list(df.columns) == SAE_COLUMNS
    for unit in ("L1N7.out", "L1.mlp.W_out"):
        latent, cosine = top(df, unit, "write")
        assert latent == j_neuron and cosine == pytest.approx(1.0, abs=1e-6)
    assert top(df, "L0H3.OV", "write")[0] == j_head
    assert top(df, "L0H3.OV", "write")[1] == pytest.approx(1.0, abs=1e-6)
    reads = sae_readout(pair, sae, k=5, components=["L1N2.in", "L1.mlp.W_in"], progress=False)
    for unit in ("L1N2.in", "L1.mlp.W_in"):  # the encoder side: which latent the update reads
        latent, cosine = top(reads, unit, "read")
        assert latent == i_read and cosine == pytest.approx(1.0, abs=1e-6)
    # units with no update have base rows only
    assert df[(df.component == "L0H0.OV") & (df.source == "update")].empty
    assert not df[(df.component == "L0H0.OV") & (df.source == "base")].empty


def test_cosines_equal_a_direct_computation(model):
    """Against numpy: the top right singular vector of ΔW_out, normalised decoder rows, both
    signs, and z over all latents (the singular vector's own sign is arbitrary)."""
    sae = random_sae()
    pair = ModelPair(model, _noisy(model))
    df = sae_readout(pair, sae, k=D_SAE, components=["L1.mlp.W_out"], progress=False)
    delta = pair.tuning_vector()["blocks.1.mlp.W_out"].double().numpy()  # [d_mlp, d_model]
    v = np.linalg.svd(delta)[2][0]
    dec = sae.W_dec.double().numpy()
    cos = dec @ v / np.linalg.norm(dec, axis=1)
    rows = df[(df.source == "update") & (df.direction == 0)]
    plus = rows[rows.sign == 1].sort_values("latent").cosine.to_numpy()
    flip = 1.0 if np.allclose(plus, cos, atol=1e-9) else -1.0
    for sign in (1, -1):
        got = rows[rows.sign == sign].sort_values("latent")
        expect = sign * flip * cos
        assert np.allclose(got.cosine, expect, atol=1e-9)
        assert np.allclose(got.z, (expect - expect.mean()) / expect.std(ddof=1), atol=1e-9)


def _noisy(model):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


@pytest.mark.parametrize("site, attn, mlp", [
    ("hook_resid_pre", [0], [0]), ("hook_resid_mid", [0, 1], [0]),
    ("hook_resid_post", [0, 1], [0, 1]), ("hook_attn_out", [1], []), ("hook_mlp_out", [], [1])])
def test_the_units_writing_into_each_hook(model, site, attn, mlp):
    assert writing_layers(site, 1) == {"attn": attn, "mlp": mlp}
    pair = ModelPair(model, _noisy(model))
    df = sae_readout(pair, random_sae(f"blocks.1.{site}"), k=2, neurons=3, progress=False)
    layers = {kind: sorted({int(u[1]) for u in df.component if (("H" in u) == (kind == "attn"))})
              for kind in ("attn", "mlp")}
    assert layers == {"attn": attn, "mlp": mlp}
    neurons = {u.split(".")[0] for u in df.component if "N" in u.split(".")[0]}
    assert len(neurons) == (3 if mlp else 0)
    if mlp:  # the writing neurons with the largest ‖ΔW_out[n]‖
        tv = pair.tuning_vector()
        norms = torch.stack([tv[f"blocks.{l}.mlp.W_out"].norm(dim=1) for l in mlp]).flatten()
        expect = {f"L{mlp[i // 48]}N{i % 48}" for i in torch.topk(norms, 3).indices.tolist()}
        assert neurons == expect


def test_nothing_writes_into_the_first_residual_stream(model):
    df = sae_readout(ModelPair(model, _noisy(model)), random_sae("blocks.0.hook_resid_pre"),
                     progress=False)
    assert df.empty and list(df.columns) == SAE_COLUMNS


def test_the_chance_level_is_what_random_directions_reach():
    sae = random_sae()
    dec = sae.W_dec.double()
    level = chance_cosine(dec)
    x = torch.randn(20000, D, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    tops = ((x / x.norm(dim=1, keepdim=True)) @ dec.T).max(1).values
    assert float((tops > level).float().mean()) == pytest.approx(0.01, abs=0.006)


def test_saelens_folder_round_trip_and_sources(tmp_path):
    sae = random_sae()
    folder = sae.save(tmp_path / "sae", model_name="tiny")
    back = SAEWeights.load(folder)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert back.hook_name == sae.hook_name and (back.layer, back.site) == (1, "hook_resid_post")
    as_dict = {n: getattr(sae, n) for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    assert torch.equal(SAEWeights.of({**as_dict, "hook_name": sae.hook_name}).W_dec, sae.W_dec)
    x = torch.randn(4, D)
    assert torch.allclose(sae.decode(sae.encode(x)),
                          torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) @ sae.W_dec + sae.b_dec)


def test_bad_saes_get_clear_errors(model, tmp_path):
    pair = ModelPair(model, _noisy(model))
    with pytest.raises(ShapeMismatchError, match="d_model is 32.*another model"):
        sae_readout(pair, random_sae(d=16), progress=False)
    with pytest.raises(InvalidArgumentError, match="hook is 'blocks.1.attn.hook_z'.*Supported"):
        random_sae("blocks.1.attn.hook_z")
    with pytest.raises(InvalidArgumentError, match="past the model's 2 layers"):
        sae_readout(pair, random_sae("blocks.5.hook_resid_post"), progress=False)
    s = random_sae()
    with pytest.raises(ShapeMismatchError, match="W_dec is \\(96, 16\\), expected \\(96, 32\\)"):
        check_shapes(s.W_enc, s.W_dec[:, :16], s.b_enc, s.b_dec)
    with pytest.raises(InvalidArgumentError, match="has no 'W_dec'.*SAEWeights.load"):
        SAEWeights.of({"W_enc": torch.zeros(2, 2), "hook_name": "blocks.0.hook_resid_post"})
    with pytest.raises(InvalidArgumentError, match="hook is unknown: pass hook_name"):
        s = random_sae()
        SAEWeights.of({n: getattr(s, n) for n in ("W_enc", "W_dec", "b_enc", "b_dec")})
    with pytest.raises(CheckpointNotFoundError, match="not an SAELens SAE folder.*save_model"):
        SAEWeights.load(tmp_path)
    with pytest.raises(TvLensError, match="k and directions must be at least 1"):
        sae_readout(pair, random_sae(), k=0)


# ------------------------------------------------------------------ the shipped demo SAE
def test_the_demo_sae_reconstructs_the_bridge_hook():
    """The demo SAE was trained on HF hidden states; through the bridge's hook of the same
    name it reconstructs the base's activations on held-out text as training recorded."""
    import random

    from tv_lens.demo import load_base, load_sae
    from tv_lens.demo.corpus import build_corpora
    from tv_lens.demo.train import packed_blocks

    sae, bridge = load_sae(), load_base()
    texts = [ex.text for c in build_corpora(0).values() for ex in c.eval]
    blocks = packed_blocks(texts, bridge.tokenizer, 64, random.Random("sae-0"))[:64]
    _, cache = bridge.run_with_cache(blocks, names_filter=sae.hook_name)
    acts = cache[sae.hook_name].flatten(0, 1)
    f = sae.encode(acts)
    variance = (acts - acts.mean(0)).pow(2).sum(1).mean()
    explained = 1 - (acts - sae.decode(f)).pow(2).sum(1).mean() / variance
    recorded = sae.metadata["training"]["eval"]
    assert float(explained) > 0.9 and abs(float(explained) - recorded["explained_variance"]) < 0.02
    assert float((f > 0).float().sum(1).mean()) < 0.5 * sae.d_in
    assert sae.W_dec.norm(dim=1).sub(1).abs().max() < 1e-5  # SAELens convention


def test_saelens_loads_the_demo_sae():
    sae_lens = pytest.importorskip(
        "sae_lens", reason="SAELens needs transformer-lens<4; this runs in the TL 3.9 environment "
                           "(make test-tl3)")
    from tv_lens.demo import CHECKPOINTS, load_pair, load_sae

    theirs = sae_lens.SAE.load_from_disk(CHECKPOINTS / "sae")
    ours = load_sae()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(theirs, name).detach(), getattr(ours, name))
    x = torch.randn(5, ours.d_in)
    assert torch.allclose(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), atol=1e-5)
    pair = load_pair("medical")
    a = sae_readout(pair, theirs, k=5, progress=False)
    b = sae_readout(pair, ours, k=5, progress=False)
    assert a.equals(b)


def test_top_activations_are_the_saes_strongest_codes():
    """Each reported activation is the SAE's code at that text and position (recomputed from the
    bridge's cache of the whole batch), strongest first, and no unreported position is stronger."""
    from tv_lens.demo import load_base, load_sae
    from tv_lens.sae import top_activations

    sae, bridge = load_sae(), load_base()
    texts = ["The cat sat on the mat.", "Question: What is the dose of sumatriptan? Answer:",
             "Felix has 3 boxes and buys 4 more."]
    codes = [sae.encode(bridge.run_with_cache(bridge.to_tokens(t), names_filter=sae.hook_name)[1]
                        [sae.hook_name][0]) for t in texts]
    latent = int(torch.stack([c.max(0).values for c in codes]).max(0).values.argmax())
    df = top_activations(bridge, sae, texts, [latent, 3], k=4)
    rows = df[df.latent == latent]
    assert 1 <= len(rows) <= 4 and list(rows["rank"]) == list(range(len(rows)))
    assert rows.activation.is_monotonic_decreasing
    for r in rows.itertuples():
        assert r.activation == pytest.approx(float(codes[r.text][r.pos, latent]), rel=1e-5)
    everything = torch.cat([c[:, latent] for c in codes])
    assert rows.activation.iloc[0] == pytest.approx(float(everything.max()), rel=1e-5)
    assert (everything > 0).sum() >= len(rows)
