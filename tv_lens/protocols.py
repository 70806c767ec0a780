"""What the analysed thing is, as types: the first argument of every public function.

Functions that need only weights (``analyze``, ``read_tokens``, ``composition``, …) take a
:class:`PairLike`: a :class:`~tv_lens.ModelPair` or a :class:`~tv_lens.TuningVector` that
carries its base weights (both answer ``tuning_vector()``). Functions that run the models
(``patch``, ``attribute``, ``activation_patch``) take a :class:`LoadedPair`: a ``ModelPair``
with both models loaded. Both are structural (:class:`typing.Protocol`), so a user's own pair
class works if it has these members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tv_lens.vector import TuningVector


@runtime_checkable
class PairLike(Protocol):
    """Anything with a tuning vector: a ``ModelPair``, or a ``TuningVector`` (itself)."""

    def tuning_vector(self) -> "TuningVector": ...


@runtime_checkable
class LoadedPair(Protocol):
    """A pair of loaded models (TransformerBridges or HookedTransformers) and its tuning
    vector: a ``ModelPair``."""

    base: Any
    tuned: Any

    def tuning_vector(self) -> "TuningVector": ...
