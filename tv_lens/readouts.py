"""Reading an update as tokens: which tokens' logits a head's ΔOV can move most.

For a head's exact circuit change ``ΔOV`` (``d_model × d_model``, kept factored as ``A @ B``) and
the unembedding ``W_U`` (with the final norm's gain folded in, ``diag(w) · W_U``; ``W_Eᵀ`` when
embeddings are tied), the score of token t is ``‖ΔOV · W_U[:, t]‖``: the largest change of
token t's logit the update can write, per unit of input read by the head. The token-readouts
issue extends this to every unit; this is the head case the views need.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

COLUMNS = ["rank", "token_id", "token", "score", "base_score"]


def _unembedding(tv) -> torch.Tensor:
    base = tv.base
    W_U = base["unembed.W_U"] if "unembed.W_U" in tv else base["embed.W_E"].T
    W_U = W_U.double()[:, : tv.spec.d_vocab]
    if "ln_final.w" in tv:
        W_U = base["ln_final.w"].double()[:, None] * W_U
    return W_U


def ov_tokens(pair_or_vector: Any, layer: int, head: int, k: int = 10,
              tokenizer: Any = None) -> pd.DataFrame:
    """The ``k`` tokens whose logits head ``(layer, head)``'s ΔOV can move most.

    Returns:
        ``rank, token_id, token, score, base_score``: ``score = ‖ΔOV W_U[:, t]‖`` and, for
        scale, ``base_score = ‖OV W_U[:, t]‖`` of the base head.
    """
    tv = pair_or_vector.tuning_vector() if hasattr(pair_or_vector, "tuning_vector") else pair_or_vector
    tokenizer = tokenizer or getattr(pair_or_vector, "tokenizer", None)
    with torch.no_grad():
        W_U = _unembedding(tv)
        delta = tv.ov(layer, head)
        A, B = delta.A.double(), delta.B.double()
        a = f"blocks.{layer}.attn."
        V = tv.base[a + "W_V"][tv.spec.kv_head(head)].double()
        O = tv.base[a + "W_O"][head].double()

        def scores(left, right):  # ‖left (right W_U)[:, t]‖ for every t, via left's Gram matrix
            R = right @ W_U.to(right.device)
            return ((left.T @ left) @ R * R).sum(0).clamp(min=0).sqrt()

        s, s_base = scores(A, B).cpu(), scores(V, O).cpu()
    top = torch.topk(s, min(k, len(s)))
    ids = top.indices.tolist()
    names = (tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None
             else [f"<id {i}>" for i in ids])
    return pd.DataFrame({"rank": range(1, len(ids) + 1), "token_id": ids, "token": names,
                         "score": top.values.tolist(), "base_score": s_base[ids].tolist()},
                        columns=COLUMNS)
