"""Held-out loss and exact-match answer accuracy on the demo domains, for any causal LM.

``evaluate`` accepts Hugging Face causal LMs (anything whose output has ``.logits``) and
TransformerLens bridges (whose forward returns logits), so the same numbers come out for the
shipped checkpoints, for a ``ModelPair``'s models and for a model with a tuning vector applied.

Answer accuracy is greedy exact match: the model is right when, after ``Answer:``, greedy decoding
produces exactly the answer tokens (including the final ``.``). It is computed by teacher forcing
(greedy decoding reproduces a sequence iff every argmax along it matches), so one batched forward
pass scores many questions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tv_lens.demo.corpus import Example, build_corpora


HALVES = ("validation", "test")


def _logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def _right_padded(rows: Sequence[list[int]], pad_id: int) -> Int[Tensor, "batch pos"]:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


@torch.no_grad()
def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 64,
                   device: str | torch.device | None = None) -> pd.DataFrame:
    """Per example: mean next-token loss over the whole line, and whether the answer is exact.

    Returns one row per example with columns ``domain, kind, phrasing, loss, n_tokens, correct``
    (``correct`` is NaN for lines without an answer).
    """
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, answer_spans = [], []
        for ex in chunk:
            # Explicit BOS, no tokenizer specials: a bridge's tokenizer may add BOS itself.
            seq = [bos] + tokenizer(ex.text, add_special_tokens=False).input_ids
            span = None
            if ex.answer is not None:
                prompt = [bos] + tokenizer(ex.prompt, add_special_tokens=False).input_ids
                # Tokenization is word-local (Metaspace pre-tokenizer), so the prompt's tokens
                # are a prefix of the line's; check rather than assume.
                if seq[: len(prompt)] != prompt:
                    raise ValueError(f"prompt/answer tokenization is not word-local for {ex.text!r}")
                span = (len(prompt), len(seq))
            ids.append(seq)
            answer_spans.append(span)
        tokens = _right_padded(ids, pad)
        if device is not None:
            tokens = tokens.to(device)
        logits = _logits(model, tokens).float()
        logprobs = logits[:, :-1].log_softmax(-1)
        targets = tokens[:, 1:]
        nll = -logprobs.gather(-1, targets[..., None])[..., 0]
        greedy = logits[:, :-1].argmax(-1)
        for i, (ex, seq, span) in enumerate(zip(chunk, ids, answer_spans)):
            n = len(seq) - 1
            correct = float("nan")
            if span is not None:
                a, b = span
                correct = float(bool((greedy[i, a - 1 : b - 1] == tokens[i, a:b]).all()))
            rows.append(dict(domain=ex.domain, kind=ex.kind, phrasing=ex.phrasing,
                             loss=nll[i, :n].mean().item(), n_tokens=n, correct=correct))
    return pd.DataFrame(rows)


def evaluate(models: Mapping[str, object] | object, tokenizer, *, seed: int = 0,
             domains: Sequence[str] = ("general", "medical", "math"),
             phrasing: str | None = None, half: str | None = None,
             device: str | torch.device | None = None) -> pd.DataFrame:
    """Held-out loss and answer accuracy per model and domain.

    Args:
        models: one model, or a mapping ``name -> model`` (HF causal LM or TransformerBridge).
        tokenizer: the family's tokenizer (``bridge.tokenizer`` works).
        seed: corpus seed (the shipped family uses 0).
        domains: which eval splits to score.
        phrasing: ``"held_out"`` or ``"train"`` to score only questions in those phrasings;
            ``None`` scores the whole eval split.
        half: ``"validation"`` (even positions of the eval split) or ``"test"`` (odd positions),
            for choosing a hyper-parameter on one half and reporting on the other.

    Returns:
        One row per (model, domain): ``model, domain, loss, answer_acc, n_questions``;
        ``answer_acc`` is NaN where the split has no questions.
    """
    if not isinstance(models, Mapping):
        models = {"model": models}
    corpora = build_corpora(seed)
    if half not in (None, *HALVES):
        raise ValueError(f"half must be None, 'validation' or 'test', got {half!r}.")
    unknown = sorted(set(domains) - set(corpora))
    if unknown:
        raise ValueError(f"Unknown domain(s) {unknown}; choose from {sorted(corpora)}.")
    rows = []
    for name, model in models.items():
        for domain in domains:
            examples = [ex for i, ex in enumerate(corpora[domain].eval)
                        if (phrasing is None or ex.phrasing == phrasing)
                        and (half is None or i % 2 == HALVES.index(half))]
            scores = score_examples(model, tokenizer, examples, device=device)
            weights = scores["n_tokens"]
            questions = scores["correct"].dropna()
            rows.append(dict(model=name, domain=domain,
                             loss=float((scores["loss"] * weights).sum() / weights.sum()),
                             answer_acc=float(questions.mean()) if len(questions) else float("nan"),
                             n_questions=len(questions)))
    return pd.DataFrame(rows)
