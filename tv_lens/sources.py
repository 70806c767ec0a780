"""Where weights come from: a live model's parameters, read in TransformerLens names.

:class:`ModelWeights` wraps a ``TransformerBridge``, a Hugging Face causal LM or a TL-native
model. It finds the *live* parameters by their checkpoint keys (undoing the bridge's
``_original_component`` nesting and renames), reads them through the layout table in
:mod:`tv_lens.layout`, and is the one place that writes deltas back into a model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from tv_lens.errors import ProcessedWeightsError, TvLensError, UnsupportedArchitectureError
from tv_lens.layout import layout
from tv_lens.slots import Slot
from tv_lens.spec import ArchSpec


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (checked without importing TL)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def is_hooked(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens 3.x ``HookedTransformer`` (SAELens's
    ``HookedSAETransformer`` included), checked without importing TL."""
    return any(cls.__name__ == "HookedTransformer" for cls in type(model).__mro__)


def check_runs_hooks(pair: Any, what: str) -> None:
    """Refuse a pair whose models have no TransformerLens hooks (``what`` needs them): both
    must be ``TransformerBridge``s or TL 3.x ``HookedTransformer``s."""
    if not all(is_bridge(m) or is_hooked(m) for m in (pair.base, pair.tuned)):
        raise TvLensError(
            f"{what} reads TransformerLens hooks, so it needs TransformerBridge (or TL 3.x "
            "HookedTransformer) models: load the pair with ModelPair.from_pretrained(...) or "
            "ModelPair(bridge, bridge).")


_NO_PROCESSING = ("Load it with HookedTransformer.from_pretrained_no_processing(...) (or "
                  "fold_ln=False, center_writing_weights=False, center_unembed=False): a "
                  "difference of processed weights is not the fine-tune's update (folding mixes "
                  "norm gains into the matrices, centring removes a direction).")


def _centred(weight: Tensor, dim: int) -> bool:
    """Whether every mean of ``weight`` along ``dim`` is zero up to rounding (what TL's
    centring leaves, bf16 included). Uncentred, the means of ``n`` entries are of order
    ``|w|/√n`` and the largest of them is well above the threshold ``0.05·|w|/√n``."""
    weight = weight.detach().double()
    n = weight.shape[dim]
    return bool(weight.mean(dim).abs().max() <= 0.05 * weight.abs().mean() / n ** 0.5)


def check_unprocessed(model: Any) -> None:
    """Refuse a HookedTransformer whose weights TransformerLens folded or centred.

    Folding is recorded in the config (``LNPre`` / ``RMSPre``); centring is not, so it is read
    off the weights: ``W_U``'s means over the vocabulary (``center_unembed``) and, for LayerNorm
    models, ``W_E``'s means over ``d_model`` (``center_writing_weights``) are zero only after
    centring. Value-bias folding leaves no trace that tells it from zero-initialised biases.
    """
    norm = str(model.cfg.normalization_type)
    if norm.endswith("Pre"):
        raise ProcessedWeightsError(
            f"This HookedTransformer's norms were folded into the weights (normalization_type "
            f"{norm!r}). {_NO_PROCESSING}")
    centred = [name for name, weight, dim in (("W_U", model.unembed.W_U, 1),
                                              ("W_E", model.embed.W_E, 1))
               if (name == "W_U" or norm == "LN") and _centred(weight, dim)]
    if centred:
        raise ProcessedWeightsError(
            f"This HookedTransformer's weights were centred ({' and '.join(centred)} "
            f"{'have' if len(centred) > 1 else 'has'} zero means: center_"
            f"{'unembed' if centred == ['W_U'] else 'writing_weights'}=True). {_NO_PROCESSING}")


