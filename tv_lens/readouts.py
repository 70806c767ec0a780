"""Reading an update as tokens (a weight lens).

:func:`read_tokens` reads every unit's update directions through the vocabulary: the top
singular directions of each head's ΔOV / ΔQK (kept factored: ``ΔOV = ΔW_V·W_O' + W_V·ΔW_O``,
never dense per head), of each MLP matrix update, and of single neurons' updates, beside the
base unit's own top directions. A direction ``v`` in the residual stream is read

- on the ``write`` side (what a unit writes: ΔOV's and ΔW_out's right singular vectors, a
  neuron's ΔW_out row) through the unembedding after the final norm's gain:
  ``score_t = (γ ⊙ v) · W_U[:, t]``, the logit change of token t per unit written;
- on a ``read`` side (what a unit reads: ΔOV's left, ΔW_in's / ΔW_gate's left singular vectors,
  a neuron's ΔW_in column) through the embedding: ``score_t = W_E[t] · v``; a QK circuit has two
  read sides, ``query`` (left) and ``key`` (right).

A singular vector's sign is arbitrary, so both signs are read. :func:`domain_score` counts how
many of a direction's top tokens fall in a word list, against chance (hypergeometric).

:func:`ov_tokens` is the per-head summary the views use: ``‖ΔOV · W_U[:, t]‖``, the largest
change of token t's logit the head's update can write per unit of input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tv_lens.components import (CIRCUITS, NEURON_MATRICES, Component, Components, circuit_name,
                                matrix_name, neuron_matrix_name)
from tv_lens.errors import InvalidArgumentError
from tv_lens.protocols import PairLike
from tv_lens.linalg import FactoredSVD, dense_svd, factored_svd
from tv_lens.pair import token_strings

COLUMNS = ["component", "rank", "token_id", "token", "score", "base_score"]


def unembedding(tv, tuned: bool = False) -> torch.Tensor:
    """``diag(γ) · W_U`` (``[d_model, vocab]``; ``W_Eᵀ`` when embeddings are tied) of the base,
    or with ``tuned`` of the fine-tuned model (base + update)."""
    def weight(name: str) -> Tensor:
        return (tv.base[name] + tv[name] if tuned else tv.base[name]).double()

    W_U = weight("unembed.W_U") if "unembed.W_U" in tv else weight("embed.W_E").T
    W_U = W_U[:, : tv.spec.d_vocab]
    if "ln_final.w" in tv:
        W_U = weight("ln_final.w")[:, None] * W_U
    return W_U


def ov_tokens(pair: PairLike, head: str, k: int = 10, tokenizer: Any = None) -> pd.DataFrame:
    """The ``k`` tokens whose logits ``head``'s ΔOV (``"L2H5"`` or ``"L2H5.OV"``) can move most.

    Returns:
        ``component`` (the head's OV circuit), ``rank`` (0 = top), ``token_id, token, score,
        base_score``: ``score = ‖ΔOV W_U[:, t]‖`` and, for
        scale, ``base_score = ‖OV W_U[:, t]‖`` of the base head.
    """
    tv = pair.tuning_vector()
    c = tv.components.parse(head)
    if c.kind not in ("head", "circuit") or c.circuit == "QK":
        raise InvalidArgumentError(f"ov_tokens reads one query head's OV circuit, such as 'L2H5' "
                                   f"or 'L2H5.OV'; got {head!r}.")
    layer, head = c.layer, c.head
    tokenizer = tokenizer or getattr(pair, "tokenizer", None)
    with torch.no_grad():
        W_U = unembedding(tv)
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
    names = token_strings(tokenizer, ids)
    return pd.DataFrame({"component": circuit_name(layer, head, "OV"), "rank": range(len(ids)),
                         "token_id": ids, "token": names,
                         "score": top.values.tolist(), "base_score": s_base[ids].tolist()},
                        columns=COLUMNS)


# --------------------------------------------------------------------------- weight lens
TOKEN_COLUMNS = ["component", "source", "direction", "sign", "side", "rank", "token", "token_id",
                 "score", "z", "sigma", "d_vocab"]



def _embedding(tv) -> Tensor:
    return tv.base["embed.W_E"].double()[: tv.spec.d_vocab]


def _circuit_factors(tv, layer: int, head: int, circuit: str) -> tuple[tuple[Tensor, Tensor], ...]:
    """``((A, B) of the update, (A, B) of the base)`` with circuit = A @ B, exact and factored:
    ``ΔOV = ΔV·(O + ΔO) + V·ΔO`` (no cancellation), likewise ΔQK."""
    a, kv = f"blocks.{layer}.attn.", tv.spec.kv_head(head)
    if circuit == "OV":
        L, R = tv.base[a + "W_V"][kv].double(), tv.base[a + "W_O"][head].double()
        dL, dR = tv[a + "W_V"][kv].double(), tv[a + "W_O"][head].double()
    else:
        L, R = tv.base[a + "W_Q"][head].double(), tv.base[a + "W_K"][kv].double().T
        dL, dR = tv[a + "W_Q"][head].double(), tv[a + "W_K"][kv].double().T
    return (torch.cat([dL, L], 1), torch.cat([R + dR, dR], 0)), (L, R)


def _matrix_svd(tv, name: str, base: bool) -> FactoredSVD:
    if base:
        return dense_svd(tv.base[name].double())
    factors = tv.factors(name)
    if factors is not None:
        return factored_svd(factors.left, factors.right)
    return dense_svd(tv[name].double())


def mlp_matrices(tv, layer: int, matrices: tuple[str, ...] = ("W_in", "W_gate", "W_out")) -> list[str]:
    """A layer's MLP matrices the vector holds, as component names: ``L3.mlp.W_in`` (the dense
    or shared-expert MLP's) and, in a mixture of experts, ``L3E5.mlp.W_in`` (expert 5's)."""
    prefixes = [f"blocks.{layer}.mlp."] + [f"blocks.{layer}.mlp.experts.{e}."
                                           for e in range(tv.spec.n_experts)]
    return [matrix_name(p + m) for p in prefixes for m in matrices if p + m in tv]


def default_components(tv) -> list[str]:
    """What :func:`read_tokens` reads by default: every head's OV and QK circuit and every MLP
    matrix, layer by layer."""
    names = []
    for layer in range(tv.spec.n_layers):
        names += [circuit_name(layer, h, c) for h in range(tv.spec.n_heads) for c in CIRCUITS]
        names += mlp_matrices(tv, layer)
    return names


#: what each readable matrix's d_model side does
_MLP_SIDES = {"W_out": "write", "W_in": "read", "W_gate": "read"}


def readable(tv, components: Components) -> list[Component]:
    """The circuits, MLP matrices and neuron slices that ``components`` name, a larger piece
    read as its readable pieces: a head as its OV and QK circuits, ``L3.attn`` (or ``attn``) as
    its heads' circuits, ``L3.mlp`` (or an expert, or ``mlp``) as its MLP matrices, a neuron as
    its ``in``/``gate``/``out`` slices, a named group as its members."""
    index = tv.components
    if not isinstance(components, (str, Mapping)):
        components = list(components)
        if not components:
            return []
    out: list[Component] = []
    for c in index.resolve(components):
        if c.kind in ("circuit", "neuron_matrix") or (c.kind == "matrix" and c.matrix in _MLP_SIDES):
            out.append(c)
        elif c.kind == "head":
            out += [index.parse(circuit_name(c.layer, c.head, k)) for k in CIRCUITS]
        elif c.kind == "attn":
            out += [index.parse(circuit_name(c.layer, h, k)) for h in range(tv.spec.n_heads)
                    for k in CIRCUITS]
        elif c.kind == "mlp":
            out += [index.parse(n) for n in mlp_matrices(tv, c.layer)]
        elif c.kind == "expert":
            out += [index.parse(n) for n in mlp_matrices(tv, c.layer)
                    if index.parse(n).expert == c.expert]
        elif c.kind == "neuron":
            out += [index.parse(neuron_matrix_name(c.layer, c.neuron, m, c.expert))
                    for m in NEURON_MATRICES.values()
                    if neuron_matrix_name(c.layer, c.neuron, m, c.expert) in index]
        elif c.kind in ("all_layers", "named"):
            out += readable(tv, list(c.members))
        else:
            raise InvalidArgumentError(
                f"{c.name!r} ({c.kind.replace('_', ' ')}) has no directions to read as tokens: "
                f"read heads or circuits ('L2H5', 'L2H5.OV'), MLP matrices ('L3.mlp', "
                f"'L3.mlp.W_out') or neurons ('L3N100', 'L3N100.out').")
    return out


def _unit_directions(tv, c: Component, directions: int) -> list[tuple[str, str, int, Tensor, float]]:
    """``(source, side, direction, vector, sigma)`` of one readable component, update and base."""
    out = []
    if c.kind == "neuron_matrix":
        (piece,) = tv.components.slices(c)
        axis_row = c.matrix == "W_out"  # W_out rows, W_in / W_gate columns
        for source, W in (("update", tv[piece.param].double()),
                          ("base", tv.base[piece.param].double())):
            v = W[piece.index] if axis_row else W[:, piece.index]
            norm = float(v.norm())
            if norm > 0:
                out.append((source, "write" if axis_row else "read", 0, v / norm, norm))
        return out
    if c.kind == "circuit":
        sides = ("read", "write") if c.circuit == "OV" else ("query", "key")
        for source, (A, B) in zip(("update", "base"),
                                  _circuit_factors(tv, c.layer, c.head, c.circuit)):
            svd = factored_svd(A, B)
            for side, vecs in zip(sides, (svd.U, svd.V)):
                out += [(source, side, j, vecs[:, j], float(svd.S[j]))
                        for j in range(min(directions, svd.S.numel()))]
        return out
    for source in ("update", "base"):
        svd = _matrix_svd(tv, c.param, source == "base")
        vecs = svd.V if c.matrix == "W_out" else svd.U  # the d_model side
        out += [(source, _MLP_SIDES[c.matrix], j, vecs[:, j], float(svd.S[j]))
                for j in range(min(directions, svd.S.numel()))]
    return out


def read_tokens(pair: PairLike, components: Components | None = None, k: int = 20,
                directions: int = 3, *, score: str = "logit", tokenizer: Any = None,
                progress: bool = True) -> pd.DataFrame:
    """Components' update directions (and the base's) read as tokens (module docstring).

    Args:
        pair: a ``ModelPair`` or a tuning vector that carries its base.
        components: what to read (:func:`readable`): circuits ``"L2H5.OV"``/``"L2H5.QK"``, MLP
            matrices ``"L3.mlp.W_out"`` (``W_in``, ``W_gate``), neuron slices ``"L3N100.out"``
            (``in``, ``gate``), or larger pieces read as these (``"L2H5"``, ``"L3.mlp"``,
            ``"L3N100"``, ``"heads"``, ``"mlp"``); default :func:`default_components` (every
            head circuit and MLP matrix).
        k: tokens per direction and sign.
        directions: top singular directions per component (neuron slices have one).
        score: ``"logit"`` (the logit-lens dot product above: the logit change per unit
            written) or ``"cosine"`` (divided by each token's ``‖γ ⊙ W_U[:, t]‖`` /
            ``‖W_E[t]‖``: which token's direction the update points at, whatever the token's
            norm; in a trained model high-norm tokens can otherwise outrank the token an update
            was written along).
        tokenizer: to name the tokens (default the pair's).
        progress: a tqdm bar over components.

    Returns:
        One row per token: ``component, source ("update" | "base"), direction (0 = top), sign
        (+1 | −1), side ("write" | "read" | "query" | "key"), rank (0 = top), token, token_id,
        score`` (the signed readout, larger = more), ``z`` (the score in standard deviations
        of that direction's readout over the whole vocabulary: how much the token stands out),
        ``sigma`` (the direction's singular value, or the neuron slice's norm), ``d_vocab``
        (the vocabulary size, for :func:`domain_score`).
    """
    if k < 1 or directions < 1:
        raise InvalidArgumentError(f"k and directions must be at least 1, got k={k}, directions={directions}.")
    tv = pair.tuning_vector()
    if tv.base is None:
        tv.base_tensor("embed.W_E")  # raises MissingBaseError with the fix
    tokenizer = tokenizer or getattr(pair, "tokenizer", None)
    chosen = readable(tv, default_components(tv) if components is None else components)
    if score not in ("logit", "cosine"):
        raise InvalidArgumentError(f"score must be 'logit' or 'cosine', got {score!r}.")
    readers = {"write": unembedding(tv).T, "read": _embedding(tv)}  # [vocab, d_model] each
    if score == "cosine":
        readers = {s: W / W.norm(dim=1, keepdim=True).clamp(min=1e-30) for s, W in readers.items()}
    df = read_directions(tv, chosen, readers, k, directions, desc="read_tokens", progress=progress)
    ids = [int(i) for i in df.token_id]
    df["token"] = token_strings(tokenizer, ids)
    df["d_vocab"] = tv.spec.d_vocab
    return df[TOKEN_COLUMNS]


def read_directions(tv, components: list[Component], readers: dict[str, Tensor], k: int,
                    directions: int, *, desc: str, progress: bool) -> pd.DataFrame:
    """Every readable component's update and base directions scored against the rows of ``readers[side]``
    (``[n_rows, d_model]`` per side; ``read`` also serves ``query`` and ``key``): the top ``k``
    rows per direction and sign, as ``token_id`` / ``score`` columns (:func:`_top_rows`)."""
    from tqdm.auto import tqdm

    readers = {**readers, "query": readers["read"], "key": readers["read"]}
    frames = []
    with torch.no_grad():
        for c in tqdm(components, desc=desc, disable=not progress):
            found = _unit_directions(tv, c, directions)
            for side in dict.fromkeys(f[1] for f in found):  # in order: deterministic rows
                batch = [f for f in found if f[1] == side]
                scores = readers[side] @ torch.stack([f[3] for f in batch], 1).to(readers[side].device)
                frames += _top_rows(c.name, batch, scores.cpu(), k)  # [n_rows, n] scores
    return _assemble(frames)


def _top_rows(component: str, batch: list, scores: Tensor, k: int) -> list[dict]:
    """Columns of the top-``k`` tokens of every direction in ``batch``, both signs."""
    k = min(k, scores.shape[0])
    mean, std = scores.mean(0), scores.std(0).clamp(min=1e-30)
    rows = []
    for sign in (1, -1):
        top = torch.topk(sign * scores, k, dim=0)  # [k, n]
        z = (top.values - sign * mean) / std
        for j, (source, side, direction, _, sigma) in enumerate(batch):
            rows.append(dict(component=component, source=source, direction=direction, sign=sign, side=side,
                             rank=np.arange(k), token_id=top.indices[:, j].numpy(),
                             score=top.values[:, j].numpy(), z=z[:, j].numpy(), sigma=sigma))
    return rows


def _assemble(blocks: list[dict]) -> pd.DataFrame:
    if not blocks:
        return pd.DataFrame(columns=[c for c in TOKEN_COLUMNS if c not in ("token", "d_vocab")])
    return pd.concat([pd.DataFrame(b) for b in blocks], ignore_index=True)


def domain_score(df: pd.DataFrame, token_ids: Iterable[int], d_vocab: int | None = None
                 ) -> pd.DataFrame:
    """How many of each direction's top tokens fall in a word list, against chance.

    Args:
        df: a :func:`read_tokens` table (or any table with its key columns and ``token_id``).
        token_ids: the word list as token ids.
        d_vocab: vocabulary size (default the table's ``d_vocab`` column).

    Returns:
        One row per (component, source, direction, sign, side): ``hits`` of ``k`` top tokens in the
        list, ``expected = k·|list|/d_vocab``, ``ratio`` and ``p_value`` (hypergeometric
        ``P(X ≥ hits)`` for ``k`` tokens drawn without replacement), most hits first.
    """
    ids = set(int(t) for t in token_ids)
    if not d_vocab and "d_vocab" in df and len(df):
        d_vocab = int(df["d_vocab"].iloc[0])
    if not d_vocab:
        raise InvalidArgumentError("domain_score needs the vocabulary size: pass d_vocab=... "
                                   "(read_tokens tables carry it in their d_vocab column).")
    K = len(ids)
    keys = ["component", "source", "direction", "sign", "side"]
    grouped = df.assign(hit=df.token_id.isin(ids)).groupby(keys, sort=False)
    out = grouped.agg(hits=("hit", "sum"), k=("hit", "size")).reset_index()
    out["expected"] = out.k * K / d_vocab
    out["ratio"] = out.hits / out.expected if K else np.nan
    out["p_value"] = [_hypergeom_sf(int(h), d_vocab, K, int(n)) for h, n in zip(out.hits, out.k)]
    return out.sort_values(["hits", "p_value"], ascending=[False, True], ignore_index=True)


def _hypergeom_sf(hits: int, N: int, K: int, n: int) -> float:
    """``P(X ≥ hits)`` for ``X`` hypergeometric (population N, K successes, n draws)."""
    total = math.comb(N, n)
    return float(sum(math.comb(K, i) * math.comb(N - K, n - i) for i in range(hits, min(K, n) + 1))
                 / total)


def top_token_text(tokens: pd.DataFrame, component: str, n: int = 5, side: str | None = None) -> str:
    """``"+ a b c / − d e f"``: a component's top update direction's ``n`` tokens of each sign (its
    ``write`` side by default, else its first side), for hover texts; ``""`` without rows."""
    rows = tokens[(tokens.component == component) & (tokens.source == "update") & (tokens.direction == 0)]
    if rows.empty:
        return ""
    side = side or ("write" if (rows.side == "write").any() else rows.side.iloc[0])
    rows = rows[(rows.side == side) & (rows["rank"] < n)]
    parts = [("+" if sign > 0 else "−") + " " + " ".join(g.sort_values("rank").token.astype(str))
             for sign, g in rows.groupby("sign", sort=False)]
    return f"{side}: " + " / ".join(parts)


def concentrated_units(tokens: pd.DataFrame, n: int = 8, top: int = 5) -> pd.DataFrame:
    """The update directions whose top tokens stand out most from the vocabulary: mean ``z`` of
    each (component, direction, sign, side)'s ``top`` tokens, highest ``n`` first."""
    upd = tokens[(tokens.source == "update") & (tokens["rank"] < top)]
    keys = ["component", "direction", "sign", "side"]
    out = upd.groupby(keys, sort=False).agg(mean_z=("z", "mean")).reset_index()
    return out.nlargest(n, "mean_z").reset_index(drop=True)
