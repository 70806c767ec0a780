"""What decides the numbers of an analysis: one options object for ``analyze`` and the zoo.

:func:`~tv_lens.analyze` and :func:`~tv_lens.analyze_zoo` take the same
:class:`AnalysisOptions` (or its fields as keywords), so a zoo's per-fine-tune tables are the
tables ``analyze`` gives with the same options, and an option added here reaches both. How the
work is run (``device``, ``workers``, ``threads``, ``progress``) is not an option: the tables do
not depend on it beyond float rounding, and a zoo's stored tasks are reused across it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from tv_lens.analysis.labels import LABEL_MODES, Thresholds
from tv_lens.errors import InvalidArgumentError, close_matches


@dataclass(frozen=True)
class AnalysisOptions:
    """The options of :func:`~tv_lens.analyze` and :func:`~tv_lens.analyze_zoo`, checked when
    made (an :class:`~tv_lens.InvalidArgumentError` names the bad one).

    Attributes:
        k: singular directions of each matrix update matched against the base.
        tol: relative change below which a unit is ``unchanged`` (its shares are NaN);
            overrides ``thresholds.tol``.
        thresholds: label thresholds (default :class:`Thresholds`).
        level: q-value at or below which a share is significant (default
            ``thresholds.level`` = 0.01).
        labels: ``"calibrated"`` (default: each share tested against its unit's null,
            ``shared/METHODS.md``) or ``"fixed"`` (the 0.5 thresholds of ``thresholds``). Every
            table carries ``z``, ``p_value`` and ``q_value`` (Benjamini–Hochberg over one table's
            units of one kind: heads per circuit, neurons per side, matrices per matrix name)
            for its alignment share, and heads and matrices the same for the amplification
            share (``amplification_z`` …), in both modes.
        null_samples: Monte Carlo draws per head circuit for its null (neurons and matrices
            have closed forms); 0 skips the head tests (only with ``labels="fixed"``).
        seed: seed of the head nulls (the draws of one layer's OV or QK circuits are seeded by
            ``(seed, layer, circuit)`` and shared by its heads, so results do not depend on
            processing order).
        intruder_k, intruder_epsilon: ``n_intruders`` in ``matrices`` (PEFT's ``top_k`` and
            ``threshold_epsilon``): how many of the tuned matrix's top singular vectors on the
            output side have no base singular vector with ``|cos| ≥ ε``. Computed for the
            per-layer linear weights (``[out, in]`` = TransformerLens ``Wᵀ``) in exact mode;
            NaN for embeddings and with ``fast``. GPT-2's fused ``c_attn`` is split into W_Q,
            W_K, W_V here, so its counts differ from PEFT's count on the fused Conv1D tensor.
        fast: per-matrix rows from the top ``fast_rank`` singular triplets of the base and of
            the update (randomized SVD) instead of full decompositions; heads and neurons are
            exact either way. What changes: ``amplification_share``, ``signed_scale``, matches
            and ``top_subspace_share`` use the base's top ``fast_rank`` directions only
            (``top_subspace_share`` within the top ``min(rank_90, fast_rank)``), ``rank_90`` is
            NaN where it exceeds ``fast_rank`` and ``effective_rank`` is NaN (it needs every
            singular value). ``info["fast"]`` records the choice. The matrix table has no
            z/p/q then and keeps the fixed-threshold labels: its base directions were found
            with the update's top directions as probes, so they lean towards the update and a
            random-subspace null would call every update aligned.
        fast_rank: singular triplets per matrix in ``fast`` mode (at least ``k``).
    """

    k: int = 10
    tol: float = 1e-6
    thresholds: Thresholds | None = None
    level: float | None = None
    labels: str = "calibrated"
    null_samples: int = 200
    seed: int = 0
    intruder_k: int = 10
    intruder_epsilon: float = 0.5
    fast: bool = False
    fast_rank: int = 32

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {self.k}.")
        if self.labels not in LABEL_MODES:
            raise InvalidArgumentError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}.")
        if self.level is not None and not 0 < self.level < 1:
            raise InvalidArgumentError(f"level must be in (0, 1), got {self.level}.")
        if self.null_samples < (2 if self.labels == "calibrated" else 0) or self.null_samples == 1:
            raise InvalidArgumentError(f"null_samples must be at least 2 for calibrated labels (or 0 "
                                       f"with labels='fixed'), got {self.null_samples}.")
        if self.intruder_k < 1 or not 0 < self.intruder_epsilon <= 1:
            raise InvalidArgumentError(f"intruder_k must be ≥ 1 and intruder_epsilon in (0, 1], "
                                       f"got {self.intruder_k} and {self.intruder_epsilon}.")
        if self.fast and self.fast_rank < self.k:
            raise InvalidArgumentError(f"fast_rank ({self.fast_rank}) must be at least k "
                                       f"({self.k}).")
        t = replace(self.thresholds or Thresholds(), tol=self.tol)
        bad = {k: v for k, v in t.__dict__.items() if not (0 <= v <= 1 and (k != "level" or v > 0))}
        if bad:
            raise InvalidArgumentError(f"Thresholds must lie in [0, 1] (tol ≥ 0, level > 0); got "
                                       f"{bad}. Shares are fractions: e.g. Thresholds(amplified=0.5, "
                                       "new=0.5).")

    @classmethod
    def of(cls, options: "AnalysisOptions | None" = None, **overrides: Any) -> "AnalysisOptions":
        """``options`` (default: the defaults) with the fields in ``overrides`` replaced: what
        ``analyze(pair, options, k=5)`` and ``analyze_zoo(..., k=5)`` run with."""
        names = [f.name for f in fields(cls)]
        for name in overrides:
            if name not in names:
                raise TypeError(f"{name!r} is not an analysis option (AnalysisOptions: "
                                f"{', '.join(names)}).{close_matches(name, names)}")
        return replace(options or cls(), **overrides)

    @property
    def t(self) -> Thresholds:
        """The thresholds in force: ``thresholds`` with ``tol`` and ``level`` applied."""
        t = replace(self.thresholds or Thresholds(), tol=self.tol)
        return replace(t, level=self.level) if self.level is not None else t

    @property
    def rank(self) -> int | None:
        """Singular triplets per matrix: ``fast_rank`` in fast mode, ``None`` (all) otherwise."""
        return self.fast_rank if self.fast else None

    @property
    def intruders(self) -> tuple[int, float]:
        """PEFT's ``(top_k, threshold_epsilon)`` for ``n_intruders``."""
        return self.intruder_k, self.intruder_epsilon
