"""Weights read from checkpoint files, one tensor at a time: the same tables as loaded models,
bounded reads, clear errors for broken files, lazy tuning vectors and --fast."""

import json
import pathlib
import re
import shutil

import pandas as pd
import pytest
import torch

from conftest import gpt2_model, llama_model
from test_alignment import check_planted, plant
from tv_lens import ModelPair, TuningVector, analyze
from tv_lens.checkpoints import Checkpoint, CheckpointWeights, SafetensorsFile, write_safetensors
from tv_lens.cli import main
from tv_lens.demo import checkpoint_dir
from tv_lens.errors import (CheckpointNotFoundError, CorruptCheckpointError, PickleCheckpointError,
                            ShapeMismatchError)
from tv_lens.pair import boot

TABLES = ("heads", "neurons", "matrices", "summary")


def assert_same_tables(a, b):
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)


def loaded(base, tuned) -> ModelPair:
    """The in-memory path: both models booted as bridges first."""
    return ModelPair(boot(base), boot(tuned))


def test_streaming_equals_in_memory_on_the_demo_pair():
    pair = ModelPair.from_pretrained(checkpoint_dir("base"), checkpoint_dir("medical"))
    streamed = analyze(pair, progress=False)
    assert pair.booted == (False, False)  # weight analysis never boots the models
    assert pair.tuning_vector().lazy
    assert_same_tables(streamed, analyze(loaded(checkpoint_dir("base"), checkpoint_dir("medical")),
                                         progress=False))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streaming_equals_in_memory_on_planted_pairs(family, save, tokenizer, tmp_path):
    model = llama_model() if family == "llama" else gpt2_model()
    tuned, *expected = plant(model)
    b, t = save(model, f"stream_{family}_b"), save(tuned, f"stream_{family}_t")
    streamed = analyze(ModelPair.from_pretrained(b, t), progress=False)
    check_planted(streamed.heads, streamed.neurons, *expected)
    assert_same_tables(streamed, analyze(loaded(b, t), progress=False))
    sharded = tmp_path / "sharded"
    tuned.save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_tables(streamed, analyze(ModelPair.from_pretrained(b, sharded), progress=False))


def test_reads_are_bounded_to_what_is_asked(llama_dirs, monkeypatch):
    reads = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, key: reads.append(key) or original(self, key))
    pair = ModelPair.from_pretrained(*llama_dirs)
    tv = pair.tuning_vector()
    assert reads == []  # construction reads headers only
    tv.head(1, 0)
    assert reads and all(".layers.1.self_attn." in k for k in reads)
    reads.clear()
    repr(2 * tv - tv)
    tv.select(layers=[0])
    assert reads == []  # arithmetic and select are lazy too


def test_plain_checkpoints_skip_the_conversion_rules(llama_dirs, monkeypatch):
    """A checkpoint stored under the in-memory names (Llama here) is read without importing
    transformers' conversion rules (seconds of imports); renamed or per-expert checkpoints use
    them (GPT-NeoX, Mixtral: ``test_families.py``)."""
    import tv_lens.checkpoints as checkpoints

    def refuse(config):
        raise AssertionError("conversion rules consulted")

    monkeypatch.setattr(checkpoints, "_conversions", refuse)
    weights = CheckpointWeights(llama_dirs[0])
    assert weights.slots["blocks.0.attn.W_Q"].hf_key == "model.layers.0.self_attn.q_proj.weight"
    monkeypatch.undo()  # the rules rename nothing here: skipping them changed nothing
    keys = weights.checkpoint.keys()
    assert checkpoints.in_memory_names(keys, checkpoints.read_config(llama_dirs[0])) == {}


def test_lazy_vector_keeps_the_api(llama_dirs, tmp_path):
    pair = ModelPair.from_pretrained(*llama_dirs)
    tv = pair.tuning_vector()
    dense = loaded(*llama_dirs).tuning_vector()
    assert tv.lazy and not tv.dense().lazy and "lazy" in repr(tv)
    for name in dense:
        assert torch.equal(tv[name], dense[name])
    for lazy_out, dense_out in [(2 * tv - tv, 2 * dense - dense), (-tv, -dense),
                                (tv.select(layers=[1], parts=["attn"]), dense.select(layers=[1], parts=["attn"])),
                                (tv.component(["L1H0", "L0N3"]), dense.component(["L1H0", "L0N3"]))]:
        assert lazy_out.lazy
        for name in dense:
            torch.testing.assert_close(lazy_out[name], dense_out[name], rtol=0, atol=0)
    path = tv.save(tmp_path / "tv.safetensors")
    assert not list(tmp_path.glob(".*partial"))
    assert not TuningVector.load(path).lazy and TuningVector.load(path, lazy=True).lazy
    for back in (TuningVector.load(path), TuningVector.load(path, lazy=True)):
        for name in dense:
            assert torch.equal(back[name], dense[name])
    model = pair.base  # booting happens on first use
    assert pair.booted == (True, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with tv.applied(model):
            raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pair_tokenizer_without_booting():
    pair = ModelPair.from_pretrained(checkpoint_dir("base"), checkpoint_dir("medical"))
    assert pair.tokenizer("Question: x").input_ids
    assert pair.booted == (False, False)


# ------------------------------------------------------------------------ broken checkpoints
@pytest.fixture
def broken(llama_dirs, tmp_path):
    """A copy of the tuned checkpoint to break."""
    return shutil.copytree(llama_dirs[1], tmp_path / "broken")


def _weights(folder):
    return folder / "model.safetensors"


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
     r"'model[.a-z_0-9]+' ends at byte \d+ but the file has only \d+ bytes"),
    (lambda f: f.write_bytes(b""), "it has 0 bytes, fewer than a safetensors header"),
    (lambda f: f.write_bytes(b"this is not a safetensors file at all"), "its header claims"),
    (lambda f: f.write_bytes((12).to_bytes(8, "little") + b"{not json!!}"), "its header is not valid JSON"),
])
def test_broken_weight_files_are_named(llama_dirs, broken, damage, message):
    damage(_weights(broken))
    pattern = re.escape(repr(str(_weights(broken)))) + r" is truncated or corrupt: " + message
    with pytest.raises(CorruptCheckpointError, match=pattern + r".*[Dd]ownload or save the checkpoint again"):
        ModelPair.from_pretrained(llama_dirs[0], broken)


