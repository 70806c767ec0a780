"""One error family for tv_lens.

Every error tv_lens raises on bad input is a :class:`TvLensError`. Messages are whole sentences
that say what was wrong, what was received, and what to do next, so a user never has to read a
stack trace from inside TransformerLens or transformers to find out what happened.
"""

from __future__ import annotations


class TvLensError(Exception):
    """Base class of every error tv_lens raises on bad input."""


class InvalidArgumentError(TvLensError, ValueError):
    """An argument outside what the function accepts (a ``ValueError`` too)."""


class OutOfRangeError(TvLensError, IndexError):
    """A layer, head, neuron or other index past the model's size (an ``IndexError`` too)."""


class IncompatiblePairError(TvLensError):
    """The base and tuned models do not share an architecture."""


class VocabMismatchError(IncompatiblePairError):
    """The models have different vocabulary sizes (typically a fine-tune that added tokens)."""


class CheckpointNotFoundError(TvLensError):
    """A local path that should hold a checkpoint does not exist or is not a checkpoint."""


class CorruptCheckpointError(CheckpointNotFoundError):
    """A checkpoint file is truncated, corrupt or not what its name says."""


class PickleCheckpointError(TvLensError):
    """A checkpoint holds only pickle weights and the caller did not opt in to reading them."""


class UnsupportedDtypeError(TvLensError):
    """A valid checkpoint tensor of a dtype tv_lens does not read (float8, other quantized)."""


class UnsupportedArchitectureError(TvLensError):
    """The checkpoint's architecture has no tv_lens weight layout (or no TransformerLens adapter)."""


class NonFiniteWeightsError(TvLensError):
    """A model holds NaN or infinite weights."""


class ShapeMismatchError(TvLensError):
    """Tensors do not fit together: a tuning vector applied to the wrong model, or two vectors
    of different models combined."""


class ProcessedWeightsError(TvLensError):
    """A model's weights were folded/centred (compatibility mode); its raw weights are gone."""


class MissingBaseError(TvLensError):
    """A circuit difference needs the base model's weights, which this tuning vector lacks."""


class TvLensWarning(UserWarning):
    """Something tv_lens handled but the user should know about (e.g. mixed dtypes)."""


def close_matches(name: str, options: list[str], n: int = 3) -> str:
    """``" Did you mean 'a', 'b'?"`` for the closest ``options`` to ``name``, or ``""``."""
    import difflib

    hits = difflib.get_close_matches(name, options, n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""
