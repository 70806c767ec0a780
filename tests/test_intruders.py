"""``n_intruders`` equals PEFT's own count (``peft.tuners.lora.intruders``) on LoRA adapters."""

import re

import numpy as np
import pytest
import torch

from tv_lens import ModelPair, analyze
from tv_lens.linalg import gram_svd
from tv_lens.shares import intruder_count, matrix_overlap

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TL_NAME = {"q_proj": "W_Q", "k_proj": "W_K", "v_proj": "W_V", "o_proj": "W_O",
           "gate_proj": "W_gate", "up_proj": "W_in", "down_proj": "W_out"}
ADAPTERS = {  # two ranks, two scalings (alpha / r = 2 and rsLoRA alpha / √r = 8)
    "r2": dict(r=2, lora_alpha=4),
    "r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True),
}


def _peft_counts(model, top_k: int, epsilon: float) -> dict[tuple[int, str], int]:
    """PEFT's counts, read from the lines its ``reduce_intruder_dimension`` logs."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=epsilon,
                              logging_sink=lambda *a: lines.append(" ".join(map(str, a))))
    counts = {}
    for line in lines:
        if "intruder" not in line.lower() or "_proj" not in line:
            continue  # e.g. "Enabling new adapter ..."
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj): (?:Intruders: (\d+)|No intruders)", line)
        assert m, line
        counts[(int(m.group(1)), TL_NAME[m.group(2)])] = int(m.group(3) or 0)
    return counts


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter(request, llama_dirs, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dirs[0]),
                           LoraConfig(init_lora_weights=False, target_modules=ALL,
                                      **ADAPTERS[request.param]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # updates of every size: some write intruders, some do not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(torch.rand((), generator=g) * 0.3)
    folder = tmp_path_factory.mktemp(f"intruders_{request.param}")
    model.save_pretrained(folder)
    return llama_dirs[0], folder, model


@pytest.mark.parametrize("top_k,epsilon", [(10, 0.5), (5, 0.7)])
def test_counts_equal_peft(adapter, top_k, epsilon):
    import copy

    base, folder, model = adapter
    expected = _peft_counts(copy.deepcopy(model), top_k, epsilon)
    assert len(expected) == 2 * len(ALL)
    result = analyze(ModelPair.from_pretrained(base, folder), progress=False,
                     intruder_k=top_k, intruder_epsilon=epsilon)
    got = result.matrices.set_index(["layer", "matrix"])["n_intruders"]
    assert {k: int(got[k]) for k in expected} == expected
    assert 0 < sum(expected.values()) < top_k * len(expected)  # not a trivial agreement
    assert got[[k for k in got.index if k[0] is np.nan or "embed" in str(k[1])]].isna().all()


def test_count_against_dense_svd():
    """Both orientations (tall and transposed) and the factored path, against a direct SVD."""
    from tv_lens.lazy import LowRank

    g = torch.Generator().manual_seed(0)
    for shape in ((40, 24), (24, 40), (30, 30)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        L = torch.randn(shape[0], 3, generator=g, dtype=torch.float64)
        R = torch.randn(3, shape[1], generator=g, dtype=torch.float64) * 0.8
        D = L @ R
        # PEFT's definition on the nn.Linear weight [out, in] = Wᵀ
        U_base = torch.linalg.svd(W.T, full_matrices=False)[0]
        U_tuned = torch.linalg.svd((W + D).T, full_matrices=False)[0]
        cos = (U_tuned.T @ U_base).abs().max(dim=1).values[:10]
        base = gram_svd(W)
        for update in (D, LowRank(L, R)):
            count, best = intruder_count(base, matrix_overlap(base, update, 10), 10, 0.5)
            torch.testing.assert_close(best, cos, atol=1e-8, rtol=1e-8)
            assert count == int((cos < 0.5).sum())


def test_top_eigenpairs_krylov_equals_eigh(monkeypatch):
    """The Krylov path (used above n = 1024) against a full eigh, on Grams like the ones it
    meets: a random tall matrix's (flat Marchenko–Pastur top) plus a low-rank update."""
    from tv_lens.linalg import top_eigenpairs

    g = torch.Generator().manual_seed(0)
    W = torch.randn(600, 300, generator=g, dtype=torch.float64)
    D = torch.randn(600, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 300, generator=g,
                                                                             dtype=torch.float64)
    for T in (W, W + 0.2 * D, W + 3.0 * D):
        G = T.T @ T
        evals, vecs = torch.linalg.eigh(G)
        ref_vals, ref_vecs = evals.flip(0)[:10], vecs.flip(1)[:, :10]
        start = torch.linalg.eigh(W.T @ W)[1].flip(1)
        sizes, eigh = [], torch.linalg.eigh
        monkeypatch.setattr(torch.linalg, "eigh", lambda x: sizes.append(x.shape[0]) or eigh(x))
        vals, got = top_eigenpairs(G, 10, start=start, krylov_above=100, max_dim=200)
        monkeypatch.undo()
        assert max(sizes) < 300  # converged in the Krylov space: no full eigh fallback
        torch.testing.assert_close(vals, ref_vals, rtol=1e-7, atol=0)
        np.testing.assert_allclose((got * ref_vecs).sum(0).abs().numpy(), 1.0, atol=1e-6)
    small_vals, _ = top_eigenpairs(W.T @ W, 5)  # n ≤ 1024: the full eigh
    torch.testing.assert_close(small_vals, torch.linalg.eigvalsh(W.T @ W).flip(0)[:5])


@pytest.mark.parametrize("spectrum", ["flat", "power law"])
def test_top_eigenpairs_skips_krylov_on_a_flat_top(monkeypatch, spectrum):
    """With ``start_values`` flat past the top k (like a random matrix's top), no Krylov space
    is grown (one tridiagonal reduction instead); with a power-law top it is. Same pairs either
    way."""
    from tv_lens import linalg

    g = torch.Generator().manual_seed(1)
    U, _, Vh = torch.linalg.svd(torch.randn(600, 300, generator=g, dtype=torch.float64),
                                full_matrices=False)
    S = (torch.linspace(1.0, 0.8, 300, dtype=torch.float64) if spectrum == "flat"
         else torch.arange(1, 301, dtype=torch.float64) ** -0.7)
    W = U @ torch.diag(S) @ Vh
    G = W.T @ W
    evals, vecs = torch.linalg.eigh(G)
    ref_vals, ref_vecs = evals.flip(0)[:10], vecs.flip(1)[:, :10]
    grown = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda x: grown.append(x.shape) or qr(x))
    vals, got = linalg.top_eigenpairs(G, 10, start=vecs.flip(1), start_values=evals.flip(0),
                                      krylov_above=100, max_dim=200)
    assert bool(grown) == (spectrum == "power law")
    assert linalg._flat_top(evals.flip(0), 10, 20) == (spectrum == "flat")
    torch.testing.assert_close(vals, ref_vals, rtol=1e-10, atol=0)
    np.testing.assert_allclose((got * ref_vecs).sum(0).abs().numpy(), 1.0, atol=1e-6)
