"""Tuning-vector entries that are not held in memory: lazy and factored.

A 7B tuning vector is 28 GB in float32. :class:`LazyDeltas` is the mapping a
:class:`~tv_lens.TuningVector` holds when its entries are read from checkpoints on access (each
access computes ``tuned − base`` for one weight and keeps nothing); shapes and dtypes are known up
front from the files' headers, so a vector can be combined, restricted and saved without reading a
single weight. :class:`LowRank` is one entry kept as the product of two thin factors (a LoRA
update ``scale · B A``), in the TransformerLens matrix orientation the analysis uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

Meta = tuple[tuple[int, ...], torch.dtype]


class LazyDeltas(Mapping):  # of str -> Tensor (unsubscripted: checkers must not sample it)
    """``TL name -> tensor``, computed by ``compute(name)`` on every access and never stored.

    Args:
        meta: each name's shape and dtype (what ``compute`` returns), in a stable order.
        compute: returns the tensor of one name.
        with_base: returns ``(base weight, tensor)`` of one name, reading the base once for
            both (a difference of checkpoints; see :meth:`~tv_lens.TuningVector.base_and_update`).
    """

    def __init__(self, meta: Mapping[str, Meta], compute: Callable[[str], Tensor],
                 with_base: Callable[[str], tuple[Tensor, Tensor]] | None = None):
        self.meta = dict(meta)
        self.compute = compute
        self.with_base = with_base

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.meta:
            raise KeyError(name)
        return self.compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)

    def __contains__(self, name: object) -> bool:
        return name in self.meta

    def __repr__(self) -> str:
        return f"LazyDeltas({len(self)} entries, read on access)"


@dataclass(frozen=True)
class LowRank:
    """An update ``left @ right`` of rank ≤ r, never formed densely unless asked.

    The product is the weight in TransformerLens *matrix* orientation (the per-matrix table's:
    ``W_Q`` as ``[d_model, n_heads·d_head]``, ``W_O`` as ``[n_heads·d_head, d_model]``,
    ``W_in`` as ``[d_model, d_mlp]``, ``W_out`` as ``[d_mlp, d_model]``).
    """

    left: Float[Tensor, "a r"]
    right: Float[Tensor, "r b"]

    def __repr__(self) -> str:
        a, b = self.shape
        return f"LowRank({a} × {b}, rank {self.rank}, {self.left.dtype}, {self.left.device})"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> Float[Tensor, "a b"]:
        return self.left @ self.right

    def scaled(self, alpha: float | int) -> "LowRank":
        return LowRank(alpha * self.left, self.right)

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def frob2(self) -> float:
        """``‖left @ right‖_F²`` as ``tr((LᵀL)(RRᵀ))`` in float64."""
        L, R = self.left.double(), self.right.double()
        return float(((L.T @ L) * (R @ R.T)).sum())
