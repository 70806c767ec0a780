"""tv_lens: mechanistic interpretability of fine-tuning, in TransformerLens.

Pair a base model with its fine-tuned version (:class:`ModelPair`) and work with the tuning
vector ``τ = θ_tuned − θ_base`` (:class:`TuningVector`) per head, neuron and matrix.

Importing this package is cheap: it imports neither plotly nor circuitsvis (``tv_lens.viz`` and
``tv_lens.report`` load them on first use), and TransformerLens only when a model is loaded.
"""

from tv_lens import metrics
from tv_lens.activation_lens import activation_difference_lens
from tv_lens.activation_patching import activation_patch
from tv_lens.alignment import Analysis, Thresholds, analyze, matrix_spectrum
from tv_lens.circuits import composition
from tv_lens.components import Component, ComponentIndex
from tv_lens.compose import compose, to_mergekit_config
from tv_lens.errors import (CheckpointNotFoundError, IncompatiblePairError, InvalidArgumentError,
                            MissingBaseError, NonFiniteWeightsError, OutOfRangeError,
                            ProcessedWeightsError,
                            ShapeMismatchError, TvLensError, TvLensWarning,
                            UnsupportedArchitectureError, VocabMismatchError)
from tv_lens.merging import composition_grid
from tv_lens.pair import ModelPair
from tv_lens.patching import AttributionComparison, attribute, compare_attribution, patch
from tv_lens.readouts import domain_score, read_tokens
from tv_lens.sae import SAEWeights, sae_readout
from tv_lens.representations import compare_representations
from tv_lens.spec import ArchSpec
from tv_lens.tl_compat import load_hooked
from tv_lens.vector import HeadDelta, NeuronDelta, TuningVector
from tv_lens.zoo import Zoo, analyze_zoo

__version__ = "0.1.0"

__all__ = [
    # pairing and tuning vectors
    "ArchSpec", "HeadDelta", "ModelPair", "NeuronDelta", "TuningVector", "compose",
    "to_mergekit_config",
    # components
    "Component", "ComponentIndex",
    # analysis
    "Analysis", "Thresholds", "analyze", "compare_representations", "composition",
    "matrix_spectrum",
    # model zoos: many fine-tunes of one base
    "Zoo", "analyze_zoo",
    # reading updates as tokens
    "activation_difference_lens", "domain_score", "read_tokens",
    # SAE latents and TransformerLens 3.x HookedTransformer models
    "SAEWeights", "load_hooked", "sae_readout",
    # patching and experiments
    "AttributionComparison", "activation_patch", "attribute", "compare_attribution",
    "composition_grid", "metrics", "patch",
    # errors
    "CheckpointNotFoundError", "IncompatiblePairError", "InvalidArgumentError", "MissingBaseError",
    "OutOfRangeError",
    "NonFiniteWeightsError", "ProcessedWeightsError", "ShapeMismatchError", "TvLensError",
    "TvLensWarning", "UnsupportedArchitectureError", "VocabMismatchError",
    # views (imported on first use: plotly and circuitsvis stay out of `import tv_lens`)
    "report", "viz",
]


def __getattr__(name: str):
    if name == "viz":
        import importlib

        return importlib.import_module("tv_lens.viz")
    if name == "report":
        from tv_lens.reporting import report

        return report
    raise AttributeError(f"module 'tv_lens' has no attribute {name!r}")
