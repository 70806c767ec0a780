"""Held-out loss and exact-match answer accuracy on the demo domains, for any causal LM.

Built on :mod:`tv_lens.metrics` (one implementation for evaluation and patching):
:func:`domain_metrics` gives a domain's held-out split as metrics (``loss`` over every line,
``answer_acc`` and ``answer_logprob`` over its questions), and :func:`evaluate` tabulates them
for several models. Hugging Face causal LMs and TransformerLens bridges both work, so the same
numbers come out for the shipped checkpoints, a ``ModelPair``'s models and a model with a tuning
vector applied.

Answer accuracy is greedy exact match: the model is right when, after ``Answer:``, greedy decoding
produces exactly the answer tokens (including the final ``.``), computed by teacher forcing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tv_lens import metrics
from tv_lens.demo.corpus import build_corpora
from tv_lens.errors import InvalidArgumentError

HALVES = ("validation", "test")


def domain_metrics(domain: str, tokenizer: Any = None, *, seed: int = 0,
                   phrasing: str | None = None, half: str | None = None,
                   batch_size: int = 64) -> dict[str, metrics.Metric]:
    """A demo domain's held-out split as metrics: ``loss`` (every line, token-weighted) and,
    where the split has questions, ``answer_acc`` and ``answer_logprob``.

    Args:
        domain: ``"general"``, ``"medical"`` or ``"math"``.
        tokenizer: the family's tokenizer (``None``: the first model evaluated lends its own).
        seed: corpus seed (the shipped family uses 0).
        phrasing: ``"held_out"`` or ``"train"`` to keep only questions in those phrasings.
        half: ``"validation"`` (even positions of the eval split) or ``"test"`` (odd positions).
    """
    corpora = build_corpora(seed)
    if half not in (None, *HALVES):
        raise InvalidArgumentError(f"half must be None, 'validation' or 'test', got {half!r}.")
    if domain not in corpora:
        raise InvalidArgumentError(f"Unknown domain {domain!r}; choose from {sorted(corpora)}.")
    examples = [ex for i, ex in enumerate(corpora[domain].eval)
                if (phrasing is None or ex.phrasing == phrasing)
                and (half is None or i % 2 == HALVES.index(half))]
    out: dict[str, metrics.Metric] = {
        "loss": metrics.loss([ex.text for ex in examples], tokenizer, batch_size=batch_size,
                             name=f"{domain} loss")}
    questions = [ex for ex in examples if ex.answer is not None]
    if questions:
        prompts = [ex.prompt for ex in questions]
        answers = [ex.text[len(ex.prompt):] for ex in questions]
        for name, make in (("answer_acc", metrics.answer_accuracy),
                           ("answer_logprob", metrics.answer_logprob)):
            out[name] = make(prompts, answers, tokenizer, batch_size=batch_size,
                             name=f"{domain} {name}")
    return out


def evaluate(models: Mapping[str, object] | object, tokenizer, *, seed: int = 0,
             domains: Sequence[str] = ("general", "medical", "math"),
             phrasing: str | None = None, half: str | None = None) -> pd.DataFrame:
    """Held-out loss and answer accuracy per model and domain.

    Args:
        models: one model, or a mapping ``name -> model`` (HF causal LM or TransformerBridge).
        tokenizer: the family's tokenizer (``bridge.tokenizer`` works).
        seed, phrasing, half: select the examples, as in :func:`domain_metrics`.

    Returns:
        One row per (model, domain): ``model, domain, loss, answer_acc, n_questions``;
        ``answer_acc`` is NaN where the split has no questions.
    """
    if not isinstance(models, Mapping):
        models = {"model": models}
    per_domain = {d: domain_metrics(d, tokenizer, seed=seed, phrasing=phrasing, half=half)
                  for d in domains}
    rows = []
    for name, model in models.items():
        for domain, ms in per_domain.items():
            acc = ms.get("answer_acc")
            rows.append(dict(model=name, domain=domain, loss=ms["loss"].value(model),
                             answer_acc=acc.value(model) if acc else float("nan"),
                             n_questions=len(acc.prompts) if acc else 0))
    return pd.DataFrame(rows)
