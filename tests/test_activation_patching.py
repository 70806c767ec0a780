"""Cross-model activation patching: planted differences are found where they were planted."""

import pytest
import torch

from conftest import gpt2_model, make_tokenizer, perturb
from tv_lens import ModelPair, TvLensError, activation_patch, metrics

TEXTS = ["the cat sat on a mat", "the dog ran to the park"]


@pytest.fixture(scope="module")
def planted(save):
    """GPT-2 pair differing only in head 2's value weights in layer 1."""
    base, tuned = perturb(gpt2_model(), 0.2), perturb(gpt2_model(), 0.2)  # weights of some size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # c_attn is [d_model, 3·d_model]: V of head 2 is columns 64+16..64+24
        tuned.transformer.h[1].attn.c_attn.weight[:, 80:88] += 3 * torch.randn(32, 8, generator=g)
    return ModelPair.from_pretrained(save(base, "ap_b"), save(tuned, "ap_t"))


def test_only_the_planted_head_carries_the_difference(planted):
    metric = metrics.loss(TEXTS)
    df = activation_patch(planted, metric, ["attn.hook_z", "hook_resid_post"], progress=False)
    assert list(df.columns) == ["component", "into", "hook", "layer", "head", "pos", "base",
                                "tuned", "patched", "normalized"]
    assert df.set_index(["hook", "head"]).component.loc[("blocks.1.attn.hook_z", 2)].iloc[0] == "L1H2"
    assert set(df[df.hook.str.endswith("resid_post")].component) == {"L0.resid_post", "L1.resid_post"}
    by_name = activation_patch(planted, metric, ["L1.resid_post", "L1.attn"], progress=False)
    assert by_name.hook.tolist() == ["blocks.1.hook_resid_post", "blocks.1.hook_attn_out"] * 2
    assert by_name.set_index(["into", "hook"]).normalized.equals(
        activation_patch(planted, metric, ["blocks.1.hook_resid_post", "blocks.1.hook_attn_out"],
                         progress=False).set_index(["into", "hook"]).normalized)
    assert abs(df.tuned.iloc[0] - df.base.iloc[0]) > 0.1
    z = df[df.hook.str.endswith("hook_z")].set_index(["into", "layer", "head"]).normalized
    assert len(z) == 2 * 2 * 4  # receivers × layers × heads
    assert z["base", 1, 2] == pytest.approx(1.0, abs=1e-5)
    assert z["tuned", 1, 2] == pytest.approx(0.0, abs=1e-5)
    others = z.drop([("base", 1, 2), ("tuned", 1, 2)])
    assert (others["base"].abs() < 1e-5).all() and ((others["tuned"] - 1).abs() < 1e-5).all()
    resid = df[df.hook.str.endswith("resid_post")].set_index(["into", "layer"]).normalized
    assert resid["base", 0] == pytest.approx(0.0, abs=1e-5)  # before the change
    assert resid["base", 1] == pytest.approx(1.0, abs=1e-5)  # after it: all of it


def test_each_position_and_one_direction(planted):
    metric = metrics.loss(["the cat sat on a mat"])
    df = activation_patch(planted, metric, "blocks.1.hook_resid_post", positions="each",
                          into="base", progress=False)
    n_tokens = metric.batches()[0].tokens.shape[1]
    assert df.pos.tolist() == list(range(n_tokens)) and set(df.into) == {"base"}
    # each position's residual carries that position's share; later tokens see no other change
    # in the last layer, so the per-position effects add up to the whole effect
    assert df.normalized.sum() == pytest.approx(1.0, abs=1e-4)


def test_activation_patching_refuses_bad_input(planted, save):
    metric = metrics.loss(TEXTS)
    with pytest.raises(TvLensError, match="no hook point 'blocks.0.hook_resid_pr'.*Did you mean"):
        activation_patch(planted, metric, "blocks.0.hook_resid_pr", progress=False)
    with pytest.raises(TvLensError, match="positions='each' needs inputs of one length"):
        activation_patch(planted, metrics.loss(TEXTS + ["the cat"], batch_size=1),
                         positions="each", progress=False)
    with pytest.raises(TvLensError, match="a plain function"):
        activation_patch(planted, lambda m: m(torch.tensor([[1, 2]])).sum(), progress=False)
    with pytest.raises(TvLensError, match="into must be one of"):
        activation_patch(planted, metric, into="sideways")
    with pytest.raises(TvLensError, match="layers \\[5\\] are out of range"):
        activation_patch(planted, metric, layers=[5], progress=False)


def test_different_tokenizers_are_refused(save):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "▁the", "▁cat"])}
    raw = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                    eos_token="</s>", pad_token="<pad>")
    pair = ModelPair.from_pretrained(save(gpt2_model(), "tok_a"),
                                     save(gpt2_model(), "tok_b", tok=other))
    with pytest.raises(TvLensError, match="tokenise 'the dog' differently"):
        activation_patch(pair, metrics.loss(["the dog"]), progress=False)
    assert make_tokenizer  # the shared fixture tokenizer is the default one
