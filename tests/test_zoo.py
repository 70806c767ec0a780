"""Model zoos: per-fine-tune tables equal separate analyze runs, cross tables against direct
computations, serial = worker processes = Ray, a failing fine-tune does not lose the others, and
a killed run resumes to the same tables."""

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from conftest import llama_model, perturb, runs_once_in
from tv_lens import ModelPair, analyze
from tv_lens.zoo import analyze_zoo

# The zoo reads checkpoint files only (no code path of it differs between the TransformerLens
# lines): it runs once, in the TL 3.9 suite, which keeps both suites inside their time.
pytestmark = runs_once_in(3)

FAST = dict(null_samples=20, progress=False, threads=1)


@pytest.fixture(scope="module")
def zoo_dirs(save):
    """A tiny Llama base and three fine-tunes: two sharing most of their update, one not."""
    base = llama_model()
    shared = perturb(copy.deepcopy(base), scale=0.03, seed=11)
    a = perturb(copy.deepcopy(shared), scale=0.01, seed=12)
    b = perturb(copy.deepcopy(shared), scale=0.01, seed=13)
    c = perturb(copy.deepcopy(base), scale=0.03, seed=14)
    return save(base, "zoo_base"), {n: save(m, f"zoo_{n}") for n, m in
                                    (("a", a), ("b", b), ("c", c))}


@pytest.fixture(scope="module")
def serial(zoo_dirs):
    base, tuned = zoo_dirs
    return analyze_zoo(base, {k: str(v) for k, v in tuned.items()}, **FAST)


@pytest.mark.parametrize("options", [
    # every option off its default (intruders were fixed at (10, 0.5) in the zoo before)
    dict(k=4, tol=1e-5, level=0.05, labels="fixed", seed=3, intruder_k=3,
         intruder_epsilon=0.9, thresholds=None),
    dict(fast=True, fast_rank=12, k=6),
])
def test_the_zoo_takes_analyzes_own_options(zoo_dirs, options):
    """One AnalysisOptions for both: a zoo's tables equal analyze's under the same options,
    passed as an object or as keywords; the task key changes with any option."""
    from tv_lens.analysis.options import AnalysisOptions
    from tv_lens.zoo import ZooOptions

    base, tuned = zoo_dirs
    given = AnalysisOptions(null_samples=20, **options)
    zoo = analyze_zoo(base, {"a": str(tuned["a"])}, given, progress=False, threads=1)
    alone = analyze(ModelPair.from_pretrained(base, tuned["a"]), progress=False, **{
        "null_samples": 20, **options})
    for kind in ("heads", "neurons", "matrices", "summary"):
        pd.testing.assert_frame_equal(getattr(zoo.analyses["a"], kind), getattr(alone, kind))
    assert ZooOptions("b", {}, given).key() != ZooOptions("b", {}, AnalysisOptions(null_samples=20)).key()
    with pytest.raises(TypeError, match="'kk' is not an analysis option.*Did you mean 'k'"):
        analyze_zoo(base, {"a": str(tuned["a"])}, kk=3)


def _vector(base, tuned):
    return ModelPair.from_pretrained(base, tuned).tuning_vector()


def test_each_fine_tunes_tables_equal_a_separate_analyze(zoo_dirs, serial):
    base, tuned = zoo_dirs
    for name, folder in tuned.items():
        alone = analyze(ModelPair.from_pretrained(base, folder), null_samples=20, progress=False)
        for kind in ("heads", "neurons", "matrices", "summary"):
            pd.testing.assert_frame_equal(getattr(serial.analyses[name], kind), getattr(alone, kind))
    long = serial.heads
    assert list(long.columns[:3]) == ["model", "component", "layer"] and set(long.model) == {"a", "b", "c"}


