"""Scale benchmark: a TinyLlama-shaped 1.1B pair analysed by ``tv-lens analyze`` against the naive way.

    python benchmarks/bench_scale.py --out /tmp/bench_scale            # ~10 min on 2 CPU cores + generating
    python benchmarks/bench_scale.py --out DIR --shape llama2-7b --device cuda --only exact
    python benchmarks/bench_scale.py --out DIR2 --base-spectrum power --only exact fast naive

Steps (each measured in its own subprocess, wall time and peak RSS, all in one run):

1. generate ``DIR/base`` and ``DIR/tuned`` (bf16, sharded safetensors, generated tensor by tensor
   from per-key seeds, so memory stays small): ``tuned = base + planted update``, where the
   planted update is low rank (rank 4, every attention and MLP matrix of every layer) plus sparse
   (16 neurons per layer) plus three components with a known label (see :func:`planted`);
2. (a) ``tv-lens analyze base tuned`` exact and ``--fast``;
   (b) the naive way: both models loaded with ``transformers`` in float32, then
       ``torch.linalg.svd`` of W and of ΔW for every matrix of the first ``--naive-layers`` layers,
       extrapolated to all layers (embeddings left out, which favours the naive way);
   (c) the I/O floor: reading every byte of both checkpoints (page cache warm: read twice);
   (d) a rank-16 LoRA adapter of the same base: ``tv-lens analyze base adapter`` (factors) against
       the merged dense checkpoint (``tv-lens analyze base merged``);
3. write ``DIR/bench_scale.json`` and print the ratios a/b and a/c, the largest share difference
   of ``--fast`` against exact, and whether any planted label changed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "tinyllama-1.1b": dict(n_layers=22, d_model=2048, n_heads=32, n_kv=4, d_mlp=5632, vocab=32000),
    "llama2-7b": dict(n_layers=32, d_model=4096, n_heads=32, n_kv=32, d_mlp=11008, vocab=32000),
    "tiny": dict(n_layers=3, d_model=256, n_heads=8, n_kv=2, d_mlp=512, vocab=1000),
}
STD = 0.02
SHARD_BYTES = 1 << 30


# --------------------------------------------------------------------------- generation
def keys(shape: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama checkpoint keys and shapes."""
    d, m, dh = shape["d_model"], shape["d_mlp"], shape["d_model"] // shape["n_heads"]
    out = {"model.embed_tokens.weight": (shape["vocab"], d)}
    for layer in range(shape["n_layers"]):
        p = f"model.layers.{layer}."
        out.update({p + "self_attn.q_proj.weight": (d, d),
                    p + "self_attn.k_proj.weight": (shape["n_kv"] * dh, d),
                    p + "self_attn.v_proj.weight": (shape["n_kv"] * dh, d),
                    p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
                    p + "mlp.down_proj.weight": (d, m),
                    p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    out.update({"model.norm.weight": (d,), "lm_head.weight": (shape["vocab"], d)})
    return out


def _gen(key: str, seed: int = 0) -> torch.Generator:
    """A generator seeded from the key's text (stable across runs, unlike ``hash``)."""
    import zlib

    return torch.Generator().manual_seed((zlib.crc32(key.encode()) + 7919 * seed) % 2**31)


#: ``--base-spectrum power``: singular values ∝ i^(−POWER), like trained weights' decaying spectra
POWER = 0.5


def base_tensor(key: str, shape: tuple[int, ...], spectrum: str = "gaussian") -> torch.Tensor:
    """A base weight: iid Gaussian (``spectrum="gaussian"``: the flattest top a matrix has, the
    hardest case for a Krylov eigensolver), or (``"power"``) Haar-random singular vectors with
    singular values ∝ i^(−POWER) and the Gaussian matrix's expected Frobenius norm."""
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    if spectrum == "gaussian" or len(shape) != 2:
        return torch.randn(shape, generator=_gen(key)) * STD
    g = _gen(key)
    m, n = shape
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    S = torch.arange(1, r + 1, dtype=torch.float32) ** -POWER
    S *= STD * (m * n) ** 0.5 / S.norm()
    return (U * S) @ V.T


def planted(shape: dict) -> dict[str, str]:
    """Components with a known label: what ``planted_update`` puts where."""
    return {"L3H3.OV": "amplified", "L3N100.out": "new", "L7.W_out": "amplified",
            "L9.W_in": "new"}


def planted_update(key: str, W: torch.Tensor, shape: dict) -> torch.Tensor:
    """The update added to base weight ``W`` (float32, checkpoint orientation)."""
    if W.ndim != 2 or key.endswith("embed_tokens.weight") or key == "lm_head.weight":
        return torch.zeros_like(W)
    g = _gen(key, seed=1)
    out_dim, in_dim = W.shape
    scale = 0.1 * float(W.norm()) / 2  # rank-4 low-rank part: about 10% of ‖W‖
    D = (torch.randn(out_dim, 4, generator=g) @ torch.randn(4, in_dim, generator=g)) * scale / (
        (out_dim * in_dim) ** 0.5 * 2)
    layer = int(key.split(".")[2])
    dh = shape["d_model"] // shape["n_heads"]
    if key.endswith("mlp.up_proj.weight"):  # sparse: 16 neurons' read directions
        rows = torch.randperm(out_dim, generator=g)[:16]
        D[rows] += torch.randn(16, in_dim, generator=g) * STD * 0.3
    if layer == 3 and key.endswith("o_proj.weight"):  # head 3's W_O amplified ×1.3
        D = torch.zeros_like(W)
        D[:, 3 * dh:4 * dh] = 0.3 * W[:, 3 * dh:4 * dh]
    if layer == 3 and key.endswith("down_proj.weight"):  # neuron 100 writes a new direction
        w = W[:, 100]
        o = torch.randn(out_dim, generator=g)
        D[:, 100] = 3 * (o - (o @ w) / (w @ w) * w) * float(w.norm()) / float(o.norm())
    if layer == 7 and key.endswith("down_proj.weight"):  # W_out: its top-4 directions ×1.5
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        D = 0.5 * (U[:, :4] * S[:4]) @ Vh[:4]
    if layer == 9 and key.endswith("up_proj.weight"):  # W_in: strong rank-4 new directions
        D = D * 20
    return D


def write_checkpoint(folder: Path, shape: dict, tensor_of) -> None:
    """Sharded bf16 safetensors + index + config.json, one tensor in memory at a time."""
    from tv_lens.checkpoints import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    all_keys = keys(shape)
    shards, current, size = [], [], 0
    for key, shp in all_keys.items():
        nbytes = 2 * torch.Size(shp).numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        meta = {k: (all_keys[k], torch.bfloat16) for k in shard}
        write_safetensors(folder / name, shard, meta, lambda k: tensor_of(k).to(torch.bfloat16))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(2 * torch.Size(all_keys[k]).numel() for k in all_keys)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape["d_model"], "intermediate_size": shape["d_mlp"],
        "num_hidden_layers": shape["n_layers"], "num_attention_heads": shape["n_heads"],
        "num_key_value_heads": shape["n_kv"], "vocab_size": shape["vocab"],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 10000.0}))


