"""A model zoo against separate analyses: ``tv-lens zoo`` vs one ``tv-lens analyze`` per fine-tune.

    python benchmarks/bench_zoo.py --out /tmp/bz                # 8 fine-tunes, TinyLlama dims
    python benchmarks/bench_zoo.py --out /tmp/bz --layers 2     # the same with 2 of 22 layers

Generates (once) a Llama-shaped base with the scale benchmark's generator
(``bench_scale.py``: bf16, sharded safetensors; ``--layers`` keeps the first layers only, every
matrix keeps its TinyLlama size) and ``--fine-tunes`` fine-tunes, each base + its own rank-4
update on every projection plus one of two shared "domain" updates (even and odd fine-tunes),
so the zoo's clustering has a known answer. Then measures, in one run and in fresh processes:
the separate analyses one after the other, and the zoo (serial, each base layer decomposed
once); writes ``zoo_benchmark.json`` with wall times, peak RSS, the ratio and the share of the
separate runs' time the zoo saves, and whether the clusters found are the two domains.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import SHAPES, _gen, base_tensor, keys, write_checkpoint  # noqa: E402


def fine_tune_update(key: str, W: torch.Tensor, index: int) -> torch.Tensor:
    """Fine-tune ``index``'s update of ``W``: a rank-4 part of its own (5% of ``‖W‖``) and its
    domain's (``index % 2``; 10%): two fine-tunes of one domain have cosine ≈ 0.8, of two
    domains ≈ 0."""
    if W.ndim != 2 or "embed_tokens" in key or key == "lm_head.weight":
        return torch.zeros_like(W)
    out = torch.zeros_like(W)
    for seed, size in ((100 + index, 0.05), (10 + index % 2, 0.1)):
        g = _gen(key, seed=seed)
        D = torch.randn(W.shape[0], 4, generator=g) @ torch.randn(4, W.shape[1], generator=g)
        out += D * (size * float(W.norm()) / float(D.norm()))
    return out


def generate(out: Path, shape: dict, n_tuned: int) -> list[Path]:
    all_keys = keys(shape)
    if not (out / "base" / "config.json").exists():
        write_checkpoint(out / "base", shape, lambda k: base_tensor(k, all_keys[k]))
    folders = []
    for i in range(n_tuned):
        folder = out / f"ft{i}"
        if not (folder / "config.json").exists():
            def tensor(k: str, i: int = i) -> torch.Tensor:
                W = base_tensor(k, all_keys[k])
                return W + fine_tune_update(k, W, i)

            write_checkpoint(folder, shape, tensor)
        folders.append(folder)
    return folders


def timed(argv: list[str]) -> dict:
    """Wall time and peak RSS of one ``tv-lens`` command in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tv_lens.cli", *argv], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"  {' '.join(argv[:2])} …: {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "peak_rss_gb_so_far": max(peak, before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    parser.add_argument("--fine-tunes", type=int, default=8)
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["n_layers"] = args.layers
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tuned = generate(args.out, shape, args.fine_tunes)
    print(f"checkpoints ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = str(args.out / "base")
    print("separate analyses:", flush=True)
    separate = [timed(["analyze", base, str(t), "--out", str(args.out / "runs" / t.name)])
                for t in tuned]
    print("zoo:", flush=True)
    zoo = timed(["zoo", base, *map(str, tuned), "--out", str(args.out / "zoo")])
    separate_s = sum(r["seconds"] for r in separate)
    clusters = json.loads(json.dumps(
        {line.split(",")[0]: int(line.split(",")[1])
         for line in (args.out / "zoo" / "clusters.csv").read_text().splitlines()[1:]}))
    domains = {t.name: i % 2 for i, t in enumerate(tuned)}
    found = {frozenset(n for n in clusters if clusters[n] == c) for c in set(clusters.values())}
    want = {frozenset(n for n in domains if domains[n] == d) for d in (0, 1)}
    result = {"shape": shape, "fine_tunes": len(tuned), "separate_s": separate_s,
              "separate_each_s": [r["seconds"] for r in separate], "zoo_s": zoo["seconds"],
              "speedup": separate_s / zoo["seconds"],
              "share_saved": 1 - zoo["seconds"] / separate_s,
              "peak_rss_gb": zoo["peak_rss_gb_so_far"], "clusters": clusters,
              "clusters_are_the_domains": found == want}
    (args.out / "zoo_benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "separate_each_s"}, indent=2))


if __name__ == "__main__":
    main()
