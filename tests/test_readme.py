"""The README is a short guide whose code runs.

Every ```python block of README.md runs as written, in order and in one namespace, on the shipped
demo pair; so do the blocks of the ``docs/`` pages, page by page, except a block that needs what
the suite does not have (a 7B folder, SAELens), which the page marks with a ``<!-- not run: why
-->`` comment on the line above its fence. Files the blocks write land in a temporary folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
_FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not run\b[^>]*-->\s*$")


def python_blocks(text: str) -> tuple[list[str], list[str]]:
    """The ```python blocks of a Markdown text: (to run, marked not run)."""
    run, skipped = [], []
    for match in _FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        (skipped if _NOT_RUN.search(before) else run).append(match.group(1))
    return run, skipped


def run_blocks(blocks: list[str], name: str) -> dict:
    """Execute ``blocks`` in order in one fresh namespace and return it."""
    namespace: dict = {"__name__": f"doc:{name}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{name} (python block {i + 1})", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def _own_grad_mode():
    """A block may switch autograd off, as scripts may; the tests after it get it back."""
    with torch.enable_grad():
        yield


def test_readme_is_a_short_guide():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    run, skipped = python_blocks(text)
    assert run and not skipped  # every README block runs as written


def test_readme_links_every_docs_page_and_nothing_missing():
    text = README.read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t}
    assert {t for t in targets if not (ROOT / t).exists()} == set()
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md")} <= targets


def test_readme_troubleshooting_is_part_of_the_tested_list():
    """Each error the README lists is one of docs/bad-input.md's cases (which
    tests/test_bad_input.py generates from the cases it runs)."""
    section = README.read_text().split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    listed = [line for line in section.splitlines() if line.startswith("- ")]
    all_cases = set((DOCS / "bad-input.md").read_text().splitlines())
    assert listed and [line for line in listed if line not in all_cases] == []


def _cli_help(command: str, capsys) -> str:
    from tv_lens.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_readme_command_line_uses_real_commands_and_options(capsys):
    """Each `tv-lens` example names a subcommand and options it has; every option the section
    mentions is one of some subcommand's."""
    section = README.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    helps = {}
    examples = [line.split("#")[0] for line in section.splitlines() if line.startswith("tv-lens ")]
    assert len(examples) >= 3
    for line in examples:
        command = line.split()[1]
        helps.setdefault(command, _cli_help(command, capsys))
        assert [o for o in re.findall(r"--[a-z-]+", line) if o not in helps[command]] == []
    assert set(helps) == {"analyze", "demo", "zoo"}
    known = " ".join(helps.values())
    assert [o for o in set(re.findall(r"--[a-z][a-z-]+", section)) if o not in known] == []


def test_readme_recipe_runs_on_the_demo_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, _ = python_blocks(README.read_text())
    ns = run_blocks(run, "README.md")
    pair, metric, removed = ns["pair"], ns["metric"], ns["removed"]
    assert list(ns["analysis"].summary.part.unique()) == ["attn", "mlp"]
    assert ns["att"].columns[0] == "component" and ns["att"].component.is_unique
    # The named group is one row, equal to taking every MLP update out of the tuned model by hand.
    assert list(removed.component) == ["all_mlp"]
    row = removed.iloc[0]
    mlp_updates = pair.tuning_vector().select(parts=("mlp",))
    with torch.no_grad(), (-1 * mlp_updates).applied(pair.tuned):
        by_hand = float(metric(pair.tuned))
    assert row.patched == pytest.approx(by_hand, rel=1e-5, abs=1e-5)
    assert math.isfinite(row.normalized)
    quoted = re.search(r"0 = base; ([\d.]+) on this pair", " ".join(README.read_text().split()))
    assert row.normalized == pytest.approx(float(quoted.group(1)), abs=0.006)
    heads, neurons = ns["analysis"].heads, ns["analysis"].neurons
    ov, out = heads[heads.circuit == "OV"], neurons[neurons.matrix == "W_out"]
    text = " ".join(README.read_text().split())
    quoted = re.search(r"median excess of ([\d.]+) \(enrichment ([\d.]+)\), the neurons' output "
                       r"updates (−?[\d.]+)", text)
    assert [ov.excess.median(), ov.enrichment.median(), out.excess.median()] == pytest.approx(
        [float(x.replace("−", "-")) for x in quoted.groups()], abs=0.006)
    report = tmp_path / "report.html"
    assert report.stat().st_size > 100_000 and "<html" in report.read_text()[:2000].lower()


PAGES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())[0]],
                         ids=lambda p: p.name)
def test_docs_page_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_blocks(python_blocks(page.read_text())[0], f"docs/{page.name}")


def test_docs_blocks_are_runnable_or_say_why_not():
    """A page's block is run, or marked with its reason; a page has at most the blocks it shows."""
    for page in PAGES:
        text = page.read_text()
        run, skipped = python_blocks(text)
        assert len(run) + len(skipped) == text.count("```python"), page.name
        for block in skipped:  # not run, but still Python
            compile(block, page.name, "exec")
        for reason in re.findall(r"<!--\s*not run\b([^>]*)-->", text):
            assert len(reason.strip(" :")) > 10, (page.name, reason)
