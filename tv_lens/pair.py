"""ModelPair: a base model and its fine-tuned version, loaded identically and checked.

``ModelPair`` is the only place tv_lens loads models. Both models are booted the same way with
**raw** weights (no compatibility mode, no LayerNorm folding: see ``shared/METHODS.md``), their
architectures are compared field by field, and their vocabularies are reconciled explicitly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tv_lens.errors import (CheckpointNotFoundError, NonFiniteWeightsError, TvLensError,
                            TvLensWarning, VocabMismatchError)
from tv_lens.sources import ModelWeights, spec_of
from tv_lens.spec import ArchSpec, check_compatible
from tv_lens.vector import TuningVector

VOCAB_MODES = ("error", "shared")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_like_path(name: str) -> bool:
    """Hub names are ``org/model`` (at most one slash); anything else path-like is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def check_checkpoint(name_or_path: str | os.PathLike) -> ArchSpec | None:
    """Validate a local checkpoint folder before booting it; return its spec.

    Returns ``None`` for a Hugging Face hub name (nothing local to check). Raises
    :class:`CheckpointNotFoundError` for a missing path or a folder that is not a checkpoint,
    and :class:`~tv_lens.errors.UnsupportedArchitectureError` for an architecture tv_lens has no
    layout for.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise CheckpointNotFoundError(
                f"No checkpoint at {name!r}: the path does not exist. Pass an existing folder "
                "(with config.json, weights and tokenizer) or a Hugging Face model name."
            )
        return None
    if not path.is_dir() or not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else [path.name]
        raise CheckpointNotFoundError(
            f"{name!r} is not a checkpoint folder: it has no config.json (found {found}). "
            "Pass the folder that model.save_pretrained(...) wrote."
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointNotFoundError(
            f"{name!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}), and without one "
            "TransformerLens tries the Hugging Face Hub. Save the tokenizer next to the weights: "
            "tokenizer.save_pretrained(folder)."
        )
    return ArchSpec.from_hf_config(json.loads((path / "config.json").read_text()))


def boot(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None,
         dtype: torch.dtype = torch.float32, **boot_kwargs: Any):
    """Boot one model as a ``TransformerBridge`` with raw weights, with clear errors."""
    from transformer_lens.model_bridge import TransformerBridge

    check_checkpoint(name_or_path)
    name = str(Path(name_or_path).expanduser()) if Path(str(name_or_path)).expanduser().exists() \
        else str(name_or_path)
    try:
        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **boot_kwargs)
    except (OSError, ValueError) as exc:
        raise TvLensError(
            f"TransformerLens could not load {name!r}: {str(exc).rstrip('.')}. If this is a "
            "Hugging Face name, this machine may be offline: download it once and pass the local "
            "folder instead."
        ) from exc


def _finite(tensor: torch.Tensor, weights: ModelWeights, name: str, which: str) -> torch.Tensor:
    """``tensor`` itself, or a :class:`NonFiniteWeightsError` naming the parameter."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteWeightsError(
            f"The {which} model has {bad} NaN/inf value(s) in {name} "
            f"(checkpoint key {weights.slots[name].hf_key}). A weight difference with NaN is "
            "meaningless; check how the checkpoint was saved or converted."
        )
    return tensor


