"""Composition against hand-computed answers and against mergekit's formulas.

``mergekit_reference`` restates, in numpy, what mergekit's generalized task arithmetic does per
checkpoint tensor (``mergekit/sparsify.py``: ``magnitude`` keeps ``int(density·n)`` entries by
``argsort`` of ``|x|``; ``generalized_task_arithmetic.py``: weights after sparsification,
``get_mask(method="sum")`` elects ``sum ≥ 0 → +1``, divisor ``Σ w·mask`` with zeros set to 1,
then ``lambda``), independent of tv_lens' torch code.
"""

import numpy as np
import pytest
import torch
import yaml

from conftest import gpt2_model
from tv_lens import ModelPair, TuningVector, compose, to_mergekit_config
from tv_lens.errors import TvLensError
from tv_lens.spec import ArchSpec

SPEC = ArchSpec("TransformerLensNative", "native", 1, 4, 2, 2, 2, 3, 5, True, "RMS", "rotary")


def vec(values):
    """A one-parameter vector: only blocks.0.mlp.W_out ([d_mlp=3, d_model=4]) is set."""
    return TuningVector({"blocks.0.mlp.W_out": torch.tensor(values, dtype=torch.float32)}, SPEC)


A = [[1.0, -2.0, 0.5, 0.0], [3.0, 0.1, -0.2, 4.0], [0.0, 0.0, 1.0, -1.0]]
B = [[-1.0, 1.1, 0.4, 2.0], [1.2, -0.1, 0.3, -4.5], [0.2, 0.0, -3.0, -0.9]]


def mergekit_reference(deltas, weights, method, density=1.0, lambda_=1.0, normalize=None):
    """mergekit's merge of one checkpoint tensor's task vectors (numpy, float64)."""
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    if method == "ties":
        kept = []
        for d in deltas:
            k = max(1, int(density * d.size)) if density < 1 else d.size
            mask = np.zeros(d.size)
            mask[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = 1
            kept.append(d * mask.reshape(d.shape))
        deltas = kept
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *[1] * deltas[0].ndim)
    weighted = np.stack(deltas) * w
    if method == "ties":
        majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
        mask = (np.sign(weighted) == majority).astype(np.float64)
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
        normalize = True if normalize is None else normalize
    else:
        mixed, divisor = weighted.sum(0), w.sum()
        normalize = False if normalize is None else normalize
    if normalize:
        mixed = mixed / divisor
    return mixed * lambda_


def test_sum_is_weighted_task_arithmetic():
    out = compose([vec(A), vec(B)], weights=[0.5, 2.0], lambda_=0.7)
    expected = 0.7 * (0.5 * torch.tensor(A) + 2.0 * torch.tensor(B))
    torch.testing.assert_close(out["blocks.0.mlp.W_out"], expected)
    torch.testing.assert_close(compose([vec(A), vec(B)], method="sum")["blocks.0.mlp.W_out"],
                               torch.tensor(A) + torch.tensor(B))


def test_ties_hand_computed():
    out = compose([vec(A), vec(B)], method="ties", density=0.5)["blocks.0.mlp.W_out"]
    assert out[1, 3] == -4.5  # 4.0 vs −4.5: the summed mass elects −, only −4.5 is kept
    assert out[0, 0] == 1.0  # 1.0 vs −1.0: a zero sum elects + (mergekit), 1.0 is kept
    assert out[2, 2] == -3.0  # only B keeps it (A's 1.0 is trimmed: not in A's top 6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.3, 1.7, 0.9), (1.0, -0.5, 2.0)])
@pytest.mark.parametrize("method,density", [("ties", 0.3), ("ties", 0.05), ("ties", 1.0),
                                            ("task_arithmetic", 1.0)])
def test_equals_mergekit_on_random_vectors(weights, method, density):
    g = torch.Generator().manual_seed(0)
    spec = ArchSpec("TransformerLensNative", "native", 2, 16, 4, 4, 4, 24, 50, True, "RMS", "rotary")
    names = ["blocks.0.mlp.W_out", "blocks.1.attn.W_Q", "blocks.1.mlp.W_in"]
    shapes = {"blocks.0.mlp.W_out": (24, 16), "blocks.1.attn.W_Q": (4, 16, 4),
              "blocks.1.mlp.W_in": (16, 24)}
    vectors = [TuningVector({n: torch.randn(shapes[n], generator=g, dtype=torch.float64)
                             for n in names}, spec) for _ in weights]
    out = compose(vectors, weights, method=method, density=density, lambda_=1.3)
    for name in names:
        ref = mergekit_reference([v[name].numpy() for v in vectors], weights, method, density, 1.3)
        np.testing.assert_allclose(out[name].numpy(), ref, atol=1e-6, rtol=0)


