"""Every bad input gets a clear error and leaves nothing half-written.

One table of cases drives the command line (exit status 2, a message naming the problem and the
fix, no traceback) and the Python API (a ``TvLensError`` subclass with that message). The cases
marked for the docs generate the "When something goes wrong" list of ``docs/bad-input.md``, checked
below, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import gpt2_model, llama_model
from tv_lens import ModelPair, Thresholds, TuningVector, analyze, compose
from tv_lens.cli import main
from tv_lens.errors import TvLensError

BAD_INPUT_DOC = Path(__file__).parent.parent / "docs" / "bad-input.md"


@dataclass(frozen=True)
class Case:
    """A bad input: ``cli`` builds argv from the context (exit 2 expected), or ``api`` is a call
    that must raise; ``problem`` and ``fix`` are regexes the message must match; ``readme``
    (situation) puts the case in docs/bad-input.md's list with its ``fix_text``."""

    id: str
    problem: str
    fix: str
    cli: Callable | None = None
    api: Callable | None = None
    readme: str | None = None
    fix_text: str | None = None
    command: str = "analyze"


class Ctx:
    """Folders the cases need, built once per module."""

    def __init__(self, root: Path, llama_dirs, save):
        self.root, self.base, self.tuned = root, str(llama_dirs[0]), str(llama_dirs[1])
        self.save = save
        self._made: dict[str, str] = {}

    def copy(self, name: str, damage: Callable[[Path], None]) -> str:
        if name not in self._made:
            folder = self.root / name
            shutil.copytree(self.tuned, folder)
            damage(folder)
            self._made[name] = str(folder)
        return self._made[name]

    def model(self, name: str, build: Callable) -> str:
        if name not in self._made:
            self._made[name] = str(self.save(build(), name))
        return self._made[name]

    def copy_of_base(self, name: str, damage: Callable[[Path], None] = lambda f: None) -> str:
        if name not in self._made:
            shutil.copytree(self.base, self.root / name)
            damage(self.root / name)
            self._made[name] = str(self.root / name)
        return self._made[name]

    def out(self, name: str = "out") -> str:
        return str(self.root / "outs" / name)


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _truncate(folder: Path) -> None:
    f = _weights(folder)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _shard(folder: Path, missing_tensor: bool | None) -> None:
    """Turn the single file into an index + one shard; drop the shard (False), name a missing
    tensor (True) or neither (None)."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(_weights(folder))
    _weights(folder).unlink()
    save_file(tensors, folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {name: "model-00001-of-00001.safetensors" for name in tensors}
    if missing_tensor:
        index["model.layers.0.mlp.extra.weight"] = "model-00001-of-00001.safetensors"
    elif missing_tensor is False:
        (folder / "model-00001-of-00001.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def _rewrite_header(folder: Path, edit: Callable[[dict], bytes | str | dict],
                    tail: bytes = b"") -> None:
    """Give ``model.safetensors`` the header ``edit(header)`` returns (a dict, or raw JSON text
    or bytes) over the same data (plus ``tail``)."""
    import json
    import struct

    raw = _weights(folder).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = (header if isinstance(header, bytes) else header.encode() if isinstance(header, str)
            else json.dumps(header).encode())
    _weights(folder).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:] + tail)


_Q0, _Q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"


def _overlap(h: dict) -> dict:
    h[_Q1]["data_offsets"] = h[_Q0]["data_offsets"]  # the same bytes twice, a gap elsewhere
    return h


def _duplicate(h: dict) -> str:
    import json

    text = json.dumps(h)
    return "{" + json.dumps(_Q0) + ": " + json.dumps(h[_Q0]) + ", " + text[1:]


def _negative(h: dict) -> dict:
    h[_Q0]["shape"] = [-32, -32]
    return h


def _float8(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(_weights(folder))
    tensors[_Q0] = tensors[_Q0].to(torch.float8_e4m3fn)
    save_file(tensors, _weights(folder), metadata={"format": "pt"})


def _index_naming(target: str) -> Callable[[Path], None]:
    """A shard index whose weight_map names ``target`` (outside the folder) for one tensor."""
    def damage(folder: Path) -> None:
        import json

        _shard(folder, missing_tensor=None)
        index = folder / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"][_Q0] = target
        index.write_text(json.dumps(data))
    return damage


def _foreign_out(c: "Ctx") -> str:
    """An --out folder holding a file tv_lens did not write."""
    folder = c.root / "outs" / "foreign"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    return str(folder)


def _adapter(c: "Ctx", name: str, edit: Callable[[Path], None]) -> str:
    """A rank-2 PEFT adapter of the base (q_proj, down_proj), copied and damaged by ``edit``."""
    source = c.root / "adapter"
    if not source.exists():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(c.base),
                               LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                          target_modules=["q_proj", "down_proj"]))
        model.save_pretrained(source)
    if name not in c._made:
        shutil.copytree(source, c.root / name)
        edit(c.root / name)
        c._made[name] = str(c.root / name)
    return c._made[name]


def _json_edit(name: str, **changes) -> Callable[[Path], None]:
    """Set (or, with None, remove) keys of the JSON file ``name`` of a folder."""
    def edit(folder: Path) -> None:
        config = json.loads((folder / name).read_text())
        for key, value in changes.items():
            config.pop(key) if value is None else config.__setitem__(key, value)
        (folder / name).write_text(json.dumps(config))
    return edit


def _adapter_config(**changes) -> Callable[[Path], None]:
    return _json_edit("adapter_config.json", **changes)


def _adapter_null(key: str) -> Callable[[Path], None]:
    """Set ``key`` of adapter_config.json to null."""
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, key: None}))
    return edit


def _adapter_tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        full = next(k for k in tensors if k.endswith(key))
        tensors[full] = change(tensors[full])
        save_file(tensors, folder / "adapter_model.safetensors")
    return edit


def _config_edit(**changes) -> Callable[[Path], None]:
    return _json_edit("config.json", **changes)


def _extra_tensor(folder: Path) -> None:
    """A tensor no config describes (an unknown module) added to the checkpoint."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(_weights(folder))
    tensors["model.layers.0.mlp.extra_scale"] = torch.ones(32)
    save_file(tensors, _weights(folder), metadata={"format": "pt"})


def _notes_file(c: "Ctx") -> str:
    """A file of the user's where a report might be written."""
    path = c.root / "outs" / "notes.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<p>my notes</p>")
    return str(path)


def _analysis(c: "Ctx"):
    return analyze(ModelPair.from_pretrained(c.base, c.tuned), progress=False, null_samples=2)


def _looping_link(folder: Path) -> None:
    _weights(folder).unlink()
    _weights(folder).symlink_to(_weights(folder).name)  # a link to itself: a loop


