"""Composition methods against hand-computed answers on small tensors."""

import pytest
import torch

from tv_lens import TuningVector, compose
from tv_lens.spec import ArchSpec

SPEC = ArchSpec("TransformerLensNative", "native", 1, 4, 2, 2, 2, 3, 5, True, "RMS", "rotary")


def vec(values):
    """A one-parameter vector: only blocks.0.mlp.W_out ([d_mlp=3, d_model=4]) is set."""
    return TuningVector({"blocks.0.mlp.W_out": torch.tensor(values, dtype=torch.float32)}, SPEC)


A = [[1.0, -2.0, 0.5, 0.0], [3.0, 0.1, -0.2, 4.0], [0.0, 0.0, 1.0, -1.0]]
B = [[-1.0, 1.1, 0.4, 2.0], [1.2, -0.1, 0.3, -4.5], [0.2, 0.0, -3.0, -0.9]]


def test_sum_is_weighted_task_arithmetic():
    out = compose([vec(A), vec(B)], weights=[0.5, 2.0])
    expected = 0.5 * torch.tensor(A) + 2.0 * torch.tensor(B)
    torch.testing.assert_close(out["blocks.0.mlp.W_out"], expected)


def test_ties_matches_a_direct_computation():
    a, b = torch.tensor(A), torch.tensor(B)
    out = compose([vec(A), vec(B)], method="ties", top_k=0.5)["blocks.0.mlp.W_out"]
    # numpy-free reference: trim each to its 6 largest magnitudes, elect sign, disjoint mean
    def trim(t):
        keep = t.abs().flatten().argsort(descending=True)[:6]
        m = torch.zeros(t.numel(), dtype=torch.bool)
        m[keep] = True
        return torch.where(m.view_as(t), t, torch.zeros_like(t))
    ta, tb = trim(a), trim(b)
    expected = torch.zeros_like(a)
    for idx in range(a.numel()):
        x, y = ta.flatten()[idx].item(), tb.flatten()[idx].item()
        s = (x + y > 0) - (x + y < 0)
        agree = [v for v in (x, y) if v != 0 and ((v > 0) - (v < 0)) == s]
        expected.view(-1)[idx] = sum(agree) / len(agree) if agree else 0.0
    torch.testing.assert_close(out, expected)
    assert out[1, 3] == -4.5  # 4.0 vs −4.5: the summed mass elects −, only −4.5 is kept
    assert out[0, 0] == 0.0  # 1.0 vs −1.0 cancel: no entry agrees with sign 0

def test_dare_is_seeded_unbiased_and_zero_drop_is_sum():
    vs = [vec(A), vec(B)]
    torch.testing.assert_close(compose(vs, method="dare", drop_rate=0.0)["blocks.0.mlp.W_out"],
                               compose(vs)["blocks.0.mlp.W_out"])
    x = compose(vs, method="dare", drop_rate=0.5, seed=3)["blocks.0.mlp.W_out"]
    y = compose(vs, method="dare", drop_rate=0.5, seed=3)["blocks.0.mlp.W_out"]
    assert torch.equal(x, y)
    mean = torch.stack([compose(vs, method="dare", drop_rate=0.5, seed=s)["blocks.0.mlp.W_out"]
                        for s in range(400)]).mean(0)
    torch.testing.assert_close(mean, torch.tensor(A) + torch.tensor(B), atol=0.5, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown method 'avg'"):
        compose([vec(A)], method="avg")
    with pytest.raises(ValueError, match="Got 1 weights for 2 vectors"):
        compose([vec(A), vec(B)], weights=[1.0])
    with pytest.raises(ValueError, match="drop_rate must be in"):
        compose([vec(A)], method="dare", drop_rate=1.0)
