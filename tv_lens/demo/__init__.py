"""The shipped demo family: a small Llama-architecture base and two full fine-tunes of it.

``base`` was pre-trained from scratch on a seeded grammar of everyday English; ``medical`` and
``math`` are full fine-tunes of it on seeded clinical question/answer data and arithmetic word
problems (see :mod:`tv_lens.demo.corpus` and :mod:`tv_lens.demo.train`; each checkpoint folder
has a model card). Everything loads offline from the installed package.

    >>> from tv_lens.demo import load_pair
    >>> pair = load_pair("medical")          # ModelPair(base, medical fine-tune)
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).parent / "checkpoints"
NAMES = ("base", "medical", "math")


def checkpoint_dir(name: str) -> Path:
    """The folder of a shipped checkpoint: ``"base"``, ``"medical"`` or ``"math"``."""
    if name not in NAMES:
        from tv_lens.errors import TvLensError, close_matches

        raise TvLensError(f"No demo checkpoint {name!r}; the shipped ones are {NAMES}."
                          + close_matches(name, list(NAMES)))
    return CHECKPOINTS / name


def load_base(**boot_kwargs):
    """The demo base model as a ``TransformerBridge`` (raw weights, offline)."""
    from tv_lens.pair import boot

    return boot(checkpoint_dir("base"), **boot_kwargs)


def load_pair(domain: str = "medical", **kwargs):
    """``ModelPair(base, <domain> fine-tune)`` for ``domain`` in ``{"medical", "math"}``."""
    from tv_lens.pair import ModelPair

    if domain == "base":
        raise ValueError("Pick a fine-tuned domain: 'medical' or 'math'.")
    return ModelPair.from_pretrained(checkpoint_dir("base"), checkpoint_dir(domain), **kwargs)


def load_models(**boot_kwargs) -> dict:
    """All three checkpoints as bridges, ``{"base": …, "medical": …, "math": …}``."""
    from tv_lens.pair import boot

    return {name: boot(checkpoint_dir(name), **boot_kwargs) for name in NAMES}
