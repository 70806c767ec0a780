"""The activation-difference lens (Minder et al. 2025, "Narrow finetuning leaves clearly readable
traces in activation differences").

Run both models of a pair on the same (ideally unrelated, general-domain) texts, take per layer
the mean difference ``δ_l = mean(resid_tuned − resid_base)`` over the first ``positions`` tokens
of every text (BOS excluded), and read ``δ_l`` through the tuned model's final norm and ``W_U``:
``score_t = (γ ⊙ norm(δ_l)) · W_U[:, t]`` (the norm's bias is left out: it does not depend on
δ). A narrow fine-tune often shows its domain in these tokens even on unrelated text.

``patchscope=True`` adds the "patchscope" reading: ``δ_l`` (scaled to the base residual's mean
norm at that layer) is added to the base model's residual stream after layer ``l`` at those
positions, and the tokens whose log-probabilities the base then raises most are listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from tv_lens.components import stream_name
from tv_lens.errors import InvalidArgumentError, TvLensError
from tv_lens.pair import token_strings
from tv_lens.readouts import unembedding
from tv_lens.sources import check_runs_hooks
from tv_lens.spec import resolve_layers

COLUMNS = ["component", "layer", "reading", "rank", "token", "token_id", "score", "norm", "d_vocab"]


def _tokens(pair: Any, texts: Sequence[str], positions: int) -> tuple[Tensor, int]:
    """Token ids ``[batch, 1 + positions]`` (left-aligned, truncated) and the first non-BOS
    position. Texts shorter than ``positions`` tokens are refused with their index."""
    tok = pair.tokenizer
    if tok is None:
        raise TvLensError("The activation-difference lens runs both models on text, so it needs "
                          "a tokenizer: load the pair with ModelPair.from_pretrained(...) from "
                          "folders that hold tokenizer files.")
    ids = [tok(t)["input_ids"] for t in texts]
    tuned_tok = getattr(pair.tuned, "tokenizer", None)
    if tuned_tok is not None and tuned_tok is not tok:
        for text, x in zip(texts, ids):
            y = tuned_tok(text)["input_ids"]
            if x != y:
                raise TvLensError(
                    f"The two models tokenise {text[:60]!r} differently (base {x[:8]}…, tuned "
                    f"{y[:8]}…), so their residual streams cannot be compared position by "
                    "position. The lens needs fine-tunes that share the base's tokenizer: save "
                    "the base tokenizer next to the fine-tune's weights.")
    bos = getattr(tok, "bos_token_id", None)
    start = 1 if bos is not None and all(x and x[0] == bos for x in ids) else 0
    short = [i for i, x in enumerate(ids) if len(x) < start + positions]
    if short:
        raise InvalidArgumentError(f"Texts {short[:5]} have fewer than {positions} tokens after BOS; pass "
                          f"longer texts or a smaller positions=.")
    return torch.tensor([x[: start + positions] for x in ids]), start


def _final_norm(tv, delta: Tensor) -> Tensor:
    """``δ`` through the tuned model's final norm without its gain (applied with ``W_U`` by
    :func:`tv_lens.readouts.unembedding`): LayerNorm centres first; both scale to unit RMS."""
    if tv.spec.normalization.startswith("LN"):
        delta = delta - delta.mean(-1, keepdim=True)
    return delta / delta.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-30)


def activation_difference_lens(pair: Any, texts: Sequence[str], positions: int = 5,
                               layers: Sequence[int] | None = None, k: int = 20, *,
                               patchscope: bool = False, batch_size: int = 16) -> pd.DataFrame:
    """Per layer, the tokens the mean activation difference of the pair promotes (module
    docstring).

    Args:
        pair: a :class:`~tv_lens.ModelPair` (both models are run).
        texts: prompts, ideally unrelated to the fine-tuning domain.
        positions: tokens per text after BOS whose differences are averaged.
        layers: blocks to read (default all); the difference is taken after each block.
        k: tokens per reading.
        patchscope: also list the tokens the base model raises when ``δ_l`` is added to its
            residual stream after layer ``l``.
        batch_size: texts per forward pass.

    Returns:
        ``component`` (the residual stream read: ``L3.resid_post``), ``layer, reading
        ("logit_lens" | "patchscope"), rank, token, token_id, score``, ``norm`` (``‖δ_l‖``,
        the mean difference's norm at that layer) and ``d_vocab``.
    """
    if positions < 1 or k < 1:
        raise InvalidArgumentError(f"positions and k must be at least 1, got {positions} and {k}.")
    check_runs_hooks(pair, "The activation-difference lens")
    layers = resolve_layers(layers, pair.spec.n_layers)
    tokens, start = _tokens(pair, texts, positions)
    names = [f"blocks.{l}.hook_resid_post" for l in layers]
    tv = pair.tuning_vector()
    sums = {name: 0.0 for name in names}
    base_norms = {name: 0.0 for name in names}
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            batch = tokens[i:i + batch_size]
            caches = [m.run_with_cache(batch.to(_device(m)), names_filter=lambda n: n in sums)[1]
                      for m in (pair.base, pair.tuned)]
            for name in names:
                b, t = (c[name][:, start:].double().cpu() for c in caches)
                sums[name] = sums[name] + (t - b).sum((0, 1))
                base_norms[name] += float(b.norm(dim=-1).sum())
        count = len(tokens) * positions
        deltas = {name: sums[name] / count for name in names}
        W = unembedding(tv, tuned=True)
        rows = []
        for layer, name in zip(layers, names):
            scores = _final_norm(tv, deltas[name]) @ W
            rows += _top(layer, "logit_lens", scores, k)
            if patchscope:
                scale = base_norms[name] / count / float(deltas[name].norm().clamp(min=1e-30))
                rows += _top(layer, "patchscope",
                             _patched_gain(pair.base, tokens, name, deltas[name] * scale, start,
                                           batch_size), k)
    df = pd.DataFrame(rows, columns=["layer", "reading", "rank", "token_id", "score"])
    norms = {layer: float(deltas[name].norm()) for layer, name in zip(layers, names)}
    df["component"] = [stream_name(layer, "resid_post") for layer in df.layer]
    df["token"] = token_strings(pair.tokenizer, [int(i) for i in df.token_id])
    df["norm"] = df.layer.map(norms)
    df["d_vocab"] = pair.spec.d_vocab
    return df[COLUMNS]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _patched_gain(base: Any, tokens: Tensor, name: str, delta: Tensor, start: int,
                  batch_size: int) -> Tensor:
    """Mean rise of the base's next-token log-probabilities at the averaged positions when
    ``delta`` is added to its residual stream at hook ``name`` (``[vocab]``)."""
    total = 0.0
    add = delta.float()

    def hook(resid, hook=None):
        resid[:, start:] = resid[:, start:] + add.to(resid.device, resid.dtype)
        return resid

    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size].to(_device(base))
        clean = base(batch)[:, start:].double().log_softmax(-1)
        with base.hooks(fwd_hooks=[(name, hook)]):
            patched = base(batch)[:, start:].double().log_softmax(-1)
        total = total + (patched - clean).sum((0, 1)).cpu()
    return total / (len(tokens) * (tokens.shape[1] - start))


def _top(layer: int, reading: str, scores: Tensor, k: int) -> list[dict]:
    top = torch.topk(scores, min(k, scores.shape[0]))
    return [dict(layer=layer, reading=reading, rank=r, token_id=int(i), score=float(v))
            for r, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()))]

