"""The architecture facts a weight difference depends on, read the same way from every source.

An :class:`ArchSpec` is read from a Hugging Face config (a ``config.json`` dict or a
``PretrainedConfig``), from a TransformerLens bridge, from a TL-native config, or from a
TransformerLens 3.x ``HookedTransformerConfig``. Two models form
a pair only if every field in :data:`COMPATIBILITY_FIELDS` agrees; ``d_vocab`` is checked
separately because fine-tunes that add tokens are common and have a defined way forward.
"""

from __future__ import annotations

from collections.abc import Iterable

from dataclasses import asdict, dataclass, fields
from typing import Any

from tv_lens.errors import IncompatiblePairError, UnsupportedArchitectureError

#: Hugging Face ``model_type`` / architecture names and the weight layout family they use.
FAMILIES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
    "gpt2": "gpt2", "GPT2LMHeadModel": "gpt2",
    "TransformerLensNative": "native",
}

#: Architectures whose layout is derived from TransformerLens's adapter (``tv_lens.adapters``;
#: each tested in ``tests/test_families.py``) and the ``model_type`` of each.
DERIVED_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text", "Olmo2ForCausalLM": "olmo2", "GPTJForCausalLM": "gptj",
    "Phi3ForCausalLM": "phi3", "GPTNeoXForCausalLM": "gpt_neox",
    "MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe",
    "ArceeForCausalLM": "arcee", "CohereForCausalLM": "cohere", "Cohere2ForCausalLM": "cohere2",
    "Exaone4ForCausalLM": "exaone4", "GlmForCausalLM": "glm", "Glm4ForCausalLM": "glm4",
    "GraniteForCausalLM": "granite", "OlmoForCausalLM": "olmo", "Olmo3ForCausalLM": "olmo3",
    "PhiForCausalLM": "phi", "SmolLM3ForCausalLM": "smollm3", "Starcoder2ForCausalLM": "starcoder2",
    "Ernie4_5ForCausalLM": "ernie4_5", "GraniteMoeForCausalLM": "granitemoe",
    "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense", "Jais2ForCausalLM": "jais2",
    "Ministral3ForCausalLM": "ministral3", "NanoChatForCausalLM": "nanochat",
    "NemotronForCausalLM": "nemotron", "SeedOssForCausalLM": "seed_oss",
    "VaultGemmaForCausalLM": "vaultgemma", "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
FAMILIES.update({name: "adapter" for item in DERIVED_ARCHITECTURES.items() for name in item})

#: configs with GPT-style keys (``n_embd``, ``n_head``, ``n_layer``, ``n_inner``): a plain MLP
#: and LayerNorm, learned positions (GPT-2) or rotary ones (GPT-J)
_GPT_STYLE = {"gpt2": "standard", "gptj": "rotary"}

#: derived families (usual config keys) whose norms are LayerNorms / whose MLP has no gate
#: (each checked against its TransformerLens adapter's config in ``tests/test_families.py``)
LAYERNORM_TYPES = {"gpt_neox", "cohere", "cohere2", "olmo", "phi", "starcoder2", "jais2", "nemotron"}
PLAIN_MLP_TYPES = {"gpt_neox", "arcee", "phi", "starcoder2", "jais2", "nanochat", "nemotron"}

COMPATIBILITY_FIELDS = ("architecture", "n_layers", "d_model", "n_heads", "n_kv_heads",
                        "d_head", "d_mlp", "gated_mlp", "normalization", "positional", "n_experts",
                        "d_mlp_shared")


def config_error(where: str, problem: str) -> "CorruptCheckpointError":
    """The error for a config that cannot describe its checkpoint: ``"{where} {problem}. Fix
    it …"``."""
    from tv_lens.errors import CorruptCheckpointError

    return CorruptCheckpointError(f"{where} {problem}. Fix it so that it describes the "
                                  "checkpoint's weights (or download the checkpoint again).")