@pytest.fixture
def sharded(tokenizer, tmp_path):
    folder = tmp_path / "sharded"
    llama_model().save_pretrained(folder, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    return folder


def test_missing_shard_is_named(llama_dirs, sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"The shard '{shard.name}' named by .* is "
                                                      "missing. Download or copy every shard"):
        ModelPair.from_pretrained(llama_dirs[0], sharded)


def test_index_naming_a_missing_tensor(llama_dirs, sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.extra.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"places 'model.layers.0.extra.weight' in this "
                                                     "shard but the shard does not hold it"):
        ModelPair.from_pretrained(llama_dirs[0], sharded)


def test_config_not_json_and_config_weight_disagreement(llama_dirs, broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(Exception, match="intermediate_size|d_mlp"):  # compared with the base first
        ModelPair.from_pretrained(llama_dirs[0], broken)
    with pytest.raises(ShapeMismatchError, match=r"do not match its config.json .*mlp.*has shape"):
        CheckpointWeights(broken)
    (broken / "config.json").write_text("{'not': json")
    with pytest.raises(CorruptCheckpointError, match=r"config.json' is truncated or corrupt: it is "
                                                     "not valid JSON"):
        ModelPair.from_pretrained(llama_dirs[0], broken)


def test_pickle_checkpoints_need_opt_in(llama_dirs, broken):
    from safetensors.torch import load_file

    state = load_file(str(_weights(broken)))
    _weights(broken).unlink()
    torch.save(state, broken / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match=r"pickle weights \(pytorch_model.bin\).*"
                                                    r"allow_pickle=True \(CLI: --allow-pickle\).*"
                                                    r"weights_only=True"):
        ModelPair.from_pretrained(llama_dirs[0], broken)
    tv = ModelPair.from_pretrained(llama_dirs[0], broken, allow_pickle=True).tuning_vector()
    reference = ModelPair.from_pretrained(*llama_dirs).tuning_vector()
    for name in reference:
        assert torch.equal(tv[name], reference[name])
    torch.save({"a": torch.zeros(2), "obj": pathlib.PurePosixPath("x")}, broken / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match=r"torch.load\(weights_only=True\) failed"):
        Checkpoint(broken, allow_pickle=True)


def test_streaming_writer_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.zeros(0, 3)}
    meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    path = write_safetensors(tmp_path / "x.safetensors", list(tensors), meta, tensors.__getitem__,
                             metadata={"k": "v"})
    from safetensors.torch import load_file

    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert SafetensorsFile(path).metadata == {"k": "v"}
    with pytest.raises(ValueError, match="the header says"):
        write_safetensors(tmp_path / "y.safetensors", ["a"], {"a": ((9,), torch.float32)},
                          tensors.__getitem__)
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".y*"))


# ------------------------------------------------------------------------ --fast and the CLI
def test_fast_mode_keeps_planted_labels(save):
    model = llama_model(hidden_size=128)
    tuned, *expected = plant(model)
    pair = ModelPair.from_pretrained(save(model, "fast_b"), save(tuned, "fast_t"))
    exact = analyze(pair, progress=False)
    fast = analyze(pair, progress=False, fast=True, fast_rank=12)
    assert fast.info["fast"] and fast.info["fast_rank"] == 12 and not exact.info["fast"]
    check_planted(fast.heads, fast.neurons, *expected)  # heads and neurons are exact either way
    for a, b in [(exact.heads, fast.heads), (exact.neurons, fast.neurons)]:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    changed = exact.matrices[exact.matrices.label != "unchanged"]
    assert (fast.matrices.loc[changed.index, "effective_rank"].isna()).all()
    clear = exact.matrices.label.isin(["unchanged", "amplified", "dampened"])
    assert (fast.matrices.label[clear] == exact.matrices.label[clear]).all()
    with pytest.raises(ValueError, match="fast_rank .* must be at least k"):
        analyze(pair, fast=True, fast_rank=4, k=10)


def test_cli_writes_nothing_when_the_analysis_fails(llama_dirs, tmp_path, capsys):
    bad = llama_model()
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    assert main(["analyze", str(llama_dirs[0]), str(tmp_path / "nan"), "--out", str(out)]) == 2
    assert "NaN/inf" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert main(["analyze", *map(str, llama_dirs), "--out", str(out), "--fast", "--fast-rank", "12"]) == 0
    assert json.loads((out / "summary.json").read_text())["info"]["fast"] is True
    assert main(["analyze", *map(str, llama_dirs), "--out", str(out)]) == 0
    assert f"replaced the earlier output in {out}/" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["analyze", *map(str, llama_dirs), "--out", str(tmp_path / "file")]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err


def test_cli_device_errors(llama_dirs, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["analyze", *map(str, llama_dirs), "--out", out, "--device", "gpu9"]) == 2
    assert "--device 'gpu9' is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["analyze", *map(str, llama_dirs), "--out", out, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "asks for a GPU but PyTorch sees none" in err and "Traceback" not in err
