"""Activation patching across the pair: run one model on the other's activations.

``activation_patch(pair, metric, hooks)`` caches one model's activations at TransformerLens hook
points (``run_with_cache``) and replays them into the other model (``hooks(fwd_hooks=…)``), one
hook point (and head, and position) at a time, on the metric's own tokens:

- ``into="base"``: the base model runs with the tuned model's activation. Its
  normalised effect says how much of the tuned behaviour that activation alone carries.
- ``into="tuned"``: the tuned model runs with the base model's activation; a normalised
  effect near 0 says the tuned behaviour needs that activation.

Normalised effect, as everywhere in tv_lens: ``(f(patched) − f(base)) / (f(tuned) − f(base))``,
0 = base, 1 = tuned. Hooks whose activation has a head axis (``attn.hook_z``, ``hook_q``,
``hook_k``, ``hook_v``, ``hook_result``: ``[batch, pos, head, d_head]``) are patched one head at
a time; ``positions="each"`` patches one position at a time (positions of the right-padded
batch, so use prompts of one template or a single prompt).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from tv_lens.errors import InvalidArgumentError, TvLensError, close_matches
from tv_lens.components import head_name, hook_of, stream_of_hook
from tv_lens.protocols import LoadedPair
from tv_lens.metrics import Metric, MetricLike, as_metric, model_device
from tv_lens.patching import normalized_effect
from tv_lens.sources import check_runs_hooks
from tv_lens.spec import resolve_layers

#: which model receives the other's activations (the ``into`` column)
RECEIVERS = ("base", "tuned")
#: Hook points whose activations are ``[batch, pos, head, d_head]``.
_PER_HEAD = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_result")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
COLUMNS = ["component", "into", "hook", "layer", "head", "pos", "base", "tuned", "patched",
           "normalized"]


def _hook_names(model: Any, hooks: Iterable[str] | str, layers: Sequence[int] | None,
                n_layers: int) -> list[tuple[str, int | None]]:
    """Full hook names with their layer: block-relative names expand over ``layers``."""
    available = list(getattr(model, "hook_dict", {}))
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    layers = resolve_layers(layers, n_layers)
    out = []
    for hook in hooks:
        hook = hook_of(hook) or hook  # a component name: L3.resid_pre, L3.attn, L3.mlp
        full = [hook] if hook.startswith("blocks.") or hook not in _block_hooks(available) \
            else [f"blocks.{l}.{hook}" for l in layers]
        for name in full:
            if name not in available:
                raise InvalidArgumentError(
                    f"The model has no hook point {name!r}. Block hooks are named like "
                    "'hook_resid_pre', 'hook_attn_out', 'hook_mlp_out', 'attn.hook_z' (expanded over "
                    "layers) or in full, 'blocks.2.attn.hook_z'."
                    + close_matches(name, available))
            m = _BLOCK.match(name)
            out.append((name, int(m.group(1)) if m else None))
    return out


def _block_hooks(available: list[str]) -> set[str]:
    return {m.group(2) for m in map(_BLOCK.match, available) if m}


def check_same_tokenization(pair: Any, metric: Metric) -> None:
    """Raise unless both models' tokenizers turn the metric's texts into the same ids."""
    tok_b, tok_t = (getattr(m, "tokenizer", None) for m in (pair.base, pair.tuned))
    if tok_b is None or tok_t is None or tok_b is tok_t or metric.tokenizer is not None:
        return
    for text in metric.texts:
        a = tok_b(text, add_special_tokens=False).input_ids
        b = tok_t(text, add_special_tokens=False).input_ids
        if a != b:
            raise TvLensError(
                f"The two models tokenise {text[:60]!r} differently (base {a[:8]}…, tuned "
                f"{b[:8]}…), so their activations cannot be swapped position by position. "
                "Activation patching needs a shared tokenizer; pass tokenizer= to the metric "
                "to pick one if the ids agree on the tokens you use.")


def _patches(name: str, layer: int | None, shape: torch.Size, positions: str) -> list[dict]:
    """Every (head, pos) slice of one hook's activation to patch, as index dicts."""
    heads = range(shape[2]) if name.endswith(_PER_HEAD) and len(shape) == 4 else [None]
    pos = range(shape[1]) if positions == "each" else [None]
    return [dict(hook=name, layer=layer, head=h, pos=p) for h in heads for p in pos]