@dataclass(frozen=True)
class ArchSpec:
    """Shapes and structure of one model, in TransformerLens vocabulary."""

    architecture: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool
    normalization: str
    positional: str
    #: experts per mixture-of-experts MLP (0: a dense MLP); ``d_mlp`` is then each expert's width
    n_experts: int = 0
    #: width of a mixture-of-experts MLP's always-on shared expert (Qwen-MoE; 0: none)
    d_mlp_shared: int = 0

    @property
    def group_size(self) -> int:
        """Query heads per key-value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key-value head whose K/V query head ``head`` reads."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        # (fields with defaults may be missing: vectors saved before they existed)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def from_hf_config(cls, config: Any, where: str = "config.json") -> "ArchSpec":
        """Read a Hugging Face config (``PretrainedConfig`` or the ``config.json`` dict),
        checked: a JSON object with the keys its family needs, positive integer sizes, heads
        that divide (``where`` names the file in messages).

        Raises:
            CorruptCheckpointError: one sentence per problem, naming the key.
            UnsupportedArchitectureError: no weight layout for the architecture.
        """
        if not isinstance(config, dict) and not hasattr(config, "to_dict"):
            raise config_error(where, f"is a JSON {type(config).__name__}, not an object")
        c = config if isinstance(config, dict) else config.to_dict()
        spec = cls._from_checked(c, where)
        spec._check(where, "head_dim" in c and c["head_dim"] is not None)
        return spec

    def _check(self, where: str, explicit_head_dim: bool) -> None:
        """Sizes positive, heads dividing: the facts every weight shape is derived from."""
        if self.n_heads % self.n_kv_heads:
            raise config_error(where, f"has {self.n_heads} attention heads, not a multiple of its "
                                     f"{self.n_kv_heads} key-value heads")
        if not explicit_head_dim and self.family != "native" and self.d_model % self.n_heads:
            raise config_error(where, f"has d_model {self.d_model}, not a multiple of its "
                                     f"{self.n_heads} attention heads (and no head_dim)")

    @classmethod
    def _from_checked(cls, c: dict[str, Any], where: str) -> "ArchSpec":
        def size(*keys: str, default: Any = None, zero: bool = False) -> int:
            key = next((k for k in keys if c.get(k) is not None), None)
            if key is None and default is None:
                raise config_error(where, f"lacks {keys[0]!r}, which this architecture needs")
            value = c[key] if key is not None else default
            if type(value) is not int or value < (0 if zero else 1):
                raise config_error(where, f"has {key} = {value!r}; it must be a "
                                         f"{'non-negative' if zero else 'positive'} integer")
            return value

        architecture = (c.get("architectures") or [c.get("model_type", "?")])[0]
        model_type = c.get("model_type", "?")
        family = FAMILIES.get(model_type) or FAMILIES.get(architecture)
        if family is None:
            supported = sorted(k for k in FAMILIES if k[0].isupper())
            raise UnsupportedArchitectureError(
                f"tv_lens has no weight layout for architecture {architecture!r} "
                f"(model_type {model_type!r}). Supported: {', '.join(supported)}. "
                "Open an issue with the checkpoint's config.json to add one."
            )
        gpt_style = _GPT_STYLE.get("gpt2" if family == "gpt2" else model_type)
        if gpt_style is not None:
            d_model, n_heads = size("n_embd"), size("n_head")
            return cls(architecture, family, size("n_layer"), d_model, n_heads, n_heads,
                       d_model // n_heads, size("n_inner", default=4 * d_model),
                       size("vocab_size"), False, "LN", gpt_style)
        d_model, n_heads = size("hidden_size"), size("num_attention_heads")
        n_experts = size("num_local_experts", "num_experts", default=0, zero=True)
        # a mixture of experts' d_mlp is one expert's width (Qwen-MoE names it apart)
        d_mlp = (size("moe_intermediate_size", "intermediate_size") if n_experts
                 else size("intermediate_size"))
        shared = size("shared_expert_intermediate_size", default=0, zero=True) if n_experts else 0
        return cls(architecture, family, size("num_hidden_layers"), d_model, n_heads,
                   size("num_key_value_heads", default=n_heads),
                   size("head_dim", default=max(d_model // n_heads, 1)), d_mlp,
                   size("vocab_size"), model_type not in PLAIN_MLP_TYPES,
                   "LN" if model_type in LAYERNORM_TYPES else "RMS", "rotary", n_experts, shared)

    @classmethod
    def from_bridge(cls, bridge: Any) -> "ArchSpec":
        """Read a ``TransformerBridge`` (HF-backed or TL-native)."""
        cfg = bridge.cfg
        hf_config = getattr(getattr(bridge, "original_model", None), "config", None)
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            return cls.from_hf_config(hf_config)
        architecture = getattr(cfg, "architecture", None) or "TransformerLensNative"
        if FAMILIES.get(architecture) != "native":
            raise UnsupportedArchitectureError(
                f"Cannot read the architecture of this bridge (cfg.architecture="
                f"{architecture!r}) and it wraps no Hugging Face model with a config."
            )
        return cls(
            architecture, "native", cfg.n_layers, cfg.d_model, cfg.n_heads,
            getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, cfg.d_head, cfg.d_mlp,
            cfg.d_vocab, bool(cfg.gated_mlp), str(cfg.normalization_type),
            str(getattr(cfg, "positional_embedding_type", "standard")),
        )


    @classmethod
    def from_hooked_config(cls, cfg: Any) -> "ArchSpec":
        """Read a TransformerLens 3.x ``HookedTransformerConfig`` (of a model loaded without
        weight processing; :func:`tv_lens.sources.check_unprocessed` checks that)."""
        architecture = getattr(cfg, "original_architecture", None) or "?"
        family = FAMILIES.get(architecture)
        if family is None or family == "native":
            supported = sorted(k for k in FAMILIES if k[0].isupper() and FAMILIES[k] != "native")
            raise UnsupportedArchitectureError(
                f"tv_lens has no weight layout for this HookedTransformer's architecture "
                f"{architecture!r} (cfg.original_architecture). Supported: "
                f"{', '.join(supported)}."
            )
        return cls(
            architecture, family, cfg.n_layers, cfg.d_model, cfg.n_heads,
            getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, cfg.d_head, cfg.d_mlp,
            cfg.d_vocab, bool(cfg.gated_mlp), str(cfg.normalization_type),
            str(cfg.positional_embedding_type),
        )


_INCOMPATIBLE = {  # what was being done: (names of the two sides, sentence before, sentence after)
    "pair": (("base", "tuned"), "The base and tuned models do not share an architecture, so their "
             "weights cannot be subtracted.", "A tuning vector needs the fine-tuned model and the "
             "exact base model it was fine-tuned from."),
    "combine": (("first", "second"), "The two tuning vectors come from models of different "
                "architectures, so they cannot be combined.", "Combine only vectors of fine-tunes "
                "of the same base model."),
    "apply": (("vector", "model"), "This tuning vector does not fit the model it is applied to.",
              "Apply it to the base model it was computed from (or one of the same architecture)."),
}


def check_compatible(base: ArchSpec, tuned: ArchSpec, what: str = "pair") -> None:
    """Raise :class:`IncompatiblePairError` naming every differing field (``d_vocab`` aside);
    ``what`` (``"pair"``, ``"combine"``, ``"apply"``) says what was being attempted."""
    (a, b), before, after = _INCOMPATIBLE[what]
    diffs = [f"{name}: {a}={getattr(base, name)!r}, {b}={getattr(tuned, name)!r}"
             for name in COMPATIBILITY_FIELDS if getattr(base, name) != getattr(tuned, name)]
    if diffs:
        raise IncompatiblePairError(f"{before} Differing fields: " + "; ".join(diffs) + f". {after}")


def resolve_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """``layers`` as a list (default all), refusing any outside ``0 .. n_layers − 1``."""
    from tv_lens.errors import OutOfRangeError

    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise OutOfRangeError(f"layers {bad} are out of range: the model has {n_layers} layers "
                              f"(0..{n_layers - 1}).")
    return layers
