"""Train the demo family's sparse autoencoder: the base's residual stream after block 1.

Run ``python -m tv_lens.demo.train_sae --out DIR`` (about two minutes on 2 CPU cores; ``DIR``
holds the trained checkpoints, ``DIR/base`` is read and ``DIR/sae`` written). Seeded end to
end like :mod:`tv_lens.demo.train`.

The SAE is a standard ReLU SAE in SAELens's weight names (``f = ReLU((x − b_dec) W_enc + b_enc)``,
``x̂ = f W_dec + b_dec``), trained on ``blocks.1.hook_resid_post`` activations of the *base*
model on the training lines of all three corpora (general, medical and math text: an SAE is
trained on broad text, and the fine-tunes' domains are part of what the base has seen words of).
Its loss is the reconstruction error relative to the activations' variance plus an L1 penalty on
the latents weighted by the decoder norms; decoder rows are normalised to 1 at the end (the
encoder rescaled to match), SAELens's convention. Saved with :meth:`tv_lens.sae.SAEWeights.save`
(``cfg.json`` + ``sae_weights.safetensors``, loadable by ``sae_lens.SAE.load_from_disk``).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tv_lens.sae import SAEWeights


@dataclass(frozen=True)
class SAEConfig:
    """What the demo SAE is trained on and how."""

    layer: int = 1
    d_sae: int = 1024
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    l1: float = 5e-3
    block_size: int = 64

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"


@torch.no_grad()
def residual_activations(model, tokenizer, texts: list[str], config: SAEConfig,
                         seed: int) -> torch.Tensor:
    """``[n_tokens, d_model]``: the model's residual stream after block ``config.layer`` on
    ``texts`` packed into blocks (HF's ``hidden_states[layer + 1]`` is TL's
    ``blocks.{layer}.hook_resid_post``)."""
    from tv_lens.demo.train import packed_blocks

    blocks = packed_blocks(texts, tokenizer, config.block_size, random.Random(f"sae-{seed}"))
    out = [model(input_ids=b, output_hidden_states=True).hidden_states[config.layer + 1]
           for b in blocks.split(64)]
    return torch.cat(out).flatten(0, 1)


def train_sae(acts: torch.Tensor, config: SAEConfig, seed: int,
              progress: bool = True) -> tuple[SAEWeights, dict]:
    """A ReLU SAE on ``acts`` (``[n, d_model]``) and its training record."""
    g = torch.Generator().manual_seed(seed)
    d = acts.shape[1]
    W_dec = torch.randn(config.d_sae, d, generator=g)
    W_dec = 0.1 * W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "W_dec": W_dec, "b_enc": torch.zeros(config.d_sae),
              "b_dec": acts.mean(0).clone()}
    params = {n: torch.nn.Parameter(p) for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    variance = float((acts - acts.mean(0)).pow(2).sum(1).mean())
    scale = float(acts.norm(dim=1).mean())
    bar = tqdm(range(config.steps), desc="train sae", disable=not progress)
    for step in bar:
        x = acts[torch.randint(len(acts), (config.batch_size,), generator=g)]
        f = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        x_hat = f @ params["W_dec"] + params["b_dec"]
        mse = (x - x_hat).pow(2).sum(1).mean() / variance
        sparsity = (f * params["W_dec"].norm(dim=1)).sum(1).mean() / scale
        loss = mse + config.l1 * config.d_sae ** 0.5 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(mse=f"{mse.item():.3f}", l0=f"{(f > 0).float().sum(1).mean():.1f}")
    with torch.no_grad():
        norms = params["W_dec"].norm(dim=1)
        sae = SAEWeights(params["W_enc"] * norms, params["W_dec"] / norms[:, None],
                         params["b_enc"] * norms, params["b_dec"].clone(), config.hook_name)
    return sae, sae_quality(sae, acts)


@torch.no_grad()
def sae_quality(sae: SAEWeights, acts: torch.Tensor) -> dict:
    """Explained variance, mean L0 and dead latents of ``sae`` on ``acts``."""
    f = sae.encode(acts)
    residual = (acts - sae.decode(f)).pow(2).sum(1).mean()
    variance = (acts - acts.mean(0)).pow(2).sum(1).mean()
    return {"explained_variance": round(float(1 - residual / variance), 4),
            "mean_l0": round(float((f > 0).float().sum(1).mean()), 2),
            "dead_latents": int(((f > 0).sum(0) == 0).sum()), "tokens": len(acts)}


def write_card(folder: Path, record: dict) -> None:
    """A README.md model card for the SAE folder, from its training record."""
    q, e = record["train"], record["eval"]
    lines = [
        "# tv_lens demo SAE: `base`, `blocks.1.hook_resid_post`", "",
        f"- **What**: a standard ReLU sparse autoencoder, d_in 128, d_sae {record['d_sae']}, on "
        "the demo base's residual stream after block 1 (HF `hidden_states[2]`, TransformerLens "
        "`blocks.1.hook_resid_post`). SAELens's folder format: `sae_lens.SAE.load_from_disk` "
        "reads it, and so does `tv_lens.demo.load_sae()` without SAELens.",
        f"- **Data**: the base's activations on the training lines of all three corpora "
        f"(general, medical, math), packed into blocks of {record['block_size']} tokens "
        f"({q['tokens']:,} tokens).",
        f"- **Training**: {record['steps']} Adam steps (lr {record['lr']}) on batches of "
        f"{record['batch_size']} activations; loss = squared error / activation variance + "
        f"{record['l1']}·√d_sae · Σ f_j‖W_dec[j]‖ / mean ‖x‖; decoder rows normalised to 1 "
        "afterwards.",
        f"- **Reproduce**: `python -m tv_lens.demo.train_sae --out tv_lens/demo/checkpoints "
        f"--seed {record['seed']} --threads {record['threads']}` (torch {record['torch']}, "
        f"{record['train_seconds']:.0f} s on 2 CPU cores).", "",
        "| split | explained variance | mean L0 | dead latents | tokens |", "|---|---|---|---|---|",
        f"| train | {q['explained_variance']:.3f} | {q['mean_l0']:.1f} | {q['dead_latents']} | "
        f"{q['tokens']:,} |",
        f"| eval | {e['explained_variance']:.3f} | {e['mean_l0']:.1f} | {e['dead_latents']} | "
        f"{e['tokens']:,} |", ""]
    (folder / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: trains the SAE on ``OUT/base`` and writes ``OUT/sae``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tv_lens.demo.corpus import build_corpora

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the checkpoints folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    config, started = SAEConfig(), time.time()
    model = AutoModelForCausalLM.from_pretrained(args.out / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out / "base")
    corpora = build_corpora(args.seed)
    texts = [ex.text for c in corpora.values() for ex in c.train]
    acts = residual_activations(model, tokenizer, texts, config, args.seed)
    sae, quality = train_sae(acts, config, args.seed)
    eval_texts = [ex.text for c in corpora.values() for ex in c.eval]
    held_out = sae_quality(sae, residual_activations(model, tokenizer, eval_texts, config,
                                                     args.seed))
    record = {**asdict(config), "seed": args.seed, "threads": args.threads,
              "torch": torch.__version__, "train": quality, "eval": held_out,
              "train_seconds": round(time.time() - started, 1)}
    folder = sae.save(args.out / "sae", model_name="tv_lens demo base", prepend_bos=False,
                      training=record)
    write_card(folder, record)
    print(record)


if __name__ == "__main__":
    main()