def _broken_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{oops")


def _header_edit(key: str, field: str, value) -> Callable[[Path], None]:
    """Set one field of one tensor's entry in the safetensors header (``key`` None: the
    ``__metadata__`` entry itself)."""
    def edit(h: dict) -> dict:
        if key is None:
            h["__metadata__"] = value
        else:
            h[key][field] = value
        return h
    return lambda folder: _rewrite_header(folder, edit)


def _adapter_drop(key: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if not k.endswith(key)},
                  folder / "adapter_model.safetensors")
    return edit


def _adapter_saved_lm_head(folder: Path) -> None:
    """A modules_to_save copy of lm_head with one row too many."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(97, 32)
    save_file(tensors, folder / "adapter_model.safetensors")


def _zoo(c: "Ctx", **kwargs):
    from tv_lens.zoo import analyze_zoo

    return analyze_zoo(c.base, **{"tuned": [c.tuned], "progress": False, **kwargs})


def _users_zoo_json(c: "Ctx") -> str:
    """A user's folder that happens to hold a zoo.json and a report.html of its own."""
    folder = c.root / "outs" / "users_zoo"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zoo.json").write_text('{"animals": ["yak"]}')
    (folder / "report.html").write_text("<p>my report</p>")
    return str(folder)


def _link_out(c: "Ctx") -> str:
    link = c.root / "outs" / "link"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(c.root / "outs" / "link-target")
    return str(link)


def _config_shape(folder: Path) -> None:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (folder / "config.json").write_text(json.dumps(cfg))


def _as_pickle(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(_weights(folder)), folder / "pytorch_model.bin")
    _weights(folder).unlink()