def _replace(source: torch.Tensor, head: int | None, pos: int | None):
    """A forward hook that writes ``source`` into the activation at ``[:, pos, head]``."""
    index = (slice(None), slice(None) if pos is None else pos) + (() if head is None else (head,))

    def hook(activation, hook=None):
        patched = activation.clone()
        patched[index] = source[index].to(activation.dtype)
        return patched

    return hook


def activation_patch(pair: LoadedPair, metric: MetricLike, hooks: Iterable[str] | str = "hook_resid_pre", *,
                     layers: Sequence[int] | None = None, positions: str = "all",
                     into: str = "both", progress: bool = True) -> pd.DataFrame:
    """Run one model of the pair with the other's activations at chosen hook points.

    Args:
        pair: a :class:`~tv_lens.ModelPair` of ``TransformerBridge`` models.
        metric: a :mod:`tv_lens.metrics` metric (it holds the tokens both models run on).
        hooks: hook names relative to a block (``"hook_resid_pre"``, ``"hook_attn_out"``,
            ``"hook_mlp_out"``, ``"attn.hook_z"``: expanded over ``layers``), full names
            (``"blocks.2.attn.hook_z"``) or component names of residual-stream points and
            block outputs (``"L2.resid_pre"``, ``"L2.attn"``, ``"L2.mlp"``).
        layers: blocks to expand block-relative names over (default all).
        positions: ``"all"`` patches every position at once; ``"each"`` one position at a time.
        into: which model runs with the other's activations: ``"base"``, ``"tuned"`` or
            ``"both"``.
        progress: show a tqdm bar over batches.

    Returns:
        One row per (into, hook, head, position): ``component`` (the head ``L2H5`` where
        split by head, else the hook's residual-stream point ``L2.resid_pre`` or part
        ``L2.attn``/``L2.mlp`` (:func:`tv_lens.components.stream_of_hook`), else ``<NA>``),
        ``into, hook, layer, head, pos, base, tuned, patched, normalized`` (``head``/``pos``
        are NA where not split).
    """
    check_runs_hooks(pair, "Activation patching")
    if positions not in ("all", "each"):
        raise InvalidArgumentError(f"positions must be 'all' or 'each', got {positions!r}.")
    if into not in (*RECEIVERS, "both"):
        raise InvalidArgumentError(f"into must be one of {RECEIVERS} or 'both', got {into!r}.")
    metric = as_metric(metric)
    batches = metric.batches(pair.base)
    check_same_tokenization(pair, metric)
    widths = {int(b.tokens.shape[1]) for b in batches}
    if positions == "each" and len(widths) > 1:
        raise InvalidArgumentError(f"positions='each' needs inputs of one length, but the metric's batches "
                          f"are {sorted(widths)} tokens wide. Use one prompt, or prompts of one "
                          "template that tokenise to the same length.")
    names = _hook_names(pair.base, hooks, layers, pair.spec.n_layers)
    f_base, f_tuned = metric.value(pair.base), metric.value(pair.tuned)
    receivers = RECEIVERS if into == "both" else (into,)
    totals: dict[tuple, float] = {}
    device = model_device(pair.base)
    with torch.no_grad():
        for b, batch in enumerate(tqdm(batches, desc="activation patching", disable=not progress)):
            batch = batch.to(device)
            for d in receivers:
                receiver, source = (pair.base, pair.tuned) if d == "base" else (pair.tuned, pair.base)
                wanted = {n for n, _ in names}
                _, cache = source.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted)
                for name, layer in names:
                    for spec in _patches(name, layer, cache[name].shape, positions):
                        hook = _replace(cache[name], spec["head"], spec["pos"])
                        with receiver.hooks(fwd_hooks=[(name, hook)]):
                            term = metric.term(receiver(batch.tokens), batch)
                        key = (d, name, layer, spec["head"], spec["pos"])
                        totals[key] = totals.get(key, 0.0) + float(term)
    rows = [dict(component=head_name(layer, head) if head is not None else stream_of_hook(name),
                 into=d, hook=name, layer=layer, head=head,
                 pos=pos, base=f_base,
                 tuned=f_tuned, patched=value, normalized=normalized_effect(value, f_base, f_tuned))
            for (d, name, layer, head, pos), value in totals.items()]
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("layer", "head", "pos"):
        df[col] = df[col].astype("Int64")
    return df
