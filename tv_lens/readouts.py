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
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tv_lens.errors import InvalidArgumentError, TvLensError
from tv_lens.linalg import FactoredSVD, dense_svd, factored_svd

COLUMNS = ["rank", "token_id", "token", "score", "base_score"]


def _unembedding(tv, tuned: bool = False) -> torch.Tensor:
    """``diag(γ) · W_U`` (``[d_model, vocab]``; ``W_Eᵀ`` when embeddings are tied) of the base,
    or with ``tuned`` of the fine-tuned model (base + update)."""
    def weight(name: str) -> Tensor:
        return (tv.base[name] + tv[name] if tuned else tv.base[name]).double()

    W_U = weight("unembed.W_U") if "unembed.W_U" in tv else weight("embed.W_E").T
    W_U = W_U[:, : tv.spec.d_vocab]
    if "ln_final.w" in tv:
        W_U = weight("ln_final.w")[:, None] * W_U
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
    names = token_strings(tokenizer, ids)
    return pd.DataFrame({"rank": range(1, len(ids) + 1), "token_id": ids, "token": names,
                         "score": top.values.tolist(), "base_score": s_base[ids].tolist()},
                        columns=COLUMNS)


# --------------------------------------------------------------------------- weight lens
TOKEN_COLUMNS = ["unit", "source", "direction", "sign", "side", "rank", "token", "token_id",
                 "score", "z", "sigma"]
_MLP_SIDES = {"W_out": ("write",), "W_in": ("read",), "W_gate": ("read",)}
_NEURON_MATRIX = {"out": "W_out", "in": "W_in", "gate": "W_gate"}


def _vector_of(pair_or_vector: Any):
    return pair_or_vector.tuning_vector() if hasattr(pair_or_vector, "tuning_vector") else pair_or_vector


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


def mlp_matrix_units(tv, layer: int, matrices: tuple[str, ...] = ("W_in", "W_gate", "W_out")) -> list[str]:
    """A layer's MLP matrices as units: ``L3.mlp.W_in`` (the dense or shared-expert MLP's) and,
    in a mixture of experts, ``L3E5.mlp.W_in`` (expert 5's), for each matrix the vector has."""
    experts = [""] + [f"E{e}" for e in range(tv.spec.n_experts)]
    return [f"L{layer}{e}.mlp.{m}" for e in experts for m in matrices
            if _mlp_name(layer, e[1:] or None, m) in tv]


def _mlp_name(layer: int | str, expert: int | str | None, matrix: str) -> str:
    return f"blocks.{layer}.mlp.{'' if expert is None else f'experts.{expert}.'}{matrix}"


def _default_units(tv) -> list[str]:
    spec, units = tv.spec, []
    for layer in range(spec.n_layers):
        units += [f"L{layer}H{h}.{c}" for h in range(spec.n_heads) for c in ("OV", "QK")]
        units += mlp_matrix_units(tv, layer)
    return units


def _parse_unit(unit: str, tv) -> tuple[str, int, Any]:
    """``(kind, layer, detail)``: ``("head", l, (h, circuit))``, ``("mlp", l, (TL name,
    matrix))`` or ``("neuron", l, (TL name, n, side))``; a clear error for anything else."""
    import re

    spec = tv.spec
    m = re.fullmatch(r"L(\d+)H(\d+)\.(OV|QK)", unit)
    if m and int(m[1]) < spec.n_layers and int(m[2]) < spec.n_heads:
        return "head", int(m[1]), (int(m[2]), m[3])
    m = re.fullmatch(r"L(\d+)(?:E(\d+))?\.mlp\.(W_in|W_gate|W_out)", unit)
    if m and _mlp_name(m[1], m[2], m[3]) in tv:
        return "mlp", int(m[1]), (_mlp_name(m[1], m[2], m[3]), m[3])
    m = re.fullmatch(r"L(\d+)(?:E(\d+))?N(\d+)\.(out|in|gate)", unit)
    name = m and _mlp_name(m[1], m[2], _NEURON_MATRIX[m[4]])
    if m and name in tv:
        shape = tv.meta(name)[0]  # W_out [d_mlp, d_model], W_in / W_gate [d_model, d_mlp]
        if int(m[3]) < shape[0 if m[4] == "out" else 1]:
            return "neuron", int(m[1]), (name, int(m[3]), m[4])
    raise TvLensError(
        f"Unknown unit {unit!r} for this model ({spec.n_layers} layers, {spec.n_heads} heads, "
        f"d_mlp {spec.d_mlp}). Units are 'L2H5.OV', 'L2H5.QK', 'L3.mlp.W_out' (W_in, W_gate) "
        f"and 'L3N100.out' (in, gate); in a mixture of experts 'L3E5.mlp.W_out' and "
        f"'L3E5N100.out'.")


