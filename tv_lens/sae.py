"""Tuning vectors read in a sparse autoencoder's latents: which SAE latents does a fine-tune write?

A sparse autoencoder on a hook of layer ``l`` (``blocks.l.hook_resid_post``, ``hook_resid_pre``,
``hook_resid_mid``, ``hook_mlp_out``, ``hook_attn_out``) encodes ``x`` as
``f = ReLU((x − b_dec) W_enc + b_enc)`` and decodes ``x̂ = f W_dec + b_dec``. Its latents are
directions of the residual stream: ``W_dec[j]`` is what latent ``j`` writes, ``W_enc[:, j]`` is
what it reads. :func:`sae_readout` takes the update directions of every unit that writes into the
hook (the same directions as :func:`tv_lens.read_tokens`: the top singular directions of each
head's ΔOV, of the MLPs' ΔW_out, single neurons' ΔW_out rows) and reads them in those latents:

- ``write`` side: the cosine of the direction with every decoder direction ``W_dec[j]``;
- ``read`` side (ΔOV's input directions, ΔW_in / ΔW_gate, a neuron's ΔW_in column): the cosine
  with every encoder direction ``W_enc[:, j]`` (which latents the update reads).

A random direction in ``d_model`` dimensions has cosine of order ``1/√d_model`` with any fixed
direction; the table's ``chance`` column is the 99th percentile of the *top* cosine a random
direction reaches among all latents (one sign), so a latent above it is one chance would rarely
put there. :class:`SAEWeights` holds the four matrices and the hook name: an SAELens ``SAE`` is
read into it where SAELens is installed, and SAELens's folder format (``cfg.json`` +
``sae_weights.safetensors``) is read and written without SAELens, which cannot be installed
beside TransformerLens 4.x.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tv_lens.errors import CheckpointNotFoundError, InvalidArgumentError, ShapeMismatchError
from tv_lens.components import Components, circuit_name, neuron_matrix_name
from tv_lens.protocols import PairLike
from tv_lens.pair import token_strings
from tv_lens.readouts import mlp_matrices, read_directions, readable

#: Hooks an SAE can sit on, and which units of which layers write into each.
_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_HOOK = re.compile(r"blocks\.(\d+)\.(" + "|".join(_SITES) + r")")
SAE_COLUMNS = ["component", "source", "direction", "sign", "side", "rank", "latent", "cosine", "z",
               "chance", "sigma", "d_sae", "hook"]
WEIGHTS_FILE, CONFIG_FILE = "sae_weights.safetensors", "cfg.json"


@dataclass(frozen=True)
class SAEWeights:
    """The weights of a sparse autoencoder (SAELens names and shapes) and the hook it reads.

    Attributes:
        W_enc: ``[d_in, d_sae]``; ``W_enc[:, j]`` is what latent ``j`` reads.
        W_dec: ``[d_sae, d_in]``; ``W_dec[j]`` is what latent ``j`` writes.
        b_enc: ``[d_sae]``.
        b_dec: ``[d_in]``.
        hook_name: e.g. ``"blocks.1.hook_resid_post"``.
        metadata: what the SAE's ``cfg.json`` says about it (its training, for the demo SAE).
    """

    W_enc: Float[Tensor, "d_in d_sae"]
    W_dec: Float[Tensor, "d_sae d_in"]
    b_enc: Float[Tensor, " d_sae"]
    b_dec: Float[Tensor, " d_in"]
    hook_name: str
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_shapes(self.W_enc, self.W_dec, self.b_enc, self.b_dec)
        self.site  # checks the hook name

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def layer(self) -> int:
        return int(_HOOK.fullmatch(self.hook_name)[1])

    @property
    def site(self) -> str:
        """The hook's kind: ``hook_resid_post``, ``hook_mlp_out``, …"""
        m = _HOOK.fullmatch(self.hook_name)
        if m is None:
            raise InvalidArgumentError(
                f"tv_lens reads SAEs on the residual stream or a block's output, but this SAE's "
                f"hook is {self.hook_name!r}. Supported hooks: blocks.L.{{{', '.join(_SITES)}}}.")
        return m[2]

    @classmethod
    def of(cls, sae: Any, hook_name: str | None = None) -> "SAEWeights":
        """An :class:`SAEWeights`, an SAELens ``SAE`` (its ``cfg.metadata.hook_name``), or a
        mapping with ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` (and ``hook_name``)."""
        if isinstance(sae, cls):
            return sae
        if isinstance(sae, Mapping):
            get = sae.__getitem__
            hook_name = hook_name or sae.get("hook_name")
        else:
            get = lambda name: getattr(sae, name)  # noqa: E731
            cfg = getattr(sae, "cfg", None)
            meta = getattr(cfg, "metadata", None)
            hook_name = (hook_name or getattr(meta, "hook_name", None)
                         or getattr(cfg, "hook_name", None))
        try:
            tensors = {n: torch.as_tensor(get(n)).detach().float().cpu()
                       for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
        except (KeyError, AttributeError) as exc:
            raise InvalidArgumentError(
                f"Cannot read SAE weights from a {type(sae).__name__}: it has no {exc}. Pass an "
                "SAELens SAE, SAEWeights.load(folder), or a dict with W_enc [d_in, d_sae], W_dec "
                "[d_sae, d_in], b_enc, b_dec and hook_name.") from exc
        if not hook_name:
            raise InvalidArgumentError("The SAE's hook is unknown: pass hook_name=..., e.g. "
                                       "'blocks.1.hook_resid_post'.")
        return cls(**tensors, hook_name=hook_name)

    @classmethod
    def load(cls, folder: str | Path) -> "SAEWeights":
        """Read an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) without SAELens."""
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise CheckpointNotFoundError(
                f"{str(folder)!r} is not an SAELens SAE folder: it needs {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (what SAE.save_model(folder) writes).")
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        metadata = cfg.get("metadata") or {}
        hook_name = metadata.get("hook_name") or cfg.get("hook_name")
        weights = cls.of(load_file(folder / WEIGHTS_FILE), hook_name=hook_name)
        return cls(weights.W_enc, weights.W_dec, weights.b_enc, weights.b_dec, hook_name, metadata)

    def save(self, folder: str | Path, *, model_name: str = "", **metadata: Any) -> Path:
        """Write SAELens's folder format (a ``standard`` ReLU SAE), loadable by
        ``sae_lens.SAE.load_from_disk(folder)``; ``metadata`` goes into ``cfg.json``."""
        from safetensors.torch import save_file

        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: getattr(self, n).contiguous() for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
                  folder / WEIGHTS_FILE)
        cfg = {"architecture": "standard", "d_in": self.d_in, "d_sae": self.d_sae,
               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none",
               # sae_lens_version: the folder format's (SAELens reads a folder without it as
               # a pre-6.0 config and then drops the metadata, hook name included)
               "metadata": {"model_name": model_name, "hook_name": self.hook_name,
                            "hook_head_index": None, "prepend_bos": True,
                            "sae_lens_version": "6.0.0", **metadata}}
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        return folder

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return f @ self.W_dec + self.b_dec


