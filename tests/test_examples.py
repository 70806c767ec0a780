"""The example scripts run on the shipped pairs and print the numbers the docs quote.

Each number is read from the text of the docs page that quotes it (``docs/research-claims.md``,
``docs/token-readouts.md``, ``docs/patching.md``), so an edit of either side that drifts fails here,
and is compared with what the example computes, to the page's rounding (plus a little for the
two TransformerLens lines' different softmax code paths).
"""

import re
import runpy
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"


@pytest.fixture(autouse=True)
def _own_grad_mode():
    """The scripts switch autograd off for their process, as scripts may; the tests after
    these run in this process, so grad mode is given back."""
    with torch.enable_grad():
        yield


def _numbers(text: str, pattern: str) -> list[float]:
    """The groups of ``pattern``'s first match in ``text``, as numbers (− read as a minus)."""
    match = re.search(pattern, " ".join(text.split()))
    assert match, f"no match for {pattern!r}"
    return [float(g.replace("−", "-")) for g in match.groups()]


def quoter(page: str) -> Callable[[str], list[float]]:
    """``quoted(pattern)``: numbers ``docs/<page>`` quotes, found by a regex over its text (line
    breaks read as spaces)."""
    text = (DOCS / page).read_text()
    return lambda pattern: _numbers(text, pattern)


