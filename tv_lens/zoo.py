"""Model zoos: many fine-tunes of one base, each base layer decomposed once for all of them.

``analyze_zoo(base, [tuned, …])`` gives every fine-tune's :func:`~tv_lens.analyze` tables (one
long table per kind with a ``model`` column, equal to separate ``analyze`` runs) and the tables
that compare fine-tunes with each other:

- ``head_similarity``: per attention unit and pair of fine-tunes, the cosine between the two
  tuning vectors restricted to the unit's weight slices (:mod:`tv_lens.components`): a query
  head ``L3H5`` (its W_Q and W_O slices, and its W_K / W_V where every head has its own) and,
  under grouped-query attention, a key-value head ``L3KV1`` (its W_K / W_V slices, shared by
  the query heads of its group: compared once, on its own row);
- ``matrix_similarity``: per weight matrix and pair, the cosine of the two updates and the
  principal angles between their top-``rank`` update subspaces on the ``d_model`` side
  (``shared_dims`` = Σ cos² θᵢ, from 0 = orthogonal new directions to ``rank`` = the same
  subspace; ``baseline_shared_dims`` = r_a·r_b/d, its mean for two random subspaces);
- ``neuron_similarity``: per layer, the ``neurons`` (a count) neurons with the largest update of
  each fine-tune (all neurons of all pairs would be hundreds of millions of rows), and for
  each pair the cosine of the two neuron updates (W_in / W_gate columns and W_out row);
- ``similarity``: the fine-tune × fine-tune cosine of whole tuning vectors, and ``linkage``
  (average-linkage hierarchical clustering on ``1 − cosine``), ``clusters(threshold)``.

Execution: the work is one task per layer (plus one for the embeddings). A task reads the base
layer once, decomposes its matrices once (:func:`~tv_lens.analysis.run.base_decompositions`) and
compares every fine-tune's layer with it and with each other, so the cross tables need no
second pass. Tasks run serially, in ``workers`` local processes, or on Ray (``ray=True`` for a
local instance, ``ray="ADDRESS"`` for a cluster); only paths and options travel to a task and
only its tables come back, never whole models. Each finished task is written atomically under
``out/.zoo-tasks/`` as a record (:mod:`tv_lens.records`: JSON + safetensors, never a pickle),
keyed by the analysis options and the *content* of every checkpoint (:func:`content_hash`), and
a re-run of the same zoo picks them up (a killed run resumes; a task whose checkpoints changed
since is recomputed, and said so). The ``--out`` folder of a zoo is reused on purpose: it holds
the tasks, and :meth:`Zoo.save` replaces its tables. A fine-tune that fails (missing or corrupt
shard, another architecture) is reported in ``Zoo.failed`` and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tv_lens.analysis.options import AnalysisOptions
from tv_lens.analysis.rows import as_2d, matrix_names, mlp_prefixes, neuron_norm2
from tv_lens.analysis.run import (LayerRows, base_decompositions, layer_rows, layer_tensors,
                                  model_rows, names_by_layer)
from tv_lens.analysis.summary import Analysis, assemble
from tv_lens.components import (expert_of, head_name, kv_head_name, layer_name, matrix_name,
                                neuron_name)
from tv_lens.lazy import LowRank
from tv_lens.errors import InvalidArgumentError, TvLensError
from tv_lens.linalg import GramSVD, gram, tall, top_eigenpairs
from tv_lens.records import load_record, save_record
from tv_lens.speedups import write_csv
from tv_lens.staging import ZOO_TASKS, check_destination
from tv_lens.workers import check_threads

#: the matrices whose ``d_model`` side is their second axis (they write into the residual)
_WRITERS = ("W_O", "W_out", "W_E")


@dataclass(frozen=True)
class ZooOptions:
    """What every task needs: where the checkpoints are and how to analyse them."""

    base: str
    tuned: dict[str, str]  # name -> checkpoint folder
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    rank: int = 8
    neurons: int = 20
    threads: int | None = None
    allow_pickle: bool = False
    cache: str | None = None  # folder of base decompositions, under the base's content hash
    base_hash: str = ""
    #: checkpoint name ("base" or a fine-tune's) -> content hash, where tasks are stored
    contents: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        """A digest of the options that decide a task's result (checkpoint paths included;
        their contents are checked per task record, so a changed file is named). Every
        :class:`AnalysisOptions` field is in it (before they were one object, only ``k``,
        ``tol``, ``labels``, ``level``, ``null_samples`` and ``seed`` were: tasks stored then
        are recomputed once)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("threads", "cache", "contents")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Zoo:
    """The tables of :func:`analyze_zoo`."""

    analyses: dict[str, Analysis]
    head_similarity: pd.DataFrame
    matrix_similarity: pd.DataFrame
    neuron_similarity: pd.DataFrame
    similarity: pd.DataFrame
    failed: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return f"Zoo({len(self.analyses)} fine-tunes{failed}: {', '.join(self.analyses)})"

    def _long(self, kind: str) -> pd.DataFrame:
        frames = [getattr(a, kind).assign(model=name) for name, a in self.analyses.items()]
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return out[["model", *[c for c in out.columns if c != "model"]]]

    @property
    def heads(self) -> pd.DataFrame:
        """Every fine-tune's heads table, one after the other, with a ``model`` column."""
        return self._long("heads")

    @property
    def neurons(self) -> pd.DataFrame:
        return self._long("neurons")

    @property
    def matrices(self) -> pd.DataFrame:
        return self._long("matrices")

    @property
    def summary(self) -> pd.DataFrame:
        return self._long("summary")

    @property
    def linkage(self) -> np.ndarray:
        """SciPy average-linkage matrix of the fine-tunes on the distance ``1 − cosine``."""
        from scipy.cluster.hierarchy import linkage
        from scipy.spatial.distance import squareform

        distance = (1.0 - self.similarity.to_numpy()).clip(min=0)
        np.fill_diagonal(distance, 0.0)
        return linkage(squareform(distance, checks=False), method="average")

    def clusters(self, threshold: float = 0.5) -> pd.Series:
        """Cluster of each fine-tune: groups whose average cosine distance stays below
        ``threshold`` (``1 − cosine``; 0.5 joins fine-tunes whose vectors have cosine ≥ 0.5)."""
        from scipy.cluster.hierarchy import fcluster

        names = list(self.similarity.index)
        if len(names) < 2:
            return pd.Series(np.ones(len(names), dtype=int), index=names, name="cluster")
        return pd.Series(fcluster(self.linkage, threshold, criterion="distance"), index=names,
                         name="cluster")

    def shared(self, kind: str = "heads", min_cosine: float = 0.5) -> pd.DataFrame:
        """Components every pair of fine-tunes updated in the same direction (cosine ≥
        ``min_cosine`` for every pair): ``heads`` or ``matrices``; one row per ``component``
        with its ``min_cosine``."""
        table = {"heads": self.head_similarity, "matrices": self.matrix_similarity}[kind]
        if table.empty:
            return table
        worst = table.groupby("component", sort=False)["cosine"].min().rename("min_cosine")
        return worst[worst >= min_cosine].reset_index()

    def save(self, folder: str | Path) -> Path:
        """Write the long tables, the cross tables, ``similarity.csv``, ``clusters.csv``,
        ``zoo.json`` and ``report.html`` (:func:`tv_lens.reporting.zoo_report`) into a new,
        empty or tv_lens-written folder (:mod:`tv_lens.staging`'s rule; others are refused)."""
        from tv_lens.staging import check_destination, write_marker

        folder = Path(folder)
        check_destination(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for kind in ("heads", "neurons", "matrices", "summary", "head_similarity",
                     "matrix_similarity", "neuron_similarity"):
            write_csv(getattr(self, kind), folder / f"{kind}.csv")
        self.similarity.to_csv(folder / "similarity.csv")
        self.clusters().to_csv(folder / "clusters.csv")
        (folder / "zoo.json").write_text(json.dumps({"failed": self.failed, "info": self.info},
                                                    indent=2, default=str))
        from tv_lens.reporting import zoo_report

        zoo_report(self, folder / "report.html")
        write_marker(folder, "Zoo.save")
        return folder


# --------------------------------------------------------------------------- one task
def _open(options: ZooOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """The tuning vector of every fine-tune (or the reason it cannot be read)."""
    from tv_lens.pair import ModelPair

    vectors, failed = {}, {}
    for name, path in options.tuned.items():
        try:
            pair = ModelPair.from_pretrained(options.base, path, allow_pickle=options.allow_pickle)
            vectors[name] = pair.tuning_vector()
        except (TvLensError, OSError) as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return vectors, failed


def _attention_units(spec: Any, layer: int) -> list[tuple[str, int | None, int | None,
                                                              tuple[str, ...]]]:
    """``(component, head, kv_head, weights)`` of a layer's attention units: each query head
    with its W_Q / W_O slices (and W_K / W_V where every head has its own), then each key-value
    head of grouped-query attention with its W_K / W_V slices."""
    gqa = spec.n_kv_heads != spec.n_heads
    units = [(head_name(layer, h), h, None, ("W_Q", "W_O") if gqa else ("W_Q", "W_K", "W_V", "W_O"))
             for h in range(spec.n_heads)]
    if gqa:
        units += [(kv_head_name(layer, g), None, g, ("W_K", "W_V")) for g in range(spec.n_kv_heads)]
    return units


def _head_dots(deltas: dict[str, dict[str, Tensor]], spec: Any, layer: int) -> Tensor:
    """``[units, K, K]`` dot products of the K fine-tunes' updates of each attention unit
    (:func:`_attention_units`), summed in float64 one weight and unit at a time (never a
    float64 copy of every head of every fine-tune)."""
    a = f"blocks.{layer}.attn."
    units = _attention_units(spec, layer)
    out = torch.zeros(len(units), len(deltas), len(deltas), dtype=torch.float64)
    for u, (_, head, kv_head, weights) in enumerate(units):
        for weight in weights:
            i = head if kv_head is None else kv_head
            out[u] += _gram_of([d[a + weight][i] for d in deltas.values()])
    return out


def _cosines_from_dots(dots: Tensor, names: list[str]) -> dict[tuple[str, str], Tensor]:
    """Every pair's cosine per unit from ``[units, K, K]`` dot products (NaN where one is 0)."""
    norms = dots.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    return {(a, b): dots[:, i, j] / (norms[:, i] * norms[:, j])
            for (i, a), (j, b) in combinations(enumerate(names), 2)}


def _neuron_slices(delta: dict[str, Tensor], prefix: str, rows: list[int]) -> Tensor:
    """``[len(rows), entries]``: the update of each neuron in ``rows`` (its W_in / W_gate
    columns, its W_out row), in float64."""
    parts = [delta[prefix + m][:, rows].T for m in ("W_in", "W_gate") if prefix + m in delta]
    return torch.cat(parts + [delta[prefix + "W_out"][rows]], dim=1).double()


def _neuron_norm2s(delta: dict[str, Tensor], prefix: str) -> Tensor:
    """Squared norm of every neuron's update (W_in / W_gate columns, W_out row), float64."""
    inputs = [m for m in ("W_in", "W_gate") if prefix + m in delta]
    return sum((neuron_norm2(delta[prefix + m], 1) for m in inputs),
               neuron_norm2(delta[prefix + "W_out"], 0))


#: up to this side dimension the subspace is exact (Gram eigenvectors); above it randomized
EXACT_SUBSPACE_UP_TO = 512


def _subspace(D: Tensor, rank: int, right: bool, power_iterations: int = 4) -> Tensor:
    """Orthonormal basis ``[side, ≤ rank]`` (float64) of the top-``rank`` singular subspace of
    ``D`` on one side (columns of ``U``, or of ``V`` with ``right``). Up to
    :data:`EXACT_SUBSPACE_UP_TO` the top eigenvectors of that side's Gram matrix (float64);
    above it a seeded randomized range finder in float32 (``rank + 10`` probes,
    ``power_iterations`` power iterations: a few thin products instead of a ``d_model``-sized
    eigendecomposition per fine-tune and matrix, and no float64 copy of ``D``; its accuracy is
    tested against the exact subspace)."""
    A = D.mT if right else D  # its rows are the side wanted
    if A.shape[0] <= EXACT_SUBSPACE_UP_TO:
        values, vectors = top_eigenpairs(gram(A.mT.double()), min(rank, A.shape[0]))
        keep = values > 1e-24 * values[0] if values.numel() and values[0] > 0 else values < -1
        return vectors[:, keep]
    A = A.float()
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(A @ torch.randn(A.shape[1], rank + 10, generator=g).to(A.device)).Q
    for _ in range(power_iterations):
        Q = torch.linalg.qr(A @ (A.mT @ Q)).Q
    small, S, _ = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    keep = int((S[:rank] > 1e-6 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return torch.linalg.qr((Q @ small)[:, :keep].double()).Q  # re-orthonormalised in float64


def _matrix_pairs(deltas: dict[str, Tensor], dots: np.ndarray, name: str, rank: int) -> list[dict]:
    """Cosine (from ``dots``, the updates' ``[K, K]`` dot products) and principal angles of
    every pair's update of matrix ``name``."""
    right = name.rsplit(".", 1)[-1] in _WRITERS
    bases = {k: _subspace(d, rank, right) for k, d in deltas.items()}
    rows = []
    for (a, b), cos in _cosines_from_dots(torch.from_numpy(dots)[None], list(deltas)).items():
        Qa, Qb = bases[a], bases[b]
        angles = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0) if Qa.numel() and Qb.numel() \
            else torch.zeros(0, dtype=torch.float64)
        side = Qa.shape[0]  # the d_model side's dimension
        rows.append(dict(model_a=a, model_b=b, cosine=float(cos[0]),
                         shared_dims=float(angles.pow(2).sum()),
                         subspace_rank=int(min(Qa.shape[1], Qb.shape[1])),
                         baseline_shared_dims=Qa.shape[1] * Qb.shape[1] / side,
                         top_cos_angle=float(angles[0]) if angles.numel() else float("nan")))
    return rows


def _gram_of(updates: list[Tensor], chunk: int = 1 << 22) -> Tensor:
    """``[K, K]`` dot products of K same-shaped updates: float64 Gram matrices of
    ``[K, chunk]`` slices of the flattened updates, summed."""
    flat = [d.reshape(-1) for d in updates]
    out = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for start in range(0, flat[0].numel(), chunk):
        block = torch.stack([f[start:start + chunk] for f in flat]).double()
        out += block @ block.T
    return out


def run_task(options: ZooOptions, layer: int | None) -> dict:
    """One layer's work (``None``: the embeddings) for every fine-tune: its analysis rows, the
    cross tables and the dot products of the updates. Picklable in and out: what a worker or
    Ray task runs."""
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        with torch.no_grad():
            return _task(options, layer)
    finally:
        torch.set_num_threads(threads)


def _task(options: ZooOptions, layer: int | None) -> dict:
    vectors, failed = _open(options)
    out: dict[str, Any] = {"layer": layer, "rows": {}, "failed": failed, "models": list(vectors),
                           "dots": np.zeros((0, 0))}
    if not vectors:
        return out
    first = next(iter(vectors.values()))
    names = names_by_layer(first).get(layer, [])
    o, cpu = options.analysis, torch.device("cpu")
    # once for every fine-tune (fast mode decomposes base and update together, per fine-tune)
    bases = {} if o.fast else _base_decompositions(options, first, layer)
    weights = [n for n in names if n in first]
    deltas: dict[str, dict[str, Tensor]] = {}  # fine-tune -> its update of this layer, dense
    for name, tv in list(vectors.items()):
        try:
            if layer is None:
                out["rows"][name] = model_rows(tv, names, o, cpu, bases)
                deltas[name] = {n: tv[n] for n in weights}
            else:  # read once: for its own rows and for the comparisons below
                base, delta = layer_tensors(tv, [n for n in weights if ".attn." in n or ".mlp." in n],
                                            cpu)
                out["rows"][name] = layer_rows(tv, layer, names, o, cpu, bases, (base, delta))
                deltas[name] = {n: d.dense() if isinstance(d, LowRank) else d for n, d in delta.items()}
                deltas[name].update({n: tv[n] for n in weights if n not in delta})  # norms
                del base, delta
        except (TvLensError, OSError) as exc:  # e.g. a truncated shard of this fine-tune
            out["failed"][name] = f"{type(exc).__name__}: {exc}"
            del vectors[name]
            deltas.pop(name, None)
    out["models"] = list(vectors)
    out["dots"] = np.zeros((len(vectors), len(vectors)))
    matrices, rows = set(matrix_names(first)), []
    for name in weights:
        update = {k: d[name] for k, d in deltas.items()}
        dots = _gram_of(list(update.values())).numpy()
        out["dots"] += dots
        if name in matrices:
            rows += [dict(component=matrix_name(name), param=name, layer=layer,
                          expert=expert_of(name), matrix=name.rsplit(".", 1)[-1], **r)
                     for r in _matrix_pairs({k: as_2d(name, d) for k, d in update.items()},
                                            dots, name, options.rank)]
    out["matrix_similarity"] = pd.DataFrame(rows)
    if layer is None:
        return out
    spec = first.spec
    head_dots = _head_dots(deltas, spec, layer)
    heads = _cosines_from_dots(head_dots, list(vectors))
    units = _attention_units(spec, layer)
    out["head_similarity"] = pd.DataFrame(
        [dict(component=name, layer=layer, head=head, kv_head=kv_head, model_a=a, model_b=b,
              cosine=float(c[u]))
         for (a, b), c in heads.items() for u, (name, head, kv_head, _) in enumerate(units)])
    out["neuron_similarity"] = _neuron_pairs(deltas, spec, layer, options.neurons)
    return out


def _neuron_pairs(deltas: dict[str, dict[str, Tensor]], spec: Any, layer: int,
                  top: int) -> pd.DataFrame:
    """Pairwise cosines of the union of every fine-tune's ``top`` largest neuron updates."""
    rows = []
    for prefix, expert in mlp_prefixes(spec, layer):
        if prefix + "W_out" not in next(iter(deltas.values())):
            continue
        norms = [_neuron_norm2s(d, prefix) for d in deltas.values()]
        chosen = sorted(set().union(*(torch.topk(n, min(top, n.numel())).indices.tolist()
                                      for n in norms)))
        slices = torch.stack([_neuron_slices(d, prefix, chosen) for d in deltas.values()], dim=1)
        for (a, b), c in _cosines_from_dots(slices @ slices.mT, list(deltas)).items():
            rows += [dict(component=neuron_name(layer, n, expert), layer=layer, expert=expert,
                          neuron=n, model_a=a, model_b=b, cosine=float(v))
                     for n, v in zip(chosen, c.tolist())]
    return pd.DataFrame(rows)


def content_hash(folder: str | os.PathLike) -> str:
    """A digest of a checkpoint folder's weight and config files' bytes (any change, any new
    file changes it)."""
    digest = hashlib.blake2b(digest_size=16)
    if not Path(folder).is_dir():
        return "missing"  # reported as the fine-tune's failure when its task opens it
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".bin"):
            digest.update(path.name.encode())
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def _base_decompositions(options: ZooOptions, tv, layer: int | None) -> dict[str, GramSVD]:
    """The layer's base decompositions, from ``options.cache`` when a run of any zoo of the
    same base (same content hash) stored them, computed and stored otherwise."""
    if options.cache is None:
        return base_decompositions(tv, layer)
    path = Path(options.cache) / options.base_hash / layer_name(layer)
    saved = load_record(path, key={"base": options.base_hash})
    if saved is not None:
        out = {}
        for name, d in saved.items():
            Wt, transposed = tall(as_2d(name, tv.base[name]))
            gram_ = None if d["gram"] is None else torch.from_numpy(d["gram"])
            out[name] = GramSVD(Wt, torch.from_numpy(d["S"]), torch.from_numpy(d["V"]),
                                transposed, float(d["energy"]), gram=gram_)
        return out
    bases = base_decompositions(tv, layer)
    save_record({n: {"S": b.S.numpy(), "V": b.V.numpy(), "energy": float(b.energy),
                     "gram": None if b.gram is None else b.gram.numpy()}
                 for n, b in bases.items()},
                path, key={"base": options.base_hash})
    return bases


# --------------------------------------------------------------------------- running tasks
def _execute(options: ZooOptions, layers: list[int | None], store: Path | None, workers: int,
             ray: Any, progress: bool) -> dict[int | None, dict]:
    """Every task's result: read from ``store`` where a run finished it from the same
    checkpoint contents, computed otherwise (and then stored), serially, in worker processes or
    on Ray."""
    from tqdm.auto import tqdm

    done: dict[int | None, dict] = {}
    path = (lambda layer: store / layer_name(layer)) if store else None
    changed: set[str] = set()
    for layer in layers:
        if path is None:
            continue
        result = load_record(path(layer), key=options.contents, types=(LayerRows,))
        if result is not None:
            done[layer] = result
        else:
            changed |= _changed(path(layer), options.contents)
    if changed:
        print(f"zoo: the files of {', '.join(sorted(changed))} changed since the stored tasks "
              "were computed; recomputing them.")
    todo = [layer for layer in layers if layer not in done]
    todo = [layer for layer in layers if layer not in done]

    def finished(layer, result):
        done[layer] = result
        if path is not None:
            save_record(result, path(layer), key=options.contents)
        bar.update()

    with tqdm(total=len(layers), initial=len(done), desc="zoo tasks", disable=not progress) as bar:
        if ray:
            _on_ray(options, todo, ray, finished)
        elif workers > 1:
            import concurrent.futures as cf
            import multiprocessing as mp

            if mp.parent_process() is not None:  # a worker re-running an unguarded script
                raise TvLensError(_MAIN_GUARD)
            try:
                with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                    futures = {pool.submit(run_task, options, layer): layer for layer in todo}
                    for future in cf.as_completed(futures):
                        finished(futures[future], future.result())
            except cf.process.BrokenProcessPool:
                raise TvLensError(_MAIN_GUARD) from None
        else:
            for layer in todo:
                finished(layer, run_task(options, layer))
    return done


def _changed(record: Path, contents: dict[str, str]) -> set[str]:
    """The checkpoints whose content hash differs from what a stored task was computed from."""
    try:
        stored = json.loads(record.with_suffix(".json").read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name, digest in contents.items()
            if isinstance(stored, dict) and stored.get(name, digest) != digest}


_MAIN_GUARD = (
    "The zoo's worker processes stopped before finishing. Worker processes start by importing "
    "the script that made them, so a script calling analyze_zoo(..., workers=N) must call it "
    "under `if __name__ == \"__main__\":` (or pass workers=1); a worker that ran out of memory "
    "stops them too.")


def _on_ray(options: ZooOptions, todo: list, address: Any, finished) -> None:
    try:
        import ray
    except ImportError:
        raise TvLensError("ray=... needs Ray: pip install 'tv-lens[ray]' (or pip install ray).") from None
    if not ray.is_initialized():
        kwargs = {"address": address} if isinstance(address, str) else {"num_cpus": os.cpu_count()}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False)
    task = ray.remote(run_task)
    futures = {task.remote(options, layer): layer for layer in todo}
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        finished(futures[ready[0]], ray.get(ready[0]))


def analyze_zoo(base: str | os.PathLike, tuned: Sequence[str | os.PathLike] | dict[str, str],
                options: AnalysisOptions | None = None, *, out: str | os.PathLike | None = None,
                workers: int = 1, threads: int | None = None, ray: bool | str = False,
                rank: int = 8, neurons: int = 20, allow_pickle: bool = False,
                cache: str | os.PathLike | None = None, progress: bool = True,
                **overrides: Any) -> Zoo:
    """:func:`~tv_lens.analyze` of every fine-tune of ``base`` and the tables comparing them
    (module docstring), each base layer decomposed once.

    Args:
        base: the base checkpoint folder.
        tuned: fine-tune checkpoint folders (named by folder name) or ``{name: folder}``.
        options: what decides each fine-tune's tables, as for :func:`~tv_lens.analyze`
            (:class:`~tv_lens.analysis.options.AnalysisOptions`; its fields may be passed as
            keywords, which override it: ``analyze_zoo(base, tuned, k=5)``).
        out: a folder for finished tasks (``out/.zoo-tasks/``, reused by a re-run of the same
            zoo: a killed run resumes) and the tables (:meth:`Zoo.save`); ``None`` keeps
            everything in memory.
        workers: layers worked on at once, each in its own process (default 1: serial, in
            this process). Each worker holds one layer of the base and of every fine-tune.
        threads: BLAS (torch) threads per worker (default: with one worker, as set; with
            several, this process's torch threads shared out evenly, at least one each; on Ray,
            as Ray sets them). Give the same value to get bit-identical tables from serial,
            worker and Ray runs.
        ray: ``True`` for a local Ray instance (or the one already initialised), an address
            string for a cluster; tasks are scheduled per layer.
        rank: update directions per matrix compared between fine-tunes (principal angles).
        neurons: neurons per layer and fine-tune compared between fine-tunes.
        cache: a folder for the base's per-layer decompositions, stored under the base
            checkpoint's content hash (:func:`content_hash`): any later zoo of the same base
            reuses them, a changed base file gets new ones. Two ``n × n`` float64 matrices per
            matrix of width ``n`` (the Gram matrix and its eigenvectors): 64 MB at n = 2048,
            about 320 MB per layer of a 1.1B Llama and 7 GB for all of it.
    """
    out = Path(out).expanduser() if out is not None else None
    if isinstance(tuned, dict):
        models = {str(k): str(v) for k, v in tuned.items()}
    else:
        models = {Path(p).name: str(p) for p in tuned}
        if len(models) < len(tuned):
            raise InvalidArgumentError("Two fine-tunes have the same folder name; pass "
                                       "tuned={name: folder} to name them apart.")
    if not models:
        raise InvalidArgumentError("analyze_zoo needs at least one fine-tune.")
    if workers < 1 or rank < 1 or neurons < 1:
        raise InvalidArgumentError(f"workers, rank and neurons must be at least 1, got "
                                   f"{workers}, {rank}, {neurons}.")
    analysis = AnalysisOptions.of(options, **overrides)
    threads = check_threads(threads)
    if threads is None and workers > 1 and not ray:
        threads = max(1, torch.get_num_threads() // workers)
    contents = ({"base": content_hash(base), **{n: content_hash(f) for n, f in models.items()}}
                if out is not None else {})
    options = ZooOptions(str(base), models, analysis, rank, neurons, threads, allow_pickle,
                         None if cache is None else str(cache),
                         content_hash(base) if cache is not None else "", contents)
    from tv_lens.pair import ModelPair

    probe = ModelPair.from_pretrained(base, base, allow_pickle=allow_pickle).tuning_vector()
    layers: list[int | None] = [*range(probe.spec.n_layers), None]
    if out is not None:
        check_destination(out, [base, *models.values()])
    store = out / ZOO_TASKS / options.key() if out is not None else None
    created = out is not None and not Path(out).exists()
    results = _execute(options, layers, store, workers, ray, progress)
    try:
        zoo = _assemble(options, probe.spec, results)
    except TvLensError:
        if created:  # nothing to resume towards: leave no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if out is not None:
        zoo.save(out)
    return zoo


def _assemble(options: ZooOptions, spec: Any, results: dict[int | None, dict]) -> Zoo:
    # layer order, whatever order the tasks finished in: sums come out bit for bit the same
    results = dict(sorted(results.items(), key=lambda x: (x[0] is None, x[0] or 0)))
    failed: dict[str, str] = {}
    for result in results.values():
        failed.update(result["failed"])
    ok = [name for name in options.tuned if name not in failed]
    if not ok:
        raise TvLensError("Every fine-tune of the zoo failed: " + "; ".join(
            f"{name}: {why}" for name, why in failed.items()))
    analyses = {}
    o = options.analysis
    for name in ok:
        heads, neurons, matrices, energies = [], [], [], {}
        for layer in range(spec.n_layers):
            rows = results[layer]["rows"][name]
            heads += rows.heads
            neurons += rows.neurons
            matrices += rows.matrices
            energies.update(rows.energies)
        matrices += results[None]["rows"][name]
        with warnings.catch_warnings():  # an identical fine-tune is reported as failed below
            warnings.filterwarnings("ignore", "The two models are identical")
            analysis = assemble(spec, heads, neurons, matrices, energies, o,
                                info={"k": o.k, "labels": o.labels, "fast": o.fast,
                                      "spec": spec.to_dict(), "zoo": True})
        if analysis.info.get("degenerate") == "identical":
            failed[name] = ("its weights are identical to the base's (τ = 0): there is no update "
                            "to analyse or compare")
        else:
            analyses[name] = analysis
    ok = list(analyses)
    if not ok:
        raise TvLensError("Every fine-tune of the zoo failed: " + "; ".join(
            f"{name}: {why}" for name, why in failed.items()))
    dots = np.zeros((len(ok), len(ok)))
    for result in results.values():
        index = [result["models"].index(n) for n in ok]
        dots += result["dots"][np.ix_(index, index)]
    norms = np.sqrt(np.diag(dots))
    similarity = pd.DataFrame(dots / np.outer(norms, norms), index=ok, columns=ok)

    def cross(kind: str) -> pd.DataFrame:
        frames = [r[kind] for r in results.values() if kind in r and not r[kind].empty]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if not table.empty:
            table = table[table.model_a.isin(ok) & table.model_b.isin(ok)].reset_index(drop=True)
            for col in ("layer", "head", "kv_head", "expert"):
                if col in table:
                    table[col] = table[col].astype("Int64")
        return table

    return Zoo(analyses, cross("head_similarity"), cross("matrix_similarity"),
               cross("neuron_similarity"), similarity, failed,
               {"base": options.base, "models": options.tuned, "rank": options.rank,
                "neurons": options.neurons})