def difference(base: Any, tuned: Any, *, vocab: str = "error",
               metadata: dict[str, Any] | None = None) -> TuningVector:
    """``tuned − base`` for two loaded models, checked (see :class:`ModelPair`)."""
    if vocab not in VOCAB_MODES:
        raise ValueError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}.")
    base_w, tuned_w = ModelWeights(base), ModelWeights(tuned)
    check_compatible(base_w.spec, tuned_w.spec)
    n_base, n_tuned = base_w.spec.d_vocab, tuned_w.spec.d_vocab
    shared = min(n_base, n_tuned)
    if n_base != n_tuned and vocab == "error":
        raise VocabMismatchError(
            f"d_vocab differs: base={n_base}, tuned={n_tuned} ({abs(n_tuned - n_base)} tokens "
            f"{'added' if n_tuned > n_base else 'removed'} by the fine-tune). Pass vocab='shared' "
            f"to compare embeddings and unembeddings on the first {shared} rows; the extra "
            "tokens are then listed in pair.added_tokens."
        )
    dtypes = sorted(str(d) for d in base_w.dtypes | tuned_w.dtypes)
    if len(dtypes) > 1:
        warnings.warn(f"The models hold weights of several dtypes ({', '.join(dtypes)}); "
                      "tv_lens computes every difference in float32 (float64 where a model holds "
                      "float64).", TvLensWarning, stacklevel=3)
    deltas = {}
    for name in tqdm(base_w, desc="tuning vector", leave=False, disable=None):
        if name not in tuned_w:
            raise TvLensError(f"The tuned model lacks {name} which the base model has.")
        b = _finite(base_w[name], base_w, name, "base")
        t = _finite(tuned_w[name], tuned_w, name, "tuned")
        if name == "embed.W_E":
            b, t = b[:shared], t[:shared]
        elif name == "unembed.W_U":
            b, t = b[:, :shared], t[:, :shared]
        deltas[name] = t - b
    spec = base_w.spec
    if n_base != shared:  # the vector then lives in the shared vocabulary
        spec = ArchSpec.from_dict({**spec.to_dict(), "d_vocab": shared})
    meta = {"vocab": vocab, "d_vocab_base": n_base, "d_vocab_tuned": n_tuned, **(metadata or {})}
    return TuningVector(deltas, spec, base=base_w, metadata=meta)


def _name_of(model: Any) -> str:
    cfg = getattr(model, "cfg", None)
    for attr in ("model_name", "name_or_path", "_name_or_path"):
        for holder in (cfg, getattr(model, "config", None)):
            value = getattr(holder, attr, None)
            if value:
                return str(value)
    return type(model).__name__


