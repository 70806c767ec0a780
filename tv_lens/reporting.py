"""One self-contained HTML report: the analysis tables, figures, circuit view and head views.

``report(analysis, path, pair=…, prompt=…)`` writes a single file that opens offline in any
browser: plotly.js and the circuitsvis bundle are embedded once each (not once per figure), no
script or stylesheet is loaded from the network, and every token string and model name is
HTML-escaped. Sections that need the weights (spectra, circuit view, head tokens) are written
when a ``pair`` (or a tuning vector with its base) is given; sections that run the models
(attention patterns, per-token effects) when a ``pair`` of loaded models and a ``prompt`` are
given. The report says which sections were left out and how to get them.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tv_lens.components import head_name
from tv_lens.protocols import PairLike
from tv_lens.staging import REPORT_SIGNATURE, check_report_path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; }
.note { color: #555; font-size: .9em; } .left-out { background: #fff8e1; padding: .5em 1em; }
code { background: #f4f4f4; padding: 0 .3em; }
.toks { margin: .3em 0; font-size: .9em; } .tok { padding: 1px 4px; margin: 0 2px; border-radius: 3px; font-family: monospace; }
"""


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _circuitsvis_js() -> str:
    import circuitsvis

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return bundle.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


class _Page:
    """Sections of HTML, with figures and views turned into embeddable snippets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.has_views = False

    def heading(self, text: str, note: str = "") -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        if note:
            self.parts.append(f'<p class="note">{html.escape(note)}</p>')

    def figure(self, fig) -> None:
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False,
                                      config={"displaylogo": False}))

    def view(self, view) -> None:
        self.has_views = True
        self.parts.append(f"<h3>{html.escape(view.title)}</h3>\n{view.snippet()}")

    def table(self, df: pd.DataFrame) -> None:
        self.parts.append(df.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}",
                                     na_rep=""))

    def html(self, title: str) -> str:
        head = [REPORT_SIGNATURE, f"<meta charset='utf-8'><title>{html.escape(title)}</title>",
                f"<style>{_STYLE}</style>", f"<script>{_plotly_js()}</script>"]
        if self.has_views:
            head.append(f"<script>{_circuitsvis_js()}</script>")
        return ("<!DOCTYPE html>\n<html><head>" + "\n".join(head) + "</head><body>\n"
                f"<h1>{html.escape(title)}</h1>\n" + "\n".join(self.parts) + "\n</body></html>")


#: Largest n_layers·n_heads for which the report computes all-pairs composition scores itself.
MAX_COMPOSITION_HEADS = 512


def _tuning_vector(pair: Any):
    if pair is None:
        return None
    tv = pair.tuning_vector()
    return tv if tv.base is not None else None


#: units the report reads as tokens: the most-changed head circuits and MLP matrices
READ_HEADS, READ_MATRICES = 16, 6


def _readouts(analysis, tv, pair: Any) -> pd.DataFrame | None:
    """:func:`~tv_lens.readouts.read_tokens` of the most-changed units (None without a
    tokenizer: token ids alone say little)."""
    from tv_lens.readouts import read_tokens

    tokenizer = getattr(pair, "tokenizer", None)
    if tokenizer is None:
        return None
    heads = analysis.heads.nlargest(READ_HEADS, "delta_norm")
    mlp = analysis.matrices[analysis.matrices.matrix.isin(["W_in", "W_gate", "W_out"])]
    mlp = mlp.nlargest(READ_MATRICES, "delta_norm")
    components = list(heads.component) + list(mlp.component)
    return read_tokens(tv, components, k=10, directions=2, tokenizer=tokenizer, progress=False)


def _token_lists(tokens: pd.DataFrame, n: int = 8) -> str:
    """The most concentrated update directions as rows of tokens shaded by their z."""
    from tv_lens.readouts import concentrated_units

    rows = []
    for r in concentrated_units(tokens, n).itertuples():
        sel = tokens[(tokens.component == r.component) & (tokens.source == "update")
                     & (tokens.direction == r.direction) & (tokens.sign == r.sign)
                     & (tokens.side == r.side)].sort_values("rank")
        top = max(float(sel.z.max()), 1e-9)
        spans = "".join(
            f'<span class="tok" style="background: rgba(214, 39, 40, {max(0.0, z) / top:.2f})" '
            f'title="z = {z:.1f}">{html.escape(str(t))}</span>' for t, z in zip(sel.token, sel.z))
        sign = "+" if r.sign > 0 else "−"
        rows.append(f"<div class=\"toks\"><b>{html.escape(r.component)}</b> direction {r.direction} "
                    f"({sign}, {html.escape(r.side)}; mean z {r.mean_z:.1f}): {spans}</div>")
    return "".join(rows)


def report(analysis, path: str | Path, *, pair: PairLike | None = None, prompt: str | None = None,
           composition: pd.DataFrame | None = None, patching: pd.DataFrame | None = None,
           title: str | None = None, k: int = 3) -> Path:
    """Write one self-contained HTML report and return its path.

    Args:
        analysis: the :class:`~tv_lens.Analysis` to report.
        path: the ``.html`` file to write (folders are created).
        pair: the :class:`~tv_lens.ModelPair` (or a tuning vector with its base) analysed:
            enables spectra, the circuit view and head token views; with loaded models and a
            ``prompt`` also attention patterns and per-token effects.
        prompt: text to show attention patterns and per-token loss differences on.
        composition: :func:`tv_lens.composition` scores (computed from ``pair`` if omitted).
        patching: a :func:`tv_lens.patch` or :func:`tv_lens.attribute` result to draw.
        title: page title (default: the two model names).
        k: how many of the most-changed heads get their own views.
    """
    from tv_lens import viz
    from tv_lens.analysis.spectrum import matrix_spectrum
    from tv_lens.circuits import composition as composition_scores

    started = time.perf_counter()
    info = analysis.info
    meta = info.get("metadata", {})
    names = (meta.get("base", "base"), meta.get("tuned", "tuned"))
    page, left_out = _Page(), []
    page.parts.append(f'<p class="note">{html.escape(names[0])} → {html.escape(names[1])}</p>')
    provenance = {k: info[k] for k in ("command", "arguments", "tv_lens_version",
                                      "torch_version", "k", "thresholds", "spec") if k in info}
    page.parts.append("<details><summary>How this report was made</summary><pre>"
                      + html.escape(json.dumps(provenance, indent=2, default=str))
                      + "</pre></details>")

    tv = _tuning_vector(pair)
    tokens = _readouts(analysis, tv, pair) if tv is not None else None

    page.heading("Summary: attention vs MLP", "Energy share of the update per layer and part, "
                 "and how much of it writes new directions, beside the random baselines.")
    page.figure(viz.summary(analysis))
    cols = [c for c in ("component", "energy_share", "new_frac", "amplified_frac",
                        "aligned_frac", "mean_new_share", "baseline_new_share", "baseline_new_share_weights")
            if c in analysis.summary]
    page.table(analysis.summary[cols])

    page.heading("Heads", "Share of each head's ΔOV / ΔQK inside the head's existing read and "
                 "write subspaces; colour centred on the weight-perturbation baseline.")
    page.figure(viz.heads(analysis, "OV", "subspace_share", tokens=tokens))
    page.figure(viz.heads(analysis, "QK", "subspace_share", tokens=tokens))
    mode = analysis.info.get("labels", "fixed")
    page.heading("Head labels", ("Calibrated" if mode == "calibrated" else "Fixed-threshold")
                 + " labels of each head's OV circuit"
                 + (": aligned = more inside its subspaces than a random perturbation of its "
                    "weights of the same size (q ≤ level); hover for z, p and q."
                    if mode == "calibrated" else "."))
    page.figure(viz.heads(analysis, "OV", "label"))
    page.heading("Neurons", "Cosine between each neuron's output-direction update and the "
                 "direction itself; the dashed band is a random update's.")
    page.figure(viz.neurons(analysis, "W_out"))

    if tokens is not None:
        page.heading("What did the update write?", "The update directions whose top tokens stand "
                     "out most from the vocabulary (mean z of their top 5) among the most-changed "
                     f"components ({tokens.component.nunique()} read); colour = z. "
                     "tv_lens.read_tokens(pair) reads every head circuit and MLP matrix.")
        page.parts.append(_token_lists(tokens))
    ov = analysis.heads[analysis.heads.circuit == "OV"]
    top = [head_name(l, h) for l, h in ov.nlargest(k, "delta_norm")[["layer", "head"]].itertuples(index=False)]
    if tv is not None:
        matrices = analysis.matrices.dropna(subset=["layer"])
        matrix, param = matrices.loc[matrices.relative_norm.idxmax(), ["component", "param"]]
        fast_rank = info.get("fast_rank") if info.get("fast") else None
        which = f"the top {fast_rank} singular values (--fast)" if fast_rank else "singular values"
        page.heading("Spectrum of the most-changed matrix", f"{matrix} ({param}): {which} of W and "
                     "Δ; Δ's top directions marked red where they match no direction of W (< 0.5).")
        page.figure(viz.spectrum(matrix_spectrum(tv, matrix, fast_rank=fast_rank)))
        scores = composition
        edges = "edges = largest changes in head composition."
        if scores is None and tv.spec.n_layers * tv.spec.n_heads <= MAX_COMPOSITION_HEADS:
            scores = composition_scores(pair)
        elif scores is None:
            edges = (f"no composition edges: this model has more than {MAX_COMPOSITION_HEADS} "
                     "heads, whose all-pairs scores would hold every layer's heads in memory; "
                     "pass composition=tv_lens.composition(pair) to draw them.")
        page.heading("Circuit view", "Heads and MLPs by layer; colour = new_share, size = update "
                     "norm (or patching effect); " + edges)
        page.figure(viz.circuit(analysis, scores, patching, tokens=tokens))
        if hasattr(pair, "tuning_vector") and getattr(pair, "tokenizer", None) is not None:
            page.heading("Most-changed heads: what their ΔOV writes")
            for head in top:
                page.view(viz.head_tokens(pair, head))
    else:
        left_out.append("spectra, the circuit view and head token views (they need the weights: "
                        "pass pair= to tv_lens.report)")
    if patching is not None:
        page.heading("Patching")
        page.figure(viz.patching(patching))
    runs_models = pair is not None and hasattr(type(pair), "base") and prompt
    if runs_models:
        page.heading("On the prompt", prompt)
        page.view(viz.attention(pair, prompt, top))
        page.view(viz.token_loss_difference(pair, prompt))
        if top:
            page.view(viz.token_effect(pair, prompt, top[0]))
    else:
        left_out.append("attention patterns and per-token effects (they run the models: pass "
                        "pair= and prompt=, or --prompt TEXT on the command line)")
    if left_out:
        page.heading("Left out of this report")
        page.parts.append('<ul class="left-out">' + "".join(
            f"<li>{html.escape(x)}</li>" for x in left_out) + "</ul>")
    page.parts.append(f'<p class="note">Written by tv_lens {html.escape(str(info.get("tv_lens_version", "")))} '
                      f"in {time.perf_counter() - started:.1f} s.</p>")
    path = Path(path)
    check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page.html(title or f"tv_lens: {names[0]} → {names[1]}"), encoding="utf-8")
    return path


def zoo_report(zoo, path: str | Path) -> Path:
    """A self-contained HTML report of a model zoo: similarity of the fine-tunes and their
    clusters, shared heads and matrices, and each fine-tune's summary."""
    from tv_lens import viz

    page = _Page()
    page.heading("Fine-tunes", "Cosine similarity of whole tuning vectors; clusters join "
                 "fine-tunes whose average cosine distance stays below 0.5.")
    page.figure(viz.zoo_similarity(zoo))
    page.table(zoo.clusters().rename_axis("model").reset_index())
    if zoo.failed:
        page.heading("Failed fine-tunes")
        page.table(pd.DataFrame({"model": list(zoo.failed), "why": list(zoo.failed.values())}))
    if len(zoo.analyses) >= 2:
        page.heading("Where they agree", "Per head the smallest cosine over pairs of fine-tunes "
                     "(high: every fine-tune changed the head alike); per matrix the shared "
                     "update directions against two random subspaces.")
        page.figure(viz.zoo_heads(zoo))
        page.figure(viz.zoo_matrices(zoo))
        shared = zoo.shared("heads", 0.5)
        page.parts.append(f"<p class='note'>{len(shared)} heads updated alike by every pair "
                          "(cosine ≥ 0.5).</p>")
    page.heading("Each fine-tune", "The summary table of every fine-tune's analysis.")
    page.table(zoo.summary.query("layer == 'all'"))
    path = Path(path)
    check_report_path(path)
    path.write_text(page.html(f"tv_lens zoo: {len(zoo.analyses)} fine-tunes of {zoo.info.get('base')}"),
                    encoding="utf-8")
    return path
