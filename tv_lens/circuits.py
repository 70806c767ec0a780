"""Circuits between heads: how fine-tuning changed the way heads compose.

Composition scores (Elhage et al. 2021; ``shared/METHODS.md``, "Circuits between heads") between
an earlier head ``a`` and a later head ``b``, in TransformerLens' row-vector orientation:

    score = ‖OV_a · M_b‖_F / (‖OV_a‖_F · ‖M_b‖_F),   M_b = QK_b (Q), QK_bᵀ (K) or OV_b (V),

as ``transformer_lens.utilities.composition_scores(left, right)`` computes it. Everything stays
factored: with ``OV_a = V_a O_a`` and ``M_b = X_b Y_b`` (rank ≤ d_head each),
``‖V_a (O_a X_b) Y_b‖_F² = tr((Cᵀ G_a C) H_b)`` with ``C = O_a X_b`` (``d_head × d_head``),
``G_a = V_aᵀV_a`` and ``H_b = Y_b Y_bᵀ``, so no ``d_model × d_model`` matrix is ever built.

Every head reads the residual stream through its block's ``ln1``: that norm gain is folded into
the head's W_Q, W_K and W_V (``diag(w) · W``), as TransformerLens' processed weights would, so
the reading head's QK/OV and the writing head's OV are both the circuits its input really sees.
LayerNorm centring and biases are not folded (raw weights are analysed; see METHODS.md).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.components import head_name
from tv_lens.protocols import PairLike

EDGES = ("Q", "K", "V")
COLUMNS = ["component_a", "component_b", "layer_a", "head_a", "layer_b", "head_b", "edge", "base",
           "tuned", "change"]


def _factors(weights: Any, spec: Any, layer: int, gain: bool) -> dict[str, Tensor]:
    """Per head of ``layer``: Q, K, V ([n_heads, d_model, d_head], K/V repeated per query head)
    and O ([n_heads, d_head, d_model]) in float64, the ln1 gain folded into Q/K/V."""
    a = f"blocks.{layer}.attn."
    kv = torch.tensor([spec.kv_head(h) for h in range(spec.n_heads)])
    out = {"Q": weights[a + "W_Q"].double(), "K": weights[a + "W_K"].double()[kv],
           "V": weights[a + "W_V"].double()[kv], "O": weights[a + "W_O"].double()}
    w = f"blocks.{layer}.ln1.w"
    if gain and w in weights:
        g = weights[w].double()[None, :, None]
        for key in ("Q", "K", "V"):
            out[key] = g * out[key]
    return out


def _frob2(left: Float[Tensor, "a d_model dh"], core: Float[Tensor, "a b dh dh2"],
           right: Float[Tensor, "b dh2 d_model"]) -> Float[Tensor, "a b"]:
    """``‖left_a · core_ab · right_b‖_F²`` for every (a, b), from d_head-sized Gram matrices."""
    G = left.transpose(-1, -2) @ left  # [a, dh, dh]
    H = right @ right.transpose(-1, -2)  # [b, dh2, dh2]
    inner = core.transpose(-1, -2) @ G[:, None] @ core  # [a, b, dh2, dh2]
    return (inner * H[None]).sum((-1, -2))


def _circuit_frob2(X: Float[Tensor, "n d_model dh"], Y: Float[Tensor, "n dh d_model"]) -> Float[Tensor, " n"]:
    """``‖X_i Y_i‖_F²`` per head: ``tr((XᵀX)(YYᵀ))``."""
    return ((X.transpose(-1, -2) @ X) * (Y @ Y.transpose(-1, -2))).sum((-1, -2))


def _scores(early: dict[str, Tensor], late: dict[str, Tensor]) -> dict[str, Tensor]:
    """Q-, K- and V-composition scores ``[heads_a, heads_b]`` between two layers' heads."""
    V, O = early["V"], early["O"]
    ov2 = _circuit_frob2(V, O)
    right = {"Q": (late["Q"], late["K"].transpose(-1, -2)),   # QK_b = W_Q W_Kᵀ
             "K": (late["K"], late["Q"].transpose(-1, -2)),   # QK_bᵀ = W_K W_Qᵀ
             "V": (late["V"], late["O"])}                     # OV_b = W_V W_O
    out = {}
    for kind, (X, Y) in right.items():
        core = O[:, None] @ X[None]  # [a, b, dh, dh]
        num = _frob2(V, core, Y)
        m2 = _circuit_frob2(X, Y)
        out[kind] = (num / (ov2[:, None] * m2[None, :])).clamp(min=0).sqrt()
    return out


class _Tuned:
    """``name -> base[name] + τ[name]``, computed on access (one layer's weights at a time)."""

    def __init__(self, base: Any, tv: Any):
        self.base, self.tv = base, tv

    def __getitem__(self, name: str) -> Tensor:
        b = self.base[name]
        return b + self.tv[name].to(b.device)

    def __contains__(self, name: str) -> bool:
        return name in self.tv


def composition(pair: PairLike, *, fold_norm_gains: bool = True) -> pd.DataFrame:
    """Composition scores of every (earlier head, later head, edge) in both models.

    Args:
        pair: a :class:`~tv_lens.ModelPair` (or anything with ``tuning_vector()``).
        fold_norm_gains: fold each head's ``ln1`` gain into its Q/K/V (default, as
            TransformerLens' processed weights would).

    Returns:
        One row per (``component_a``, ``component_b``, ``edge``): the writing head
        ``component_a`` (``L0H3``, also as ``layer_a``/``head_a``) before the reading head
        ``component_b`` (``layer_a < layer_b``), ``edge`` in Q/K/V (which of the reader's inputs
        composes), and ``base``, ``tuned`` and ``change = tuned − base``.
    """
    tv = pair.tuning_vector()
    spec, base = tv.spec, tv.base
    tuned = _Tuned(base, tv)
    rows = []
    with torch.no_grad():
        per_layer = [(_factors(base, spec, l, fold_norm_gains),
                      _factors(tuned, spec, l, fold_norm_gains)) for l in range(spec.n_layers)]
        for la in range(spec.n_layers):
            for lb in range(la + 1, spec.n_layers):
                before = _scores(per_layer[la][0], per_layer[lb][0])
                after = _scores(per_layer[la][1], per_layer[lb][1])
                for edge in EDGES:
                    b, t = before[edge].cpu(), after[edge].cpu()
                    for ha in range(spec.n_heads):
                        for hb in range(spec.n_heads):
                            rows.append((head_name(la, ha), head_name(lb, hb), la, ha, lb, hb, edge,
                                         float(b[ha, hb]), float(t[ha, hb]),
                                         float(t[ha, hb] - b[ha, hb])))
    return pd.DataFrame(rows, columns=COLUMNS)
