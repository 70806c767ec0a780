"""The self-contained HTML report: offline, escaped, complete; rendered in headless Chromium."""

import re
import shutil
import subprocess

import pytest
import torch

import tv_lens
from tv_lens import ModelPair
from tv_lens.cli import main

PROMPT = "the cat sat on a mat </script><script>alert(1)</script>"


@pytest.fixture(scope="module")
def pair(llama_dirs):
    return ModelPair.from_pretrained(*llama_dirs)


@pytest.fixture(scope="module")
def full_report(pair, tmp_path_factory):
    analysis = tv_lens.analyze(pair, progress=False)
    analysis.info["metadata"]["tuned"] = "tuned <b>model</b>"
    patching = tv_lens.attribute(pair, tv_lens.metrics.loss(torch.tensor([[1, 5, 9, 17]])),
                                 progress=False)
    path = tmp_path_factory.mktemp("report") / "report.html"
    return tv_lens.report(analysis, path, pair=pair, prompt=PROMPT, patching=patching)


def _external_sources(text: str) -> list[str]:
    return re.findall(r"<(?:script|link|img)[^>]+(?:src|href)\s*=\s*[\"']?https?://", text)


def test_report_is_one_offline_file_with_every_section(full_report):
    text = full_report.read_text()
    assert not _external_sources(text)
    assert text.count("plotly.js v") <= 2 and text.count("var CircuitsVis") <= 1  # embedded once
    assert text.count('class="plotly-graph-div"') == 8  # summary, 2 heads, head labels,
    #                                                     neurons, spectrum, circuit, patching
    assert text.count("CircuitsVis.render(") == 3 + 3  # head tokens ×3, attention, 2 token views
    for heading in ("Summary: attention vs MLP", "Head labels", "What did the update write?",
                    "Circuit view", "On the prompt",
                    "Most-changed heads"):
        assert heading in text
    assert "Left out of this report" not in text
    assert "tuned &lt;b&gt;model&lt;/b&gt;" in text and "tuned <b>model</b>" not in text
    assert "alert(1)</script>" not in text  # the prompt is escaped everywhere
    assert full_report.stat().st_size < 10 * 2**20


def test_weight_only_report_says_what_it_left_out(pair, tmp_path):
    analysis = tv_lens.analyze(pair, progress=False)
    text = tv_lens.report(analysis, tmp_path / "r.html").read_text()
    assert "Left out of this report" in text and "pass pair=" in text and "--prompt" in text
    assert "var CircuitsVis" not in text  # no views, no bundle


def test_fast_report_draws_the_fast_spectrum(pair, tmp_path, monkeypatch):
    """A --fast analysis's report draws the top ``fast_rank`` values, as the analysis saw them
    (no exact decomposition of the most-changed matrix just for the figure)."""
    calls = []
    from tv_lens.analysis import spectrum

    real = spectrum.matrix_spectrum
    monkeypatch.setattr(spectrum, "matrix_spectrum",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    analysis = tv_lens.analyze(pair, progress=False, fast=True, fast_rank=12)
    text = tv_lens.report(analysis, tmp_path / "r.html", pair=pair).read_text()
    assert calls == [{"fast_rank": 12}] and "the top 12 singular values (--fast)" in text


def test_cli_writes_the_report(llama_dirs, tmp_path, capsys):
    assert main(["analyze", str(llama_dirs[0]), str(llama_dirs[1]), "--out", str(tmp_path),
                 "--prompt", "the cat sat"]) == 0
    assert "report: " in capsys.readouterr().out and (tmp_path / "report.html").is_file()
    assert "On the prompt" in (tmp_path / "report.html").read_text()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def test_report_renders_in_chromium_with_the_network_blocked(full_report):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium; "
                    "apt-get install chromium to run this test)")
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000",
         "--enable-logging=stderr", "--v=0", "--dump-dom", full_report.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom, log = run.stdout, run.stderr
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console[:3]
    assert dom.count('class="plot-container plotly"') == 8  # every plotly figure drew
    views = re.findall(r'<div id="circuits-vis-[^"]+"[^>]*>(.{0,40})', dom)
    assert len(views) == 6 and all(v.startswith("<div") for v in views), views  # all rendered
    assert "<script>alert(1)" not in dom.split("</head>", 1)[1].replace("&lt;script&gt;", "")


def test_report_on_a_one_layer_model(tmp_path):
    """One layer: no head composes with another, so the circuit view has no edges (it crashed
    on the empty composition table)."""
    import copy

    from conftest import llama_model, perturb

    base = llama_model(num_hidden_layers=1)
    pair = tv_lens.ModelPair(base, perturb(copy.deepcopy(base)))
    text = tv_lens.report(tv_lens.analyze(pair, progress=False), tmp_path / "r.html",
                          pair=pair).read_text()
    assert "Spectrum of the most-changed matrix" in text and "blocks.0." in text
