"""Tiny offline checkpoints built in code: Llama (GQA) and GPT-2, saved with a tokenizer."""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from jaxtyping import install_import_hook

from tv_lens.tl_compat import tl_version

# Check every jaxtyping shape annotation in tv_lens at test time (beartype at call boundaries):
# `import tv_lens` imports nothing (its names load on first use), so every module is imported
# here, under the hook.
with install_import_hook("tv_lens", "beartype.beartype"):
    import tv_lens

    for _module in pkgutil.walk_packages(tv_lens.__path__, "tv_lens."):
        importlib.import_module(_module.name)

def runs_once_in(major: int) -> pytest.MarkDecorator:
    """For tests with no TransformerLens code path (checkpoint files, linear algebra,
    statistics, HF models): they run once, in the suite of TransformerLens ``major`` (3: `make
    test-tl3`, 4: `make test`), not again in the other; CI runs the two suites side by side, so
    this keeps each inside its time."""
    line = {3: "TL 3.9 suite (make test-tl3)", 4: "TL 4.x suite (make test)"}[major]
    return pytest.mark.skipif(tl_version()[0] != major,
                              reason=f"no TransformerLens code path: runs once, in the {line}")


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang Question Answer "
         "what is one two three four five six seven eight nine zero").split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _build(config_cls, model_cls, defaults: dict, seed: int, **overrides):
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**defaults, **overrides}))


def llama_model(seed: int = 0, vocab: int = 96, **overrides):
    """A tiny Llama with grouped-query attention (4 query heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaConfig, LlamaForCausalLM, _LLAMA_LIKE, seed, vocab_size=vocab, **overrides)


def qwen2_model(seed: int = 0, vocab: int = 96, **overrides):
    """A tiny Qwen2: Llama layout plus Q/K/V biases, grouped-query attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2Config, Qwen2ForCausalLM, _LLAMA_LIKE, seed, vocab_size=vocab, **overrides)


def gpt2_model(seed: int = 0, vocab: int = 96, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    # n_ctx: the Hub's GPT-2 config.json carries it beside n_positions, and TL 3.9 reads it
    defaults = dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, n_ctx=32, bos_token_id=1,
                    eos_token_id=2)
    return _build(GPT2Config, GPT2LMHeadModel, defaults, seed, vocab_size=vocab, **overrides)


def perturb(model, scale: float = 0.05, seed: int = 1):
    """Add seeded Gaussian noise to every parameter (a stand-in for a full fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def save(tmp_path_factory, tokenizer) -> Callable[..., Path]:
    """``save(model, name)`` writes model + tokenizer to a fresh folder and returns it."""

    def _save(model, name: str, tok=None) -> Path:
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        (tok or tokenizer).save_pretrained(folder)
        return folder

    return _save


@pytest.fixture(scope="session")
def llama_dirs(save) -> tuple[Path, Path]:
    """A tiny Llama (GQA: 4 query heads, 2 kv heads) and a fully perturbed copy."""
    return save(llama_model(), "llama_base"), save(perturb(llama_model()), "llama_tuned")


@pytest.fixture(scope="session")
def gpt2_dirs(save) -> tuple[Path, Path]:
    return save(gpt2_model(), "gpt2_base"), save(perturb(gpt2_model()), "gpt2_tuned")


@pytest.fixture(scope="session")
def qwen2_dirs(save) -> tuple[Path, Path]:
    return save(qwen2_model(), "qwen2_base"), save(perturb(qwen2_model()), "qwen2_tuned")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def family_dirs(request, llama_dirs, gpt2_dirs):
    return request.param, (llama_dirs if request.param == "llama" else gpt2_dirs)


@pytest.fixture
def tokens():
    return torch.tensor([[1, 5, 9, 17, 33, 40, 2, 7], [1, 60, 61, 12, 4, 8, 90, 3]])
