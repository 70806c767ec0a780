"""Streaming an analysis over the layers: ``analyze`` and the per-layer runner the zoo shares.

A model is analysed one block at a time: :func:`layer_tensors` reads a block's base weights and
updates (LoRA factors stay factors), :func:`layer_rows` turns them into that block's rows
(:mod:`tv_lens.analysis.rows`) and lets each weight go as soon as its row is made, and
:func:`model_rows` does the embeddings. :func:`analyze` runs these for every block, ``workers``
blocks at a time in threads (:mod:`tv_lens.workers`), and hands the rows to
:func:`~tv_lens.analysis.summary.assemble`; :func:`tv_lens.analyze_zoo` runs the same functions
for many fine-tunes of one base, with each base block decomposed once
(:func:`base_decompositions`). So peak memory is about one block per worker, whatever the model
size, and a zoo's tables equal ``analyze``'s.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from tv_lens.analysis.options import AnalysisOptions
from tv_lens.analysis.rows import (as_2d, as_matrix, head_rows, matrix_names, matrix_row,
                                   neuron_rows, unit_energies)
from tv_lens.analysis.summary import Analysis, assemble
from tv_lens.linalg import GramSVD, gram_svd
from tv_lens.sources import layer_of
from tv_lens.protocols import PairLike
from tv_lens.speedups import release_freed_memory
from tv_lens.vector import TuningVector
from tv_lens.workers import check_threads, check_workers, ordered_map


def layer_tensors(tv: TuningVector, names: list[str], device: Any) -> tuple[dict, dict]:
    """One layer's base weights and updates (factors where the vector has them and no dense
    form is needed: attention heads slice their weights densely, d_model × d_head each)."""
    base, delta = {}, {}
    for name in names:
        factors = tv.factors(name)
        if factors is not None and ".attn." not in name:
            base[name], delta[name] = tv.base[name].to(device), factors.to(device)
        else:
            base[name], delta[name] = (x.to(device) for x in tv.base_and_update(name))
    return base, delta


@dataclass
class LayerRows:
    """One layer's rows of every table, and its per-unit update energies."""

    heads: list[dict]
    neurons: list[pd.DataFrame]
    matrices: list[dict]
    energies: dict[tuple[int, str], np.ndarray]


def names_by_layer(tv: TuningVector) -> dict[int | None, list[str]]:
    """The vector's weight names per block (``None``: embeddings, final norm)."""
    out: dict[int | None, list[str]] = {}
    for name in tv.slots:
        if name in tv:
            out.setdefault(layer_of(name), []).append(name)
    return out


def base_decompositions(tv: TuningVector, layer: int | None,
                        device: torch.device | None = None) -> dict[str, GramSVD]:
    """``gram_svd`` of each of a layer's base matrices (``None``: the embeddings), what the
    matrices table needs of the base in exact mode, for :func:`layer_rows` /
    :func:`model_rows` to reuse across fine-tunes of one base."""
    names = [n for n in names_by_layer(tv).get(layer, []) if n in set(matrix_names(tv))]
    return {n: gram_svd(as_2d(n, tv.base[n].to(device or "cpu"))) for n in names}


def layer_rows(tv: TuningVector, layer: int, names: list[str], o: AnalysisOptions, device: torch.device,
               bases: dict[str, GramSVD] | None = None,
               tensors: tuple[dict, dict] | None = None) -> LayerRows:
    """Heads, neurons and matrices rows of one layer, worked on ``device`` (``bases``: the layer's
    :func:`base_decompositions`, computed once for a zoo of fine-tunes; ``tensors``: the
    layer's :func:`layer_tensors`, read already by a caller that needs them too).

    Memory: one part's weights (attention, then MLP) are held at a time, each weight let go
    once its matrix row is made, so that several workers (:mod:`tv_lens.workers`) fit."""
    names = [n for n in names if ".attn." in n or ".mlp." in n]
    spec, matrices = tv.spec, set(matrix_names(tv))
    out = LayerRows([], [], [], {})
    for part in dict.fromkeys(n.split(".")[2] for n in names):  # attn, mlp in stored order
        part_names = [n for n in names if n.split(".")[2] == part]
        base, delta = ((tensors[0] | {}, tensors[1] | {}) if tensors is not None
                       else layer_tensors(tv, part_names, device))
        release_freed_memory()  # the raw reads
        if part == "attn":
            out.heads = head_rows(spec, layer, base, delta, o.t, o.null_samples, o.seed)
        else:
            out.neurons = neuron_rows(spec, layer, base, delta, o.t)
        out.energies[(layer, part)] = unit_energies(spec, layer, part, delta)
        release_freed_memory()
        for name in part_names:
            if name in matrices:
                W, D = base.pop(name), delta.pop(name)
                out.matrices.append(matrix_row(name, as_2d(name, W), as_matrix(name, D),
                                               o.k, o.t, o.rank, o.intruders,
                                               (bases or {}).get(name)))
                del W, D
                release_freed_memory()
        del base, delta
    return out


def model_rows(tv: TuningVector, names: list[str], o: AnalysisOptions, device: torch.device,
               bases: dict[str, GramSVD] | None = None) -> list[dict]:
    """The matrices rows of the weights outside the blocks (embeddings), one at a time."""
    rows = []
    matrices = set(matrix_names(tv))
    for name in names:
        if name in matrices:
            base, delta = layer_tensors(tv, [name], device)
            rows.append(matrix_row(name, base[name], delta[name], o.k, o.t, o.rank,
                                   base=(bases or {}).get(name)))
            del base, delta
            release_freed_memory()
    return rows