def test_ties_trims_a_fused_checkpoint_tensor_as_one():
    """GPT-2's c_attn is one tensor to mergekit: the kept set is the fused tensor's top entries."""
    base, a, b = gpt2_model(0), gpt2_model(1), gpt2_model(2)
    ta, tb = ModelPair(base, a).tuning_vector(), ModelPair(base, b).tuning_vector()
    out = compose([ta, tb], [1.0, 0.6], method="ties", density=0.1)
    layer = "transformer.h.0.attn.c_attn.weight"
    sd = {k: v.double().numpy() for k, v in base.state_dict().items()}
    deltas = [m.state_dict()[layer].double().numpy() - sd[layer] for m in (a, b)]
    ref = mergekit_reference(deltas, [1.0, 0.6], "ties", 0.1)  # [d_model, 3·d_model] Conv1D
    d = ref.shape[0]
    q = ref[:, :d].reshape(d, 4, d // 4).transpose(1, 0, 2)  # TL W_Q [n_heads, d_model, d_head]
    np.testing.assert_allclose(out["blocks.0.attn.W_Q"].double().numpy(), q, atol=1e-6)
    # trimming W_Q on its own (not what mergekit does) would keep a different set
    alone = mergekit_reference([v["blocks.0.attn.W_Q"].numpy() for v in (ta, tb)], [1.0, 0.6],
                               "ties", 0.1)
    assert not np.allclose(alone, out["blocks.0.attn.W_Q"].numpy(), atol=1e-6)


def test_dare_rescaling_and_seeding():
    vs = [vec(A), vec(B)]
    for rescale in ("l1", "inverse", None):
        torch.testing.assert_close(
            compose(vs, method="dare", density=1.0, rescale=rescale)["blocks.0.mlp.W_out"],
            compose(vs)["blocks.0.mlp.W_out"])
    x = compose(vs, method="dare", density=0.5, seed=3)["blocks.0.mlp.W_out"]
    assert torch.equal(x, compose(vs, method="dare", density=0.5, seed=3)["blocks.0.mlp.W_out"])
    # l1 (mergekit): each vector keeps its L1 norm exactly; inverse: unbiased on average
    one = compose([vec(A)], method="dare", density=0.5, seed=1)["blocks.0.mlp.W_out"]
    assert float(one.abs().sum()) == pytest.approx(float(torch.tensor(A).abs().sum()), rel=1e-6)
    mean = torch.stack([compose(vs, method="dare", density=0.5, rescale="inverse", seed=s)
                        ["blocks.0.mlp.W_out"] for s in range(400)]).mean(0)
    torch.testing.assert_close(mean, torch.tensor(A) + torch.tensor(B), atol=0.5, rtol=0)
    kept = compose([vec(A)], method="dare", density=0.5, rescale=None, seed=1)["blocks.0.mlp.W_out"]
    assert set(kept[kept != 0].tolist()) <= set(torch.tensor(A).flatten().tolist())
    ties = compose(vs, method="dare_ties", density=0.5, seed=3)["blocks.0.mlp.W_out"]
    assert ties.shape == (3, 4) and not torch.equal(ties, x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown method 'avg'"):
        compose([vec(A)], method="avg")
    with pytest.raises(ValueError, match="Got 1 weight values for 2 vectors"):
        compose([vec(A), vec(B)], weights=[1.0])
    with pytest.raises(ValueError, match="density must be in"):
        compose([vec(A)], method="dare", density=0.0)
    with pytest.raises(ValueError, match="`top_k` is now `density`"):
        compose([vec(A)], method="ties", top_k=0.2)
    with pytest.raises(ValueError, match="`drop_rate` is now `density` = 1 − drop_rate"):
        compose([vec(A)], method="dare", drop_rate=0.5)
    with pytest.raises(ValueError, match="rescale must be one of"):
        compose([vec(A)], method="dare", rescale="l2")


def test_to_mergekit_config(tmp_path):
    from tv_lens.demo import load_pair

    med, math = load_pair("medical").tuning_vector(), load_pair("math").tuning_vector()
    path = tmp_path / "merge.yml"
    text = to_mergekit_config([med, math], [1.0, 0.5], method="ties", density=[0.2, 0.3],
                              lambda_=0.9, path=path)
    config = yaml.safe_load(path.read_text())
    assert text == path.read_text()
    assert config == {
        "merge_method": "ties", "base_model": med.metadata["base"],
        "models": [{"model": med.metadata["tuned"], "parameters": {"weight": 1.0, "density": 0.2}},
                   {"model": math.metadata["tuned"], "parameters": {"weight": 0.5, "density": 0.3}}],
        "parameters": {"normalize": True, "lambda": 0.9}, "dtype": "float32"}
    dare = yaml.safe_load(to_mergekit_config([med, math], method="dare", density=0.5))
    assert dare["merge_method"] == "dare_linear" and dare["parameters"]["rescale"] is True
    with pytest.raises(TvLensError, match="mergekit has no 1/density rescaling"):
        to_mergekit_config([med], method="dare", rescale="inverse")
    with pytest.raises(TvLensError, match="pass base_model=... and models="):
        to_mergekit_config([vec(A)])