def _other_tokenizer(folder: Path) -> None:
    """The same vocabulary size, other merges: the same text gets other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    tok.train_from_iterator(["a mat sat the cat on zebra yak xylophone dog ran"] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def _poisoned(weight_of: Callable) -> torch.nn.Module:
    """The tiny Llama with one entry of ``weight_of(model)`` set to inf (NaN for embeddings)."""
    model = llama_model()
    with torch.no_grad():
        w = weight_of(model)
        w.view(-1)[0] = float("nan") if w.ndim == 2 else float("inf")
    return model


def _nan_model():
    model = llama_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def _vector(ctx: Ctx) -> TuningVector:
    return ModelPair.from_pretrained(ctx.base, ctx.tuned).tuning_vector()


def _saved_vector(ctx: Ctx, truncate: bool) -> str:
    path = ctx.root / ("vec_trunc.safetensors" if truncate else "vec.safetensors")
    if not path.exists():
        _vector(ctx).save(path)
        if truncate:
            path.write_bytes(path.read_bytes()[:-100])
    return str(path)


ANALYZE = ["analyze"]
_EXACT_BASE = r"the exact base model it was fine-tuned from"
CASES = [
    # ---------------------------------------------------------------- weight files
    Case("truncated-safetensors", r"is truncated or corrupt", r"[Dd]ownload or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("trunc", _truncate)],
         readme="A weight file is truncated or corrupt (an interrupted download)",
         fix_text="download or save the checkpoint again"),
    Case("empty-safetensors", r"has 0 bytes", r"[Dd]ownload or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("empty", lambda f: _weights(f).write_bytes(b""))]),
    Case("not-safetensors", r"header claims", r"[Dd]ownload or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("junk", lambda f: _weights(f).write_bytes(b"not a weight file" * 4))]),
    Case("missing-shard", r"The shard '.*' named by .* is missing", r"Download or copy every shard",
         cli=lambda c: [c.base, c.copy("noshard", lambda f: _shard(f, False))],
         readme="A shard of a sharded checkpoint is missing",
         fix_text="Download or copy every shard of the checkpoint"),
    Case("index-names-missing-tensor", r"places 'model.layers.0.mlp.extra.weight' in this shard",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("badindex", lambda f: _shard(f, True))]),
    Case("header-overlapping-offsets", r"starts at data byte \d+, not at \d+ where the tensor before it ends",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("overlap", lambda f: _rewrite_header(f, _overlap))]),
    Case("header-trailing-bytes", r"its tensors end at data byte \d+ but the data section has \d+ bytes",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("trailing", lambda f: _rewrite_header(f, lambda h: h, b"\0" * 16))]),
    Case("header-duplicate-name", r"the tensor name 'model\.layers\.0\.self_attn\.q_proj\.weight' appears twice",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("duplicate", lambda f: _rewrite_header(f, _duplicate))]),
    Case("header-negative-shape", r"the header entry of '.*q_proj\.weight' is malformed",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("negative", lambda f: _rewrite_header(f, _negative))]),
    Case("header-not-utf8", r"its header is not UTF-8 text", r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("notutf8", lambda f: _rewrite_header(f, lambda h: b'{"\xff": 1}'))]),
    Case("float8-weights", r"stores '.*q_proj\.weight' as F8_E4M3, which tv_lens does not read",
         r"Save the checkpoint in bfloat16, float16 or float32 first",
         cli=lambda c: [c.base, c.copy("float8", _float8)],
         readme="Float8 or other quantized weights", fix_text="Save the checkpoint in bfloat16, float16 or float32 first"),
    Case("shard-outside-folder", r"it names the shard '\.\./x\.safetensors', which is not a file name beside the index",
         r"shards must sit in the checkpoint folder",
         cli=lambda c: [c.base, c.copy("dotdot", _index_naming("../x.safetensors"))],
         readme="A shard index that names a file outside the checkpoint folder",
         fix_text="shards must sit in the checkpoint folder"),
    Case("shard-absolute-path", r"it names the shard '/etc/passwd', which is not a file name beside the index",
         r"shards must sit in the checkpoint folder",
         cli=lambda c: [c.base, c.copy("absolute", _index_naming("/etc/passwd"))]),
    Case("shard-index-wrong-shape", r"it is not a shard index: a JSON object whose 'weight_map' maps",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("indexlist", lambda f: (_shard(f, None), (
             f / "model.safetensors.index.json").write_text('{"weight_map": ["a", "b"]}')))]),
    Case("config-weights-disagree", r"do not match its config.json", r"save them together again",
         cli=lambda c: [c.copy("cfgshape", _config_shape), c.copy("cfgshape", _config_shape)]),
    Case("config-zero-heads", r"config\.json' has num_attention_heads = 0; it must be a positive integer",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_heads0", _config_edit(num_attention_heads=0))]),
    Case("config-heads-do-not-divide", r"has 4 attention heads, not a multiple of its 3 key-value heads",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_kv3", _config_edit(num_key_value_heads=3))]),
    Case("config-d-model-not-divisible", r"has d_model 32, not a multiple of its 5 attention heads",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_heads5", _config_edit(num_attention_heads=5,
                                                                   num_key_value_heads=5,
                                                                   head_dim=None))]),
    Case("config-missing-key", r"config\.json' lacks 'intermediate_size', which this architecture needs",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_noffn", _config_edit(intermediate_size=None))]),
    Case("config-zero-layers", r"has num_hidden_layers = 0; it must be a positive integer",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_layers0", _config_edit(num_hidden_layers=0))]),
    Case("config-string-size", r"has hidden_size = '32'; it must be a positive integer",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_str", _config_edit(hidden_size="32"))]),
    Case("config-not-an-object", r"config\.json' is a JSON list, not an object",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_list", lambda f: (f / "config.json").write_text("[1, 2]"))]),
    Case("config-not-utf8", r"config\.json' is truncated or corrupt: it is not UTF-8 text",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("cfg_utf8", lambda f: (f / "config.json").write_bytes(b'{"\xff": 1}'))]),
    Case("config-fewer-layers-than-weights",
         r"holds \d+ tensor\(s\) its config\.json does not describe, e\.g\. \['model\.layers\.1\.",
         r"Check that config\.json belongs to these weights \(its 1 layers, say\)",
         cli=lambda c: [c.copy("cfg_1layer_b", _config_edit(num_hidden_layers=1)),
                        c.copy("cfg_1layer", _config_edit(num_hidden_layers=1))]),
    Case("checkpoint-unknown-module",
         r"holds 1 tensor\(s\) its config\.json does not describe, e\.g\. \['model\.layers\.0\.mlp\.extra_scale'\]",
         r"Check that config\.json belongs to these weights",
         cli=lambda c: [c.base, c.copy("extra", _extra_tensor)]),
    Case("config-not-json", r"config.json' is truncated or corrupt: it is not valid JSON",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("cfgjson", lambda f: (f / "config.json").write_text("{oops"))]),
    Case("missing-folder", r"the path does not exist", r"Pass an existing folder",
         cli=lambda c: [c.base, str(c.root / "no-such-folder")],
         readme="A path that does not exist", fix_text="Pass an existing folder"),
    Case("folder-without-config", r"is not a checkpoint folder: it has no config.json",
         r"Pass the folder that model.save_pretrained\(...\) wrote",
         cli=lambda c: [c.base, c.copy("nocfg", lambda f: (f / "config.json").unlink())]),
    Case("pickle-without-opt-in", r"pickle weights \(pytorch_model.bin\)", r"--allow-pickle|allow_pickle",
         cli=lambda c: [c.base, c.copy("pickle", _as_pickle)],
         readme="Only pytorch_model.bin (pickle) weights",
         fix_text="--allow-pickle"),
    Case("inf-in-final-norm", r"The tuned model has 1 NaN/inf value\(s\) in ln_final\.w",
         r"check how the checkpoint was saved or converted",
         cli=lambda c: [c.base, c.model("inf_norm", lambda: _poisoned(lambda m: m.model.norm.weight))]),
    Case("nan-in-embedding", r"The tuned model has 1 NaN/inf value\(s\) in embed\.W_E",
         r"check how the checkpoint was saved or converted",
         cli=lambda c: [c.base, c.model("nan_embed", lambda: _poisoned(lambda m: m.model.embed_tokens.weight))]),
    Case("identical-checkpoints", r"The two checkpoints are identical: every weight difference is zero",
         r"Pass the fine-tuned model's folder as TUNED",
         cli=lambda c: [c.base, c.copy_of_base("copy_of_base")],
         readme="The two checkpoints are identical (τ = 0)",
         fix_text="Pass the fine-tuned model's folder as TUNED"),
    Case("same-folder-twice", r"BASE and TUNED are the same folder", r"Pass the base model's folder, then",
         cli=lambda c: [c.base, c.base]),
    Case("nan-weights", r"NaN/inf value\(s\) in blocks.1.mlp.W_out",
         r"check how the checkpoint was saved or converted",
         cli=lambda c: [c.base, c.model("nanmodel", _nan_model)],
         readme="NaN or infinite weights", fix_text="check how the checkpoint was saved or converted"),
    # ---------------------------------------------------------------- incompatible pairs
    Case("pair-layers", r"Differing fields: n_layers: base=2, tuned=3", _EXACT_BASE,
         cli=lambda c: [c.base, c.model("l3", lambda: llama_model(num_hidden_layers=3))],
         readme="Base and fine-tune of different shapes (layers, heads, d_mlp, architecture)",
         fix_text="the exact base model it was fine-tuned from"),
    Case("pair-heads", r"n_heads: base=4, tuned=8", _EXACT_BASE,
         cli=lambda c: [c.base, c.model("h8", lambda: llama_model(num_attention_heads=8,
                                                                 num_key_value_heads=2))]),
    Case("pair-d-mlp", r"d_mlp: base=48, tuned=64", _EXACT_BASE,
         cli=lambda c: [c.base, c.model("mlp64", lambda: llama_model(intermediate_size=64))]),
    Case("pair-architecture", r"architecture: base='LlamaForCausalLM', tuned='GPT2LMHeadModel'",
         _EXACT_BASE,
         cli=lambda c: [c.base, c.model("gpt2", gpt2_model)]),
    Case("pair-vocabulary", r"d_vocab differs: base=96, tuned=100", r"--vocab shared",
         cli=lambda c: [c.base, c.model("v100", lambda: llama_model(vocab=100))],
         readme="A fine-tune that added tokens (vocabularies differ)",
         fix_text="--vocab shared"),
    # ---------------------------------------------------------------- output folder
    Case("out-is-a-file", r"is an existing file, not a folder", r"Pass a folder path",
         cli=lambda c: [c.base, c.tuned, "--out", _file(c)],
         readme="--out names an existing file", fix_text="Pass a folder path"),
    Case("out-parent-is-a-file", r"Cannot write the output folder", r"Pass a folder you can write to",
         cli=lambda c: [c.base, c.tuned, "--out", _file(c) + "/sub/out"],
         readme="--out cannot be written", fix_text="Pass a folder you can write to"),
    # ---------------------------------------------------------------- options
    Case("out-holds-other-files", r"already holds files tv_lens did not write \(thesis\.tex\)",
         r"Choose an empty or new folder",
         cli=lambda c: [c.base, c.tuned, "--out", _foreign_out(c)],
         readme="--out holds files tv_lens did not write", fix_text="Choose an empty or new folder"),
    Case("out-is-an-input", r"--out '.*' is the input folder '.*'; tv_lens never writes",
         r"Pass a separate folder for the output",
         cli=lambda c: [c.base, c.tuned, "--out", c.tuned],
         readme="--out is (inside) a model folder", fix_text="Pass a separate folder for the output"),
    Case("lora-rank-zero", r"LoRA rank 0 \(factors of rank 2\); a LoRA rank is a positive integer",
         r"Fix r / rank_pattern in adapter_config\.json",
         cli=lambda c: [c.base, _adapter(c, "lora_r0", _adapter_config(r=0, rank_pattern={}))]),
    Case("lora-factor-shapes", r"which do not multiply \(A is \[r, in\], B is \[out, r\]\)",
         r"The adapter file is corrupt: save it again",
         cli=lambda c: [c.base, _adapter(c, "lora_shapes", _adapter_tensor(
             "layers.0.self_attn.q_proj.lora_B.weight", lambda t: torch.cat([t, t], dim=1)))]),
    Case("lora-nan-factors", r"its LoRA factors hold NaN or inf values",
         r"Check how the adapter was trained and saved",
         cli=lambda c: [c.base, _adapter(c, "lora_nan", _adapter_tensor(
             "layers.1.mlp.down_proj.lora_A.weight", lambda t: t * float("nan")))]),
    Case("lora-pattern-invalid-regex", r"rank_pattern key '\(q_proj' is not a valid regular expression",
         r"Fix the pattern",
         cli=lambda c: [c.base, _adapter(c, "lora_badre", _adapter_config(rank_pattern={"(q_proj": 2}))]),
    Case("zoo-out-is-a-file", r"--out '.*' is an existing file, not a folder", r"Pass a folder path",
         cli=lambda c: [c.base, c.tuned, "--out", _file(c)], command="zoo"),
    Case("zoo-out-holds-other-files", r"already holds files tv_lens did not write \(thesis\.tex\)",
         r"Choose an empty or new folder", cli=lambda c: [c.base, c.tuned, "--out", _foreign_out(c)],
         command="zoo"),
    Case("zoo-out-is-an-input", r"--out '.*' is the input folder '.*'; tv_lens never writes",
         r"Pass a separate folder for the output", cli=lambda c: [c.base, c.tuned, "--out", c.tuned],
         command="zoo"),
    Case("zoo-fine-tune-is-the-base", r"identical to the base's \(τ = 0\)",
         r"there is no update to analyse or compare", cli=lambda c: [c.base, c.copy_of_base("copy_of_base")],
         command="zoo"),
    Case("api-save-into-other-files", r"already holds files tv_lens did not write \(thesis\.tex\)",
         r"Choose an empty or new folder", api=lambda c: _analysis(c).save(_foreign_out(c))),
    Case("api-report-over-a-users-file", r"notes\.html' exists and is not a report tv_lens wrote",
         r"choose another path", api=lambda c: __import__("tv_lens").report(_analysis(c), _notes_file(c))),
    Case("cli-unknown-option", r"unknown option --ouput\. Did you mean --out\?",
         r"'tv-lens analyze --help' lists them",
         cli=lambda c: [c.base, c.tuned, "--ouput", c.out("typo")],
         readme="A mistyped option (--ouput)", fix_text="Did you mean --out?"),
    Case("cli-device-meta", r"--device meta holds no weights tv_lens can compute with",
         r"use cpu, cuda or cuda:N", cli=lambda c: [c.base, c.tuned, "--device", "meta"]),
    Case("weights-symlink-loop", r"model\.safetensors' is a symbolic link that leads to no file",
         r"Point it at the weights, or copy the file in its place",
         cli=lambda c: [c.base, c.copy("loop", _looping_link)]),
    Case("tokenizer-fails-to-load", r"The tokenizer in '.*' could not be loaded \(\w+",
         r"Save it again next to the weights: tokenizer\.save_pretrained\(folder\)",
         cli=lambda c: [c.copy_of_base("badtok_base", _broken_tokenizer), c.tuned]),
    Case("adapter-given-as-base", r"given as the base, is a PEFT adapter folder",
         r"Pass the base model's folder first and the adapter second",
         cli=lambda c: [_adapter(c, "adapter_as_base", lambda f: None), c.base]),
    Case("header-metadata-not-an-object", r"its __metadata__ is not a JSON object",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("meta_list", _header_edit(None, "", ["x"]))]),
    Case("header-unknown-dtype", r"has the unknown dtype 'F7'", r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("dtype_f7", _header_edit(_Q0, "dtype", "F7"))]),
    Case("header-offsets-not-integers", r"the header entry of '.*q_proj\.weight' is malformed",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("offsets_str", _header_edit(_Q0, "data_offsets", ["0", "4096"]))]),
    Case("header-wrong-byte-count", r"'.*q_proj\.weight' holds \d+ bytes, its shape \[32, 16\] needs \d+",
         r"download or save the checkpoint again",
         cli=lambda c: [c.base, c.copy("bytes", _header_edit(_Q0, "shape", [32, 16]))]),
    Case("config-zero-kv-heads", r"has num_key_value_heads = 0; it must be a positive integer",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_kv0", _config_edit(num_key_value_heads=0))]),
    Case("config-negative-vocab", r"has vocab_size = -96; it must be a positive integer",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_vocab", _config_edit(vocab_size=-96))]),
    Case("config-float-size", r"has intermediate_size = 48\.0; it must be a positive integer",
         r"Fix it so that it describes the checkpoint's weights",
         cli=lambda c: [c.base, c.copy("cfg_float", _config_edit(intermediate_size=48.0))]),
    Case("lora-one-factor", r"has only one LoRA factor for '.*q_proj'; it needs both A and B",
         r"The adapter file is incomplete",
         cli=lambda c: [c.base, _adapter(c, "lora_onefactor", _adapter_drop("q_proj.lora_B.weight"))]),
    Case("lora-rank-disagrees", r"its factors have rank 2 but adapter_config\.json says 4",
         r"The config and the weights disagree",
         cli=lambda c: [c.base, _adapter(c, "lora_r4", _adapter_config(r=4))]),
    Case("lora-rank-missing", r"says 8 \(PEFT's default where r is missing\)",
         r"The config and the weights disagree",
         cli=lambda c: [c.base, _adapter(c, "lora_nor", _adapter_config(r=None))]),
    Case("lora-pattern-not-an-object", r"alpha_pattern must be an object mapping module-name patterns",
         r"Fix the config", cli=lambda c: [c.base, _adapter(c, "lora_patlist",
                                                          _adapter_config(alpha_pattern=["q_proj"]))]),
    Case("lora-saved-module-shape", r"saved copy of 'lm_head\.weight' \(modules_to_save\) has shape \[97, 32\]",
         r"Is this adapter for this base\?",
         cli=lambda c: [c.base, _adapter(c, "lora_saved", _adapter_saved_lm_head)]),
    Case("out-inside-an-input", r"--out '.*' is inside the input folder '.*'; tv_lens never writes",
         r"Pass a separate folder for the output",
         cli=lambda c: [c.base, c.tuned, "--out", str(Path(c.tuned) / "analysis")]),
    Case("out-holds-an-input", r"--out '.*' holds the input folder '.*'; tv_lens never writes",
         r"Pass a separate folder for the output",
         cli=lambda c: [c.base, c.tuned, "--out", str(Path(c.tuned).parent)]),
    Case("zoo-rank-zero", r"workers, rank and neurons must be at least 1, got 1, 0, 20",
         r"must be at least 1", cli=lambda c: [c.base, c.tuned, "--rank", "0"], command="zoo"),
    Case("api-zoo-no-fine-tunes", r"analyze_zoo needs at least one fine-tune", r"at least one",
         api=lambda c: _zoo(c, tuned=[])),
    Case("api-zoo-same-folder-names", r"Two fine-tunes have the same folder name",
         r"pass tuned=\{name: folder\}", api=lambda c: _zoo(c, tuned=[c.tuned, c.tuned])),
    Case("api-save-over-a-file", r"--out '.*a-file' is an existing file, not a folder",
         r"Pass a folder path", api=lambda c: _analysis(c).save(_file(c))),
    Case("api-report-into-a-folder", r"is a folder; pass the report's file path",
         r"report\.html", api=lambda c: __import__("tv_lens").report(_analysis(c), c.root)),
    Case("api-compare-attribution-exact", r"exact= lacks the columns \['kind', 'granularity'",
         r"pass what tv_lens\.patch returned",
         api=lambda c: __import__("tv_lens").compare_attribution(
             ModelPair.from_pretrained(c.base, c.tuned), __import__("tv_lens").metrics.loss(
                 torch.tensor([[1, 5, 9, 13]])), ["L0H1"], progress=False,
             attribution=__import__("tv_lens").attribute(ModelPair.from_pretrained(c.base, c.tuned),
                 __import__("tv_lens").metrics.loss(torch.tensor([[1, 5, 9, 13]])), progress=False),
             exact=__import__("pandas").DataFrame({"component": ["L0H1"]}))),
    Case("out-a-users-zoo-json", r"already holds files tv_lens did not write \(report\.html, zoo\.json\)",
         r"Choose an empty or new folder", cli=lambda c: [c.base, c.tuned, "--out", _users_zoo_json(c)]),
    Case("out-is-a-symlink", r"--out '.*link' is a symbolic link", r"Pass the folder itself",
         cli=lambda c: [c.base, c.tuned, "--out", _link_out(c)]),
    Case("lora-alpha-null", r"LoRA alpha None; an alpha is a finite number",
         r"Fix lora_alpha / alpha_pattern in adapter_config\.json",
         cli=lambda c: [c.base, _adapter(c, "lora_alpha_null", _adapter_null("lora_alpha"))]),
    Case("llama-mlp-bias", r"bias tensor\(s\) that tv_lens's LlamaForCausalLM layout does not read",
         r"Open an issue with the checkpoint's config\.json",
         cli=lambda c: [c.model("mlp_bias_b", lambda: llama_model(mlp_bias=True)),
                        c.model("mlp_bias_t", lambda: llama_model(seed=1, mlp_bias=True))]),
    Case("cli-top-k", r"-k must", r"be at least 1",
         cli=lambda c: [c.base, c.tuned, "-k", "0"]),
    Case("cli-level", r"--level must be between 0 and 1", r"e\.g\. 0\.01",
         cli=lambda c: [c.base, c.tuned, "--level", "1.5"]),
    Case("cli-null-samples", r"--null-samples must be at least 2", r"default 200",
         cli=lambda c: [c.base, c.tuned, "--null-samples", "1"]),
    Case("cli-fast-rank", r"--fast-rank \(4\)", r"must be at least -k \(10\)",
         cli=lambda c: [c.base, c.tuned, "--fast", "--fast-rank", "4"]),
    Case("cli-device-string", r"--device 'gpu9' is not a device", r"use cpu, cuda or cuda:N",
         cli=lambda c: [c.base, c.tuned, "--device", "gpu9"]),
    Case("cli-device-cuda-without-gpu", r"asks for a GPU but PyTorch sees none", r"Drop --device|--device cpu",
         cli=lambda c: [c.base, c.tuned, "--device", "cuda"],
         readme="--device cuda on a machine without a GPU", fix_text="Drop --device or use --device cpu"),
    # ---------------------------------------------------------------- Python API
    Case("api-top-k", r"k must", r"be at least 1, got 0", api=lambda c: analyze(_vector(c), k=0)),
    Case("api-labels", r"labels must be one of", r"calibrated", api=lambda c: analyze(_vector(c), labels="loose")),
    Case("api-level", r"level", r"must be in \(0, 1\), got 5", api=lambda c: analyze(_vector(c), level=5.0)),
    Case("api-intruders", r"intruder_epsilon", r"in \(0, 1\], got 10 and 2.0",
         api=lambda c: analyze(_vector(c), intruder_epsilon=2.0)),
    Case("api-component-name", r"Component 'L0H99': head 99 is out of range",
         r"the model has 4 per layer \(0..3\)",
         api=lambda c: _vector(c).component("L0H99")),
    Case("api-part-name", r"The part 'norm' was renamed", r"use 'norms'",
         api=lambda c: _vector(c).select(parts=["norm"])),
    Case("api-compose-density", r"density must be in \(0, 1\]", r"the fraction of entries kept",
         api=lambda c: compose([_vector(c)], method="ties", density=0.0)),
    Case("api-compose-old-keyword", r"`top_k` is now `density`", r"density=0.2",
         api=lambda c: compose([_vector(c)], method="ties", top_k=0.2)),
    Case("api-vocab-mode", r"got 'merge'", r"vocab must be one of \('error', 'shared'\)",
         api=lambda c: ModelPair.from_pretrained(c.base, c.tuned, vocab="merge")),
    Case("api-load-truncated-vector", r"vec_trunc.safetensors' is truncated or corrupt",
         r"download or save the checkpoint again",
         api=lambda c: TuningVector.load(_saved_vector(c, truncate=True))),
    Case("api-apply-to-other-shape", r"does not fit the model it is applied to.*d_model",
         r"Apply it to the base model it was computed from",
         api=lambda c: TuningVector.load(_saved_vector(c, False)).apply_(llama_model(hidden_size=48))),
    Case("api-vector-of-other-model", r"come from models of different architectures",
         r"Combine only vectors of fine-tunes of the same base",
         api=lambda c: _vector(c) + ModelPair(gpt2_model(), gpt2_model(1)).tuning_vector()),
    Case("api-lens-mismatched-tokenizer", r"tokenise .* differently",
         r"save the base tokenizer next to the fine-tune's weights",
         api=lambda c: __import__("tv_lens").activation_difference_lens(
             ModelPair.from_pretrained(c.base, c.copy("othertok", _other_tokenizer)),
             ["the cat sat on the mat and the dog ran"], positions=3),
         readme="Token-level tools on a fine-tune with another tokenizer",
         fix_text="save the base tokenizer next to the fine-tune's weights"),
    Case("api-thresholds", r"Thresholds must lie in \[0, 1\]", r"Shares are fractions",
         api=lambda c: analyze(_vector(c), thresholds=Thresholds(amplified=1.5))),
    Case("api-alpha-nan", r"alpha must be a finite number, got nan", r"Pass e.g. alpha=0.5",
         api=lambda c: _vector(c).apply_to(llama_model(), alpha=float("nan"))),
    Case("api-patch-alphas-empty", r"alphas is empty", r"alphas=\(1.0,\)",
         api=lambda c: __import__("tv_lens").patch(ModelPair.from_pretrained(c.base, c.tuned),
                                                   __import__("tv_lens").metrics.loss(torch.tensor([[1, 5, 9]])),
                                                   "heads", alphas=[], progress=False)),
    Case("api-attribute-steps", r"steps must be a positive integer, got 0", r"",
         api=lambda c: __import__("tv_lens").attribute(ModelPair.from_pretrained(c.base, c.tuned),
                                                       __import__("tv_lens").metrics.loss(torch.tensor([[1, 5, 9]])),
                                                       steps=0, progress=False)),
    Case("api-read-tokens-unit", r"Unknown component 'L0H0.XY'", r"Names are",
         api=lambda c: __import__("tv_lens").read_tokens(_vector(c), ["L0H0.XY"], progress=False)),
]


def _file(c: Ctx) -> str:
    path = c.root / "a-file"
    path.write_text("x")
    return str(path)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, llama_dirs, save) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("bad"), llama_dirs, save)


@pytest.mark.parametrize("case", [c for c in CASES if c.cli], ids=lambda c: c.id)
def test_cli(case: Case, ctx: Ctx, capsys, monkeypatch):
    if case.id == "cli-device-cuda-without-gpu":  # the same on a GPU host: hide its GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = case.cli(ctx)  # builds the case's folders (their progress bars are not the CLI's)
    argv = [case.command] + args + ([] if "--out" in args else ["--out", ctx.out(case.id)])
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    # a weight found broken mid-analysis: the progress bar so far, then the message on its own line
    *bars, message = err.strip().split("\n")
    assert all("analyze layers" in line or "zoo tasks" in line for line in bars), err
    assert message.startswith("tv-lens: error: ") and message.count("\n") == 0, message
    assert re.search(case.problem, message), message
    assert re.search(case.fix, message), message
    assert case.fix_text is None or case.fix_text in message
    outs = ctx.root / "outs"
    assert not outs.exists() or not [p for p in outs.iterdir() if p.name.startswith(".")]
    if "--out" not in args:
        assert not Path(ctx.out(case.id)).exists()  # nothing written


@pytest.mark.parametrize("case", [c for c in CASES if c.api], ids=lambda c: c.id)
def test_api(case: Case, ctx: Ctx):
    with pytest.raises(TvLensError) as info:
        case.api(ctx)
    message = str(info.value)
    assert re.search(case.problem, message), message
    assert re.search(case.fix, message), message
    assert case.fix_text is None or case.fix_text in message


@pytest.mark.parametrize("damage", [_overlap, _negative, "trailing", "not-utf8"],
                         ids=["overlap", "negative", "trailing", "not-utf8"])
def test_the_safetensors_library_refuses_the_same_headers(damage, ctx, tmp_path):
    """Every header tv_lens calls corrupt, the safetensors library refuses too (a duplicate name
    it reads as its last entry; tv_lens refuses it), and a valid float8 file it opens (tv_lens
    refuses that one with a message of its own)."""
    from safetensors import safe_open

    folder, fresh = tmp_path / "m", tmp_path / "fresh"
    for f in (folder, fresh):
        shutil.copytree(ctx.tuned, f)
    if damage == "trailing":
        _rewrite_header(folder, lambda h: h, b"\0" * 16)
    elif damage == "not-utf8":
        _rewrite_header(folder, lambda h: b'{"\xff": 1}')
    else:
        _rewrite_header(folder, damage)
    with pytest.raises(Exception, match="(?i)header"):
        with safe_open(str(_weights(folder)), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    _float8(fresh)
    with safe_open(str(_weights(fresh)), "pt") as f:
        assert f.get_tensor(_Q0).dtype == torch.float8_e4m3fn


def test_no_file_bytes_in_messages(ctx, capsys):
    """A shard index naming /etc/passwd: the message names the path, never the file's bytes."""
    assert main(ANALYZE + [ctx.base, ctx.copy("absolute", _index_naming("/etc/passwd")),
                           "--out", ctx.out("passwd")]) == 2
    assert "root:" not in capsys.readouterr().err

