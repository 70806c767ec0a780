"""ModelPair: a base model and its fine-tuned version, loaded identically and checked.

``ModelPair`` is the only place tv_lens loads models. Both models are booted the same way with
**raw** weights (no compatibility mode, no LayerNorm folding: see ``shared/METHODS.md``), their
architectures are compared field by field, and their vocabularies are reconciled explicitly.

A pair made from local folders (:meth:`ModelPair.from_pretrained`) reads its weights straight
from the checkpoint files, one tensor at a time (:mod:`tv_lens.checkpoints`), and boots its
TransformerLens models only when something runs them (patching, representations, attention
views): weight analysis of a 70B pair never holds a model. The tuned side may be a PEFT adapter
folder, whose factors are used as they are (:mod:`tv_lens.lora`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from tv_lens.errors import (CheckpointNotFoundError, InvalidArgumentError, NonFiniteWeightsError,
                            TvLensError, TvLensWarning, VocabMismatchError)
from tv_lens.lazy import LazyDeltas
from tv_lens.sources import ModelWeights, spec_of
from tv_lens.spec import ArchSpec, check_compatible
from tv_lens.vector import TuningVector

VOCAB_MODES = ("error", "shared")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_like_path(name: str) -> bool:
    """Hub names are ``org/model`` (at most one slash); anything else path-like is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def is_adapter(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` is a local PEFT adapter folder (has ``adapter_config.json``)."""
    return (Path(str(name_or_path)).expanduser() / "adapter_config.json").is_file()


def check_checkpoint(name_or_path: str | os.PathLike, *, tokenizer: bool = True) -> ArchSpec | None:
    """Validate a local checkpoint folder before reading or booting it; return its spec.

    Returns ``None`` for a Hugging Face hub name (nothing local to check). Raises
    :class:`CheckpointNotFoundError` for a missing path or a folder that is not a checkpoint
    (or, with ``tokenizer=True``, has no tokenizer: booting needs one, weight analysis does not),
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
    if tokenizer and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointNotFoundError(
            f"{name!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}), and without one "
            "TransformerLens tries the Hugging Face Hub. Save the tokenizer next to the weights: "
            "tokenizer.save_pretrained(folder)."
        )
    from tv_lens.checkpoints import read_config

    return ArchSpec.from_hf_config(read_config(path), repr(str(Path(path) / "config.json")))


def _card_base_model(folder: Path) -> list[str]:
    """The ``base_model`` entries of a Hugging Face model card's metadata (README.md)."""
    import re

    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return []
    meta = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    found = re.findall(r"^base_model:[ \t]*(\S.*)$|^base_model:\s*\n((?:\s*-\s*\S+\s*\n?)+)",
                       meta, re.M)
    names = []
    for single, listed in found:
        names += [single.strip("'\" ")] if single else re.findall(r"-\s*(\S+)", listed)
    return names


def check_order(base: str | os.PathLike, tuned: str | os.PathLike) -> None:
    """Refuse a PEFT adapter passed as the base, and warn where the model cards say the two
    models are swapped (the "base" fine-tuned from the "tuned"); otherwise nothing is guessed."""
    base_dir, tuned_dir = Path(base).expanduser(), Path(tuned).expanduser()
    if (base_dir / "adapter_config.json").is_file():
        raise CheckpointNotFoundError(
            f"{str(base)!r}, given as the base, is a PEFT adapter folder. Pass the base model's "
            "folder first and the adapter second.")
    if not (base_dir.is_dir() and tuned_dir.is_dir()):
        return
    named = {n.rstrip("/").rsplit("/", 1)[-1] for n in _card_base_model(base_dir)}
    if tuned_dir.resolve().name in named:
        warnings.warn(f"The model card of {str(base)!r}, given as the base, says it was "
                      f"fine-tuned from {tuned_dir.resolve().name!r}, given as the fine-tune: "
                      "are the two swapped? The base comes first.", TvLensWarning, stacklevel=2)


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


def _finite_difference(base: torch.Tensor, tuned: torch.Tensor, weights: Any, name: str, *,
                       in_place: bool = False) -> torch.Tensor:
    """``tuned − base`` (written into ``tuned`` when ``in_place``: one tensor fewer at the peak
    of an embedding's read), or a :class:`NonFiniteWeightsError` naming the model and parameter
    (one finiteness pass over the difference: NaN or inf in either weight makes it non-finite)."""
    delta = tuned.sub_(base) if in_place else tuned - base
    if torch.isfinite(delta.sum()) or torch.isfinite(delta).all():  # (a sum is 15× faster; it
        return delta  # is non-finite wherever an entry is, and rarely overflows otherwise)
    base_bad = ~torch.isfinite(base)
    # (tuned was overwritten in place: its bad values are where Δ is non-finite but base is not)
    tuned_bad = ~torch.isfinite(delta) & ~base_bad if in_place else ~torch.isfinite(tuned)
    for which, bad_mask in (("base", base_bad), ("tuned", tuned_bad)):
        bad = int(bad_mask.sum())
        if bad:
            raise NonFiniteWeightsError(
                f"The {which} model has {bad} NaN/inf value(s) in {name} "
                f"(checkpoint key {weights.slots[name].hf_key}). A weight difference with NaN is "
                "meaningless; check how the checkpoint was saved or converted."
            )
    raise NonFiniteWeightsError(
        f"{name} differs by more than the float range between the models (overflow in tuned − "
        "base); check how the checkpoints were saved or converted.")


def _vocab_error(n_base: int, n_tuned: int) -> VocabMismatchError:
    shared = min(n_base, n_tuned)
    return VocabMismatchError(
        f"d_vocab differs: base={n_base}, tuned={n_tuned} ({abs(n_tuned - n_base)} tokens "
        f"{'added' if n_tuned > n_base else 'removed'} by the fine-tune). Pass vocab='shared' "
        f"(CLI: --vocab shared) to compare embeddings and unembeddings on the first {shared} rows; the extra "
        "tokens are then listed in pair.added_tokens."
    )


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's token string; ``<id N>`` where there is no tokenizer or it cannot decode the id
    (a padded vocabulary: embedding rows past the tokenizer's last token)."""
    names = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [None] * len(ids)
    return [n if isinstance(n, str) else f"<id {i}>" for i, n in zip(ids, names)]


def difference(base: Any, tuned: Any, *, vocab: str = "error",
               metadata: dict[str, Any] | None = None) -> TuningVector:
    """``tuned − base`` for two loaded models, checked (see :class:`ModelPair`).

    A HookedTransformer fills in tensors its checkpoint does not have (zero biases, an untied
    copy of a tied ``W_U``); a slot that is such padding in both models is left out, so the
    vector holds exactly the checkpoint's parameters."""
    base_w, tuned_w = ModelWeights(base), ModelWeights(tuned)
    hooked = [w.padding() for w in (base_w, tuned_w) if w.hooked]
    padding = set.intersection(*hooked) if hooked else set()
    return weight_difference(base_w.without(padding), tuned_w.without(padding), vocab=vocab,
                             metadata=metadata)


def weight_difference(base_w: Any, tuned_w: Any, *, vocab: str = "error",
                      metadata: dict[str, Any] | None = None, lazy: bool = False) -> TuningVector:
    """``tuned − base`` for two ``TL name -> tensor`` weight sources (live models'
    :class:`~tv_lens.sources.ModelWeights` or checkpoints'
    :class:`~tv_lens.checkpoints.CheckpointWeights`), checked.

    ``lazy=True`` computes each entry on access (the sources must know shapes and dtypes
    without reading: ``shape(name)``, ``dtype(name)``) and keeps nothing.
    """
    if vocab not in VOCAB_MODES:
        raise InvalidArgumentError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}.")
    check_compatible(base_w.spec, tuned_w.spec)
    n_base, n_tuned = base_w.spec.d_vocab, tuned_w.spec.d_vocab
    shared = min(n_base, n_tuned)
    if n_base != n_tuned and vocab == "error":
        raise _vocab_error(n_base, n_tuned)
    missing = [name for name in base_w if name not in tuned_w]
    if missing:
        raise TvLensError(f"The tuned model lacks {missing[0]} which the base model has.")
    dtypes = sorted(str(d) for d in base_w.dtypes | tuned_w.dtypes)
    if len(dtypes) > 1:
        warnings.warn(f"The models hold weights of several dtypes ({', '.join(dtypes)}); "
                      "tv_lens computes every difference in float32 (float64 where a model holds "
                      "float64).", TvLensWarning, stacklevel=3)

    in_place = getattr(tuned_w, "returns_copies", False)  # tuned tensors are ours to change

    def base_and_delta(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = base_w[name], tuned_w[name]
        if name == "embed.W_E":
            b, t = b[:shared], t[:shared]
        elif name == "unembed.W_U":
            b, t = b[:, :shared], t[:, :shared]
        return b, _finite_difference(b, t, base_w, name, in_place=in_place)

    def delta(name: str) -> torch.Tensor:
        return base_and_delta(name)[1]

    if lazy:
        meta = {}
        for name in base_w:
            shape = list(base_w.shape(name))
            if name in ("embed.W_E", "unembed.W_U"):
                shape[0 if name == "embed.W_E" else 1] = shared
            meta[name] = (tuple(shape), torch.promote_types(base_w.dtype(name), tuned_w.dtype(name)))
        deltas: Any = LazyDeltas(meta, delta, with_base=base_and_delta)
    else:
        deltas = {name: delta(name) for name in tqdm(base_w, desc="tuning vector", leave=False,
                                                     disable=None)}
    spec = base_w.spec
    if n_base != shared:  # the vector then lives in the shared vocabulary
        spec = ArchSpec.from_dict({**spec.to_dict(), "d_vocab": shared})
    meta_data = {"vocab": vocab, "d_vocab_base": n_base, "d_vocab_tuned": n_tuned,
                 **(metadata or {})}
    return TuningVector(deltas, spec, base=base_w, metadata=meta_data)


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

    Pairs made by :meth:`from_pretrained` from local folders read weights from the files and
    boot :attr:`base` / :attr:`tuned` on first access (:attr:`booted` says whether they have).
    """

    def __init__(self, base: Any, tuned: Any, *, vocab: str = "error",
                 names: tuple[str, str] | None = None):
        if vocab not in VOCAB_MODES:
            raise InvalidArgumentError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}.")
        self._models: list[Any] = [base, tuned]
        self._booters: tuple[Callable[[], Any], Callable[[], Any]] | None = None
        self._make_vector: Callable[[], TuningVector] | None = None
        self.vocab = vocab
        self.base_spec, self.tuned_spec = spec_of(base), spec_of(tuned)
        self._check_specs()
        self.names = names or (_name_of(base), _name_of(tuned))
        self._tuning_vector: TuningVector | None = None

    def _check_specs(self) -> None:
        check_compatible(self.base_spec, self.tuned_spec)
        n_base, n_tuned = self.base_spec.d_vocab, self.tuned_spec.d_vocab
        if n_base != n_tuned and self.vocab == "error":
            raise _vocab_error(n_base, n_tuned)

    @classmethod
    def _lazy(cls, specs: tuple[ArchSpec, ArchSpec], make_vector: Callable[[], TuningVector],
              booters: tuple[Callable[[], Any], Callable[[], Any]], *, vocab: str,
              names: tuple[str, str]) -> "ModelPair":
        """A pair whose vector comes from ``make_vector`` and whose models boot on demand."""
        if vocab not in VOCAB_MODES:
            raise InvalidArgumentError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}.")
        pair = cls.__new__(cls)
        pair._models, pair._booters, pair._make_vector = [None, None], booters, make_vector
        pair.vocab, pair.names, pair._tuning_vector = vocab, names, None
        pair.base_spec, pair.tuned_spec = specs
        pair._check_specs()
        return pair

    def _model(self, i: int) -> Any:
        if self._models[i] is None:
            self._models[i] = self._booters[i]()
        return self._models[i]

    @property
    def base(self) -> Any:
        """The base model (a ``TransformerBridge``; booted now if it was not yet)."""
        return self._model(0)

    @property
    def tuned(self) -> Any:
        """The fine-tuned model (a ``TransformerBridge``; booted now if it was not yet)."""
        return self._model(1)

    @property
    def booted(self) -> tuple[bool, bool]:
        """Whether the base and the tuned model are loaded (weight analysis never loads them)."""
        return self._models[0] is not None, self._models[1] is not None

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
        """The base model's tokenizer (read from its folder without booting the model when
        the pair was made from folders; ``None`` when there is none)."""
        if self._models[0] is not None or self._booters is None:
            return getattr(self.base, "tokenizer", None)
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = None
            folder = Path(self.names[0]).expanduser()
            if any((folder / f).is_file() for f in _TOKENIZER_FILES):
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(folder)
                except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
                    raise CheckpointNotFoundError(
                        f"The tokenizer in {str(folder)!r} could not be loaded "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                        ". Save it again next to the weights: tokenizer.save_pretrained(folder)."
                    ) from exc
        return self._tokenizer

    @property
    def added_tokens(self) -> list[str]:
        """Tokens the tuned vocabulary has beyond the base's (empty when sizes agree)."""
        n_base, n_tuned = self.base_spec.d_vocab, self.tuned_spec.d_vocab
        if n_tuned <= n_base:
            return []
        return token_strings(getattr(self.tuned, "tokenizer", None), list(range(n_base, n_tuned)))

    def tuning_vector(self, *, dense: bool = False) -> TuningVector:
        """``tuned − base`` for every weight (made once, then cached).

        For a pair read from files the vector is lazy (each entry read from the checkpoints on
        access); ``dense=True`` returns it with every entry in memory (cached too), which is what
        repeated patching of live models wants.
        """
        if self._tuning_vector is None:
            metadata = {"base": self.names[0], "tuned": self.names[1]}
            self._tuning_vector = (self._make_vector() if self._make_vector is not None else
                                   difference(self.base, self.tuned, vocab=self.vocab,
                                              metadata=metadata))
        if dense and self._tuning_vector.lazy:
            self._tuning_vector = self._tuning_vector.dense()
        return self._tuning_vector

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, tuned: str | os.PathLike, *,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, vocab: str = "error",
                        allow_pickle: bool = False, **boot_kwargs: Any) -> "ModelPair":
        """Pair two checkpoints: local folders (read lazily), a base folder and a PEFT adapter
        folder (``adapter_config.json``; the adapter's factors are used as they are), or HF hub
        names (booted now).

        Local folders are checked (architecture, vocabulary, shapes against ``config.json``,
        truncated files) from their headers before any weight is read; the models boot on first
        use with raw weights, in ``dtype`` on ``device``, with ``boot_kwargs`` going to
        ``TransformerBridge.boot_transformers``. Weight analysis reads the files in their stored
        precision (float32 for bf16/fp16), or in float64 when ``dtype`` is float64. ``allow_pickle=True`` reads ``pytorch_model.bin``
        checkpoints with ``torch.load(weights_only=True)``; without it they are refused.
        """
        from tv_lens.checkpoints import CheckpointWeights

        names = (str(base), str(tuned))
        boot_opts = dict(device=device, dtype=dtype, **boot_kwargs)
        if is_adapter(tuned):
            return cls._from_adapter(base, tuned, vocab=vocab, allow_pickle=allow_pickle,
                                     boot_opts=boot_opts)
        specs = check_checkpoint(base, tokenizer=False), check_checkpoint(tuned, tokenizer=False)
        if not all(specs):  # a hub name: nothing local to read, boot both now
            if all(s is not None for s in specs):
                check_compatible(*specs)
            models = [boot(p, **boot_opts) for p in (base, tuned)]
            return cls(*models, vocab=vocab, names=names)
        check_compatible(*specs)
        sources = [CheckpointWeights(p, allow_pickle=allow_pickle, float64=dtype == torch.float64)
                   for p in (base, tuned)]

        def make_vector() -> TuningVector:
            return weight_difference(*sources, vocab=vocab, lazy=True,
                                     metadata={"base": names[0], "tuned": names[1]})

        booters = (lambda: boot(base, **boot_opts), lambda: boot(tuned, **boot_opts))
        return cls._lazy((sources[0].spec, sources[1].spec), make_vector, booters, vocab=vocab,
                         names=names)

    @classmethod
    def _from_adapter(cls, base: str | os.PathLike, adapter: str | os.PathLike, *, vocab: str,
                      allow_pickle: bool, boot_opts: dict[str, Any]) -> "ModelPair":
        from tv_lens.checkpoints import CheckpointWeights
        from tv_lens.lora import Adapter, lora_vector

        if check_checkpoint(base, tokenizer=False) is None:
            raise CheckpointNotFoundError(
                f"A PEFT adapter is read against a local base folder, but {str(base)!r} is not "
                "one. Download the base model once and pass its folder."
            )
        base_w = CheckpointWeights(base, allow_pickle=allow_pickle,
                                   float64=boot_opts.get("dtype") == torch.float64)
        lora = Adapter(adapter, base_w, allow_pickle=allow_pickle)
        names = (str(base), f"{base} + {adapter}")

        def make_vector() -> TuningVector:
            return lora_vector(base_w, lora, metadata={"base": names[0], "tuned": names[1]})

        booters = (lambda: boot(base, **boot_opts),
                   lambda: boot_merged_adapter(base, adapter, **boot_opts))
        return cls._lazy((base_w.spec, base_w.spec), make_vector, booters, vocab=vocab,
                         names=names)

    @classmethod
    def from_hf_models(cls, base: Any, tuned: Any, *, tokenizer: Any = None,
                       vocab: str = "error") -> "ModelPair":
        """Wrap two already-loaded Hugging Face causal LMs as bridges (keeping their dtype).

        ``tokenizer`` must be re-creatable from its ``name_or_path`` (TransformerLens reloads
        it): save it next to the weights and pass the loaded one, or pass ``None`` to use the
        model's own ``name_or_path``.
        """
        return cls(bridge_of(base, tokenizer), bridge_of(tuned, tokenizer), vocab=vocab)

    @classmethod
    def from_peft(cls, base: str | os.PathLike, adapter: str | os.PathLike, *,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  vocab: str = "error", allow_pickle: bool = False) -> "ModelPair":
        """Pair a base checkpoint folder with a PEFT (LoRA) adapter folder: the same as
        :meth:`from_pretrained` with the adapter folder as ``tuned``. Each target's tuning
        vector is kept as ``scale · B A`` (:meth:`TuningVector.factors`)."""
        if not is_adapter(adapter):
            raise CheckpointNotFoundError(
                f"{str(adapter)!r} is not a PEFT adapter folder: it has no adapter_config.json. "
                "Pass the folder that peft_model.save_pretrained(...) wrote."
            )
        return cls.from_pretrained(base, adapter, device=device, dtype=dtype, vocab=vocab,
                                   allow_pickle=allow_pickle)


def bridge_of(model: Any, tokenizer: Any = None) -> Any:
    """An already-loaded Hugging Face causal LM wrapped as a ``TransformerBridge``."""
    from transformer_lens.model_bridge import TransformerBridge

    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    if not name:
        raise TvLensError(
            "This HF model has no name_or_path, which TransformerLens needs to set up "
            "the bridge. Save it with model.save_pretrained(folder) (with its tokenizer) "
            "and load it from there, or use ModelPair.from_pretrained(folder, …)."
        )
    return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)


def boot_merged_adapter(base: str | os.PathLike, adapter: str | os.PathLike, *,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, **_: Any) -> Any:
    """The base with a PEFT adapter merged in (``merge_and_unload``), as a bridge. Needs
    ``peft`` (the ``lora`` extra)."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise TvLensError("Running a LoRA-tuned model needs the peft package: "
                          "pip install 'tv-lens[lora]' (or pip install peft).") from exc
    from transformers import AutoModelForCausalLM

    check_checkpoint(base)
    tuned = AutoModelForCausalLM.from_pretrained(base, torch_dtype=dtype)
    tuned = PeftModel.from_pretrained(tuned, str(Path(adapter).expanduser())).merge_and_unload()
    bridge = bridge_of(tuned)  # the tokenizer comes from the base folder
    return bridge.to(device) if device is not None else bridge
