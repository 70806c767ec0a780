"""Metrics against direct computations, and their errors."""

import pytest
import torch

from tv_lens import ModelPair, TvLensError, metrics


@pytest.fixture(scope="module")
def pair(llama_dirs):
    return ModelPair.from_pretrained(*llama_dirs)


PROMPTS = ["the cat sat on", "what is one two", "the dog ran to the"]
ANSWERS = [" a mat", " three", " park"]


def _ids(tokenizer, text):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids


def test_loss_equals_cross_entropy_over_all_tokens(pair, tokenizer):
    texts = ["the cat sat on a mat", "birds sang", "what is one two three four five"]
    m = metrics.loss(texts, tokenizer, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # one text at a time, no padding
            ids = torch.tensor([_ids(tokenizer, text)])
            logits = pair.base(ids)[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert m.value(pair.base) == pytest.approx(nll / count, rel=1e-5)
    per_text = m.per_example(pair.base)
    assert per_text.shape == (3,) and per_text.min() > 0


def test_answer_logprob_accuracy_and_logit_diff_by_hand(pair, tokenizer):
    lp = metrics.answer_logprob(PROMPTS, ANSWERS, tokenizer, batch_size=2)
    acc = metrics.answer_accuracy(PROMPTS, ANSWERS, tokenizer)
    diff = metrics.logit_diff(PROMPTS, [" mat", " three", " cat"], [" the", " one", " sat"],
                              tokenizer)
    expected_lp, expected_acc, expected_diff = [], [], []
    with torch.no_grad():
        for prompt, answer, c, i in zip(PROMPTS, ANSWERS, diff.correct, diff.incorrect):
            head, full = _ids(tokenizer, prompt), _ids(tokenizer, prompt + answer)
            logits = pair.base(torch.tensor([full]))[0]
            logprobs = logits.log_softmax(-1)
            span = range(len(head), len(full))
            expected_lp.append(sum(logprobs[t - 1, full[t]].item() for t in span))
            expected_acc.append(all(logits[t - 1].argmax().item() == full[t] for t in span))
            last = pair.base(torch.tensor([head]))[0, -1]
            c_id, i_id = (tokenizer(x, add_special_tokens=False).input_ids[0] for x in (c, i))
            expected_diff.append((last[c_id] - last[i_id]).item())
    assert lp.value(pair.base) == pytest.approx(sum(expected_lp) / 3, rel=1e-5)
    torch.testing.assert_close(lp.per_example(pair.base), torch.tensor(expected_lp), rtol=1e-5,
                               atol=1e-5)
    assert acc.value(pair.base) == pytest.approx(sum(expected_acc) / 3)
    assert diff.value(pair.base) == pytest.approx(sum(expected_diff) / 3, rel=1e-5, abs=1e-6)


def test_metric_errors_name_the_problem(pair, tokenizer):
    with pytest.raises(TvLensError, match="3 prompts and 2 answers"):
        metrics.answer_logprob(PROMPTS, ANSWERS[:2], tokenizer)
    with pytest.raises(TvLensError, match="not one string"):
        metrics.loss("the cat", tokenizer)
    with pytest.raises(TvLensError, match="single-token answers"):
        metrics.logit_diff(["the cat"], [" sat on"], [" ran"], tokenizer).value(pair.base)
    with pytest.raises(TvLensError, match="nothing to score"):
        metrics.loss([""], tokenizer).value(pair.base)
    with pytest.raises(TvLensError, match="no tokenizer"):
        metrics.loss(["the cat"]).value(torch.nn.Linear(2, 2))
    with pytest.raises(TvLensError, match=r"returned a tensor of shape \(2,\)"):
        metrics.as_metric(lambda m: torch.ones(2)).value(pair.base)
    with pytest.raises(TvLensError, match="returned nan"):
        metrics.as_metric(lambda m: torch.tensor(float("nan"))).value(pair.base)
    with pytest.raises(TvLensError, match="returned a str"):
        metrics.as_metric(lambda m: "high").value(pair.base)
    with pytest.raises(TvLensError, match="Expected a tv_lens metric or a callable"):
        metrics.as_metric(3)


def test_metric_without_tokenizer_borrows_the_first_models(pair):
    m = metrics.answer_logprob(PROMPTS, ANSWERS)
    value = m.value(pair.base)
    assert m.batches()[0].tokens[0, 0] == pair.base.tokenizer.bos_token_id
    assert value == pytest.approx(metrics.answer_logprob(PROMPTS, ANSWERS,
                                                         pair.base.tokenizer).value(pair.base))
