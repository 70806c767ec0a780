"""tv_lens: mechanistic interpretability of fine-tuning, in TransformerLens.

Pair a base model with its fine-tuned version (:class:`ModelPair`) and work with the tuning
vector ``τ = θ_tuned − θ_base`` (:class:`TuningVector`) per head, neuron and matrix.

Importing this package is free: every public name below is imported from its module on first
use (PEP 562), so ``tv-lens --help`` needs neither torch nor pandas, and plotly, circuitsvis and
TransformerLens load only when a view is drawn or a model is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (a module's own name: the module itself)
_EXPORTS: dict[str, str] = {
    # pairing and tuning vectors
    "ArchSpec": "tv_lens.spec", "HeadDelta": "tv_lens.vector", "ModelPair": "tv_lens.pair",
    "NeuronDelta": "tv_lens.vector", "TuningVector": "tv_lens.vector",
    "compose": "tv_lens.merges", "to_mergekit_config": "tv_lens.merges",
    # components
    "Component": "tv_lens.components", "ComponentIndex": "tv_lens.components",
    # analysis
    "Analysis": "tv_lens.analysis.summary", "AnalysisOptions": "tv_lens.analysis.options",
    "Thresholds": "tv_lens.analysis.labels", "analyze": "tv_lens.analysis.run",
    "compare_representations": "tv_lens.representations", "composition": "tv_lens.circuits",
    "matrix_spectrum": "tv_lens.analysis.spectrum",
    # model zoos: many fine-tunes of one base
    "Zoo": "tv_lens.zoo", "analyze_zoo": "tv_lens.zoo",
    # reading updates as tokens
    "activation_difference_lens": "tv_lens.activation_lens", "domain_score": "tv_lens.readouts",
    "read_tokens": "tv_lens.readouts",
    # SAE latents and TransformerLens 3.x HookedTransformer models
    "SAEWeights": "tv_lens.sae", "load_hooked": "tv_lens.tl_compat",
    "sae_readout": "tv_lens.sae",
    # patching and experiments
    "AttributionComparison": "tv_lens.patching", "activation_patch": "tv_lens.activation_patching",
    "attribute": "tv_lens.patching", "compare_attribution": "tv_lens.patching",
    "completeness": "tv_lens.patching",
    "composition_grid": "tv_lens.merging", "metrics": "tv_lens.metrics",
    "patch": "tv_lens.patching",
    # errors
    **{name: "tv_lens.errors" for name in (
        "CheckpointNotFoundError", "CorruptCheckpointError", "IncompatiblePairError",
        "InvalidArgumentError", "PickleCheckpointError", "UnsupportedDtypeError",
        "MissingBaseError", "NonFiniteWeightsError", "OutOfRangeError", "ProcessedWeightsError",
        "ShapeMismatchError", "TvLensError", "TvLensWarning", "UnsupportedArchitectureError",
        "VocabMismatchError")},
    # views
    "report": "tv_lens.reporting", "viz": "tv_lens.viz",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tv_lens' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if module == f"tv_lens.{name}" else getattr(loaded, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
