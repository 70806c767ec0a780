"""Train the shipped demo family: a Llama-architecture base and two full fine-tunes of it.

Run ``python -m tv_lens.demo.train --out DIR`` (about 15 minutes on 2 CPU cores). The script is
seeded end to end: the same seed, torch version and thread count reproduce the weights bit for
bit (the test suite checks the corpus and one training step; the shipped weights are stored in
float32, about 4 MB per model).

Stages:
1. a byte-free BPE tokenizer trained on all three training corpora;
2. ``base``: pre-trained from scratch on the *general* corpus;
3. ``medical`` and ``math``: full fine-tunes of ``base`` on each domain's training split;
4. ``medical_lora``: a rank-8 LoRA fine-tune of ``base`` on the medical split (PEFT adapter folder:
   ``adapter_config.json`` + ``adapter_model.safetensors``; needs ``peft``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tv_lens.demo.corpus import Corpus, build_corpora

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the demo family (LlamaForCausalLM)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_key_value_heads: int = 2
    d_mlp: int = 384
    n_ctx: int = 128
    vocab_size: int = 1024


@dataclass(frozen=True)
class Stage:
    """One training run: which corpus, how long, how fast."""

    name: str
    corpus: str
    steps: int
    lr: float
    warmup: int
    batch_size: int = 32
    block_size: int = 64
    replay: float = 0.0  # general-corpus lines mixed in per domain line, fresh each epoch
    lora_rank: int = 0  # > 0: train a LoRA adapter of this rank instead of every weight


#: What the LoRA stage adapts: every attention and MLP projection (PEFT module names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


STAGES = (
    Stage("base", "general", steps=3000, lr=3e-3, warmup=100),
    Stage("medical", "medical", steps=800, lr=1e-3, warmup=30, replay=0.5),
    Stage("math", "math", steps=3000, lr=3e-3, warmup=30, replay=1.0),
    Stage("medical_lora", "medical", steps=1200, lr=1e-2, warmup=30, replay=0.5,
          lora_rank=8),
)


def train_tokenizer(corpora: dict[str, Corpus], vocab_size: int):
    """A BPE tokenizer (Metaspace words, single digits) in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    texts = [ex.text for c in corpora.values() for ex in c.train]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def make_model(shape: ModelShape, tokenizer, seed: int):
    """A freshly initialised LlamaForCausalLM of the demo shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.d_model,
        intermediate_size=shape.d_mlp, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_key_value_heads,
        max_position_embeddings=shape.n_ctx, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def packed_blocks(texts: list[str], tokenizer, block_size: int, rng: random.Random) -> torch.Tensor:
    """Shuffle ``texts``, join them with EOS and cut the stream into ``[n, block_size]``."""
    order = texts[:]
    rng.shuffle(order)
    ids: list[int] = []
    for text in order:
        ids.extend(tokenizer(text).input_ids + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


def batches(texts: list[str], tokenizer, stage: Stage, seed: int, replay_texts: list[str] = ()):
    """Endless stream of ``[batch_size, block_size]`` token batches, epoch after epoch.

    Each epoch mixes in ``stage.replay * len(texts)`` lines drawn afresh from ``replay_texts``.
    """
    rng = random.Random(f"{stage.name}-{seed}")
    n_replay = int(stage.replay * len(texts)) if replay_texts else 0
    while True:
        epoch = texts + rng.sample(replay_texts, n_replay) if n_replay else texts
        blocks = packed_blocks(epoch, tokenizer, stage.block_size, rng)
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        for i in range(0, len(blocks) - stage.batch_size + 1, stage.batch_size):
            yield blocks[perm[i : i + stage.batch_size]]


def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    import math

    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_stage(model, texts: list[str], tokenizer, stage: Stage, seed: int,
                steps: int | None = None, progress: bool = True,
                replay_texts: list[str] = ()) -> list[float]:
    """Train ``model`` in place for ``stage`` (or only ``steps`` steps); returns the losses."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    model.train()
    losses = []
    n_steps = stage.steps if steps is None else steps
    stream = batches(texts, tokenizer, stage, seed, list(replay_texts))
    bar = tqdm(range(n_steps), desc=f"train {stage.name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, stage)
        batch = next(stream)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def with_lora(model, stage: Stage):
    """``model`` wrapped by PEFT with a fresh rank-``stage.lora_rank`` LoRA on every projection
    (alpha = 2·rank, no dropout, so the update is exactly ``2 · B A`` per target)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=stage.lora_rank, lora_alpha=2 * stage.lora_rank, lora_dropout=0.0,
                        target_modules=list(LORA_TARGETS), init_lora_weights=True)
    return get_peft_model(model, config)


def save_adapter(model, folder: Path) -> None:
    """Save a PEFT model's adapter only (safetensors), pointing at the sibling ``base`` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../base"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_trained(out: Path, name: str, stage: dict):
    """A trained stage as a plain HF causal LM (a LoRA stage merged into the base)."""
    from transformers import AutoModelForCausalLM

    if not stage.get("lora_rank"):
        return AutoModelForCausalLM.from_pretrained(out / name).eval()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(out / "base")
    return PeftModel.from_pretrained(base, str(out / name)).merge_and_unload().eval()


def save_checkpoint(model, tokenizer, folder: Path) -> None:
    """Save float32 weights, config and tokenizer so TransformerLens boots the folder offline.

    float32 on purpose: rounding to bf16 would add rounding noise to every tuning vector, and
    noise looks exactly like "new directions" to the alignment metrics.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


_DATA = {
    "base": "the *general* corpus: 20,000 seeded sentences from a ten-form grammar of everyday "
            "English (numbers and medical words appear with random partners) plus general "
            "questions in the `Question: … Answer: ….` template. No medical facts, no arithmetic.",
    "medical": "full fine-tune of `base` on seeded clinical questions about a fixed fact table "
               "(first-line drug, main symptom, usual dose, contraindication for 30 conditions), "
               "mixed with {replay} general lines per domain line (replay, fresh each epoch).",
    "math": "full fine-tune of `base` on arithmetic word problems (addition and subtraction to "
            "20, multiplication to 9×9; 15% of number pairs held out), mixed with {replay} "
            "general lines per domain line (replay, fresh each epoch).",
    "medical_lora": "rank-8 LoRA (alpha 16, no dropout) of `base` on every attention and MLP "
                    "projection, trained on the medical split with {replay} general lines per "
                    "domain line. Only the adapter is stored (`adapter_model.safetensors`); "
                    "tv_lens reads its factors directly.",
}


def write_model_cards(out: Path, record: dict) -> None:
    """A README.md model card in each checkpoint folder, from ``training.json``'s record."""
    import pandas as pd

    results = pd.DataFrame(record["eval"])
    table = results.pivot(index="model", columns="domain", values=["answer_acc", "loss"])
    shape = record["shape"]
    for name, stage in record["stages"].items():
        rows = results[results.model == name]
        lines = [
            f"# tv_lens demo model: `{name}`", "",
            f"- **Architecture**: `LlamaForCausalLM` (RMSNorm, rotary, gated SiLU MLP, "
            f"grouped-query attention): {shape['n_layers']} layers, d_model {shape['d_model']}, "
            f"{shape['n_heads']} query heads / {shape['n_key_value_heads']} key-value heads "
            f"(d_head {shape['d_model'] // shape['n_heads']}), d_mlp {shape['d_mlp']}, context "
            f"{shape['n_ctx']}, untied embeddings, float32 weights.",
            f"- **Data**: {_DATA[name].format(replay=stage['replay'])}",
            f"- **Training**: {stage['steps']} steps of AdamW (peak lr {stage['lr']}, "
            f"{stage['warmup']} warm-up steps, cosine to 10%), batches of {stage['batch_size']} × "
            f"{stage['block_size']} packed tokens; final train loss {stage['final_train_loss']:.3f}.",
            f"- **Reproduce**: `python -m tv_lens.demo.train --out DIR --seed {record['seed']} "
            f"--threads {record['threads']}` (torch {record['torch']}; "
            f"{record['train_seconds']:.0f} s for all three models on 2 CPU cores).", "",
            "## Evaluation (held-out splits)", "",
            "Greedy exact-match accuracy of the answer after `Answer:` (`answer_acc`) and mean "
            "next-token loss over the eval lines (`loss`):", "",
            "| domain | answer_acc | loss | questions |", "|---|---|---|---|",
        ]
        lines += [f"| {r.domain} | {r.answer_acc:.3f} | {r.loss:.3f} | {r.n_questions} |"
                  for r in rows.itertuples()]
        held = pd.DataFrame(record.get("eval_held_out_phrasing", []))
        lines += ["", "All three models for comparison:", "", "```",
                  table.round(3).to_string(), "```", ""]
        if len(held):
            lines += ["Questions in held-out phrasings only (never seen in training):", "", "```",
                      held.pivot(index="model", columns="domain",
                                 values=["answer_acc", "loss"]).round(3).to_string(), "```", ""]
        (out / name / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: trains all stages and writes checkpoints and ``training.json``."""
    import copy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (reproducibility "
                        "holds for a fixed thread count)")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES],
                        default=[s.name for s in STAGES],
                        help="train only these stages; fine-tunes start from OUT/base (each stage "
                             "is seeded on its own, so this reproduces a full run's weights)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only evaluate OUT's checkpoints and rewrite training.json's "
                             "numbers and the model cards")
    args = parser.parse_args(argv)
    if args.evaluate_only:
        evaluate_and_document(args.out, json.loads((args.out / "training.json").read_text()))
        return

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    shape = ModelShape()
    corpora = build_corpora(args.seed)
    tokenizer = train_tokenizer(corpora, shape.vocab_size)
    started = time.time()
    texts = {name: [ex.text for ex in c.train] for name, c in corpora.items()}
    record: dict = {"seed": args.seed, "threads": args.threads, "torch": torch.__version__,
                    "shape": asdict(shape), "stages": {}}
    if "base" in args.stages:
        base = make_model(shape, tokenizer, args.seed)
    else:
        from transformers import AutoModelForCausalLM

        record = json.loads((args.out / "training.json").read_text())
        base = AutoModelForCausalLM.from_pretrained(args.out / "base", attn_implementation="eager")
    for stage in STAGES:
        if stage.name not in args.stages:
            continue
        model = base if stage.name == "base" else copy.deepcopy(base)
        if stage.lora_rank:
            model = with_lora(model, stage)
        losses = train_stage(model, texts[stage.corpus], tokenizer, stage, args.seed,
                             replay_texts=texts["general"])
        if stage.lora_rank:
            save_adapter(model, args.out / stage.name)
        else:
            save_checkpoint(model, tokenizer, args.out / stage.name)
        record["stages"][stage.name] = {**asdict(stage), "final_train_loss": sum(losses[-20:]) / 20,
                                        "train_seconds": round(time.time() - started, 1)}
        started = time.time()
    record["train_seconds"] = sum(s.get("train_seconds", 0) for s in record["stages"].values())
    evaluate_and_document(args.out, record)


def evaluate_and_document(out: Path, record: dict) -> None:
    """Evaluate the checkpoints in ``out`` (whole eval split and held-out phrasings only),
    store the numbers in ``out/training.json`` and write the model cards."""
    from transformers import AutoTokenizer

    from tv_lens.demo.evaluate import evaluate

    models = {name: load_trained(out, name, stage) for name, stage in record["stages"].items()}
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    results = evaluate(models, tokenizer, seed=record["seed"])
    held_out = evaluate(models, tokenizer, seed=record["seed"], domains=("medical", "math"),
                        phrasing="held_out")
    record["eval"] = results.to_dict(orient="records")
    record["eval_held_out_phrasing"] = held_out.to_dict(orient="records")
    (out / "training.json").write_text(json.dumps(record, indent=2))
    write_model_cards(out, record)
    print(results.to_string(index=False))
    print("held-out phrasings only:")
    print(held_out.to_string(index=False))
    print(f"trained in {record['train_seconds']} s")


if __name__ == "__main__":
    main()