def _unit_directions(tv, unit: str, directions: int) -> list[tuple[str, str, int, Tensor, float]]:
    """``(source, side, direction, vector, sigma)`` of one unit, update and base."""
    kind, layer, detail = _parse_unit(unit, tv)
    out = []
    if kind == "neuron":
        name, n, side = detail
        axis_row = side == "out"  # W_out rows, W_in / W_gate columns
        upd = tv[name].double()
        for source, W in (("update", upd), ("base", tv.base[name].double())):
            v = W[n] if axis_row else W[:, n]
            norm = float(v.norm())
            if norm > 0:
                out.append((source, "write" if axis_row else "read", 0, v / norm, norm))
        return out
    if kind == "head":
        head, circuit = detail
        sides = ("read", "write") if circuit == "OV" else ("query", "key")
        for source, (A, B) in zip(("update", "base"), _circuit_factors(tv, layer, head, circuit)):
            svd = factored_svd(A, B)
            for side, vecs in zip(sides, (svd.U, svd.V)):
                out += [(source, side, j, vecs[:, j], float(svd.S[j]))
                        for j in range(min(directions, svd.S.numel()))]
        return out
    name, matrix = detail
    for source in ("update", "base"):
        svd = _matrix_svd(tv, name, source == "base")
        vecs = svd.V if matrix == "W_out" else svd.U  # the d_model side
        out += [(source, _MLP_SIDES[matrix][0], j, vecs[:, j], float(svd.S[j]))
                for j in range(min(directions, svd.S.numel()))]
    return out


def read_tokens(pair_or_vector: Any, units: Iterable[str] | None = None, k: int = 20,
                directions: int = 3, *, neurons: Iterable[tuple[int, int]] | None = None,
                score: str = "logit", tokenizer: Any = None, progress: bool = True) -> pd.DataFrame:
    """Every unit's update directions (and the base unit's) read as tokens (module docstring).

    Args:
        pair_or_vector: a ``ModelPair`` or a tuning vector that carries its base.
        units: unit names (``"L2H5.OV"``, ``"L2H5.QK"``, ``"L3.mlp.W_out"``, ``"L3.mlp.W_in"``,
            ``"L3N100.out"``, ``"L3N100.in"``, …); default every head circuit and MLP matrix.
        k: tokens per direction and sign.
        directions: top singular directions per unit (neurons have one).
        neurons: ``(layer, neuron)`` pairs whose ``out`` (and ``in``/``gate``) directions to
            add to ``units``.
        score: ``"logit"`` (the logit-lens dot product above: the logit change per unit
            written) or ``"cosine"`` (divided by each token's ``‖γ ⊙ W_U[:, t]‖`` /
            ``‖W_E[t]‖``: which token's direction the update points at, whatever the token's
            norm; in a trained model high-norm tokens can otherwise outrank the token an update
            was written along).
        tokenizer: to name the tokens (default the pair's).
        progress: a tqdm bar over units.

    Returns:
        One row per token: ``unit, source ("update" | "base"), direction (0 = top), sign
        (+1 | −1), side ("write" | "read" | "query" | "key"), rank (0 = top), token, token_id,
        score`` (the signed readout, larger = more), ``z`` (the score in standard deviations
        of that direction's readout over the whole vocabulary: how much the token stands out),
        ``sigma`` (the direction's singular value, or the neuron slice's norm). ``df.attrs["d_vocab"]`` holds the vocabulary size.
    """
    if k < 1 or directions < 1:
        raise InvalidArgumentError(f"k and directions must be at least 1, got k={k}, directions={directions}.")
    tv = _vector_of(pair_or_vector)
    if tv.base is None:
        tv._base_tensor("embed.W_E")  # raises MissingBaseError with the fix
    tokenizer = tokenizer or getattr(pair_or_vector, "tokenizer", None)
    units = list(units) if units is not None else _default_units(tv)
    for layer, n in neurons or ():
        units += [f"L{layer}N{n}.{side}" for side in ("out", "in", "gate")
                  if f"blocks.{layer}.mlp.{_NEURON_MATRIX[side]}" in tv]
    if score not in ("logit", "cosine"):
        raise InvalidArgumentError(f"score must be 'logit' or 'cosine', got {score!r}.")
    readers = {"write": _unembedding(tv).T, "read": _embedding(tv)}  # [vocab, d_model] each
    if score == "cosine":
        readers = {s: W / W.norm(dim=1, keepdim=True).clamp(min=1e-30) for s, W in readers.items()}
    df = read_directions(tv, units, readers, k, directions, desc="read_tokens", progress=progress)
    ids = [int(i) for i in df.token_id]
    df["token"] = token_strings(tokenizer, ids)
    df = df[TOKEN_COLUMNS]
    df.attrs["d_vocab"] = tv.spec.d_vocab
    return df


