"""circuitsvis views of the pair on a prompt: attention patterns, per-token effects, head tokens.

Each function returns a :class:`View`, a circuitsvis ``RenderedHTML`` that displays inline in
Jupyter and also remembers its element and props, so :func:`tv_lens.report` can embed the
circuitsvis bundle once and every view as a few bytes (``str(view)`` would point at a CDN).
The numbers come from the analysis layer (:mod:`tv_lens.metrics`, :mod:`tv_lens.readouts`).
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import torch
from circuitsvis.utils.render import RenderedHTML, render

from tv_lens.components import Component, Components, head_name
from tv_lens.errors import InvalidArgumentError, TvLensError


class View(RenderedHTML):
    """A circuitsvis ``RenderedHTML`` that also knows its element name and props."""

    def __init__(self, element: str, title: str = "", **props: Any):
        rendered = render(element, **props)
        super().__init__(rendered.local_src, rendered.cdn_src)
        self.element, self.title, self.props = element, title, props

    def __repr__(self) -> str:
        return f"View({self.element}, {self.title!r})"

    def snippet(self) -> str:
        """HTML that renders this view given the circuitsvis bundle loaded once on the page
        (props JSON with ``</`` escaped, so token strings cannot close the script)."""
        from circuitsvis.utils.convert_props import convert_props

        uuid = "circuits-vis-" + str(uuid4())[:13]
        props = convert_props(self.props).replace("</", "<\\/").replace("<!--", "<\\!--")
        return (f'<div id="{uuid}" style="margin: 15px 0;"></div>\n<script>\n'
                f'CircuitsVis.render("{uuid}", CircuitsVis.{self.element}, {props});\n</script>')


def _tokens(pair: Any, text: str) -> tuple[torch.Tensor, list[str]]:
    tokenizer = pair.tokenizer
    if tokenizer is None:
        raise TvLensError("Views on a prompt need a tokenizer; this pair's base model has none.")
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += tokenizer(text, add_special_tokens=False).input_ids
    from tv_lens.pair import token_strings

    return torch.tensor([ids]), token_strings(tokenizer, ids)


def _patterns(model: Any, tokens: torch.Tensor, layers: set[int]) -> dict[int, torch.Tensor]:
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {l: cache[f"blocks.{l}.attn.hook_pattern"][0].float().cpu() for l in layers}


def _heads(pair: Any, heads: Components) -> list[Component]:
    """The query heads named (``"L2H5"``, a list, a table's ``component`` column, ``"heads"``);
    a head's circuit (``"L2H5.OV"``) stands for its head."""
    index = pair.tuning_vector().components
    chosen = [index.parse(head_name(c.layer, c.head)) if c.kind == "circuit" else c
              for c in index.resolve(heads)]
    wrong = [c.name for c in chosen if c.kind != "head"]
    if wrong:
        raise InvalidArgumentError(f"{wrong[:3]} are not attention heads; name heads as 'L2H5'.")
    return chosen


def attention(pair: Any, prompt: str, heads: Components) -> View:
    """Attention patterns of ``heads`` (``"L2H5"``, ``["L0H1", "L1H3"]``) on ``prompt``: base,
    tuned and tuned − base side by side (circuitsvis ``AttentionHeads``)."""
    chosen = _heads(pair, heads)
    tokens, strings = _tokens(pair, prompt)
    layers = {c.layer for c in chosen}
    base, tuned = _patterns(pair.base, tokens, layers), _patterns(pair.tuned, tokens, layers)
    maps, names = [], []
    for c in chosen:
        l, h = c.layer, c.head
        maps += [base[l][h], tuned[l][h], tuned[l][h] - base[l][h]]
        names += [f"{c.name} {which}" for which in ("base", "tuned", "tuned−base")]
    return View("AttentionHeads", f"attention of {', '.join(c.name for c in chosen)}",
                attention=torch.stack(maps).tolist(), tokens=strings,
                attentionHeadNames=names, maxValue=1.0, minValue=-1.0)


def _token_losses(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    from tv_lens.metrics import model_logits

    with torch.no_grad():
        logprobs = model_logits(model, tokens)[0, :-1].float().log_softmax(-1)
    return -logprobs.gather(-1, tokens[0, 1:, None])[:, 0]


def token_loss_difference(pair: Any, text: str) -> View:
    """Per-token loss of the base minus the tuned model on ``text`` (positive = the fine-tune
    predicts that token better), as coloured tokens."""
    tokens, strings = _tokens(pair, text)
    diff = _token_losses(pair.base, tokens) - _token_losses(pair.tuned, tokens)
    values = [0.0] + diff.tolist()  # the first token is not predicted
    return View("ColoredTokens", "loss(base) − loss(tuned) per token", tokens=strings,
                values=values)


def token_effect(pair: Any, text: str, component: Components, mode: str = "add") -> View:
    """Per-token loss change when ``component``'s τ_c (any name or named group) is added to the
    base (or, with
    ``mode="remove"``, removed from the tuned model), as coloured tokens (positive = the patch
    lowers that token's loss)."""
    from tv_lens.sources import ModelWeights

    if mode not in ("add", "remove"):
        raise InvalidArgumentError(f"mode must be 'add' or 'remove', got {mode!r}.")
    tokens, strings = _tokens(pair, text)
    tv = pair.tuning_vector()
    cut = tv.components.deltas(tv, component)
    model = pair.base if mode == "add" else pair.tuned
    before = _token_losses(model, tokens)
    with ModelWeights(model).patched(cut, 1 if mode == "add" else -1):
        after = _token_losses(model, tokens)
    name = ", ".join(c.name for c in tv.components.resolve(component))
    return View("ColoredTokens", f"per-token loss change, {mode} {name}", tokens=strings,
                values=[0.0] + (before - after).tolist())


def head_tokens(pair: Any, head: str, k: int = 15) -> View:
    """The tokens whose logits ``head``'s ΔOV (``"L2H5"``) can move most
    (:func:`tv_lens.readouts.ov_tokens`), coloured by score."""
    from tv_lens.readouts import ov_tokens

    (c,) = _heads(pair, head)
    table = ov_tokens(pair, c.name, k)
    return View("ColoredTokens", f"tokens {c.name}'s ΔOV writes most",
                tokens=[f"{t} " for t in table.token], values=table.score.tolist(),
                minValue=float(table.score.min()), maxValue=float(table.score.max()))
