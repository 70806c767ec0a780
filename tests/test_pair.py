"""ModelPair loading paths and every bad-input error, with pinned messages."""

import json
import subprocess
import sys

import pytest
import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from conftest import gpt2_model, llama_model, perturb
from tv_lens import (CheckpointNotFoundError, IncompatiblePairError, ModelPair, TvLensError,
                     NonFiniteWeightsError, ProcessedWeightsError, TvLensWarning,
                     UnsupportedArchitectureError, VocabMismatchError)


def test_from_pretrained_loads_raw_weights(llama_dirs):
    pair = ModelPair.from_pretrained(*llama_dirs)
    assert not getattr(pair.base, "_weights_processed", False)
    assert pair.spec.n_kv_heads == 2 and pair.spec.family == "llama"
    assert "LlamaForCausalLM" in repr(pair)


def test_wrap_loaded_bridges_and_hf_models(llama_dirs, tokens):
    from transformers import AutoModelForCausalLM

    bridges = [TransformerBridge.boot_transformers(str(p)) for p in llama_dirs]
    a = ModelPair(*bridges).tuning_vector()
    hf = [AutoModelForCausalLM.from_pretrained(p) for p in llama_dirs]
    b = ModelPair.from_hf_models(*hf).tuning_vector()
    assert set(a) == set(b) and all(torch.allclose(a[n], b[n]) for n in a)


def test_native_bridge_pair(tokens):
    cfg = dict(d_model=32, d_head=8, n_layers=2, n_ctx=16, d_vocab=96, n_heads=4,
               n_key_value_heads=2, d_mlp=64, act_fn="silu", gated_mlp=True,
               normalization_type="RMS", positional_embedding_type="rotary")
    base = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg, seed=0))
    tuned = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg, seed=1))
    pair = ModelPair(base, tuned)
    with torch.no_grad(), pair.tuning_vector().applied(base):
        torch.testing.assert_close(base(tokens), tuned(tokens), atol=1e-4, rtol=1e-4)


def test_incompatible_pair_names_every_differing_field(save):
    base = save(llama_model(), "inc_base")
    other = save(llama_model(num_hidden_layers=3, intermediate_size=64), "inc_other")
    with pytest.raises(IncompatiblePairError,
                       match=r"n_layers: base=2, tuned=3; d_mlp: base=48, tuned=64"):
        ModelPair.from_pretrained(base, other)
    gpt = save(gpt2_model(), "inc_gpt")
    with pytest.raises(IncompatiblePairError, match="architecture: base='LlamaForCausalLM', "
                                                    "tuned='GPT2LMHeadModel'"):
        ModelPair.from_pretrained(base, gpt)


def test_vocab_mismatch_refused_by_default_then_shared(save, tokens):
    base_model = llama_model()
    tuned_model = perturb(llama_model())
    tuned_model.resize_token_embeddings(100, mean_resizing=False)
    base, tuned = save(base_model, "voc_base"), save(tuned_model, "voc_tuned")
    with pytest.raises(VocabMismatchError, match=r"d_vocab differs: base=96, tuned=100 \(4 tokens "
                                                 r"added.*Pass vocab='shared'.*first 96 rows"):
        ModelPair.from_pretrained(base, tuned)
    pair = ModelPair.from_pretrained(base, tuned, vocab="shared")
    tv = pair.tuning_vector()
    assert tv["embed.W_E"].shape == (96, 32) and tv["unembed.W_U"].shape == (32, 96)
    assert len(pair.added_tokens) == 4
    with torch.no_grad(), tv.applied(pair.base):  # shared rows reproduce the tuned logits there
        torch.testing.assert_close(pair.base(tokens), pair.tuned(tokens)[..., :96],
                                   atol=1e-4, rtol=1e-4)


def test_missing_path_and_non_checkpoint_folders(tmp_path, llama_dirs):
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint at '/no/such/model': the path "
                                                      "does not exist"):
        ModelPair.from_pretrained("/no/such/model", llama_dirs[1])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointNotFoundError, match=r"has no config.json \(found \['notes.txt'\]\)"):
        ModelPair.from_pretrained(tmp_path, llama_dirs[1])


def test_folder_without_tokenizer(tmp_path):
    """Weight analysis needs no tokenizer; booting the model (to run it) does."""
    llama_model().save_pretrained(tmp_path)
    pair = ModelPair.from_pretrained(tmp_path, tmp_path)
    assert pair.tuning_vector().norm() == 0.0
    with pytest.raises(CheckpointNotFoundError, match="has no tokenizer.*tokenizer.save_pretrained"):
        pair.base


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                      "architectures": ["BertForMaskedLM"]}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedArchitectureError, match="no weight layout for architecture "
                                                           "'BertForMaskedLM'.*Supported: "):
        ModelPair.from_pretrained(tmp_path, tmp_path)


def test_nan_weights_are_named(save):
    bad = llama_model()
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    pair = ModelPair.from_pretrained(save(llama_model(), "nan_b"), save(bad, "nan_t"))
    with pytest.raises(NonFiniteWeightsError, match=r"tuned model has 1 NaN/inf value\(s\) in "
                                                    r"blocks.1.mlp.W_out \(checkpoint key "
                                                    r"model.layers.1.mlp.down_proj.weight\)"):
        pair.tuning_vector().dense()  # a pair read from files checks each weight as it is read
    # the difference is taken in place in the tuned tensor: a NaN in the base is still the base's
    pair = ModelPair.from_pretrained(save(bad, "nan_b2"), save(llama_model(), "nan_t2"))
    with pytest.raises(NonFiniteWeightsError, match=r"base model has 1 NaN/inf value\(s\) in "
                                                    r"blocks.1.mlp.W_out"):
        pair.tuning_vector().dense()