def spec_of(model: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a bridge (HF-backed or TL-native), a TL 3.x HookedTransformer
    (checked for processed weights) or an HF causal LM."""
    if is_bridge(model):
        return ArchSpec.from_bridge(model)
    if is_hooked(model):
        check_unprocessed(model)
        return ArchSpec.from_hooked_config(model.cfg)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return ArchSpec.from_hf_config(config)
    raise UnsupportedArchitectureError(
        f"Cannot read a model architecture from a {type(model).__name__}. Pass a "
        "TransformerBridge (TransformerBridge.boot_transformers(path)), a HookedTransformer "
        "(TransformerLens 3.x) or a Hugging Face causal LM "
        "(AutoModelForCausalLM.from_pretrained(path))."
    )


def _strip_nesting(name: str) -> str:
    key = name.replace("._original_component", "")
    return key[len("_original_component."):] if key.startswith("_original_component.") else key


def _live_parameters(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """``(parameters, aliases)``: checkpoint key -> live parameter, for a bridge or a plain
    module, with a bridge's ``_original_component`` nesting undone.

    ``parameters`` names each parameter once. ``aliases`` holds every other name of one: a
    bridge registers some wrapped modules under TransformerLens names too (GPT-2's ``c_proj``
    first as ``o``), and tied weights (an ``lm_head`` that is the embedding) are aliases as
    well. The separate modules a bridge splits fused tensors into (``attn.q``, ``mlp.gate``)
    appear under the bridge's names.
    """
    params = {_strip_nesting(n): p for n, p in model.named_parameters()}
    aliases: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(_strip_nesting(name), param)
    return params, {k: p for k, p in aliases.items() if k not in params}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype tv_lens reads and adds a parameter of ``dtype`` in: float64 stays float64,
    everything else (float32, bf16, fp16) goes through float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SlotWeights(Mapping):
    """``TL name -> tensor`` over a layout's slots (``self.slots``); subclasses read values.
    Unsubscripted on purpose: a runtime type checker must not sample (read) its values."""

    slots: dict[str, Slot]

    def __iter__(self) -> Iterator[str]:
        return iter(self.slots)

    def __contains__(self, tl_name: object) -> bool:
        return tl_name in self.slots

    def __len__(self) -> int:
        return len(self.slots)


class ModelWeights(SlotWeights):
    """Read-only mapping ``TL name -> tensor`` over a live model's raw weights.

    Values are computed on access (never cached), detached, on the model's device, in
    :func:`compute_dtype` of the parameter (float32; float64 for float64 parameters).
    :meth:`patched` and :meth:`add_` write TL-shaped deltas back into the live parameters.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        if getattr(model, "_weights_processed", False):
            raise ProcessedWeightsError(
                "This bridge's weights were processed (enable_compatibility_mode folds norms "
                "and centres weights in place), so its raw weights are gone and a difference "
                "would mix norm gains into Q/K/V. Boot it again without compatibility mode."
            )
        self.model = model
        self.spec = spec or spec_of(model)
        self.hooked = is_hooked(model)
        self.params, aliases = _live_parameters(model)
        slots = layout(self.spec, set(self.params) | set(aliases), bridge=is_bridge(model),
                       hooked=self.hooked)
        # an alias of a parameter another slot reads under its first name is a tie (lm_head
        # = embedding): not a weight of its own
        first_name = {id(p): k for k, p in self.params.items()}
        used = {s.hf_key for s in slots}
        tied = {k for k, p in aliases.items() if first_name.get(id(p)) in used}
        self.slots: dict[str, Slot] = {s.tl_name: s for s in slots if s.hf_key not in tied}
        self.params.update({s.hf_key: aliases[s.hf_key] for s in self.slots.values()
                            if s.hf_key in aliases})
        missing = [s.hf_key for s in self.slots.values() if s.hf_key not in self.params]
        if missing:
            raise UnsupportedArchitectureError(
                f"The model ({self.spec.architecture}) lacks parameters the {self.spec.family!r} "
                f"weight layout expects, e.g. {missing[:3]}. Its parameters look like "
                f"{list(self.params)[:4]}. Is it a {self.spec.architecture} checkpoint?"
            )

    def __getitem__(self, tl_name: str) -> Tensor:
        slot = self.slots[tl_name]
        with torch.no_grad():
            param = self.params[slot.hf_key].detach()
            return slot.to_tl(param, self.spec, compute_dtype(param.dtype))

    def padding(self) -> set[str]:
        """TL names of the optional slots a HookedTransformer fills in although the checkpoint
        has no such tensor: all-zero biases (``b_Q``, ``b_O``, … of a Llama) and a ``W_U`` that
        is ``W_Eᵀ`` (tied embeddings). Empty for every other model."""
        if not self.hooked:
            return set()
        out = {name for name, slot in self.slots.items()
               if slot.optional and not self.params[slot.hf_key].detach().any()}
        if "unembed.W_U" in self.slots and torch.equal(self["unembed.W_U"], self["embed.W_E"].T):
            out.add("unembed.W_U")
        return out

    def without(self, names: set[str]) -> "ModelWeights":
        """A copy of this source (same live model) with the slots ``names`` dropped."""
        out = copy.copy(self)
        out.slots = {name: slot for name, slot in self.slots.items() if name not in names}
        return out

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {self.params[s.hf_key].dtype for s in self.slots.values()}

    def hf_deltas(self, tl_deltas: Mapping[str, Tensor],
                  alpha: float | int = 1.0) -> dict[str, Tensor]:
        """Checkpoint key -> delta for ``alpha * tl_deltas`` (fused keys summed), in each
        parameter's :func:`compute_dtype`."""
        out: dict[str, Tensor] = {}
        for tl_name, delta in tl_deltas.items():
            slot = self.slots.get(tl_name)
            if slot is None:
                raise TvLensError(
                    f"The model has no parameter {tl_name!r} (its layout is "
                    f"{self.spec.family!r}); the tuning vector was made for another model."
                )
            param = self.params[slot.hf_key]
            dtype = compute_dtype(param.dtype)
            if slot.hf_key not in out:
                out[slot.hf_key] = torch.zeros(param.shape, dtype=dtype, device=param.device)
            slot.add_to_hf(out[slot.hf_key], alpha * delta.to(param.device, dtype), self.spec)
        return out

    def parameter(self, hf_key: str) -> nn.Parameter:
        return self.params[hf_key]

    @contextmanager
    def patched(self, tl_deltas: Mapping[str, Tensor], alpha: float | int = 1.0) -> Iterator[None]:
        """Add ``alpha · tl_deltas`` to the live parameters; on exit (exceptions included) put
        back bit-for-bit copies of the originals. Nested uses restore in order."""
        originals: dict[str, Tensor] = {}
        try:
            for key, delta in self.hf_deltas(tl_deltas, alpha).items():
                if delta.any():
                    originals[key] = self.params[key].detach().clone()
                    _add_into(self.params[key], delta)
            yield
        finally:
            with torch.no_grad():
                for key, original in originals.items():
                    self.params[key].copy_(original)

    def add_(self, tl_deltas: Mapping[str, Tensor], alpha: float | int = 1.0) -> None:
        """Add ``alpha · tl_deltas`` to the live parameters, permanently."""
        for key, delta in self.hf_deltas(tl_deltas, alpha).items():
            _add_into(self.params[key], delta)


@torch.no_grad()
def _add_into(param: nn.Parameter, delta: Tensor) -> None:
    """``param += delta`` computed in the parameter's :func:`compute_dtype` and cast back."""
    dtype = compute_dtype(param.dtype)
    param.copy_((param.to(dtype) + delta.to(dtype)).to(param.dtype))


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def layer_of(tl_name: str) -> int | None:
    """The block index in a TL name (``blocks.3.attn.W_Q`` -> 3), ``None`` for global weights."""
    m = _LAYER.match(tl_name)
    return int(m.group(1)) if m else None