def check_shapes(W_enc: Tensor, W_dec: Tensor, b_enc: Tensor, b_dec: Tensor) -> None:
    """A :class:`ShapeMismatchError` naming every SAE weight that does not fit ``W_enc``'s
    ``[d_in, d_sae]``."""
    d_in, d_sae = W_enc.shape
    shapes = {"W_dec": (tuple(W_dec.shape), (d_sae, d_in)), "b_enc": (tuple(b_enc.shape), (d_sae,)),
              "b_dec": (tuple(b_dec.shape), (d_in,))}
    bad = [f"{n} is {got}, expected {want}" for n, (got, want) in shapes.items() if got != want]
    if bad:
        raise ShapeMismatchError(f"The SAE's weights do not fit together (W_enc is "
                                 f"{tuple(W_enc.shape)} = [d_in, d_sae]): {'; '.join(bad)}.")


def writing_layers(site: str, layer: int) -> dict[str, list[int]]:
    """``{"attn": layers, "mlp": layers}`` whose outputs reach ``blocks.{layer}.{site}``."""
    before = list(range(layer))
    return {"hook_resid_pre": {"attn": before, "mlp": before},
            "hook_resid_mid": {"attn": before + [layer], "mlp": before},
            "hook_resid_post": {"attn": before + [layer], "mlp": before + [layer]},
            "hook_attn_out": {"attn": [layer], "mlp": []},
            "hook_mlp_out": {"attn": [], "mlp": [layer]}}[site]