def read_directions(tv, units: list[str], readers: dict[str, Tensor], k: int, directions: int, *,
                    desc: str, progress: bool) -> pd.DataFrame:
    """Every unit's update and base directions scored against the rows of ``readers[side]``
    (``[n_rows, d_model]`` per side; ``read`` also serves ``query`` and ``key``): the top ``k``
    rows per direction and sign, as ``token_id`` / ``score`` columns (:func:`_top_rows`)."""
    from tqdm.auto import tqdm

    readers = {**readers, "query": readers["read"], "key": readers["read"]}
    frames = []
    with torch.no_grad():
        for unit in tqdm(units, desc=desc, disable=not progress):
            found = _unit_directions(tv, unit, directions)
            for side in {f[1] for f in found}:
                batch = [f for f in found if f[1] == side]
                scores = readers[side] @ torch.stack([f[3] for f in batch], 1).to(readers[side].device)
                frames += _top_rows(unit, batch, scores.cpu(), k)  # [n_rows, n] scores
    return _assemble(frames)


def _top_rows(unit: str, batch: list, scores: Tensor, k: int) -> list[dict]:
    """Columns of the top-``k`` tokens of every direction in ``batch``, both signs."""
    k = min(k, scores.shape[0])
    mean, std = scores.mean(0), scores.std(0).clamp(min=1e-30)
    rows = []
    for sign in (1, -1):
        top = torch.topk(sign * scores, k, dim=0)  # [k, n]
        z = (top.values - sign * mean) / std
        for j, (source, side, direction, _, sigma) in enumerate(batch):
            rows.append(dict(unit=unit, source=source, direction=direction, sign=sign, side=side,
                             rank=np.arange(k), token_id=top.indices[:, j].numpy(),
                             score=top.values[:, j].numpy(), z=z[:, j].numpy(), sigma=sigma))
    return rows


def _assemble(blocks: list[dict]) -> pd.DataFrame:
    if not blocks:
        return pd.DataFrame(columns=[c for c in TOKEN_COLUMNS if c != "token"])
    return pd.concat([pd.DataFrame(b) for b in blocks], ignore_index=True)


def domain_score(df: pd.DataFrame, token_ids: Iterable[int], d_vocab: int | None = None
                 ) -> pd.DataFrame:
    """How many of each direction's top tokens fall in a word list, against chance.

    Args:
        df: a :func:`read_tokens` table (or any table with its key columns and ``token_id``).
        token_ids: the word list as token ids.
        d_vocab: vocabulary size (default ``df.attrs["d_vocab"]``).

    Returns:
        One row per (unit, source, direction, sign, side): ``hits`` of ``k`` top tokens in the
        list, ``expected = k·|list|/d_vocab``, ``ratio`` and ``p_value`` (hypergeometric
        ``P(X ≥ hits)`` for ``k`` tokens drawn without replacement), most hits first.
    """
    ids = set(int(t) for t in token_ids)
    d_vocab = d_vocab or df.attrs.get("d_vocab")
    if not d_vocab:
        raise TvLensError("domain_score needs the vocabulary size: pass d_vocab=... (read_tokens "
                          "tables carry it in df.attrs['d_vocab']).")
    K = len(ids)
    keys = ["unit", "source", "direction", "sign", "side"]
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


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's token string; ``<id N>`` where there is no tokenizer or it cannot decode the id
    (a padded vocabulary: embedding rows past the tokenizer's last token)."""
    names = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [None] * len(ids)
    return [n if isinstance(n, str) else f"<id {i}>" for i, n in zip(ids, names)]


def top_token_text(tokens: pd.DataFrame, unit: str, n: int = 5, side: str | None = None) -> str:
    """``"+ a b c / − d e f"``: a unit's top update direction's ``n`` tokens of each sign (its
    ``write`` side by default, else its first side), for hover texts; ``""`` without rows."""
    rows = tokens[(tokens.unit == unit) & (tokens.source == "update") & (tokens.direction == 0)]
    if rows.empty:
        return ""
    side = side or ("write" if (rows.side == "write").any() else rows.side.iloc[0])
    rows = rows[(rows.side == side) & (rows["rank"] < n)]
    parts = [("+" if sign > 0 else "−") + " " + " ".join(g.sort_values("rank").token.astype(str))
             for sign, g in rows.groupby("sign", sort=False)]
    return f"{side}: " + " / ".join(parts)


def concentrated_units(tokens: pd.DataFrame, n: int = 8, top: int = 5) -> pd.DataFrame:
    """The update directions whose top tokens stand out most from the vocabulary: mean ``z`` of
    each (unit, direction, sign, side)'s ``top`` tokens, highest ``n`` first."""
    upd = tokens[(tokens.source == "update") & (tokens["rank"] < top)]
    keys = ["unit", "direction", "sign", "side"]
    out = upd.groupby(keys, sort=False).agg(mean_z=("z", "mean")).reset_index()
    return out.nlargest(n, "mean_z").reset_index(drop=True)
