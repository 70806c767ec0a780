"""How much did fine-tuning move the residual stream? (METHODS.md "Representations")

``compare_representations(pair, tokens)`` runs both models on the same tokens and compares,
per layer, the residual-stream activations (``blocks.{l}.hook_resid_post`` by default):

- ``k_base`` / ``k_tuned``: principal components needed for 90% of the (centred) variance;
- ``overlap``: mean cos² of the principal angles between the two top-k subspaces (1 = same);
- ``cka``: linear CKA between the two activation sets (1 = same up to rotation and scale);
- ``outside_share``: share of the tuned model's activation variance outside the base's
  principal subspace, beside ``baseline_outside_share`` = ``1 − k_base/d_model``, the share
  outside a *random* subspace of that dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tv_lens.components import stream_of_hook
from tv_lens.sources import check_runs_hooks
from tv_lens.spec import resolve_layers

COLUMNS = ["component", "layer", "hook", "k_base", "k_tuned", "overlap", "cka", "outside_share",
           "baseline_outside_share", "n_tokens"]


def principal_subspace(X: Float[Tensor, "n d"], q: float = 0.9) -> Float[Tensor, "d k"]:
    """Top principal directions of centred ``X`` explaining a fraction ``q`` of its variance."""
    _, S, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    energy = S.pow(2)
    cum = torch.cumsum(energy, 0) / energy.sum()
    k = int(torch.searchsorted(cum, torch.tensor(q, dtype=cum.dtype) - 1e-12)) + 1
    return Vh[: min(k, Vh.shape[0])].T


def linear_cka(X: Float[Tensor, "n d1"], Y: Float[Tensor, "n d2"]) -> float:
    """Linear CKA (Kornblith et al. 2019) of two activation sets over the same examples."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    cross = (X.T @ Y).pow(2).sum()
    return float(cross / ((X.T @ X).norm() * (Y.T @ Y).norm()))


def compare_activations(base: Float[Tensor, "n d"], tuned: Float[Tensor, "n d"],
                        q: float = 0.9) -> dict[str, float | int]:
    """The metrics of one layer from two ``[n_tokens, d_model]`` activation matrices."""
    base, tuned = base.double(), tuned.double()
    Qb, Qt = principal_subspace(base, q), principal_subspace(tuned, q)
    cosines = torch.linalg.svdvals(Qb.T @ Qt)
    Yc = tuned - tuned.mean(0)
    inside = (Yc @ Qb).pow(2).sum() / Yc.pow(2).sum()
    return dict(k_base=Qb.shape[1], k_tuned=Qt.shape[1], overlap=float(cosines.pow(2).mean()),
                cka=linear_cka(base, tuned), outside_share=float(1 - inside),
                baseline_outside_share=1 - Qb.shape[1] / base.shape[1], n_tokens=base.shape[0])


def _activations(model, tokens: Tensor, names: list[str], mask: Tensor | None) -> dict[str, Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = {}
    for name in names:
        act = cache[name].float()
        out[name] = act[mask] if mask is not None else act.reshape(-1, act.shape[-1])
    return out


def compare_representations(pair, tokens: Int[Tensor, "batch pos"], layers: Sequence[int] | None = None,
                            *, hook: str = "hook_resid_post",
                            mask: Bool[Tensor, "batch pos"] | None = None,
                            q: float = 0.9) -> pd.DataFrame:
    """Per-layer comparison of the two models' activations on ``tokens``.

    Args:
        pair: a :class:`~tv_lens.ModelPair` of ``TransformerBridge`` models.
        tokens: token ids, ``[batch, pos]``.
        layers: which blocks (default all).
        hook: block hook to compare, e.g. ``"hook_resid_post"``, ``"hook_mlp_out"``.
        mask: ``[batch, pos]`` booleans selecting the positions to use (e.g. non-padding).
        q: variance fraction that sets each principal subspace's dimension.

    Returns:
        One row per layer with columns ``component`` (the hook's residual-stream point or part,
        ``L3.resid_post``; ``<NA>`` for another hook), ``layer, hook, k_base, k_tuned, overlap,
        cka, outside_share, baseline_outside_share, n_tokens``.
    """
    check_runs_hooks(pair, "compare_representations")
    layers = resolve_layers(layers, pair.spec.n_layers)
    names = [f"blocks.{l}.{hook}" for l in layers]
    acts_b = _activations(pair.base, tokens, names, mask)
    acts_t = _activations(pair.tuned, tokens, names, mask)
    rows = [dict(component=stream_of_hook(n), layer=l, hook=hook,
                 **compare_activations(acts_b[n], acts_t[n], q))
            for l, n in zip(layers, names)]
    return pd.DataFrame(rows, columns=COLUMNS)
