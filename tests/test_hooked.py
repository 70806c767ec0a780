"""HookedTransformer (and SAELens's HookedSAETransformer) models as pair members (TL 3.x).

TransformerLens 4.x has no HookedTransformer, so on 4.x only the last test runs (the clear
error); the rest run in the TL 3.9 environment (``make test-tl3``, part of CI).
"""

import pytest
import torch

from conftest import llama_model, perturb
from tv_lens import ModelPair, analyze
from tv_lens.errors import ProcessedWeightsError, TvLensError
from tv_lens.pair import boot
from tv_lens.tl_compat import has_hooked_transformer, load_hooked

hooked_only = pytest.mark.skipif(
    not has_hooked_transformer(),
    reason="HookedTransformer exists only in TransformerLens 3.x; runs in the TL 3.9 environment")


@pytest.fixture(scope="module")
def tied_dirs(save):
    return (save(llama_model(tie_word_embeddings=True), "tied_base"),
            save(perturb(llama_model(tie_word_embeddings=True)), "tied_tuned"))


@pytest.fixture(params=["llama", "gpt2", "qwen2", "tied"])
def dirs(request, llama_dirs, gpt2_dirs, qwen2_dirs, tied_dirs):
    return {"llama": llama_dirs, "gpt2": gpt2_dirs, "qwen2": qwen2_dirs,
            "tied": tied_dirs}[request.param]


@hooked_only
def test_hooked_and_bridge_pairs_give_identical_vectors_and_tables(dirs):
    hooked = ModelPair(*(load_hooked(d) for d in dirs))
    bridged = ModelPair(*(boot(d) for d in dirs))
    a, b = hooked.tuning_vector(), bridged.tuning_vector()
    # exactly the checkpoint's parameters: no zero biases TL filled in, no untied W_U copy
    assert sorted(a) == sorted(b)
    for name in b:
        assert torch.equal(a[name], b[name]), name
    x, y = analyze(hooked, progress=False), analyze(bridged, progress=False)
    for table in ("heads", "neurons", "matrices", "summary"):
        assert getattr(x, table).equals(getattr(y, table)), table


@hooked_only
def test_only_the_checkpoints_biases_count(llama_dirs, gpt2_dirs, qwen2_dirs):
    def biases(dirs):
        return {n.split(".")[-1] for n in ModelPair(*(load_hooked(d) for d in dirs)).tuning_vector()
                if n.split(".")[-1].startswith("b_")}

    assert biases(llama_dirs) == set()  # b_Q, b_O, b_in, b_out, b_U are TL's zeros
    assert biases(qwen2_dirs) == {"b_Q", "b_K", "b_V"}
    assert biases(gpt2_dirs) == {"b_Q", "b_K", "b_V", "b_O", "b_in", "b_out"}


@hooked_only
def test_a_hooked_pair_patches_and_restores(llama_dirs):
    base, tuned = (load_hooked(d) for d in llama_dirs)
    tv = ModelPair(base, tuned).tuning_vector()
    tokens = torch.tensor([[1, 5, 9, 17, 33, 40, 2, 7]])
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with tv.applied(base):  # base + τ is the tuned model
        assert torch.allclose(base(tokens), tuned(tokens), atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"):
        with tv.applied(base):
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


@hooked_only
def test_a_hooked_sae_transformer_is_a_pair_member(llama_dirs):
    sae_lens = pytest.importorskip(
        "sae_lens", reason="SAELens is not installed here; make test-tl3 installs it (TL 3.9)")
    pair = ModelPair(*(load_hooked(d, cls=sae_lens.HookedSAETransformer) for d in llama_dirs))
    reference = ModelPair.from_pretrained(*llama_dirs).tuning_vector()
    assert sorted(pair.tuning_vector()) == sorted(reference)
    assert all(torch.equal(pair.tuning_vector()[n], reference[n]) for n in reference)


@hooked_only
@pytest.mark.parametrize("processing, match", [
    (dict(fold_ln=True), "norms were folded.*normalization_type 'RMSPre'"),
    (dict(center_unembed=True), "centred \\(W_U has zero means: center_unembed=True\\)"),
])
def test_processed_hooked_models_are_refused(llama_dirs, processing, match):
    model = load_hooked(llama_dirs[0])
    options = dict(fold_ln=False, center_writing_weights=False, center_unembed=False)
    model.process_weights_(**{**options, **processing})
    with pytest.raises(ProcessedWeightsError, match=match + ".*from_pretrained_no_processing"):
        ModelPair(model, load_hooked(llama_dirs[1]))


@hooked_only
def test_centred_writing_weights_are_refused(gpt2_dirs):
    model = load_hooked(gpt2_dirs[0])
    model.process_weights_(fold_ln=False, center_writing_weights=True, center_unembed=False)
    with pytest.raises(ProcessedWeightsError, match="W_E has zero means: center_writing_weights"):
        ModelPair(load_hooked(gpt2_dirs[1]), model)


@pytest.mark.skipif(has_hooked_transformer(),
                    reason="checks the TL 4.x error; TL 3.x has HookedTransformer, so load_hooked works")
def test_load_hooked_says_what_to_use_on_tl4(llama_dirs):
    with pytest.raises(TvLensError, match="only in TransformerLens 3.x.*ModelPair.from_pretrained"):
        load_hooked(llama_dirs[0])


@hooked_only
def test_patching_runs_on_hooked_pairs_as_on_bridges(llama_dirs, tokens):
    """Weight patching, attribution and activation patching give a HookedTransformer pair the
    same numbers as a bridge pair of the same checkpoints."""
    from tv_lens import activation_patch, attribute, metrics, patch

    metric = metrics.loss(tokens)
    pairs = [ModelPair(*(load_hooked(d) for d in llama_dirs)),
             ModelPair(*(boot(d) for d in llama_dirs))]
    exact = [patch(p, metric, ["L0.attn", "L1.mlp", "L1H2"], progress=False) for p in pairs]
    assert torch.allclose(torch.tensor(exact[0].effect.values), torch.tensor(exact[1].effect.values),
                          atol=1e-4)
    att = [attribute(p, metric, progress=False).set_index("component") for p in pairs]
    assert torch.allclose(torch.tensor(att[0]["add"].values), torch.tensor(att[1]["add"].values),
                          atol=1e-3)
    acts = [activation_patch(p, metric, "hook_resid_post", progress=False) for p in pairs]
    assert len(acts[0]) == len(acts[1]) == 4  # both directions, both layers
    assert torch.allclose(torch.tensor(acts[0].patched.values), torch.tensor(acts[1].patched.values),
                          atol=1e-4)