def test_at_least_a_hundred_bad_inputs():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


def test_docs_list_the_suite():
    """docs/bad-input.md's "When something goes wrong" list is the cases marked for it."""
    text = BAD_INPUT_DOC.read_text()
    section = text.split("## When something goes wrong", 1)[1].split("\n## ", 1)[0]
    listed = [line for line in section.splitlines() if line.startswith("- ")]
    expected = [f"- {c.readme}" + (f": `{c.fix_text}`" if c.fix_text else "") for c in CASES if c.readme]
    assert listed == expected
    assert f"which tries\n{len(CASES)} bad inputs" in section


def test_a_missing_tokenizer_is_fine_for_weight_analysis(ctx):
    folder = ctx.copy("notok", lambda f: [(f / n).unlink(missing_ok=True) for n in
                                         ("tokenizer.json", "tokenizer_config.json",
                                          "special_tokens_map.json")])
    pair = ModelPair.from_pretrained(ctx.base, folder)
    result = analyze(pair, progress=False)
    assert len(result.heads) and pair.booted == (False, False)


# --------------------------------------------------------------------------- not errors
def test_bf16_against_fp32_warns_once(ctx, tmp_path):
    import warnings

    model = llama_model()
    model = model.to(torch.bfloat16)
    path = ctx.save(model, "bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tv = ModelPair.from_pretrained(ctx.tuned, str(path)).tuning_vector()
        tv["blocks.0.mlp.W_out"]
    relevant = [w for w in caught if "float32" in str(w.message) or "bfloat16" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert tv["blocks.0.mlp.W_out"].dtype == torch.float32


def test_earlier_output_is_replaced_with_one_line(ctx, capsys):
    out = ctx.out("twice")
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", out]) == 0
    capsys.readouterr()
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", out]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "replaced" in l]
    assert lines == [f"replaced the earlier output in {out}/"]



def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_folder_tv_lens_did_not_write_is_never_replaced(ctx, capsys):
    out = Path(ctx.out("thesis"))
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"already holds files tv_lens did not write \(thesis\.tex\)", err), err
    assert "Choose an empty or new folder" in err
    assert _listing(out) == {"thesis.tex": b"years of work"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_earlier_output_with_a_users_file_added_is_refused(ctx, capsys):
    out = Path(ctx.out("added"))
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = _listing(out)
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 2
    assert "did not write (" in capsys.readouterr().err and _listing(out) == before


def test_output_written_before_markers_is_still_replaced(ctx, capsys):
    """An earlier version's output (no marker; analyze's files, summary.json naming tv_lens's
    version) is replaced, so a second `make demo` after an upgrade still works."""
    from tv_lens.staging import LEGACY_FILES, MARKER

    out = Path(ctx.out("legacy"))
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "analyze" and set(marker["files"]) == LEGACY_FILES
    (out / MARKER).unlink()
    capsys.readouterr()
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    assert f"replaced the earlier output in {out}/" in capsys.readouterr().out
    assert (out / MARKER).is_file()


@pytest.mark.parametrize("where", ["is", "is inside", "holds"])
def test_out_may_not_be_inside_or_hold_an_input_folder(ctx, capsys, where):
    tuned = Path(ctx.tuned)
    out = {"is": tuned, "is inside": tuned / "analysis", "holds": tuned.parent}[where]
    before = _listing(tuned)
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"--out '[^']+' {where} the input folder '[^']+'; tv_lens never writes", err)
    assert "Pass a separate folder for the output." in err
    assert _listing(tuned) == before and not (tuned / "analysis").exists()
    assert not [p for p in tuned.parent.iterdir() if ".partial-" in p.name]


def test_output_folder_follows_the_umask(ctx):
    out = Path(ctx.out("mode"))
    old = os.umask(0o022)
    try:
        assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

def test_a_write_failing_midway_leaves_the_earlier_output(ctx, capsys, monkeypatch):
    from tv_lens.analysis import summary

    out = Path(ctx.out("midway"))
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = summary.Analysis.save

    def failing_save(self, folder):
        original(self, folder)
        raise OSError(28, "No space left on device")  # after some files were written

    monkeypatch.setattr(summary.Analysis, "save", failing_save)
    with pytest.raises(OSError):
        main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    fresh = out.parent / "midway-new"
    with pytest.raises(OSError):
        main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(fresh)])
    assert not fresh.exists()


