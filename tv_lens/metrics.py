"""Metrics: the scalar ``f(model)`` that patching and attribution measure.

A :class:`Metric` holds its inputs (texts, or prompts and answers) and a differentiable reduction
``logits -> scalar``, evaluated batch by batch. Holding the inputs is what lets exact patching
re-evaluate it many times, attribution take one backward pass per batch, and activation
patching run both models on the very same tokens. Four are built in:

- :func:`loss`: mean next-token loss over every token of some texts (token-weighted);
- :func:`answer_logprob`: mean over questions of ``log p(answer | prompt)`` (the sum of the
  answer tokens' log-probabilities);
- :func:`answer_accuracy`: greedy exact-match accuracy of the answers (teacher-forced: greedy
  decoding reproduces the answer iff every argmax along it matches). It is a step function of
  the weights and has no gradient, so attribution refuses it;
- :func:`logit_diff`: mean over prompts of ``logit[correct] − logit[incorrect]`` at the prompt's
  last position.

A plain callable ``f(model) -> scalar tensor`` is accepted wherever a metric is (see
:func:`as_metric`), except by activation patching, which must feed the model tokens itself.

Tokenisation: each text is ``[BOS] + tokenizer(text, add_special_tokens=False)`` (no tokenizer
specials, so a bridge's tokenizer and the HF one agree); answers are scored on the tokens of
``prompt + answer`` that follow the prompt's tokens (checked to be a prefix: start answers with
their space, ``" Paris"``, as in TransformerLens). Without ``tokenizer=`` the first model the metric is
evaluated on lends its ``model.tokenizer``, and the tokens are kept from then on, so both models
of a pair are scored on the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tv_lens.errors import InvalidArgumentError, TvLensError


@dataclass
class Batch:
    """One batch of a metric's inputs, right-padded.

    Attributes:
        tokens: ``[batch, pos]`` token ids.
        targets: ``[batch, pos - 1]`` booleans: which next-token predictions the metric reads.
        extra: metric-specific tensors (e.g. the answer token ids of :func:`logit_diff`).
    """

    tokens: Int[Tensor, "batch pos"]
    targets: Bool[Tensor, "batch pos_minus_1"]
    extra: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device),
                     {k: v.to(device) for k, v in self.extra.items()})


def model_logits(model: Any, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of a TransformerBridge (returns them) or an HF causal LM (``.logits``)."""
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _wide(logits: Tensor) -> Tensor:
    """Logits in at least float32 (float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def check_value(value: Any, name: str, *, need_grad: bool = False) -> Tensor:
    """``value`` as a finite scalar tensor, or a :class:`TvLensError` saying what is wrong."""
    if not isinstance(value, Tensor):
        if isinstance(value, (int, float)) and not need_grad:
            value = torch.tensor(float(value))
        else:
            raise TvLensError(f"The metric {name!r} returned a {type(value).__name__}; a metric "
                              "must return a scalar torch tensor (e.g. logits[..., i].mean()).")
    if value.numel() != 1:
        raise TvLensError(f"The metric {name!r} returned a tensor of shape {tuple(value.shape)}; "
                          "it must return a scalar. Reduce it, e.g. with .mean() or .sum().")
    if not torch.isfinite(value).all():
        raise TvLensError(f"The metric {name!r} returned {value.item()}; patching needs a finite "
                          "value. Check for log(0) or a division by zero in the metric.")
    if need_grad and not value.requires_grad:
        raise TvLensError(
            f"The metric {name!r} has no gradient with respect to the weights, which attribution "
            "needs. Step functions such as accuracy or argmax have none: attribute a smooth "
            "metric instead (answer_logprob, loss or logit_diff) and check with exact patching."
        )
    return value.reshape(())


class Metric:
    """A scalar function of a model's logits on fixed inputs (see the module docstring).

    Subclasses build :class:`Batch` es from a tokenizer (:meth:`_batches`) and reduce one batch's
    logits to its share of the total (:meth:`_numerators`, divided by :attr:`denominator`).
    """

    #: Whether the metric has a gradient (accuracy does not).
    differentiable: bool = True

    def __init__(self, name: str, texts: Sequence[str], tokenizer: Any = None,
                 batch_size: int = 32, prepend_bos: bool = True):
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}.")
        self.name = name
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prepend_bos = prepend_bos
        self._cache: tuple[Any, list[Batch], float] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.texts)} inputs)"

    # ------------------------------------------------------------------ inputs
    def batches(self, model: Any = None) -> list[Batch]:
        """The tokenised inputs (with the metric's tokenizer, else ``model.tokenizer``)."""
        return self._prepared(model)[1]

    @property
    def denominator(self) -> float:
        if self._cache is None:
            raise TvLensError(f"The metric {self.name!r} has not been tokenised yet; "
                              "evaluate it on a model first.")
        return self._cache[2]

    def _prepared(self, model: Any) -> tuple[Any, list[Batch], float]:
        if self._cache is not None and self.tokenizer in (None, self._cache[0]):
            return self._cache  # without tokenizer=, the first model's tokenizer is kept
        tokenizer = self.tokenizer or getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise TvLensError(f"The metric {self.name!r} has texts but no tokenizer, and the model "
                              "has none either. Pass tokenizer=... when building the metric.")
        batches, denominator = self._batches(tokenizer)
        if denominator <= 0:
            raise TvLensError(f"The metric {self.name!r} has nothing to score (no tokens or no "
                              "questions). Pass at least one non-empty input.")
        self._cache = (tokenizer, batches, float(denominator))
        return self._cache

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        """``[BOS] + tokenizer(text)`` without the tokenizer's own specials."""
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        bos = getattr(tokenizer, "bos_token_id", None)
        return ([bos] if self.prepend_bos and bos is not None else []) + ids

    def _batches(self, tokenizer: Any) -> tuple[list[Batch], float]:
        raise NotImplementedError  # each built-in metric defines its inputs

    def _numerators(self, logits: Tensor, batch: Batch) -> Float[Tensor, " batch"]:
        raise NotImplementedError  # each built-in metric defines its reduction

    # ------------------------------------------------------------------ evaluation
    def term(self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Float[Tensor, ""]:
        """One batch's share of the metric: the metric is the sum of the terms of all batches."""
        return self._numerators(_wide(logits), batch).sum() / self.denominator

    def terms(self, model: Any) -> Iterator[Float[Tensor, ""]]:
        """Each batch's term, evaluated on ``model`` (one forward pass per batch)."""
        device = model_device(model)
        for batch in self.batches(model):
            batch = batch.to(device)
            yield self.term(model_logits(model, batch.tokens), batch)

    def __call__(self, model: Any) -> Tensor:
        """The metric on ``model`` (differentiable when gradients are enabled)."""
        return sum(self.terms(model))

    def value(self, model: Any) -> float:
        """The metric on ``model`` as a float (no gradient), checked to be a finite scalar."""
        with torch.no_grad():
            return float(check_value(self(model), self.name))

    @torch.no_grad()
    def per_example(self, model: Any) -> Float[Tensor, " n"]:
        """The metric's value for each input separately (e.g. each question's log-probability;
        each text's mean token loss for :func:`loss`)."""
        device = model_device(model)
        out = []
        for batch in self.batches(model):
            batch = batch.to(device)
            out.append(self._per_example(model_logits(model, batch.tokens), batch))
        return torch.cat(out)

    def _per_example(self, logits: Tensor, batch: Batch) -> Tensor:
        return self._numerators(_wide(logits), batch)


def _pad(rows: Sequence[list[int]], pad_id: int) -> Int[Tensor, "batch pos"]:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _next_token_logprobs(logits: Tensor, tokens: Tensor) -> Float[Tensor, "batch pos_minus_1"]:
    logprobs = logits[:, :-1].log_softmax(-1)
    return logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


class _Texts(Metric):
    """Metrics over whole texts: every next-token prediction after BOS counts."""

    def __init__(self, name: str, texts: Sequence[str] | Int[Tensor, "batch pos"], tokenizer=None,
                 batch_size: int = 32, prepend_bos: bool = True):
        if isinstance(texts, str):
            raise InvalidArgumentError("Pass a list of texts, not one string: loss([text]).")
        self.tokens = texts if isinstance(texts, Tensor) else None
        if self.tokens is not None and (self.tokens.ndim != 2 or self.tokens.shape[1] < 2):
            raise InvalidArgumentError(f"Token ids must be a [batch, pos] tensor with pos >= 2, got shape "
                              f"{tuple(self.tokens.shape)}.")
        super().__init__(name, [] if self.tokens is not None else texts, tokenizer, batch_size,
                         prepend_bos)

    def _prepared(self, model: Any):
        if self.tokens is None:
            return super()._prepared(model)
        if self._cache is None:
            t = self.tokens.long()
            batches = [Batch(t[i:i + self.batch_size],
                             torch.ones(len(t[i:i + self.batch_size]), t.shape[1] - 1, dtype=torch.bool))
                       for i in range(0, len(t), self.batch_size)]
            self._cache = (None, batches, float(t.shape[0] * (t.shape[1] - 1)))
        return self._cache

    def _batches(self, tokenizer: Any) -> tuple[list[Batch], float]:
        pad, batches, total = _pad_id(tokenizer), [], 0
        for i in range(0, len(self.texts), self.batch_size):
            rows = [self.encode(tokenizer, t) for t in self.texts[i:i + self.batch_size]]
            lengths = torch.tensor([len(r) for r in rows])
            tokens = _pad(rows, pad)
            targets = torch.arange(tokens.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
            batches.append(Batch(tokens, targets))
            total += int(targets.sum())
        return batches, float(total)


class Loss(_Texts):
    """Mean next-token cross-entropy over all tokens of the texts (token-weighted)."""

    def _numerators(self, logits: Tensor, batch: Batch) -> Tensor:
        nll = -_next_token_logprobs(logits, batch.tokens)
        return (nll * batch.targets).sum(-1)

    def _per_example(self, logits: Tensor, batch: Batch) -> Tensor:
        return self._numerators(_wide(logits), batch) / batch.targets.sum(-1).clamp(min=1)


class _Answers(Metric):
    """Metrics over (prompt, answer) pairs: the answer tokens' predictions count."""

    def __init__(self, name: str, prompts: Sequence[str], answers: Sequence[str], tokenizer=None,
                 batch_size: int = 32, prepend_bos: bool = True):
        if isinstance(prompts, str) or isinstance(answers, str):
            raise InvalidArgumentError("Pass lists of prompts and answers, not single strings.")
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers):
            raise InvalidArgumentError(f"Got {len(prompts)} prompts and {len(answers)} answers; pass one "
                              "answer per prompt.")
        self.prompts, self.answers = prompts, answers
        super().__init__(name, [p + a for p, a in zip(prompts, answers)], tokenizer, batch_size,
                         prepend_bos)

    def _batches(self, tokenizer: Any) -> tuple[list[Batch], float]:
        pad, batches = _pad_id(tokenizer), []
        for i in range(0, len(self.prompts), self.batch_size):
            rows, spans = [], []
            for prompt, answer in zip(self.prompts[i:i + self.batch_size],
                                      self.answers[i:i + self.batch_size]):
                full, head = self.encode(tokenizer, prompt + answer), self.encode(tokenizer, prompt)
                if full[:len(head)] != head or len(full) == len(head):
                    raise TvLensError(
                        f"The answer {answer!r} does not tokenise as tokens after the prompt "
                        f"{prompt!r} (the prompt's tokens are not a prefix of prompt + answer's, "
                        "or the answer is empty). Start the answer with its space (' Paris') and "
                        "end the prompt at a token boundary.")
                rows.append(full)
                spans.append((len(head), len(full)))
            tokens = _pad(rows, pad)
            pos = torch.arange(1, tokens.shape[1])[None, :]  # the position each prediction targets
            start = torch.tensor([a for a, _ in spans])[:, None]
            end = torch.tensor([b for _, b in spans])[:, None]
            batches.append(Batch(tokens, (pos >= start) & (pos < end)))
        return batches, float(len(self.prompts))


class AnswerLogprob(_Answers):
    """Mean over questions of ``log p(answer | prompt)``."""

    def _numerators(self, logits: Tensor, batch: Batch) -> Tensor:
        return (_next_token_logprobs(logits, batch.tokens) * batch.targets).sum(-1)


class AnswerAccuracy(_Answers):
    """Greedy exact-match answer accuracy (no gradient)."""

    differentiable = False

    def _numerators(self, logits: Tensor, batch: Batch) -> Tensor:
        right = logits[:, :-1].argmax(-1) == batch.tokens[:, 1:]
        return (right | ~batch.targets).all(-1).double()  # counts: exact in float64


class LogitDiff(Metric):
    """Mean over prompts of ``logit[correct] − logit[incorrect]`` at the last prompt token."""

    def __init__(self, name: str, prompts: Sequence[str], correct: Sequence[str | int],
                 incorrect: Sequence[str | int], tokenizer=None, batch_size: int = 32,
                 prepend_bos: bool = True):
        if isinstance(prompts, str):
            raise InvalidArgumentError("Pass a list of prompts, not one string.")
        if not len(prompts) == len(correct) == len(incorrect):
            raise InvalidArgumentError(f"Got {len(prompts)} prompts, {len(correct)} correct and "
                              f"{len(incorrect)} incorrect answers; pass one of each per prompt.")
        self.correct, self.incorrect = list(correct), list(incorrect)
        super().__init__(name, prompts, tokenizer, batch_size, prepend_bos)

    def _token_id(self, tokenizer: Any, answer: str | int) -> int:
        if isinstance(answer, int):
            return answer
        ids = tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise InvalidArgumentError(f"logit_diff needs single-token answers; {answer!r} is {len(ids)} "
                              f"tokens {ids}. Pass a token id or a shorter answer.")
        return ids[0]

    def _batches(self, tokenizer: Any) -> tuple[list[Batch], float]:
        pad, batches = _pad_id(tokenizer), []
        for i in range(0, len(self.texts), self.batch_size):
            rows = [self.encode(tokenizer, t) for t in self.texts[i:i + self.batch_size]]
            tokens = _pad(rows, pad)
            last = torch.tensor([len(r) - 1 for r in rows])
            ids = [[self._token_id(tokenizer, a) for a in answers[i:i + self.batch_size]]
                   for answers in (self.correct, self.incorrect)]
            targets = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
            batches.append(Batch(tokens, targets, {"last": last, "correct": torch.tensor(ids[0]),
                                                   "incorrect": torch.tensor(ids[1])}))
        return batches, float(len(self.texts))

    def _numerators(self, logits: Tensor, batch: Batch) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        final = logits[rows, batch.extra["last"]]
        return final[rows, batch.extra["correct"]] - final[rows, batch.extra["incorrect"]]


class FunctionMetric(Metric):
    """A plain ``f(model) -> scalar tensor``, usable by weight patching and attribution."""

    def __init__(self, fn: Callable[[Any], Tensor], name: str | None = None):
        super().__init__(name or getattr(fn, "__name__", "metric"), [])
        self.fn = fn

    def terms(self, model: Any) -> Iterator[Tensor]:
        yield self.fn(model)

    def __call__(self, model: Any) -> Any:
        return self.fn(model)

    def batches(self, model: Any = None) -> list[Batch]:
        raise TvLensError(
            f"The metric {self.name!r} is a plain function, so tv_lens cannot feed it cached "
            "activations. Activation patching needs a metric that holds its inputs: "
            "tv_lens.metrics.loss, answer_logprob, answer_accuracy or logit_diff."
        )

    def per_example(self, model: Any) -> Tensor:
        return torch.stack([check_value(self.fn(model), self.name)])


#: What every patching function accepts as a metric.
MetricLike = Metric | Callable[[Any], Tensor]


def as_metric(metric: Any) -> Metric:
    """``metric`` itself, or a plain callable wrapped as a :class:`FunctionMetric`."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return FunctionMetric(metric)
    raise InvalidArgumentError(f"Expected a tv_lens metric or a callable f(model) -> scalar tensor, got "
                      f"a {type(metric).__name__}.")


# ---------------------------------------------------------------------- constructors
def loss(texts: Sequence[str] | Int[Tensor, "batch pos"], tokenizer: Any = None, *,
         batch_size: int = 32, prepend_bos: bool = True, name: str = "loss") -> Loss:
    """Mean next-token loss over every token of ``texts`` (or of a ``[batch, pos]`` tensor of
    token ids, used as is: no BOS added, every position counts)."""
    return Loss(name, texts, tokenizer, batch_size, prepend_bos)


def answer_logprob(prompts: Sequence[str], answers: Sequence[str], tokenizer: Any = None, *,
                   batch_size: int = 32, prepend_bos: bool = True,
                   name: str = "answer_logprob") -> AnswerLogprob:
    """Mean over questions of ``log p(answer | prompt)`` (summed over the answer's tokens)."""
    return AnswerLogprob(name, prompts, answers, tokenizer, batch_size, prepend_bos)


def answer_accuracy(prompts: Sequence[str], answers: Sequence[str], tokenizer: Any = None, *,
                    batch_size: int = 32, prepend_bos: bool = True,
                    name: str = "answer_acc") -> AnswerAccuracy:
    """Greedy exact-match accuracy: the share of questions whose every answer token is the
    model's argmax (teacher-forced). No gradient."""
    return AnswerAccuracy(name, prompts, answers, tokenizer, batch_size, prepend_bos)


def logit_diff(prompts: Sequence[str], correct: Sequence[str | int],
               incorrect: Sequence[str | int], tokenizer: Any = None, *, batch_size: int = 32,
               prepend_bos: bool = True, name: str = "logit_diff") -> LogitDiff:
    """Mean over prompts of ``logit[correct] − logit[incorrect]`` at the last prompt token
    (single-token answers, as strings or token ids)."""
    return LogitDiff(name, prompts, correct, incorrect, tokenizer, batch_size, prepend_bos)
