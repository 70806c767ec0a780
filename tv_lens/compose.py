"""Composing tuning vectors of fine-tunes that share a base.

Three methods, all per parameter tensor (``shared/METHODS.md``):

- ``"sum"`` — task arithmetic: ``Σ_t w_t τ_t``.
- ``"ties"`` — TIES merging (Yadav et al. 2023): keep each vector's top ``top_k`` fraction of
  entries by magnitude, elect a sign per entry by summed mass, and average the kept entries that
  agree with the elected sign.
- ``"dare"`` — DARE (Yu et al. 2023): drop each entry with probability ``drop_rate``, rescale the
  survivors by ``1 / (1 − drop_rate)`` (seeded), then sum.

``weights`` multiply each vector before merging (default 1 each).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tv_lens.vector import TuningVector

METHODS = ("sum", "ties", "dare")


def _trim(t: Tensor, top_k: float) -> Tensor:
    """``t`` with all but its ``top_k`` fraction of largest-magnitude entries set to zero."""
    k = int(round(top_k * t.numel()))
    if k <= 0:
        return torch.zeros_like(t)
    if k >= t.numel():
        return t.clone()
    threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def _ties(tensors: list[Tensor], top_k: float) -> Tensor:
    trimmed = torch.stack([_trim(t, top_k) for t in tensors])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0).clamp(min=1)
    return (trimmed * agree).sum(0) / count


def _dare(tensors: list[Tensor], drop_rate: float, generator: torch.Generator) -> Tensor:
    out = torch.zeros_like(tensors[0])
    for t in tensors:
        keep = torch.rand(t.shape, generator=generator) >= drop_rate
        out += t * keep.to(t.device, t.dtype) / (1.0 - drop_rate)
    return out


def compose(vectors: Sequence[TuningVector], weights: Sequence[float | int] | None = None, *,
            method: str = "sum", top_k: float = 0.2, drop_rate: float = 0.5,
            seed: int = 0) -> TuningVector:
    """Merge tuning vectors of the same base into one.

    Args:
        vectors: two or more vectors from fine-tunes of one base model.
        weights: one multiplier per vector (default all 1).
        method: ``"sum"`` (task arithmetic), ``"ties"`` or ``"dare"``.
        top_k: TIES: fraction of entries each vector keeps (0 < top_k ≤ 1).
        drop_rate: DARE: probability of dropping an entry (0 ≤ drop_rate < 1).
        seed: DARE: seed of the drop masks.

    Returns:
        A :class:`TuningVector` with the first vector's spec, base and metadata.
    """
    vectors = list(vectors)
    if not vectors:
        raise ValueError("compose needs at least one tuning vector.")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    weights = [1.0] * len(vectors) if weights is None else list(weights)
    if len(weights) != len(vectors):
        raise ValueError(f"Got {len(weights)} weights for {len(vectors)} vectors; pass one each.")
    if method == "ties" and not 0 < top_k <= 1:
        raise ValueError(f"top_k must be in (0, 1], got {top_k}.")
    if method == "dare" and not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
    first = vectors[0]
    for other in vectors[1:]:
        first._check_same(other)
    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name in first:
        tensors = [w * v[name] for w, v in zip(weights, vectors)]
        if method == "sum":
            merged[name] = torch.stack(tensors).sum(0)
        elif method == "ties":
            merged[name] = _ties(tensors, top_k)
        else:
            merged[name] = _dare(tensors, drop_rate, generator)
    return first._new(merged)
