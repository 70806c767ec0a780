"""One weight matrix's spectrum: the numbers behind a row of the matrices table, in full.

:func:`matrix_spectrum` lists the singular values of a base matrix and of its update, and
matches the update's top directions against the base's, computed as the matrices table does
(:func:`tv_lens.analysis.rows.decompose`, :func:`tv_lens.shares.matrix_overlap`), so a report can
show why a matrix got its label.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import torch

from tv_lens.analysis.rows import as_2d, decompose
from tv_lens.components import matrix_name
from tv_lens.errors import InvalidArgumentError
from tv_lens.protocols import PairLike
from tv_lens.shares import matrix_overlap


def matrix_spectrum(pair: PairLike, name: str, k: int = 10,
                    fast_rank: int | None = None) -> pd.DataFrame:
    """Singular values of the base matrix W and of its update Δ, with Δ's top ``k`` left
    singular directions matched against W's (``match_j = max_i |⟨p_j, u_i⟩|``, METHODS.md
    level 3), for one weight, by its component name (``"L2.mlp.W_out"``, the matrices table's
    ``component``) or TL name (``"blocks.2.mlp.W_out"``; per-head weights as
    ``[d_model, n·d_head]`` like the matrices table). Computed as the matrices table does
    (:func:`tv_lens.shares.matrix_overlap`, factors for LoRA targets): one matrix at a time.
    ``fast_rank``: as ``analyze(fast=True)`` does, only the top ``fast_rank`` singular values
    of each (randomized SVD; the base's range finder probed with Δ's top directions).

    Returns:
        One row per singular direction: ``component, param`` (the matrix), ``direction``
        (0 = largest), ``sigma_base, sigma_delta, match, matched_direction`` (``match`` is NaN
        past ``k``).
    """
    tv = pair.tuning_vector()
    if name not in tv:  # a component name, parsed as every name is
        c = tv.components.parse(name)
        if c.kind != "matrix":
            raise InvalidArgumentError(f"A spectrum is of one weight matrix, such as "
                                       f"'L0.attn.W_V' or 'L2.mlp.W_out'; {name!r} is a "
                                       f"{c.kind.replace('_', ' ')}.")
        name = c.param
    if fast_rank is not None and not (isinstance(fast_rank, int) and fast_rank >= 1):
        raise InvalidArgumentError(f"fast_rank must be a positive integer or None, got "
                                   f"{fast_rank!r}.")
    with torch.no_grad():
        W = as_2d(name, tv.base[name])
        factors = tv.factors(name)
        D = factors if factors is not None else as_2d(name, tv[name])
        base, fast_delta = decompose(W, D, k, fast_rank)
        overlap = matrix_overlap(base, D, k, fast_rank=fast_rank, delta=fast_delta)
        match, index = overlap.left.abs().max(dim=0)
    S, S_d, k = base.S.cpu().numpy(), overlap.delta_S.cpu().numpy(), match.numel()
    n = max(len(S), len(S_d))
    df = pd.DataFrame({"component": matrix_name(name), "param": name, "direction": range(n),
                       "sigma_base": np.pad(S, (0, n - len(S)), constant_values=np.nan),
                       "sigma_delta": np.pad(S_d, (0, n - len(S_d)), constant_values=np.nan),
                       "match": np.pad(match.cpu().numpy(), (0, n - k), constant_values=np.nan),
                       "matched_direction": np.pad(index.cpu().numpy().astype(float), (0, n - k),
                                                   constant_values=np.nan)})
    return df
