"""The shipped demo family: deterministic generation, offline loading, honest fine-tunes."""

import json
import time

import pytest
import torch

from conftest import runs_once_in
from tv_lens.demo import CHECKPOINTS, checkpoint_dir, load_base, load_pair
from tv_lens.demo.corpus import build_corpora, medical_facts
from tv_lens.demo.evaluate import evaluate
from tv_lens.demo.train import STAGES, ModelShape, make_model, train_stage, train_tokenizer


def test_corpora_are_deterministic_and_seeded():
    a, b, c = build_corpora(0), build_corpora(0), build_corpora(1)
    for domain in a:
        assert a[domain].train == b[domain].train and a[domain].eval == b[domain].eval
    assert a["general"].train != c["general"].train
    assert medical_facts(0) != medical_facts(1)


def test_eval_split_holds_out_phrasings_and_math_problems():
    corpora = build_corpora(0)
    for domain in ("medical", "math"):
        train_texts = {ex.text for ex in corpora[domain].train}
        held = [ex for ex in corpora[domain].eval if ex.phrasing == "held_out"]
        assert held and not any(ex.text in train_texts for ex in held)
    train_prompts = {ex.text.split("Answer:")[0] for ex in corpora["math"].train}
    math_eval = [ex for ex in corpora["math"].eval if ex.phrasing == "train"]
    assert math_eval and not any(ex.text.split("Answer:")[0] in train_prompts for ex in math_eval)
    facts = medical_facts(0)
    general = " ".join(ex.text for ex in corpora["general"].train)
    drug, condition = facts["asthma"]["drug"], "asthma"
    assert f"treatment for {condition}? Answer: {drug}" not in general  # base never sees facts


def test_tokenizer_training_reproduces_the_shipped_tokenizer():
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(checkpoint_dir("base"))
    fresh = train_tokenizer(build_corpora(0), ModelShape().vocab_size)
    assert fresh.get_vocab() == shipped.get_vocab()


def test_short_training_is_bitwise_deterministic():
    tok = train_tokenizer(build_corpora(0), ModelShape().vocab_size)
    texts = [ex.text for ex in build_corpora(0)["general"].train[:2000]]
    shape = ModelShape(d_model=32, n_layers=1, n_heads=4, n_key_value_heads=2, d_mlp=64)
    runs = []
    for _ in range(2):
        model = make_model(shape, tok, seed=0)
        losses = train_stage(model, texts, tok, STAGES[0], seed=0, steps=2, progress=False)
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_shipped_checkpoints_are_small_and_documented():
    total = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert total < 25 * 2**20
    for name in ("base", "medical", "math"):
        card = (checkpoint_dir(name) / "README.md").read_text()
        assert "LlamaForCausalLM" in card and "answer_acc" in card


def test_load_pair_offline_and_fast():
    started = time.perf_counter()
    pair = load_pair("medical")
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"load_pair took {elapsed:.1f}s"
    assert pair.spec.architecture == "LlamaForCausalLM" and pair.spec.n_kv_heads < pair.spec.n_heads
    assert load_base().cfg.n_layers == pair.spec.n_layers


@runs_once_in(4)  # HF models only
def test_fine_tunes_learned_their_domain():
    """Evaluated as training evaluated them (HF models, the LoRA merged), the fine-tunes learned
    their domain, and the numbers are exactly the recorded ones."""
    from transformers import AutoTokenizer

    from tv_lens.demo.train import load_trained

    stages = json.loads((CHECKPOINTS / "training.json").read_text())["stages"]
    models = {name: load_trained(CHECKPOINTS, name, stage) for name, stage in stages.items()}
    tok = AutoTokenizer.from_pretrained(CHECKPOINTS / "base")
    df = evaluate(models, tok)
    acc = df.set_index(["model", "domain"])["answer_acc"]
    loss = df.set_index(["model", "domain"])["loss"]
    assert acc["medical", "medical"] > acc["base", "medical"] + 0.3
    assert acc["medical_lora", "medical"] > acc["base", "medical"] + 0.3
    assert acc["math", "math"] > acc["base", "math"] + 0.3
    assert loss["medical", "medical"] < loss["base", "medical"] - 1.0
    assert loss["math", "math"] < loss["base", "math"] - 1.0
    recorded = json.loads((CHECKPOINTS / "training.json").read_text())["eval"]
    for r in recorded:
        assert r["answer_acc"] == pytest.approx(acc[r["model"], r["domain"]], abs=1e-9)
        assert r["loss"] == pytest.approx(loss[r["model"], r["domain"]], rel=1e-4)


def test_the_bridge_computes_the_trained_models_logits():
    """On both TransformerLens lines the bridge of a shipped fine-tune gives the logits of the
    HF model training evaluated (the evaluation above runs once, on HF models only)."""
    from tv_lens.demo.evaluate import domain_metrics
    from tv_lens.demo.train import load_trained

    stage = json.loads((CHECKPOINTS / "training.json").read_text())["stages"]["medical"]
    model = load_trained(CHECKPOINTS, "medical", stage)
    bridge = load_pair("medical").tuned  # with its own tokenizer, on the medical questions
    batch = domain_metrics("medical", bridge.tokenizer)["answer_acc"].batches(bridge)[0]
    with torch.no_grad():
        assert torch.allclose(bridge(batch.tokens), model(batch.tokens).logits, atol=1e-4)
