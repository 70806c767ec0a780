"""circuitsvis views of the pair on a prompt: attention patterns, per-token effects, head tokens.

Each function returns a :class:`View`, a circuitsvis ``RenderedHTML`` that displays inline in
Jupyter and also remembers its element and props, so :func:`tv_lens.report` can embed the
circuitsvis bundle once and every view as a few bytes (``str(view)`` would point at a CDN).
The numbers come from the analysis layer (:mod:`tv_lens.metrics`, :mod:`tv_lens.readouts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import torch
from circuitsvis.utils.render import RenderedHTML, render

from tv_lens.components import head_name
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
    from tv_lens.readouts import token_strings

    return torch.tensor([ids]), token_strings(tokenizer, ids)


def _patterns(model: Any, tokens: torch.Tensor, layers: set[int]) -> dict[int, torch.Tensor]:
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {l: cache[f"blocks.{l}.attn.hook_pattern"][0].float().cpu() for l in layers}


def attention(pair: Any, prompt: str, heads: Sequence[tuple[int, int]]) -> View:
    """Attention patterns of ``heads`` (``[(layer, head), …]``) on ``prompt``: base, tuned and
    tuned − base side by side (circuitsvis ``AttentionHeads``)."""
    if not heads:
        raise InvalidArgumentError("Pass at least one (layer, head) to view.")
    tokens, strings = _tokens(pair, prompt)
    layers = {l for l, _ in heads}
    base, tuned = _patterns(pair.base, tokens, layers), _patterns(pair.tuned, tokens, layers)
    maps, names = [], []
    for l, h in heads:
        maps += [base[l][h], tuned[l][h], tuned[l][h] - base[l][h]]
        names += [f"{head_name(l, h)} {which}" for which in ("base", "tuned", "tuned−base")]
    return View("AttentionHeads", f"attention of {', '.join(f'L{l}H{h}' for l, h in heads)}",
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


def token_effect(pair: Any, text: str, component: str, mode: str = "add") -> View:
    """Per-token loss change when component ``component``'s τ_c is added to the base (or, with
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
    return View("ColoredTokens", f"per-token loss change, {mode} {component}", tokens=strings,
                values=[0.0] + (before - after).tolist())


def head_tokens(pair: Any, layer: int, head: int, k: int = 15) -> View:
    """The tokens whose logits the head's ΔOV can move most (:func:`tv_lens.readouts.ov_tokens`),
    coloured by score."""
    from tv_lens.readouts import ov_tokens

    table = ov_tokens(pair, layer, head, k)
    return View("ColoredTokens", f"tokens L{layer}H{head}'s ΔOV writes most",
                tokens=[f"{t} " for t in table.token], values=table.score.tolist(),
                minValue=float(table.score.min()), maxValue=float(table.score.max()))
