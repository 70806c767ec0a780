"""Composing tuning vectors of fine-tunes that share a base, the way mergekit merges them.

tv_lens follows mergekit's *generalized task arithmetic* (``mergekit/merge_methods/
generalized_task_arithmetic.py`` and ``mergekit/sparsify.py``), so a composite built here equals
the one mergekit builds from the same settings (``shared/METHODS.md``, "Composition"). Per
**checkpoint tensor** (a fused GPT-2 ``c_attn`` is one tensor although TransformerLens splits it
into W_Q, W_K, W_V), for vectors ``τ_t`` with weights ``w_t``:

1. sparsify each ``τ_t`` (``density`` = fraction kept, per vector or one for all):
   ``"ties"`` keeps its ``max(1, ⌊density·n⌋)`` largest-magnitude entries; ``"dare_*"`` keeps
   each entry with probability ``density`` (seeded) and rescales the survivors: ``"l1"``
   (mergekit's ``rescale: true``, its default for DARE: ``‖τ‖₁ / ‖kept‖₁`` of the draw),
   ``"inverse"`` (Yu et al. 2023's ``1/density``; mergekit before its L1 rescaling) or ``None``;
2. multiply by ``w_t``;
3. ``"ties"``/``"dare_ties"``: elect the sign of ``Σ_t w_t τ_t`` per entry (``≥ 0`` elects +)
   and keep the entries whose weighted sign agrees; sum them;
4. ``normalize`` (mergekit's defaults: on for ``"ties"``, off otherwise): divide by
   ``Σ_t w_t·[kept and agrees]`` per entry (by ``Σ_t w_t`` without sign election); a zero
   divisor counts as 1;
5. scale by ``lambda_``.

``"task_arithmetic"`` (alias ``"sum"``) is steps 2 and 5: ``λ Σ_t w_t τ_t``; ``"dare"`` is an
alias of ``"dare_linear"``. :func:`to_mergekit_config` writes the YAML that makes mergekit build
the same merge from the full checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tv_lens.errors import InvalidArgumentError
from tv_lens.vector import TuningVector

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
ALIASES = {"sum": "task_arithmetic", "dare": "dare_linear"}
RESCALES = ("l1", "inverse", None)
_NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}
_RENAMED = {"top_k": "`top_k` is now `density` (mergekit's name for the fraction of entries "
                     "each vector keeps): compose(..., method='ties', density=0.2).",
            "drop_rate": "`drop_rate` is now `density` = 1 − drop_rate (mergekit's name for the "
                         "fraction kept): compose(..., method='dare', density=0.5)."}


def _method(method: str) -> str:
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise InvalidArgumentError(f"Unknown method {method!r}; choose one of {METHODS} "
                         f"(aliases: {sorted(ALIASES)}).")
    return name


def _magnitude(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``max(1, ⌊density·n⌋)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    k = max(1, int(density * t.numel()))
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[t.abs().flatten().float().topk(k).indices] = True
    return torch.where(keep.view_as(t), t, torch.zeros_like(t))


def _random(t: Tensor, density: float, rescale: str | None, g: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density``, then rescale (module docstring)."""
    if density >= 1:
        return t
    kept = t * (torch.rand(t.shape, generator=g) < density).to(t.device, t.dtype)
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        before, after = t.abs().sum(), kept.abs().sum()
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    return kept