def test_in_place_differences_leave_the_checkpoint_reads_intact(save):
    """float32 checkpoints: a read can be the very tensor the checkpoint cache holds; the
    difference is taken in place, so every read must hand out its own copy."""
    base, tuned = llama_model(0), llama_model(1)
    pair = ModelPair.from_pretrained(save(base, "f32_b"), save(tuned, "f32_t"))
    tv = pair.tuning_vector()
    expected = (tuned.model.embed_tokens.weight - base.model.embed_tokens.weight).detach()
    assert tv.base.checkpoint.dtype("model.embed_tokens.weight") == torch.float32
    for _ in range(2):  # read again: the same Δ, not Δ − base
        torch.testing.assert_close(tv["embed.W_E"], expected, rtol=0, atol=0)


def test_processed_weights_refused(llama_dirs):
    base = TransformerBridge.boot_transformers(str(llama_dirs[0]))
    tuned = TransformerBridge.boot_transformers(str(llama_dirs[1]))
    tuned.enable_compatibility_mode()
    with pytest.raises(ProcessedWeightsError, match="weights were processed"):
        ModelPair(base, tuned).tuning_vector()


def test_mixed_dtypes_warn_and_compute_in_float32(llama_dirs):
    base = TransformerBridge.boot_transformers(str(llama_dirs[0]))
    tuned = TransformerBridge.boot_transformers(str(llama_dirs[1]), dtype=torch.bfloat16)
    with pytest.warns(TvLensWarning, match="several dtypes.*float32"):
        tv = ModelPair(base, tuned).tuning_vector()
    assert all(t.dtype == torch.float32 for t in tv.values())


def test_import_does_not_pull_plotting_libraries():
    code = ("import sys, tv_lens; bad = [m for m in ('plotly', 'circuitsvis', 'transformer_lens')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", [[], ["analyze"], ["demo"], ["zoo"]],
                         ids=["tv-lens", "analyze", "demo", "zoo"])
def test_help_imports_neither_torch_nor_pandas(command):
    """``tv-lens [COMMAND] --help`` prints its usage without importing torch or pandas (their
    import is seconds of every call), and public names still load on first use."""
    code = ("import sys\nfrom tv_lens.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "heavy = [m for m in ('torch', 'pandas') if m in sys.modules]\n"
            "print('heavy:', heavy)\nsys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code, *command, "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "heavy: []" in result.stdout, result.stdout + result.stderr
    assert f"usage: tv-lens {' '.join(command)}".strip() in result.stdout


def test_public_names_load_on_first_use():
    code = ("import sys, tv_lens\nassert 'torch' not in sys.modules\n"
            "from tv_lens import ModelPair, metrics, TvLensError\n"
            "assert ModelPair.__module__ == 'tv_lens.pair' and metrics.__name__ == 'tv_lens.metrics'\n"
            "assert set(tv_lens.__all__) <= set(dir(tv_lens))\n"
            "import importlib, pkgutil\n"
            "for m in pkgutil.walk_packages(tv_lens.__path__, 'tv_lens.'):\n"
            "    importlib.import_module(m.name)\n"
            "for name, where in tv_lens._EXPORTS.items():\n"  # no submodule shadows a name
            "    want = importlib.import_module(where)\n"
            "    want = want if where == 'tv_lens.' + name else getattr(want, name)\n"
            "    assert getattr(tv_lens, name) is want, name\n"
            "try:\n    tv_lens.no_such_name\nexcept AttributeError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "has no attribute 'no_such_name'" in result.stdout


def test_lora_adapter_pair_is_exactly_the_low_rank_update(llama_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dirs[0]),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # LoRA starts at B = 0; make the update non-zero
    model.save_pretrained(tmp_path / "adapter")
    lora = model.base_model.model.model.layers[1].self_attn.q_proj
    expected = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    pair = ModelPair.from_peft(llama_dirs[0], tmp_path / "adapter")
    tv = pair.tuning_vector()
    nonzero = {n.split(".", 2)[2] for n, d in tv.items() if d.abs().max() > 0}
    assert nonzero == {"attn.W_Q", "mlp.W_out"}
    w_q = tv["blocks.1.attn.W_Q"]  # [n_heads, d_model, d_head] <- [(h dh), d_model]
    torch.testing.assert_close(w_q.permute(0, 2, 1).reshape(32, 32), expected.detach(),
                               atol=1e-6, rtol=1e-5)
    s = torch.linalg.svdvals(tv["blocks.0.mlp.W_out"].double())  # rank 2 up to fp32 rounding
    assert s[1] > 1e-2 * s[0] and s[2] < 1e-4 * s[0]
    with pytest.raises(CheckpointNotFoundError, match="is not a PEFT adapter folder"):
        ModelPair.from_peft(llama_dirs[0], tmp_path)


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TvLensError, match="(?s)could not load 'someorg/somemodel'.*pass the local "
                                          "folder instead"):
        ModelPair.from_pretrained("someorg/somemodel", "someorg/other")