def test_cross_tables_against_direct_computations(zoo_dirs, serial):
    base, tuned = zoo_dirs
    tv = {k: _vector(base, v) for k, v in tuned.items()}
    flat = {k: torch.cat([t[n].double().flatten() for n in t]) for k, t in tv.items()}
    for a in "abc":
        for b in "abc":
            want = float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm()))
            assert serial.similarity.loc[a, b] == pytest.approx(want, abs=1e-10)
    # a and b share most of their update, c does not: they cluster apart
    assert serial.similarity.loc["a", "b"] > 0.8 > 0.2 > abs(serial.similarity.loc["a", "c"])
    clusters = serial.clusters(0.5)
    assert clusters["a"] == clusters["b"] != clusters["c"]
    # per attention unit: cosine of the unit's own slices (a query head's W_Q/W_O; under
    # grouped-query attention its kv head's W_K/W_V on the kv head's own row)
    spec = tv["a"].spec
    assert spec.n_kv_heads < spec.n_heads  # the test model has grouped-query attention
    kv = spec.kv_head(3)
    pairs = serial.head_similarity.query("layer == 1 and model_a == 'a' and model_b == 'c'")
    for name, slices in (("L1H3", (("W_Q", 3), ("W_O", 3))), (f"L1KV{kv}", (("W_K", kv), ("W_V", kv)))):
        x, y = (torch.cat([t[f"blocks.1.attn.{m}"][i].double().flatten() for m, i in slices])
                for t in (tv["a"], tv["c"]))
        cosine = float(pairs.set_index("component").loc[name, "cosine"])
        assert cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-10), name
    # per matrix: principal angles of the top-r d_model-side subspaces, against scipy
    r = serial.info["rank"]
    row = serial.matrix_similarity.query("layer == 0 and matrix == 'W_out' and model_a == 'a' and model_b == 'b'")
    sub = {k: np.linalg.svd(tv[k]["blocks.0.mlp.W_out"].double().numpy())[2][:r].T for k in "ab"}
    angles = scipy.linalg.subspace_angles(sub["a"], sub["b"])
    assert float(row.shared_dims.iloc[0]) == pytest.approx(float(np.sum(np.cos(angles) ** 2)), abs=1e-6)
    assert float(row.baseline_shared_dims.iloc[0]) == pytest.approx(r * r / spec.d_model)
    # neurons: the union of each fine-tune's top updates, cosine of the neuron's slices
    row = serial.neuron_similarity.iloc[0]
    n, layer = int(row.neuron), int(row.layer)
    m = f"blocks.{layer}.mlp."
    x, y = (torch.cat([t[m + "W_in"][:, n], t[m + "W_gate"][:, n], t[m + "W_out"][n]]).double()
            for t in (tv[row.model_a], tv[row.model_b]))
    assert float(row.cosine) == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-10)
    # ... compared for exactly the union of each fine-tune's top-N neurons by update norm
    top = FAST.get("neurons", 20)
    for layer in range(spec.n_layers):
        m = f"blocks.{layer}.mlp."
        want = set()
        for t in tv.values():
            norms = (t[m + "W_in"].double().pow(2).sum(0) + t[m + "W_gate"].double().pow(2).sum(0)
                     + t[m + "W_out"].double().pow(2).sum(1))
            want |= set(torch.topk(norms, top).indices.tolist())
        assert set(serial.neuron_similarity.query("layer == @layer").neuron) == want
        assert len(serial.neuron_similarity.query("layer == @layer")) == 3 * len(want)
    shared = serial.shared("matrices", 0.5)
    worst = serial.matrix_similarity.groupby("component").cosine.min()
    assert set(shared.component) == set(worst[worst >= 0.5].index)
    assert list(shared.columns) == ["component", "min_cosine"]
    out = serial.matrix_similarity.query("layer == 0 and matrix == 'W_out'")
    assert set(out.component) == {"L0.mlp.W_out"} and set(out.param) == {"blocks.0.mlp.W_out"}
    assert set(serial.head_similarity.component) == (
        {f"L{l}H{h}" for l in range(spec.n_layers) for h in range(spec.n_heads)}
        | {f"L{l}KV{g}" for l in range(spec.n_layers) for g in range(spec.n_kv_heads)})
    first = serial.neuron_similarity.iloc[0]
    assert first.component == f"L{first.layer}N{first.neuron}" and pd.isna(first.expert)