def _run(script: str, argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def test_research_claims_example(capsys, monkeypatch):
    quoted = quoter("research-claims.md")
    out = _run("research_claims.py", [], capsys, monkeypatch)
    for marker in ("0. labels per part", "calibrated", "update energy labelled new",
                   "1. MLP: update energy share", "2. attention OV", "2. attention QK",
                   "3. representations on 64 prompts", "outside_share"):
        assert marker in out
    energy, new_share, random = _numbers(out, r"update energy share ([\d.]+); energy-weighted "
                                              r"neuron new_share ([\d.]+) \(random direction: ([\d.]+)\)")
    assert 100 * energy == pytest.approx(quoted(r"MLP updates carry (\d+)% of the update energy")[0], abs=0.6)
    assert [new_share, random] == pytest.approx(
        quoted(r"neuron new_share ([\d.]+); random direction ([\d.]+)\)"), abs=0.0015)
    ov, iso, weights = _numbers(out, r"attention OV: subspace_share ([\d.]+) \(isotropic baseline "
                                     r"([\d.]+), weight-perturbation baseline ([\d.]+)\)")
    pct, times_iso, times_weights = quoted(r"keep (\d+)% of their energy inside the heads' existing "
                                           r"read/write subspaces, (\d+)× the isotropic baseline "
                                           r"and (\d+)× the weight-noise baseline")
    assert (100 * ov, ov / iso, ov / weights) == pytest.approx((pct, times_iso, times_weights), abs=0.6)
    labels = {(part, kind, mode): counts for part, kind, mode, *counts in re.findall(
        r"^\s*(\w+)\s+(\S+)\s+(calibrated|fixed)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)}
    assert labels["attn", "OV", "fixed"] == labels["attn", "QK", "fixed"] == ["0", "0", "32"]  # all new
    assert labels["attn", "OV", "calibrated"] == labels["attn", "QK", "calibrated"] == ["0", "32", "0"]
    n_in, n_gate = quoted(r"(\d+) input and (\d+) gate directions `aligned`")
    assert (int(labels["mlp", "W_in", "calibrated"][1]),
            int(labels["mlp", "W_gate", "calibrated"][1])) == (n_in, n_gate)
    assert labels["mlp", "W_out", "calibrated"][1] == "0"  # "every output direction" new
    matrices = [k for k in labels if k[0] == "matrix" and k[2] == "calibrated"]
    assert sum(int(labels[k][1]) for k in matrices) == quoted(r"\(all (\d+) `aligned`\)")[0]
    mlp_new = _numbers(out, r"MLP: update energy labelled new ([\d.]+)")[0]
    assert 100 * mlp_new == pytest.approx(quoted(r"Calibrated MLP neurons: (\d+)% of the MLP update")[0], abs=0.6)
    overlaps = [float(x) for x in re.findall(r"^\s*L\d+\.resid_post\s+\d+\s+hook_resid_post\s+\d+\s+\d+\s+([\d.]+)",
                                             out, re.M)]
    assert overlaps == pytest.approx(quoted(r"overlap ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) by layer"),
                                     abs=0.006)
    cka = [float(x) for x in re.findall(r"^\s*L\d+\.resid_post\s+\d+\s+hook_resid_post(?:\s+\S+){3}\s+([\d.]+)",
                                        out, re.M)]
    assert (cka[0], cka[-1]) == pytest.approx(quoted(r"\(CKA ([\d.]+) → ([\d.]+)\)"), abs=0.006)


def test_research_claims_example_on_the_math_pair(capsys, monkeypatch):
    quoted = quoter("research-claims.md")
    out = _run("research_claims.py", ["math"], capsys, monkeypatch)
    mlp_new = _numbers(out, r"MLP: update energy labelled new ([\d.]+)")[0]
    pct, aligned, total = quoted(r"(\d+)% on the math pair \((\d+) of (\d+) output directions `aligned`\)")
    assert 100 * mlp_new == pytest.approx(pct, abs=0.6)
    counts = re.search(r"^\s*mlp\s+W_out\s+calibrated\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M).groups()
    assert (int(counts[1]), sum(map(int, counts))) == (aligned, total)
    assert "attention OV" in out and "labels {'aligned': 32}" in out  # "the same on the math pair"


def test_token_readouts_example(capsys, monkeypatch):
    quoted = quoter("token-readouts.md")
    out = _run("token_readouts.py", [], capsys, monkeypatch)
    for marker in ("== medical", "== math", "weight lens, best update direction",
                   "weight lens, best base direction", "activation-difference lens, layer 3"):
        assert marker in out
    medical, math = out.split("== math")
    hits, chance = _numbers(medical, r"best update direction: L0H0\.QK direction \d sign [+-]1 "
                                     r"\(key\): (\d+)/20 domain tokens, ([\d.]+) expected")
    assert [hits, chance] == pytest.approx(quoted(r"\(L0H0\.QK, key side\) has (\d+) of its top 20 "
                                                  r"tokens in the medical list, against ([\d.]+) by"), abs=0.05)
    hits, chance = _numbers(math, r"best update direction: L0H5\.QK direction \d sign [+-]1 "
                                  r"\(key\): (\d+)/20 domain tokens, ([\d.]+) expected")
    assert [hits, chance] == pytest.approx(quoted(r"\(L0H5\.QK, key side\) (\d+) of 20 are digits "
                                                  r"\(all ten\), against ([\d.]+)"), abs=0.05)
    assert _numbers(medical, r"L0\.mlp\.W_out (\d+)/20") == quoted(r"layer 0's ΔW_out top direction: (\d+)/20 medical")
    assert _numbers(math, r"L1\.mlp\.W_out (\d+)/20") == quoted(r"layer 1's: (\d+)/20 digits")
    assert _numbers(medical, r"best base direction: L3H3\.OV .*?: (\d+)/20") == quoted(
        r"\(medical: (\d+)/20, L3H3\.OV")
    assert _numbers(math, r"best base direction: \S+ .*?: (\d+)/20") == quoted(r"; math: (\d+)/20\)")
    lens = [int(x) for x in re.findall(r"activation-difference lens, layer \d: (\d+)/20", medical)]
    assert lens == [0, 0, 0, 0] and quoted(r"no medical word \((\d+)/20 per layer\)") == [0]
    lens = [int(x) for x in re.findall(r"activation-difference lens, layer \d: (\d+)/20", math)]
    most, layer = quoted(r"at most (\d+)/20 digits for math \(layer (\d)\)")
    assert max(lens) == most and lens.index(max(lens)) == layer


def test_patching_example(capsys):
    """examples/patching_medical.py, step by step on one attribution: path attribution recovers
    the whole change (first order does not), and the parts, heads and rankings
    docs/patching.md quotes."""
    quoted = quoter("patching.md")
    example = runpy.run_path(str(EXAMPLES / "patching_medical.py"))
    pair, metric = example["medical_pair_and_metric"]()
    att = example["tv_lens"].attribute(pair, metric, steps=32, progress=False)
    info = example["tv_lens"].completeness(att)
    assert info["difference"] > 10  # the fine-tune raised the answers' log-probability a lot
    assert abs(info["relative_gap"]) < 0.01, info
    assert abs(info["add_sum"] - info["difference"]) > 0.05 * info["difference"]  # first order is not
    assert [info["base"], info["tuned"]] == pytest.approx(
        quoted(r"rises from (−[\d.]+) to (−[\d.]+)\)"), abs=0.006)
    assert [info["path_sum"], info["difference"], 100 * info["relative_gap"]] == pytest.approx(
        quoted(r"sums to ([\d.]+) against a true change of ([\d.]+) \(gap ([\d.]+)%\)"), abs=0.006)
    share, add_sum = quoted(r"explains (\d+)% of it \(([\d.]+)\)")
    assert [100 * info["add_sum"] / info["difference"], info["add_sum"]] == pytest.approx(
        [share, add_sum], abs=0.6)

    parts = example["parts_table"](pair, metric, att).set_index("component")
    share = {kind: 100 * parts.loc[parts.kind == kind, "path_share"].sum()
             for kind in ("mlp", "attn", "unembed", "embed", "final_norm")}
    expected = quoted(r"MLP parts carry (\d+)% of the gain and attention parts (\d+)% \(the rest: "
                      r"unembedding (\d+)%, embeddings (\d+)%, final norm (−\d+)%\)")
    assert list(share.values()) == pytest.approx(expected, abs=0.6)
    best, l3, l0 = quoted(r"recovers at most (\d+)% \(unembed; L3\.mlp (\d+)%, L0\.mlp (\d+)%\)")
    assert parts.add_exact.idxmax() == "unembed"
    assert 100 * parts.add_exact[["unembed", "L3.mlp", "L0.mlp"]].to_numpy() == \
        pytest.approx([best, l3, l0], abs=0.6)
    assert 100 * parts.remove_exact.min() == pytest.approx(
        quoted(r"keeps at least ([\d.]+)%")[0], abs=0.06)

    heads, neurons = example["ranking"](pair, metric, att)
    added = heads.table[heads.table["mode"] == "add"].set_index("component").exact
    assert added.idxmax() == "L2H5"
    assert 100 * added.max() / info["difference"] == pytest.approx(
        quoted(r"adding one head recovers at most ([\d.]+)% \(L2H5\)")[0], abs=0.06)
    rho = {(name, r.mode): r.spearman for name, cmp in (("heads", heads), ("neurons", neurons))
           for r in cmp.correlations.itertuples()}
    expected = quoted(r"Spearman ([\d.]+) \(add\) / ([\d.]+) \(remove\) over all 32 heads and "
                      r"([\d.]+) / ([\d.]+) over the top-100 neurons")
    assert [rho["heads", "add"], rho["heads", "remove"], rho["neurons", "add"],
            rho["neurons", "remove"]] == pytest.approx(expected, abs=0.006)
    assert len(neurons.table) == 200 and len(heads.table) == 64