def _default_components(tv, sae: SAEWeights, neurons: int) -> list[str]:
    """Every writing head's OV, every writing MLP's matrices, and the ``neurons`` writing neurons
    with the largest ``‖ΔW_out[n]‖``."""
    writers = writing_layers(sae.site, sae.layer)
    units = [circuit_name(l, h, "OV") for l in writers["attn"] for h in range(tv.spec.n_heads)]
    units += [u for l in writers["mlp"] for u in mlp_matrices(tv, l, ("W_out", "W_in", "W_gate"))]
    if neurons and writers["mlp"] and all(f"blocks.{l}.mlp.W_out" in tv for l in writers["mlp"]):
        norms = torch.stack([tv[f"blocks.{l}.mlp.W_out"].double().norm(dim=1)
                             for l in writers["mlp"]])  # [layers, d_mlp]
        top = torch.topk(norms.flatten(), min(neurons, norms.numel())).indices.tolist()
        for i in top:
            l, n = writers["mlp"][i // norms.shape[1]], i % norms.shape[1]
            units += [neuron_matrix_name(l, n, m) for m in ("W_out", "W_in", "W_gate")
                      if f"blocks.{l}.mlp.{m}" in tv]
    return units


def chance_cosine(directions: Float[Tensor, "n d_in"], samples: int = 256, seed: int = 0,
                  quantile: float = 0.99) -> float:
    """The ``quantile`` of the top cosine (one sign) that a uniformly random direction reaches
    among the unit-normalised ``directions`` (Monte Carlo, seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, directions.shape[1], generator=g, dtype=torch.float64)
    cos = (x / x.norm(dim=1, keepdim=True)) @ directions.T
    return float(torch.quantile(cos.max(dim=1).values, quantile))


def sae_readout(pair: PairLike, sae: Any, k: int = 20, directions: int = 1, *,
                components: Components | None = None, neurons: int = 8,
                progress: bool = True) -> pd.DataFrame:
    """The update directions of the units writing into an SAE's hook, read in its latents.

    Args:
        pair: a ``ModelPair`` or a tuning vector carrying its base.
        sae: an SAELens ``SAE``, an :class:`SAEWeights` or a dict of its weights (see
            :meth:`SAEWeights.of`); its ``d_in`` must be the model's ``d_model``.
        k: latents per direction and sign.
        directions: top singular directions per unit (neurons have one).
        components: what to read, as in :func:`tv_lens.read_tokens` (default: every head OV
            and MLP matrix whose output reaches the hook, and the ``neurons`` writing neurons
            with the largest update).
        neurons: how many single neurons the default components include.
        progress: a tqdm bar over components.

    Returns:
        One row per latent: ``component, source ("update" | "base"), direction, sign, side ("write"
        against the decoder, "read" against the encoder), rank (0 = top), latent, cosine`` (of
        the signed direction with the latent's decoder/encoder direction), ``z`` (the cosine in
        standard deviations of that direction's cosines over all latents), ``chance`` (the 99th
        percentile of the top cosine of a random direction, per side) and ``sigma`` (the
        direction's singular value or the neuron slice's norm), ``d_sae`` and ``hook`` (the
        SAE's hook name).
    """
    if k < 1 or directions < 1:
        raise InvalidArgumentError(f"k and directions must be at least 1, got k={k}, "
                                   f"directions={directions}.")
    tv = pair.tuning_vector()
    sae = SAEWeights.of(sae)
    if sae.d_in != tv.spec.d_model:
        raise ShapeMismatchError(
            f"The SAE reads {sae.d_in}-dimensional activations but the model's d_model is "
            f"{tv.spec.d_model}: it was trained on another model (or on a hook that is not the "
            "residual stream, e.g. hook_z).")
    if sae.layer >= tv.spec.n_layers:
        raise InvalidArgumentError(f"The SAE's hook {sae.hook_name!r} is past the model's "
                                   f"{tv.spec.n_layers} layers.")
    readers = {"write": sae.W_dec.double(), "read": sae.W_enc.T.double()}
    readers = {s: W / W.norm(dim=1, keepdim=True).clamp(min=1e-30) for s, W in readers.items()}
    chance = {s: chance_cosine(W) for s, W in readers.items()}
    chosen = readable(tv, _default_components(tv, sae, neurons) if components is None
                      else components)
    df = read_directions(tv, chosen, readers, k, directions, desc="sae_readout", progress=progress)
    df = df.rename(columns={"token_id": "latent", "score": "cosine"})
    if df.empty:
        return pd.DataFrame(columns=SAE_COLUMNS)
    df["chance"] = df.side.map(lambda s: chance["write" if s == "write" else "read"])
    df["d_sae"], df["hook"] = sae.d_sae, sae.hook_name
    return df[SAE_COLUMNS]


@torch.no_grad()
def top_activations(model: Any, sae: Any, texts: Iterable[str], latents: Iterable[int],
                    k: int = 10) -> pd.DataFrame:
    """Where the given latents fire: the ``k`` strongest activations of each latent over
    ``texts``, run through ``model`` (a bridge or HookedTransformer) one text at a time.

    Returns:
        One row per activation: ``latent, rank, text, pos, token, activation`` (``token`` is
        the token at ``pos``, the position whose residual stream the SAE encoded).
    """
    sae = SAEWeights.of(sae)
    latents = list(latents)
    rows = []
    for i, text in enumerate(texts):
        tokens = model.to_tokens(text)
        _, cache = model.run_with_cache(tokens, names_filter=sae.hook_name)
        acts = sae.encode(cache[sae.hook_name][0].float().cpu())[:, latents]  # [pos, latents]
        names = token_strings(model.tokenizer, tokens[0].tolist())
        for j, latent in enumerate(latents):
            for pos in torch.nonzero(acts[:, j]).flatten().tolist():
                rows.append((latent, i, pos, names[pos], float(acts[pos, j])))
    df = pd.DataFrame(rows, columns=["latent", "text", "pos", "token", "activation"])
    df = df.sort_values(["latent", "activation"], ascending=[True, False])
    df = df.groupby("latent", sort=False).head(k)
    df.insert(1, "rank", df.groupby("latent").cumcount())
    return df.reset_index(drop=True)[["latent", "rank", "text", "pos", "token", "activation"]]