def _assert_same(left, right):
    assert left.failed == right.failed
    for kind in ("heads", "neurons", "matrices", "summary", "head_similarity",
                 "matrix_similarity", "neuron_similarity"):
        pd.testing.assert_frame_equal(getattr(left, kind), getattr(right, kind), check_exact=True)
    pd.testing.assert_frame_equal(left.similarity, right.similarity, check_exact=True)


def test_workers_and_ray_give_identical_tables(zoo_dirs, serial):
    base, tuned = zoo_dirs
    tuned = {k: str(v) for k, v in tuned.items()}
    _assert_same(serial, analyze_zoo(base, tuned, workers=2, **FAST))
    import ray  # installed with the dev extra
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _assert_same(serial, analyze_zoo(base, tuned, ray=True, **FAST))
    finally:
        ray.shutdown()


def test_a_failing_fine_tune_is_reported_and_the_others_finish(zoo_dirs, serial, tmp_path, save):
    base, tuned = zoo_dirs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tuned["a"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((tuned["a"] / "model.safetensors").read_bytes()[:5000])
    gpt2 = save(__import__("conftest").gpt2_model(), "zoo_gpt2")
    zoo = analyze_zoo(base, {"a": str(tuned["a"]), "truncated": str(broken), "gpt2": str(gpt2)}, **FAST)
    assert list(zoo.analyses) == ["a"] and set(zoo.failed) == {"truncated", "gpt2"}
    assert "model.safetensors" in zoo.failed["truncated"] and "architecture" in zoo.failed["gpt2"]
    pd.testing.assert_frame_equal(zoo.analyses["a"].heads, serial.analyses["a"].heads)


class Killed(BaseException):
    """The process dying mid-way (pytest reserves KeyboardInterrupt for itself)."""


def test_a_killed_run_resumes_to_the_same_tables(zoo_dirs, serial, tmp_path, monkeypatch):
    import tv_lens.zoo as zoo_module

    base, tuned = zoo_dirs
    tuned = {k: str(v) for k, v in tuned.items()}
    real, calls = zoo_module.run_task, []

    def dies_at_layer_1(options, layer):
        calls.append(layer)
        if layer == 1:
            raise Killed
        return real(options, layer)

    monkeypatch.setattr(zoo_module, "run_task", dies_at_layer_1)
    with pytest.raises(Killed):
        analyze_zoo(base, tuned, out=tmp_path / "zoo", **FAST)
    assert calls == [0, 1]
    calls.clear()
    monkeypatch.setattr(zoo_module, "run_task", lambda options, layer: calls.append(layer) or real(options, layer))
    resumed = analyze_zoo(base, tuned, out=tmp_path / "zoo", **FAST)
    assert 0 not in calls and 1 in calls  # layer 0 was not computed again
    _assert_same(serial, resumed)
    assert (tmp_path / "zoo" / "similarity.csv").is_file()


def test_a_zoo_folder_is_never_unpickled(zoo_dirs, serial, tmp_path, monkeypatch):
    """Tasks and caches are JSON + safetensors records: a pickle planted where the old format
    kept tasks is never loaded (unpickling raises here), and the tasks' records resume."""
    import pickle

    import tv_lens.zoo as zoo_module

    base, tuned = zoo_dirs
    tuned = {k: str(v) for k, v in tuned.items()}
    out = tmp_path / "zoo"
    first = analyze_zoo(base, tuned, out=out, cache=tmp_path / "cache", **FAST)
    store = next((out / ".zoo-tasks").iterdir())
    assert sorted(p.suffix for p in store.iterdir()) == [".json"] * 3 + [".safetensors"] * 3
    for planted in (store / "L0.pkl", store / "L1.json", tmp_path / "cache" / "x.pt"):
        planted.write_bytes(pickle.dumps({"would": "run code"}))

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    calls = []
    real = zoo_module.run_task
    monkeypatch.setattr(zoo_module, "run_task",
                        lambda options, layer: calls.append(layer) or real(options, layer))
    again = analyze_zoo(base, tuned, out=out, cache=tmp_path / "cache", **FAST)
    assert calls == [1]  # the planted L1.json is not a record: recomputed; the others resumed
    _assert_same(first, again)


def test_a_changed_fine_tune_is_recomputed_and_said(zoo_dirs, serial, tmp_path, capsys, save):
    base, tuned = zoo_dirs
    folders = {k: tmp_path / k for k in ("a", "b")}
    for name, folder in folders.items():
        folder.mkdir()
        for f in Path(tuned[name]).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    names = {k: str(v) for k, v in folders.items()}
    analyze_zoo(base, names, out=tmp_path / "zoo", **FAST)
    capsys.readouterr()
    for f in Path(tuned["c"]).iterdir():  # b's files now hold fine-tune c
        (folders["b"] / f.name).write_bytes(f.read_bytes())
    changed = analyze_zoo(base, names, out=tmp_path / "zoo", **FAST)
    assert "the files of b changed since the stored tasks were computed; recomputing them" \
        in capsys.readouterr().out
    pd.testing.assert_frame_equal(changed.analyses["b"].heads, serial.analyses["c"].heads)


def test_cli_zoo_writes_the_tables(zoo_dirs, tmp_path, capsys):
    from tv_lens.cli import main

    base, tuned = zoo_dirs
    assert main(["zoo", str(base), *map(str, tuned.values()), "--out", str(tmp_path / "z"),
                 "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    assert "cosine similarity" in printed and "3 fine-tunes analysed" in printed
    sim = pd.read_csv(tmp_path / "z" / "similarity.csv", index_col=0)
    assert sim.shape == (3, 3) and np.allclose(np.diag(sim), 1.0)
    heads = pd.read_csv(tmp_path / "z" / "heads.csv")
    assert set(heads.model) == {p.name for p in tuned.values()}
    page = (tmp_path / "z" / "report.html").read_text()
    assert "Cosine similarity of the fine-tunes" in page and "https://" not in page.split("<body>")[1][:5000]
    assert main(["zoo", str(base), str(tuned["a"]), str(tmp_path / "nope"), "--out",
                 str(tmp_path / "z2")]) == 0
    assert "failed: nope" in capsys.readouterr().out
    assert main(["zoo", str(base), str(tmp_path / "nope"), "--out", str(tmp_path / "z3")]) == 2
    assert "Every fine-tune of the zoo failed: nope" in capsys.readouterr().err


def test_zoo_figures(serial):
    from tv_lens import viz
    from tv_lens.errors import TvLensError

    sim = viz.zoo_similarity(serial)
    order = list(sim.data[0].x)
    assert sorted(order) == ["a", "b", "c"] and abs(order.index("a") - order.index("b")) == 1
    heads = viz.zoo_heads(serial, "min")
    grid = serial.head_similarity.groupby(["layer", "head"]).cosine.min().unstack("head").to_numpy()
    assert np.allclose(np.asarray(heads.data[0].z, dtype=float), grid)
    bars = viz.zoo_matrices(serial)
    assert {t.name for t in bars.data} == {"a / b", "a / c", "b / c", "random baseline"}
    with pytest.raises(TvLensError, match="statistic"):
        viz.zoo_heads(serial, "median")


def test_base_decompositions_are_cached_under_the_bases_content_hash(zoo_dirs, serial, tmp_path,
                                                                      monkeypatch, save):
    """A second zoo of the same base reads every base decomposition from the cache (no
    decomposition computed) and gives the same tables; a changed base gets its own entry."""
    from tv_lens.analysis import run
    from tv_lens.zoo import content_hash

    base, tuned = zoo_dirs
    tuned = {k: str(v) for k, v in tuned.items()}
    first = analyze_zoo(base, tuned, cache=tmp_path / "cache", **FAST)
    _assert_same(serial, first)
    entries = sorted(p.name for p in (tmp_path / "cache" / content_hash(base)).iterdir())
    assert entries == [f"{n}.{s}" for n in ("L0", "L1", "embed") for s in ("json", "safetensors")]

    def no_base_decomposition(*args, **kwargs):
        raise AssertionError("the base was decomposed again")

    monkeypatch.setattr(run, "base_decompositions", no_base_decomposition)
    monkeypatch.setattr("tv_lens.zoo.base_decompositions", no_base_decomposition)
    _assert_same(serial, analyze_zoo(base, {"a": tuned["a"], "b": tuned["b"], "c": tuned["c"]},
                                     cache=tmp_path / "cache", **FAST))
    other = save(perturb(llama_model(), scale=1e-3, seed=5), "zoo_other_base")
    assert content_hash(other) != content_hash(base)


def test_randomized_subspace_matches_the_exact_one_on_a_trained_like_spectrum():
    """Above EXACT_SUBSPACE_UP_TO the zoo finds top-r update subspaces by a randomized range
    finder: on a power-law spectrum (σ_i ∝ i^−0.7, like trained weights) it recovers the exact
    top-8 subspace to Σ cos² θ within 1e-3 of 8."""
    from tv_lens.zoo import EXACT_SUBSPACE_UP_TO, _subspace

    g = torch.Generator().manual_seed(0)
    n, m = EXACT_SUBSPACE_UP_TO + 88, 900
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    S = torch.arange(1, n + 1, dtype=torch.float64) ** -0.7
    D = (U * S) @ V.T
    for right, want in ((False, U[:, :8]), (True, V[:, :8])):
        got = _subspace(D, 8, right=right)
        shared = float(torch.linalg.svdvals(got.T @ want).pow(2).sum())
        assert got.shape[1] == 8 and shared > 8 - 1e-3, (right, shared)


def test_workers_in_a_script_without_a_main_guard_are_explained(zoo_dirs, tmp_path):
    """Spawned workers import the script that made them: without `if __name__ == "__main__":`
    each would start the zoo again. The script gets one message naming the guard instead of
    multiprocessing's bootstrapping traceback."""
    import subprocess
    import sys

    base, tuned = zoo_dirs
    script = tmp_path / "unguarded.py"
    script.write_text(f"from tv_lens import analyze_zoo\n"
                      f"analyze_zoo({str(base)!r}, [{str(tuned['a'])!r}], workers=2, progress=False,"
                      f" null_samples=2)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "TvLensError: The zoo's worker processes stopped before finishing" in last, run.stderr[-2000:]
    assert 'under `if __name__ == "__main__":`' in last


def test_a_zoo_and_analyze_share_an_output_folder_and_old_output_is_updated(zoo_dirs, tmp_path):
    """A zoo written into analyze's output (and analyze into the zoo's) is tv_lens's own output
    both ways; a zoo folder of a version before markers and report signatures is updated."""
    from tv_lens.cli import main
    from tv_lens.staging import MARKER, REPORT_SIGNATURE

    base, tuned = zoo_dirs
    out = tmp_path / "shared"
    assert main(["analyze", str(base), str(tuned["a"]), "--out", str(out)]) == 0
    analyze_zoo(base, [str(tuned["a"])], out=out, **FAST)
    assert main(["analyze", str(base), str(tuned["a"]), "--out", str(out)]) == 0
    old = tmp_path / "old"
    analyze_zoo(base, [str(tuned["a"])], out=old, **FAST)
    (old / MARKER).unlink()
    report = old / "report.html"
    report.write_text(report.read_text().replace(REPORT_SIGNATURE, ""))
    analyze_zoo(base, [str(tuned["a"])], out=old, **FAST)
    assert (old / MARKER).is_file() and REPORT_SIGNATURE in report.read_text()
