"""PEFT/LoRA adapters read from their factors: the same vector and tables as the merged model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import llama_model
from tv_lens import ModelPair, analyze
from tv_lens.analysis.rows import as_2d
from tv_lens.cli import main
from tv_lens.demo import checkpoint_dir, load_pair
from tv_lens.errors import PickleCheckpointError, TvLensError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # name: (family, LoraConfig arguments, adapter_config.json edits after saving)
    "patterns": ("llama", dict(r=2, lora_alpha=4, target_modules=ALL, rank_pattern={"down_proj": 3},
                               alpha_pattern={"q_proj": 8}), {}),
    "rslora_saved": ("llama", dict(r=4, lora_alpha=4, use_rslora=True,
                                   target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"]),
                     {}),
    "dora": ("llama", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj", "down_proj"]),
             {}),
    "gpt2_fused": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                fan_in_fan_out=True), {}),
    # a config without lora_alpha: PEFT's default 8 (not r = 4)
    "alpha_missing": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                      {"lora_alpha": None}),
    # fan_in_fan_out on nn.Linear targets (square ones: a transpose would fit): PEFT ignores it
    "fan_in_fan_out_on_linear": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
                                 {"fan_in_fan_out": True}),
    # ... and transposes Conv1D targets' updates whatever the flag says
    "gpt2_flag_off": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                   fan_in_fan_out=True), {"fan_in_fan_out": False}),
}


def _edit_config(folder, edits: dict) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in edits.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config))


_BUILT: dict[str, tuple] = {}


def _build(variant, llama_dirs, gpt2_dirs, tmp_path_factory, tokenizer):
    """``(base folder, adapter folder, merged folder, variant)`` built with peft itself (once
    per variant)."""
    if variant in _BUILT:
        return _BUILT[variant]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    family, kwargs, edits = VARIANTS[variant]
    base = (llama_dirs if family == "llama" else gpt2_dirs)[0]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, **kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp(f"adapter_{variant}")
    model.save_pretrained(folder)
    _edit_config(folder, edits)
    merged = tmp_path_factory.mktemp(f"merged_{variant}")
    model.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    _BUILT[variant] = base, folder, merged, variant
    return _BUILT[variant]


@pytest.fixture(scope="module", params=list(VARIANTS))
def lora(request, llama_dirs, gpt2_dirs, tmp_path_factory, tokenizer):
    return _build(request.param, llama_dirs, gpt2_dirs, tmp_path_factory, tokenizer)


@pytest.fixture(scope="module", params=[v for v in VARIANTS if v != "dora"])
def lora_factors(request, llama_dirs, gpt2_dirs, tmp_path_factory, tokenizer):
    """The variants whose update is ``scale · B A`` (DoRA's is not: tested on merged models)."""
    return _build(request.param, llama_dirs, gpt2_dirs, tmp_path_factory, tokenizer)


def test_lora_vector_equals_the_merged_models(lora):
    base, adapter, merged, variant = lora
    pair = ModelPair.from_pretrained(base, adapter)
    tv, ref = pair.tuning_vector(), ModelPair.from_pretrained(base, merged).tuning_vector()
    assert tv.lazy and list(tv) == list(ref)
    for name in ref:  # the merged file rounds W + ΔW to float32 once
        torch.testing.assert_close(tv[name], ref[name], atol=2e-6, rtol=1e-4)
    factored = [k for k in tv if tv.factors(k) is not None]
    if variant == "dora":
        assert factored == []  # merged densely: the magnitude rescaling is not low rank
    else:
        assert factored
        for name in factored:
            torch.testing.assert_close(tv.factors(name).dense(), as_2d(name, tv[name]),
                                       atol=1e-7, rtol=1e-6)
    if variant == "patterns":  # rank_pattern: down_proj has rank 3, the others 2
        assert tv.factors("blocks.0.mlp.W_out").rank == 3
        assert tv.factors("blocks.0.attn.W_K").rank == 2
    assert pair.booted == (False, False)



def test_each_update_equals_pefts_get_delta_weight_in_float64(lora_factors):
    """Every LoRA target's update (scale, patterns, rsLoRA, defaults, orientation) equals what
    PEFT computes from the same folder (``get_delta_weight``, float64), and every
    ``modules_to_save`` copy equals PEFT's."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from tv_lens.checkpoints import CheckpointWeights
    from tv_lens.lora import Adapter

    base, adapter, _, variant = lora_factors
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float64), adapter)
    ours = Adapter(adapter, CheckpointWeights(base))
    layers = {name.removeprefix("base_model.model."): m for name, m in peft.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(layers) == set(ours.targets) and layers
    for module, target in ours.targets.items():
        P, Q = ours.checkpoint_factors(target)
        got = P.double() @ Q.double()
        want = layers[module].get_delta_weight("default").detach()
        assert got.shape == want.shape, module
        assert float((got - want).norm() / want.norm()) < 1e-6, (module, variant)
    for key, tensor in ours.saved.items():
        module = peft.get_submodule("base_model.model." + key.rsplit(".", 1)[0])
        torch.testing.assert_close(tensor.double(), module.modules_to_save["default"].weight.detach(),
                                   rtol=0, atol=0)

def test_lora_tables_equal_the_merged_tables(lora):
    base, adapter, merged, variant = lora
    ours = analyze(ModelPair.from_pretrained(base, adapter), progress=False)
    ref = analyze(ModelPair.from_pretrained(base, merged), progress=False)
    for table in ("heads", "neurons", "matrices", "summary"):
        a, b = getattr(ours, table), getattr(ref, table)
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        if "label" in a:
            assert (a["label"] == b["label"]).all(), table
        numeric = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
        np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float),
                                   rtol=2e-3, atol=1e-5, err_msg=table)


def test_demo_lora_adapter_from_its_factors(tmp_path, capsys):
    pair = load_pair("medical_lora")
    tv = pair.tuning_vector()
    targets = [k for k in tv if tv.factors(k) is not None]
    assert len(targets) == 7 * pair.spec.n_layers
    assert all(tv.factors(k).rank == 8 for k in targets)
    result = analyze(pair, progress=False)
    m = result.matrices.dropna(subset=["layer"])
    assert (m["rank_90"] <= 8).all() and (m["label"] != "unchanged").all()
    assert pair.booted == (False, False)
    out = tmp_path / "out"
    assert main(["analyze", str(checkpoint_dir("base")), str(checkpoint_dir("medical_lora")),
                 "--out", str(out)]) == 0
    info = json.loads((out / "summary.json").read_text())["info"]
    assert info["metadata"]["lora_targets"] == 7 * pair.spec.n_layers


def test_adapter_errors(llama_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dirs[0]),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
    with pytest.raises(TvLensError, match=r"its factors have rank 2 but adapter_config.json says 5"):
        ModelPair.from_pretrained(llama_dirs[0], folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(TvLensError, match="is a IA3 adapter; tv_lens reads LoRA adapters"):
        ModelPair.from_pretrained(llama_dirs[0], folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(PickleCheckpointError, match=r"pickle adapter \(adapter_model.bin\)"):
        ModelPair.from_pretrained(llama_dirs[0], folder)
    tv = ModelPair.from_pretrained(llama_dirs[0], folder, allow_pickle=True).tuning_vector()
    assert tv.factors("blocks.0.attn.W_Q").rank == 2
    other = tmp_path / "other_base"
    llama_model(hidden_size=48).save_pretrained(other)
    with pytest.raises(TvLensError, match="the adapter's update has shape .* but the base weight "
                                          "has .* Is this adapter for this base"):
        ModelPair.from_pretrained(other, folder, allow_pickle=True)
