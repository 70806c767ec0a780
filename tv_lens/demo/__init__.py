"""The shipped demo family: a small Llama-architecture base, two full fine-tunes of it and a LoRA.

``base`` was pre-trained from scratch on a seeded grammar of everyday English; ``medical`` and
``math`` are full fine-tunes of it on seeded clinical question/answer data and arithmetic word
problems; ``medical_lora`` is a rank-8 LoRA adapter of it on the medical data (a PEFT adapter
folder: tv_lens reads its factors); ``sae`` is a sparse autoencoder on the base's residual
stream after block 1 (SAELens's folder format, :func:`load_sae`). See :mod:`tv_lens.demo.corpus`,
:mod:`tv_lens.demo.train` and :mod:`tv_lens.demo.train_sae`;
each checkpoint folder has a model card. Everything loads offline from the installed package.

    >>> from tv_lens.demo import load_pair
    >>> pair = load_pair("medical")          # ModelPair(base, medical fine-tune)
    >>> lora = load_pair("medical_lora")     # ModelPair(base, base + LoRA adapter)
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).parent / "checkpoints"
NAMES = ("base", "medical", "math")
#: Shipped PEFT adapters of ``base`` (folders with adapter_config.json).
ADAPTERS = ("medical_lora",)


def checkpoint_dir(name: str) -> Path:
    """The folder of a shipped checkpoint (``"base"``, ``"medical"``, ``"math"``) or adapter
    (``"medical_lora"``)."""
    if name not in NAMES + ADAPTERS:
        from tv_lens.errors import InvalidArgumentError, close_matches

        raise InvalidArgumentError(f"No demo checkpoint {name!r}; the shipped ones are "
                                   f"{NAMES + ADAPTERS}." + close_matches(name, list(NAMES + ADAPTERS)))
    return CHECKPOINTS / name


def load_base(**boot_kwargs):
    """The demo base model as a ``TransformerBridge`` (raw weights, offline)."""
    from tv_lens.pair import boot

    return boot(checkpoint_dir("base"), **boot_kwargs)


def load_pair(domain: str = "medical", **kwargs):
    """``ModelPair(base, <domain> fine-tune)`` for ``domain`` in ``{"medical", "math",
    "medical_lora"}``."""
    from tv_lens.pair import ModelPair

    if domain == "base":
        from tv_lens.errors import InvalidArgumentError

        raise InvalidArgumentError("Pick a fine-tuned domain: 'medical', 'math' or 'medical_lora'.")
    return ModelPair.from_pretrained(checkpoint_dir("base"), checkpoint_dir(domain), **kwargs)


def load_sae():
    """The demo SAE on the base's ``blocks.1.hook_resid_post`` (an
    :class:`~tv_lens.sae.SAEWeights`; trained by :mod:`tv_lens.demo.train_sae`, its training
    record in ``.metadata["training"]``). SAELens reads the same folder:
    ``SAE.load_from_disk(CHECKPOINTS / "sae")``."""
    from tv_lens.sae import SAEWeights

    return SAEWeights.load(CHECKPOINTS / "sae")


def load_models(**boot_kwargs) -> dict:
    """All three checkpoints as bridges, ``{"base": …, "medical": …, "math": …}``."""
    from tv_lens.pair import boot

    return {name: boot(checkpoint_dir(name), **boot_kwargs) for name in NAMES}