def analyze(pair: PairLike, options: AnalysisOptions | None = None, *, progress: bool = True,
            device: str | torch.device | None = None, workers: int | None = None,
            threads: int | None = None, **overrides: Any) -> Analysis:
    """Directional-alignment tables for a :class:`~tv_lens.ModelPair` (or a tuning vector with
    base weights attached).

    Args:
        pair: a ``ModelPair`` or a ``TuningVector`` that carries its base.
        options: what decides the numbers (:class:`AnalysisOptions`: ``k``, ``tol``,
            ``thresholds``, ``level``, ``labels``, ``null_samples``, ``seed``,
            ``intruder_k``, ``intruder_epsilon``, ``fast``, ``fast_rank``; its defaults
            where ``None``). Its fields may also be passed as keywords, which override it:
            ``analyze(pair, k=5, fast=True)``.
        progress: show a tqdm bar over layers (with an ETA).
        device: where the per-layer work runs (e.g. ``"cuda"``); weights are read on the CPU
            one layer at a time and moved there.
        workers: layers worked on at once, in threads of this process (:mod:`tv_lens.workers`;
            default 2 on a CPU with at least two torch threads, 1 on a GPU). Each worker holds
            one layer.
        threads: BLAS threads per worker (default: torch's CPU threads shared out evenly
            between the workers, at least one each; with one worker, as set). The tables do not
            depend on ``workers`` or ``threads`` beyond float rounding: BLAS rounds differently
            with another thread count, which moves the clusters of nearly equal singular values
            of a flat spectrum (docs/scale-and-lora.md).

    Returns:
        :class:`Analysis` with ``heads``, ``neurons``, ``matrices`` and ``summary`` tables.

    Memory: weights are read one layer at a time (a pair from ``ModelPair.from_pretrained``
    reads them straight from the checkpoint files), so peak memory is about one layer of the
    base and of the update plus the work on its largest matrix per worker, whatever the model
    size. LoRA updates (:meth:`TuningVector.factors`) are analysed from their factors.

    Degenerate singular values: where the base has (near-)equal singular values (relative gap
    below 1e-4), single singular vectors are arbitrary within their cluster, so amplification
    shares and direction matches are measured against the cluster's whole subspace
    (:func:`tv_lens.shares.cluster_ids`); for distinct values this is the per-vector definition.

    Cost: head circuits stay factored (QR of ``[d_model, 2·d_head]`` factors, never a dense
    ``d_model²`` per head), neuron cosines are batched, and each matrix's base decomposition is
    computed once (precision: :mod:`tv_lens.linalg`).
    """
    import time

    options = AnalysisOptions.of(options, **overrides)
    tv = pair.tuning_vector()
    if tv.base is None:
        tv.base_tensor("embed.W_E")  # raises MissingBaseError with the fix
    device = torch.device(device) if device is not None else torch.device("cpu")
    workers = check_workers(workers, device)
    threads = check_threads(threads)
    spec = tv.spec
    started = time.perf_counter()
    heads: list[dict] = []
    neurons: list[pd.DataFrame] = []
    matrices: list[dict] = []
    energies: dict[tuple[int, str], np.ndarray] = {}
    by_layer = names_by_layer(tv)
    in_table = set(matrix_names(tv))
    unread = [n for names in by_layer.values() for n in names  # norms: in no table, but a
              if ".attn." not in n and ".mlp." not in n and n not in in_table]

    def rows_of(layer: int | None) -> LayerRows:
        if layer is None:  # the embeddings, and every weight no table reads (a NaN or inf
            for name in unread:  # there is refused too, with its name)
                tv[name]
            return LayerRows([], [], model_rows(tv, by_layer.get(None, []), options, device), {})
        return layer_rows(tv, layer, by_layer.get(layer, []), options, device)

    # with several workers the embeddings (the largest matrices) go first, beside the first
    # layers; their rows still follow the layers'. (The bar is closed, its line ended, and work
    # not yet started is cancelled, also when a weight turns out broken mid-way.)
    layers = list(range(spec.n_layers))
    items = [None, *layers] if workers > 1 else [*layers, None]
    outside: list[dict] = []
    bar = tqdm(total=spec.n_layers, desc="analyze layers", disable=not progress)
    with torch.no_grad(), bar, closing(ordered_map(rows_of, items, workers, threads)) as results:
        for item, rows in zip(items, results):
            if item is None:
                outside = rows.matrices
                continue
            heads += rows.heads
            neurons += rows.neurons
            matrices += rows.matrices
            energies.update(rows.energies)
            bar.update()
    matrices += outside
    o = options
    return assemble(spec, heads, neurons, matrices, energies, o, info={
        "k": o.k, "thresholds": o.t.__dict__, "spec": spec.to_dict(), "fast": o.fast,
        "fast_rank": o.rank, "device": str(device), "labels": o.labels,
        "null_samples": o.null_samples, "seed": o.seed, "workers": workers, "threads": threads,
        "intruders": {"k": o.intruder_k, "epsilon": o.intruder_epsilon},
        "metadata": {k: v for k, v in tv.metadata.items() if isinstance(v, (str, int, float))},
        "seconds": round(time.perf_counter() - started, 3)})