class ModelPair:
    """A base model and its fine-tuned version.

    Args:
        base, tuned: ``TransformerBridge`` objects (or HF causal LMs / TL-native modules) with raw
            weights.
        vocab: ``"error"`` (default) refuses models with different vocabulary sizes;
            ``"shared"`` compares embeddings and unembeddings on the shared rows and lists the
            added tokens in :attr:`added_tokens`.
        names: optional ``(base_name, tuned_name)`` used in metadata and reports.

    Raises:
        IncompatiblePairError: naming every architecture field that differs.
        VocabMismatchError: vocabulary sizes differ and ``vocab="error"``.
    """

    def __init__(self, base: Any, tuned: Any, *, vocab: str = "error",
                 names: tuple[str, str] | None = None):
        if vocab not in VOCAB_MODES:
            raise ValueError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}.")
        self.base, self.tuned, self.vocab = base, tuned, vocab
        self.base_spec, self.tuned_spec = spec_of(base), spec_of(tuned)
        check_compatible(self.base_spec, self.tuned_spec)
        if self.base_spec.d_vocab != self.tuned_spec.d_vocab and vocab == "error":
            difference(base, tuned, vocab="error")  # raises the explanatory VocabMismatchError
        self.names = names or (_name_of(base), _name_of(tuned))
        self._tuning_vector: TuningVector | None = None

    def __repr__(self) -> str:
        s = self.base_spec
        return (f"ModelPair({self.names[0]!r} -> {self.names[1]!r}: {s.architecture}, "
                f"{s.n_layers} layers, d_model={s.d_model}, {s.n_heads} heads / "
                f"{s.n_kv_heads} kv heads, d_mlp={s.d_mlp})")

    @property
    def spec(self) -> ArchSpec:
        """The shared architecture (``d_vocab`` of the base)."""
        return self.base_spec

    @property
    def tokenizer(self):
        return getattr(self.base, "tokenizer", None)

    @property
    def added_tokens(self) -> list[str]:
        """Tokens the tuned vocabulary has beyond the base's (empty when sizes agree)."""
        n_base, n_tuned = self.base_spec.d_vocab, self.tuned_spec.d_vocab
        if n_tuned <= n_base:
            return []
        tok = getattr(self.tuned, "tokenizer", None)
        ids = range(n_base, n_tuned)
        if tok is None:
            return [f"<id {i}>" for i in ids]
        return [tok.convert_ids_to_tokens(i) or f"<id {i}>" for i in ids]

    def tuning_vector(self) -> TuningVector:
        """``tuned − base`` for every weight (computed once, then cached)."""
        if self._tuning_vector is None:
            self._tuning_vector = difference(
                self.base, self.tuned, vocab=self.vocab,
                metadata={"base": self.names[0], "tuned": self.names[1]})
        return self._tuning_vector

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, tuned: str | os.PathLike, *,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, vocab: str = "error",
                        **boot_kwargs: Any) -> "ModelPair":
        """Load both models identically (HF names or local checkpoint folders) with raw weights.

        ``boot_kwargs`` go to ``TransformerBridge.boot_transformers`` for both models.
        Architectures are checked from the config files before any weights are loaded.
        """
        specs = check_checkpoint(base), check_checkpoint(tuned)
        if all(specs):
            check_compatible(*specs)
        models = [boot(p, device=device, dtype=dtype, **boot_kwargs) for p in (base, tuned)]
        return cls(*models, vocab=vocab, names=(str(base), str(tuned)))

    @classmethod
    def from_hf_models(cls, base: Any, tuned: Any, *, tokenizer: Any = None,
                       vocab: str = "error") -> "ModelPair":
        """Wrap two already-loaded Hugging Face causal LMs as bridges (keeping their dtype).

        ``tokenizer`` must be re-creatable from its ``name_or_path`` (TransformerLens reloads
        it): save it next to the weights and pass the loaded one, or pass ``None`` to use the
        model's own ``name_or_path``.
        """
        from transformer_lens.model_bridge import TransformerBridge

        bridges = []
        for model in (base, tuned):
            name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
            if not name:
                raise TvLensError(
                    "This HF model has no name_or_path, which TransformerLens needs to set up "
                    "the bridge. Save it with model.save_pretrained(folder) (with its tokenizer) "
                    "and load it from there, or use ModelPair.from_pretrained(folder, …)."
                )
            bridges.append(TransformerBridge.boot_transformers(name, hf_model=model,
                                                               tokenizer=tokenizer))
        return cls(*bridges, vocab=vocab)

    @classmethod
    def from_peft(cls, base: str | os.PathLike, adapter: str | os.PathLike, *,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  vocab: str = "error") -> "ModelPair":
        """Pair a base checkpoint with itself plus a PEFT (LoRA) adapter, merged.

        The tuned model is the base with the adapter merged in (``merge_and_unload``), so the
        tuning vector is exactly the adapter's low-rank update ``scaling · B @ A`` per target
        module. Needs ``pip install peft`` (the ``lora`` extra).
        """
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise TvLensError("Pairing a LoRA adapter needs the peft package: "
                              "pip install 'tv-lens[lora]' (or pip install peft).") from exc
        from transformers import AutoModelForCausalLM

        check_checkpoint(base)
        adapter_path = Path(adapter).expanduser()
        if not (adapter_path / "adapter_config.json").is_file():
            raise CheckpointNotFoundError(
                f"{str(adapter)!r} is not a PEFT adapter folder: it has no adapter_config.json. "
                "Pass the folder that peft_model.save_pretrained(...) wrote."
            )
        load = dict(torch_dtype=dtype)
        base_hf = AutoModelForCausalLM.from_pretrained(base, **load)
        tuned_hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **load),
                                             str(adapter_path)).merge_and_unload()
        tuned_hf.name_or_path = base_hf.name_or_path  # tokenizer comes from the base folder
        pair = cls.from_hf_models(base_hf, tuned_hf, vocab=vocab)
        if device is not None:
            pair.base.to(device), pair.tuned.to(device)
        pair.names = (str(base), f"{base} + {adapter}")
        return pair
