"""Where TransformerLens 3.x and 4.x differ, handled in one place.

tv_lens runs on both lines (``transformer-lens>=3.9,<5``): 3.9 is what SAELens 6.x installs
beside, 4.x is current. Both ship ``TransformerBridge`` with the same parameter names, so weight
reading needs nothing here. The differences that matter:

- only 3.x has ``HookedTransformer`` (and SAELens's ``HookedSAETransformer``), whose loader
  accepts only official Hub names: :func:`load_hooked` loads a *local* checkpoint folder with raw
  weights (no folding, no centring), which is what a tuning vector needs;
- 3.9's bridge gives an HF model without an ``lm_head`` bias an all-zero trainable one
  (``lm_head.bias``); no layout slot reads it, so it never enters a tuning vector (the tests
  compare bridge vectors with checkpoint files and HookedTransformer vectors key for key);
- the bridges compute attention's softmax by different code paths (the tests' float64 fixture
  patches ``torch.nn.functional.softmax``, which both use).
"""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from tv_lens.errors import TvLensError


def tl_version() -> tuple[int, int]:
    """The installed TransformerLens ``(major, minor)``."""
    major, minor = version("transformer-lens").split(".")[:2]
    return int(major), int(minor)


def has_hooked_transformer() -> bool:
    """Whether this TransformerLens line still has ``HookedTransformer`` (3.x)."""
    return tl_version()[0] < 4


def load_hooked(folder: str | os.PathLike, *, cls: Any = None, device: str | None = "cpu",
                dtype: torch.dtype = torch.float32) -> Any:
    """A local checkpoint folder as a ``HookedTransformer`` (or ``cls``, e.g. SAELens's
    ``HookedSAETransformer``) with raw weights, offline.

    ``HookedTransformer.from_pretrained_no_processing`` refuses any name that is not an official
    Hub name; this builds the TL config from the folder's ``config.json`` and loads its weights
    through TransformerLens's own converters, with no folding or centring.
    """
    if not has_hooked_transformer():
        raise TvLensError(
            f"HookedTransformer exists only in TransformerLens 3.x (installed: "
            f"{'.'.join(map(str, tl_version()))}). Use ModelPair.from_pretrained(base, tuned), "
            "which boots TransformerBridges.")
    from transformers import AutoModelForCausalLM
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    from tv_lens.pair import check_checkpoint

    check_checkpoint(folder)
    folder = str(Path(folder).expanduser().resolve())
    cls = cls or HookedTransformer
    with tempfile.TemporaryDirectory() as tmp:
        # TL 3.9 takes the architecture from the *name* when it contains "llama" or "gemma" and
        # then fails on a local folder; a neutrally named link makes it read config.json.
        link = Path(tmp) / "checkpoint"
        link.symlink_to(folder, target_is_directory=True)
        config = loading.convert_hf_model_config(str(link))
    config.update(model_name=folder, tokenizer_name=folder, dtype=dtype, device=device)
    cfg = HookedTransformerConfig(**{k: v for k, v in config.items()
                                     if k in HookedTransformerConfig.__dataclass_fields__})
    hf_model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model=hf_model)
    model = cls(cfg, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.to(device) if device is not None else model