def write_lora(folder: Path, shape: dict, rank: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT adapter folder with random rank-``rank`` factors on every projection."""
    from tv_lens.checkpoints import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    targets = {k: s for k, s in keys(shape).items() if k.endswith("_proj.weight")}
    factors, tensors = {}, {}
    for key, (out_dim, in_dim) in targets.items():
        g = _gen(key, seed=2)
        A = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
        B = torch.randn(out_dim, rank, generator=g) * STD * 0.1
        factors[key] = (A, B)
        module = "base_model.model." + key[: -len(".weight")]
        tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = A, B
    meta = {k: (tuple(v.shape), torch.float32) for k, v in tensors.items()}
    write_safetensors(folder / "adapter_model.safetensors", list(tensors), meta, tensors.__getitem__)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"], "fan_in_fan_out": False}))
    return factors


def generate(out: Path, shape: dict, spectrum: str = "gaussian", lora: bool = True) -> None:
    all_keys = keys(shape)
    if not (out / "base" / "config.json").exists():
        write_checkpoint(out / "base", shape, lambda k: base_tensor(k, all_keys[k], spectrum))

    def tuned(k: str) -> torch.Tensor:
        W = base_tensor(k, all_keys[k], spectrum)
        return W + planted_update(k, W, shape)

    if not (out / "tuned" / "config.json").exists():
        write_checkpoint(out / "tuned", shape, tuned)
    if lora and not (out / "merged" / "config.json").exists():
        factors = write_lora(out / "adapter", shape)

        def merged(k: str) -> torch.Tensor:
            W = base_tensor(k, all_keys[k], spectrum)
            if k in factors:
                A, B = factors[k]
                W = W.to(torch.bfloat16).float() + 2.0 * (B @ A)
            return W

        write_checkpoint(out / "merged", shape, merged)


# --------------------------------------------------------------------------- measured jobs
def job_naive(base: str, tuned: str, n_layers: int) -> dict:
    """Both models in float32 via transformers, then SVD of W and ΔW per matrix."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    b = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    t = AutoModelForCausalLM.from_pretrained(tuned, torch_dtype=torch.float32)
    load = time.perf_counter() - t0
    per_layer = []
    with torch.no_grad():
        for layer in range(n_layers):
            t1 = time.perf_counter()
            for (name, W), (_, W2) in zip(b.model.layers[layer].named_parameters(),
                                          t.model.layers[layer].named_parameters()):
                if W.ndim == 2:
                    torch.linalg.svd(W, full_matrices=False)
                    torch.linalg.svd(W2 - W, full_matrices=False)
            per_layer.append(time.perf_counter() - t1)
    total_layers = b.config.num_hidden_layers
    mean = sum(per_layer) / len(per_layer)
    return {"load_s": load, "per_layer_s": per_layer, "layers_timed": n_layers,
            "extrapolated_s": load + mean * total_layers}


def job_io(folders: list[str]) -> dict:
    def read_all() -> int:
        n = 0
        for folder in folders:
            for f in sorted(Path(folder).glob("*.safetensors")):
                with open(f, "rb") as fh:
                    while chunk := fh.read(64 << 20):
                        n += len(chunk)
        return n

    read_all()  # warm the page cache
    t0 = time.perf_counter()
    n = read_all()
    return {"bytes": n, "seconds": time.perf_counter() - t0}


def job_cli(argv: list[str]) -> dict:
    from tv_lens.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    return {"exit": code, "seconds": time.perf_counter() - t0}


def child(kind: str, args: list[str], result: str) -> None:
    """Run one measured job in this (fresh) process; write wall time and peak RSS."""
    t0 = time.perf_counter()
    if kind == "naive":
        out = job_naive(args[0], args[1], int(args[2]))
    elif kind == "io":
        out = job_io(args)
    else:
        out = job_cli(args)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(result).write_text(json.dumps(out))


def measure(kind: str, args: list[str], out: Path) -> dict:
    result = out / f".{kind}-{len(list(out.glob('.*.json')))}.json"
    cmd = [sys.executable, __file__, "--child", kind, str(result), *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    data = json.loads(result.read_text())
    print("  ", {k: v for k, v in data.items() if k != "per_layer_s"}, flush=True)
    return data


def compare(out: Path, shape: dict) -> dict:
    """Largest share difference of --fast against exact, and the planted labels in both."""
    import pandas as pd

    exact, fast = out / "exact", out / "fast"
    diff = {}
    for table, cols in (("heads", ["subspace_share", "amplification_share"]),
                        ("neurons", ["amplification_share"]),
                        ("matrices", ["amplification_share", "new_share", "top_subspace_share"])):
        a, b = pd.read_csv(exact / f"{table}.csv"), pd.read_csv(fast / f"{table}.csv")
        diff[table] = {c: float((a[c] - b[c]).abs().max()) for c in cols}
    labels = {}
    for folder in (exact, fast):
        heads = pd.read_csv(folder / "heads.csv").set_index(["layer", "head", "circuit"])
        neurons = pd.read_csv(folder / "neurons.csv").set_index(["layer", "neuron", "matrix"])
        mats = pd.read_csv(folder / "matrices.csv").set_index(["layer", "matrix"])
        labels[folder.name] = {"L3H3.OV": heads.loc[(3, 3, "OV"), "label"],
                               "L3N100.out": neurons.loc[(3, 100, "out"), "label"],
                               "L7.W_out": mats.loc[(7, "W_out"), "label"],
                               "L9.W_in": mats.loc[(9, "W_in"), "label"]}
    a, b = pd.read_csv(exact / "matrices.csv"), pd.read_csv(fast / "matrices.csv")
    return {"max_share_difference": diff, "planted_expected": planted(shape), "labels": labels,
            "matrix_labels_changed": int((a["label"] != b["label"]).sum()),
            "planted_labels_changed": sum(labels["exact"][k] != labels["fast"][k] for k in labels["exact"])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=list(SHAPES))
    parser.add_argument("--naive-layers", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--base-spectrum", default="gaussian", choices=["gaussian", "power"],
                        help="the base's weights: iid Gaussian (default) or singular values "
                             f"∝ i^-{POWER} (decaying like trained weights'); use a fresh --out")
    parser.add_argument("--only", nargs="+", default=["exact", "fast", "naive", "io", "lora"],
                        choices=["exact", "fast", "naive", "io", "lora"])
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    out = args.out
    t0 = time.perf_counter()
    generate(out, shape, args.base_spectrum, lora="lora" in args.only)
    results: dict = {"shape": args.shape, **shape, "base_spectrum": args.base_spectrum,
                     "generate_s": time.perf_counter() - t0,
                     "cpus": os.cpu_count(), "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads(), "device": args.device or "cpu"}
    dev = ["--device", args.device] if args.device else []
    base, tuned = str(out / "base"), str(out / "tuned")
    if "exact" in args.only:
        results["exact"] = measure("cli", ["analyze", base, tuned, "--out", str(out / "exact"), *dev], out)
    if "fast" in args.only:
        results["fast"] = measure("cli", ["analyze", base, tuned, "--out", str(out / "fast"),
                                          "--fast", *dev], out)
    if "naive" in args.only:
        results["naive"] = measure("naive", [base, tuned, str(args.naive_layers)], out)
    if "io" in args.only:
        results["io"] = measure("io", [base, tuned], out)
    if "lora" in args.only:
        results["lora_factors"] = measure("cli", ["analyze", base, str(out / "adapter"), "--out",
                                                  str(out / "lora"), *dev], out)
        results["lora_merged_dense"] = measure("cli", ["analyze", base, str(out / "merged"),
                                                       "--out", str(out / "merged_out"), *dev], out)
    ratios = {}
    if "exact" in results and "naive" in results:
        naive = results["naive"]["extrapolated_s"]
        ratios["naive_over_exact"] = naive / results["exact"]["wall_s"]
        if "fast" in results:
            ratios["naive_over_fast"] = naive / results["fast"]["wall_s"]
    if "io" in results:
        for mode in ("exact", "fast"):
            if mode in results:
                ratios[f"{mode}_over_io"] = results[mode]["wall_s"] / results["io"]["seconds"]
    if "lora_factors" in results:
        ratios["merged_over_factors"] = (results["lora_merged_dense"]["wall_s"]
                                         / results["lora_factors"]["wall_s"])
    results["ratios"] = ratios
    if "exact" in results and "fast" in results and args.shape != "tiny":
        results["fast_vs_exact"] = compare(out, shape)
    (out / "bench_scale.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"ratios": ratios, **({"fast_vs_exact": results["fast_vs_exact"]}
                                          if "fast_vs_exact" in results else {})}, indent=2))


if __name__ == "__main__":
    main()