def test_saved_vector_failing_midway_leaves_no_file(ctx, monkeypatch, tmp_path):
    from tv_lens import checkpoints

    path = tmp_path / "v.safetensors"
    real = checkpoints.write_safetensors

    def failing(target, names, meta, get, metadata=None):
        calls = []

        def get_then_fail(name):
            calls.append(name)
            if len(calls) == 4:  # the disk fills up after three tensors were written
                raise OSError(28, "No space left on device")
            return get(name)

        return real(target, names, meta, get_then_fail, metadata)

    monkeypatch.setattr(checkpoints, "write_safetensors", failing)
    with pytest.raises(OSError):
        _vector(ctx).save(path)
    assert not path.exists() and not list(tmp_path.iterdir())


_PAUSED = """
import pathlib, sys, time
import tv_lens.analysis.run, tv_lens.reporting
flag, point = pathlib.Path(sys.argv[1]), sys.argv[2]
module = tv_lens.reporting if point == "report" else tv_lens.analysis.run
real = getattr(module, point)
def paused(*args, **kwargs):
    flag.touch()  # the signal comes now: inside the staged block, tables saved for "report"
    time.sleep(120)
setattr(module, point, paused)
from tv_lens.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _run_until(ctx: Ctx, out: Path, point: str, signum: int) -> subprocess.CompletedProcess:
    """``tv-lens analyze`` in a subprocess, sent ``signum`` once it is paused at ``point``
    (``"analyze"``: the pair loaded, nothing computed; ``"report"``: the tables saved in the
    staging folder, the report about to be made)."""
    flag = out.parent / f"{out.name}.at-{point}"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, str(flag), point, *ANALYZE, ctx.base,
                             ctx.tuned, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a background job (CI's suites) starts with SIGINT ignored, which a
                            # child inherits: give it the default, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert flag.exists(), proc.communicate()
    proc.send_signal(signum)
    out_text, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_text, err)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("signum,point,status", [(signal.SIGTERM, "report", 143),
                                                 (signal.SIGHUP, "analyze", 129),
                                                 (signal.SIGINT, "report", 130)],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_real_signals_leave_nothing(ctx, signum, point, status):
    out = Path(ctx.out(f"signal-{signum}"))
    run = _run_until(ctx, out, point, signum)
    assert run.returncode == status, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"tv-lens: interrupted; nothing was written to {out}/."
    assert "Traceback" not in run.stderr
    assert not out.exists() and _leftovers(out) == []


def test_kill_9_leaves_the_earlier_output_and_a_later_run_sweeps(ctx, capsys):
    out = Path(ctx.out("killed"))
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    earlier = _listing(out)
    run = _run_until(ctx, out, "report", signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    assert _listing(out) == earlier  # the complete earlier output, untouched
    assert [n.split("-")[0] for n in _leftovers(out)] == [".killed.partial"]
    capsys.readouterr()
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"removed 1 staging folder(s) a killed run left beside {out}/" in printed
    assert _leftovers(out) == [] and set(_listing(out)) == set(earlier)


def test_a_live_runs_staging_is_never_swept_and_a_dead_swap_is_undone(ctx, capsys):
    """Staging whose owner lives (this process) stays; a run killed between moving the earlier
    output aside and moving the new one in gets its earlier output back."""
    from tv_lens.staging import OWNER, sweep

    out = Path(ctx.out("swap"))
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 0
    earlier = _listing(out)
    live = out.parent / ".swap.partial-live"
    live.mkdir()
    (live / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    aside = out.parent / ".swap.old-dead"
    aside.mkdir()
    (aside / OWNER).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    out.rename(aside / out.name)
    assert sweep(out, announce=lambda line: None) == [aside]
    assert _listing(out) == earlier and live.is_dir() and not aside.exists()
    shutil.rmtree(live)


def test_a_report_that_fails_keeps_the_tables(ctx, capsys, monkeypatch):
    from tv_lens import reporting

    def broken(*args, **kwargs):
        raise TypeError("sequence item 0: expected str instance, float found")

    monkeypatch.setattr(reporting, "report", broken)
    out = Path(ctx.out("noreport"))
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"tv-lens: error: the report could not be made (TypeError: sequence item "
                       f"0: expected str instance, float found); the tables were written to "
                       f"{out}/ without it.")
    assert {"heads.csv", "neurons.csv", "matrices.csv", "summary.csv", "summary.json"} <= set(
        _listing(out)) and "report.html" not in _listing(out)


def test_a_padded_vocabulary_analyses_and_reports(ctx, capsys):
    """Embedding rows past the tokenizer's last token (Qwen2 pads 151,646 tokens to 151,936):
    the pair analyses and reports, and those ids read as ``<id N>`` wherever tokens are shown."""
    import tv_lens

    base = llama_model(vocab=128)
    tuned = llama_model(vocab=128)
    with torch.no_grad():
        tuned.lm_head.weight[96:] += 5 * torch.randn(32, tuned.lm_head.weight.shape[1])
    base_dir, tuned_dir = ctx.save(base, "padded_base"), ctx.save(tuned, "padded_tuned")
    out = Path(ctx.out("padded"))
    assert main(ANALYZE + [str(base_dir), str(tuned_dir), "--out", str(out), "--prompt",
                           "the cat sat"]) == 0
    assert "On the prompt" in (out / "report.html").read_text()
    tokens = tv_lens.read_tokens(ModelPair.from_pretrained(base_dir, tuned_dir), progress=False)
    padded = tokens[tokens.token_id >= 96]
    assert len(padded) and (padded.token == [f"<id {i}>" for i in padded.token_id]).all()
    assert tokens.token.map(type).eq(str).all()


def test_a_backtracking_pattern_cannot_hang(ctx, monkeypatch):
    """``(?:[\\w.]+)+!`` takes Python's ``re`` 9 s on a 28-character module name (and doubles
    with every character more): every pattern is matched by the ``regex`` engine under a time
    limit, and a pattern that runs out of it gets a message."""
    import regex

    import tv_lens.lora

    folder = _adapter(ctx, "lora_redos", _adapter_config(alpha_pattern={r"(?:[\w.]+)+!": 4}))
    limits, real = [], regex.match
    monkeypatch.setattr(regex, "match", lambda *a, **k: limits.append(k.get("timeout")) or real(*a, **k))
    tv = ModelPair.from_peft(ctx.base, folder).tuning_vector()
    assert tv.factors("blocks.0.attn.W_Q") is not None  # the pattern matched nothing: alpha 4
    assert limits and set(limits) == {tv_lens.lora.PATTERN_TIMEOUT}
    monkeypatch.setattr(tv_lens.lora, "PATTERN_TIMEOUT", 0.0)
    with pytest.raises(TvLensError, match=r"alpha_pattern key .* takes more than 0 s to match "
                                          r"'model\.layers\.\d\.[\w.]+' \(a pattern that backtracks\)\. "
                                          r"Simplify the pattern\."):
        ModelPair.from_peft(ctx.base, folder)


def test_a_hub_format_gpt2_folder_reads(gpt2_dirs, tmp_path):
    """GPT-2 as the Hub stores it: keys without the ``transformer.`` prefix (saved from
    GPT2Model) and the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` beside them.
    Its vector equals the one of the same weights saved by transformers today."""
    from safetensors.torch import load_file, save_file

    folders = []
    for source in gpt2_dirs:
        folder = tmp_path / source.name
        shutil.copytree(source, folder)
        tensors = {k.removeprefix("transformer."): v for k, v in load_file(_weights(folder)).items()}
        for layer in range(2):
            tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
            tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(tensors, _weights(folder), metadata={"format": "pt"})
        folders.append(folder)
    hub = ModelPair.from_pretrained(*folders).tuning_vector()
    ref = ModelPair.from_pretrained(*gpt2_dirs).tuning_vector()
    assert list(hub) == list(ref) and hub.base.slots["blocks.0.attn.W_Q"].hf_key == "h.0.attn.c_attn.weight"
    for name in ref:
        torch.testing.assert_close(hub[name], ref[name], rtol=0, atol=0)


def test_swapped_folders_are_warned_about_where_the_cards_say_so(ctx, tmp_path, capsys):
    """The "base" folder's model card names the "fine-tune" folder as its base_model: one
    warning line; cards that say nothing give no guess."""
    base, tuned = tmp_path / "my-base", tmp_path / "my-medical"
    shutil.copytree(ctx.base, base)
    shutil.copytree(ctx.tuned, tuned)
    (tuned / "README.md").write_text("---\nbase_model:\n- org/my-base\n---\n# a medical model\n")
    out = tmp_path / "out"
    assert main(ANALYZE + [str(tuned), str(base), "--out", str(out)]) == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if l.startswith("tv-lens: warning")]
    assert warned == [f"tv-lens: warning: The model card of {str(tuned)!r}, given as the base, "
                      "says it was fine-tuned from 'my-base', given as the fine-tune: are the two "
                      "swapped? The base comes first."]
    assert main(ANALYZE + [str(base), str(tuned), "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_out_may_not_be_the_current_folder(ctx, tmp_path, monkeypatch, capsys):
    """`--out .` would swap the folder the process stands in (and, empty, stage inside itself)."""
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", out]) == 2
        assert "is the current folder or holds it" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_ignored_hangup_stays_ignored():
    """Under nohup SIGHUP is ignored: tv-lens leaves it so (it handles SIGTERM alone)."""
    from tv_lens.cli import _signals_interrupt

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _signals_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_torn_or_damaged_records_are_recomputed(tmp_path):
    """A record whose arrays are truncated, or belong to another write, reads as absent."""
    import numpy as np

    from tv_lens.records import load_record, save_record

    save_record({"a": np.arange(6.0), "b": [1, "x", None]}, tmp_path / "r", key={"k": 1})
    got = load_record(tmp_path / "r", key={"k": 1})
    assert got["b"] == [1, "x", None] and (got["a"] == np.arange(6.0)).all()
    assert load_record(tmp_path / "r", key={"k": 2}) is None
    arrays = (tmp_path / "r.safetensors").read_bytes()
    save_record({"a": np.arange(7.0), "b": []}, tmp_path / "other", key={"k": 1})
    (tmp_path / "r.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    assert load_record(tmp_path / "r", key={"k": 1}) is None  # torn: JSON of one write, arrays of another
    (tmp_path / "r.safetensors").write_bytes(arrays[:-8])
    assert load_record(tmp_path / "r", key={"k": 1}) is None  # truncated


def test_argument_errors_are_value_errors(ctx):
    """As the README says: an argument outside what a function accepts is an
    InvalidArgumentError, a ValueError too (mode, steps, k, positions, score)."""
    import tv_lens
    from tv_lens import InvalidArgumentError

    pair = ModelPair.from_pretrained(ctx.base, ctx.tuned)
    metric = tv_lens.metrics.loss(torch.tensor([[1, 5, 9, 13]]))
    for call in (lambda: tv_lens.patch(pair, metric, ["L0H1"], mode="bad", progress=False),
                 lambda: tv_lens.attribute(pair, metric, steps=0, progress=False),
                 lambda: tv_lens.read_tokens(pair, k=0, progress=False),
                 lambda: tv_lens.read_tokens(pair, score="dot", progress=False),
                 lambda: tv_lens.activation_patch(pair, metric, "hook_resid_pre", positions="some")):
        with pytest.raises(InvalidArgumentError) as info:
            call()
        assert isinstance(info.value, ValueError)


def test_low_rank_updates_print_their_shape_not_their_entries():
    from tv_lens.lazy import LowRank

    text = repr(LowRank(torch.ones(6, 2), torch.ones(2, 5)))
    assert text == "LowRank(6 × 5, rank 2, torch.float32, cpu)"

def test_ctrl_c_exits_130_without_a_traceback(ctx, capsys, monkeypatch):
    from tv_lens.analysis import run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "analyze", interrupted)
    out = ctx.out("interrupted")
    assert main(ANALYZE + [ctx.base, ctx.tuned, "--out", out]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.strip() == f"tv-lens: interrupted; nothing was written to {out}/."
    assert not Path(out).exists()


def test_invalid_option_values_are_usage_errors(ctx, capsys):
    """argparse's own checks (choices, numbers): exit status 2, a usage line, no traceback."""
    for bad in (["--dtype", "float8"], ["-k", "ten"], ["--labels", "strict"]):
        with pytest.raises(SystemExit) as info:
            main(ANALYZE + [ctx.base, ctx.tuned, "--out", ctx.out("usage"), *bad])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert f"argument {bad[0]}: invalid" in err and err.startswith("usage: tv-lens analyze")
    assert not Path(ctx.out("usage")).exists()