def _merge(deltas: list[Tensor], weights: list[float], method: str, density: list[float],
           rescale: str | None, normalize: bool, g: torch.Generator) -> Tensor:
    """One checkpoint tensor's merge (flattened), steps 1–4 of the module docstring."""
    if method == "ties":
        deltas = [_magnitude(d, p) for d, p in zip(deltas, density)]
    elif method.startswith("dare"):
        deltas = [_random(d, p, rescale, g) for d, p in zip(deltas, density)]
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)[:, None]
    weighted = torch.stack(deltas) * w
    if method in ("ties", "dare_ties"):
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
        agree = (weighted.sign() == elected).to(weighted.dtype)
        mixed, divisor = (weighted * agree).sum(0), (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed, divisor = weighted.sum(0), w.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    return mixed / divisor if normalize else mixed


def _tensor_groups(tv: TuningVector) -> list[list[str]]:
    """Entry names grouped by the checkpoint tensor they come from (fused QKV: one group)."""
    groups: dict[str, list[str]] = {}
    slots = tv.slots
    for name in tv:
        key = slots[name].hf_key if name in slots else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _per_vector(value: float | int | Sequence[float | int], n: int, what: str) -> list[float]:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise InvalidArgumentError(f"Got {len(values)} {what} values for {n} vectors; pass one each or one "
                         f"for all.")
    return values


def compose(vectors: Sequence[TuningVector], weights: Sequence[float | int] | None = None, *,
            method: str = "task_arithmetic", density: float | Sequence[float] = 1.0,
            lambda_: float | int = 1.0, normalize: bool | None = None, rescale: str | None = "l1",
            seed: int = 0, **removed: Any) -> TuningVector:
    """Merge tuning vectors of the same base into one, as mergekit does (module docstring).

    Args:
        vectors: one or more vectors from fine-tunes of one base model.
        weights: one multiplier per vector (mergekit's ``weight``; default all 1).
        method: ``"task_arithmetic"`` (``"sum"``), ``"ties"``, ``"dare_linear"`` (``"dare"``)
            or ``"dare_ties"``.
        density: fraction of each vector's entries kept (TIES: by magnitude; DARE: at random),
            one value or one per vector; ignored by task arithmetic.
        lambda_: scale of the merged vector (mergekit's ``lambda``).
        normalize: divide by the kept weights per entry (default: mergekit's per method).
        rescale: DARE survivors' rescaling: ``"l1"`` (mergekit), ``"inverse"`` (``1/density``,
            Yu et al.) or ``None``.
        seed: DARE: seed of the drop masks.

    Returns:
        A :class:`TuningVector` with the first vector's spec, base and metadata.
    """
    if removed:
        key = next(iter(removed))
        raise InvalidArgumentError(_RENAMED.get(key, f"compose() got an unexpected keyword {key!r}."))
    vectors = list(vectors)
    if not vectors:
        raise InvalidArgumentError("compose needs at least one tuning vector.")
    method = _method(method)
    weights = _per_vector(1.0 if weights is None else weights, len(vectors), "weight")
    density = _per_vector(density, len(vectors), "density")
    if method != "task_arithmetic" and not all(0 < p <= 1 for p in density):
        raise InvalidArgumentError(f"density must be in (0, 1] (the fraction of entries kept), got {density}.")
    if rescale not in RESCALES:
        raise InvalidArgumentError(f"rescale must be one of {RESCALES}, got {rescale!r}.")
    normalize = _NORMALIZE[method] if normalize is None else normalize
    first = vectors[0]
    for other in vectors[1:]:
        first.check_same(other)
    g = torch.Generator().manual_seed(seed)
    merged = {}
    for names in _tensor_groups(first):
        flat = [torch.cat([v[n].flatten() for n in names]) for v in vectors]
        out = _merge(flat, weights, method, density, rescale, normalize, g) * lambda_
        for name, part in zip(names, out.split([first[n].numel() for n in names])):
            merged[name] = part.view_as(first[name])
    return first.with_deltas(merged)


def to_mergekit_config(vectors: Sequence[TuningVector], weights: Sequence[float | int] | None = None,
                       *, method: str = "task_arithmetic", density: float | Sequence[float] = 1.0,
                       lambda_: float | int = 1.0, normalize: bool | None = None,
                       rescale: str | None = "l1", base_model: str | None = None,
                       models: Sequence[str] | None = None, dtype: str = "float32",
                       path: str | Path | None = None) -> str:
    """The mergekit YAML that builds ``base + compose(vectors, …)`` from the full checkpoints.

    ``base_model`` and ``models`` default to the paths recorded in the vectors' metadata
    (``"base"``, ``"tuned"``: set by :meth:`ModelPair.tuning_vector`). DARE's ``"inverse"``
    rescaling has no mergekit setting (mergekit rescales by the L1 norm) and is refused. Writes
    the YAML to ``path`` when given; returns it.
    """
    import yaml

    name = _method(method)
    vectors = list(vectors)
    weights = _per_vector(1.0 if weights is None else weights, len(vectors), "weight")
    density = _per_vector(density, len(vectors), "density")
    if name.startswith("dare") and rescale == "inverse":
        raise InvalidArgumentError("mergekit has no 1/density rescaling (it rescales DARE by the L1 norm): "
                          "use rescale='l1' (or None) to get a config mergekit reproduces.")
    base_model = base_model or vectors[0].metadata.get("base")
    models = list(models) if models is not None else [v.metadata.get("tuned") for v in vectors]
    if not base_model or any(not m for m in models) or len(models) != len(vectors):
        raise InvalidArgumentError("to_mergekit_config needs the base and each fine-tune's checkpoint "
                          "path: pass base_model=... and models=[...] (one per vector), or use "
                          "vectors from ModelPair.tuning_vector(), which records them.")
    entries = []
    for model, w, p in zip(models, weights, density):
        params: dict[str, float] = {"weight": w}
        if name != "task_arithmetic":
            params["density"] = p
        entries.append({"model": str(model), "parameters": params})
    parameters: dict[str, Any] = {"normalize": _NORMALIZE[name] if normalize is None else normalize,
                                  "lambda": float(lambda_)}
    if name.startswith("dare"):
        parameters["rescale"] = rescale is not None
    config = {"merge_method": name, "base_model": str(base_model), "models": entries,
              "parameters": parameters, "dtype": dtype}
    text = yaml.safe_dump(config, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
