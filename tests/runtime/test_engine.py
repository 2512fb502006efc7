"""SpecDecoder is lossless: greedy output equals ``target.generate(do_sample=False)`` token for token."""

import copy

import pytest
import torch

from vspec import PruneConfig, SpecConfig, SpecDecoder, apply_vspec
from vspec.testing import (
    assert_follows,
    family_models,
    make_inputs,
    perturbed_copy,
    sample_continuations,
    target_sequence_probs,
    tiny_model,
)

FAMILIES = ["qwen2_5_vl", "llava_onevision"]


@pytest.fixture(scope="module")
def models():
    """Per family: the target, a close draft (perturbed copy: partial acceptance) and the small random draft."""
    return family_models(FAMILIES + ["qwen2_vl"])


def _reference(target, inputs, **kw):
    return target.generate(**inputs, do_sample=False, **kw)


def _assert_same(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(out, ref), f"\nvspec:\n{out}\nreference:\n{ref}"


@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("batch", [1, 4], ids=["b1", "b4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_generate(models, family, batch, gamma):
    target, close, _ = models[family]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5, 4][:batch], seed=batch)
    ref = _reference(target, inputs, max_new_tokens=23)
    out = SpecDecoder(target, close, SpecConfig(draft_len=gamma, prune="none")).generate(**inputs, max_new_tokens=23)
    _assert_same(out.sequences, ref)
    st = out.stats
    assert st.target_calls == st.rounds
    assert sum(st.accept_histogram) == st.row_rounds
    # the close draft must be partly right, or these tests would not exercise rollback
    assert 1.0 < st.mean_accepted_length <= gamma + 1


@pytest.mark.parametrize("method", ["semantic", "attention", "uniform", "random", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_prune_method_is_lossless(models, family, method):
    target, close, small = models[family]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[4, 6, 3], frames=8)
    ref = _reference(target, inputs, max_new_tokens=17)
    for draft, ratio in ((close, 0.05), (small, 0.25)):
        dec = SpecDecoder(target, draft, SpecConfig(draft_len=4, prune=method, keep_ratio=ratio))
        out = dec.generate(**inputs, max_new_tokens=17)
        _assert_same(out.sequences, ref)
        if method != "none":
            assert out.stats.kept_visual_tokens < out.stats.total_visual_tokens


@pytest.mark.parametrize("method", ["semantic", "attention"])
def test_prune_source_draft_is_lossless(models, method):
    target, close, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[5, 3], frames=8)
    ref = _reference(target, inputs, max_new_tokens=15)
    dec = SpecDecoder(target, close, SpecConfig(draft_len=3, prune=method, prune_source="draft", keep_ratio=0.25))
    _assert_same(dec.generate(**inputs, max_new_tokens=15).sequences, ref)


def test_qwen2_vl_is_lossless(models):
    target, close, _ = models["qwen2_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[5, 3])
    ref = _reference(target, inputs, max_new_tokens=15)
    out = SpecDecoder(target, close, SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.25))
    _assert_same(out.generate(**inputs, max_new_tokens=15).sequences, ref)


def test_image_inputs_are_lossless(models):
    target, close, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[5, 3], modality="image", height=112, width=84)
    ref = _reference(target, inputs, max_new_tokens=15)
    dec = SpecDecoder(target, close, SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.2))
    _assert_same(dec.generate(**inputs, max_new_tokens=15).sequences, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_inputs_are_plain_speculative_decoding(models, family):
    target, close, _ = models[family]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[5, 3], modality="text")
    ref = _reference(target, inputs, max_new_tokens=15)
    out = SpecDecoder(target, close, SpecConfig(draft_len=3)).generate(**inputs, max_new_tokens=15)
    _assert_same(out.sequences, ref)
    assert out.stats.total_visual_tokens == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_inside_a_draft_stops_each_row_like_generate(models, family):
    target, close, _ = models[family]
    inputs = make_inputs(target, batch_size=4, prompt_lens=[3, 7, 5, 4], seed=3)
    free = _reference(target, inputs, max_new_tokens=20)
    L = inputs["input_ids"].shape[1]
    # An EOS id that row 0 produces mid-way, so rows finish at different steps and inside accepted drafts.
    eos = int(free[0, L + 6])
    ref = _reference(target, inputs, max_new_tokens=20, eos_token_id=eos)
    out = SpecDecoder(target, close, SpecConfig(draft_len=4, prune="none"))
    got = out.generate(**inputs, max_new_tokens=20, eos_token_id=eos)
    _assert_same(got.sequences, ref)
    assert ref.shape[1] < free.shape[1] or (ref[:, L:] == eos).any()


def test_cache_compaction_keeps_output_exact(models):
    target, close, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5], seed=5)
    ref = _reference(target, inputs, max_new_tokens=30)
    dec = SpecDecoder(target, close, SpecConfig(draft_len=4, prune="none", compact_holes=1))
    out = dec.generate(**inputs, max_new_tokens=30)
    _assert_same(out.sequences, ref)
    assert out.stats.compactions > 0


@pytest.mark.parametrize("gamma", [2, 4])
def test_identical_draft_accepts_everything(models, gamma):
    """Honest accounting: a draft equal to the target gives MAL = γ+1 exactly (rounds not cut by the budget)."""
    target, _, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6])
    rounds = 3
    dec = SpecDecoder(target, copy.deepcopy(target), SpecConfig(draft_len=gamma, prune="none"))
    out = dec.generate(**inputs, max_new_tokens=1 + rounds * (gamma + 1), eos_token_id=10**6)
    st = out.stats
    assert st.rounds == rounds and st.target_calls == rounds
    assert st.mean_accepted_length == gamma + 1
    assert st.accept_histogram[gamma] == 2 * rounds


def test_apply_vspec_round_trip(models):
    target, close, _ = models["llava_onevision"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6])
    before = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    cfg = SpecConfig(draft_len=3, prune="uniform", keep_ratio=0.3)
    expected = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=12).sequences
    with apply_vspec(target, close, cfg) as handle:
        patched = target.generate(**inputs, max_new_tokens=12)
        _assert_same(patched, expected)
        assert handle.last_stats.rounds > 0
        full = target.generate(**inputs, max_new_tokens=12, return_dict_in_generate=True)
        _assert_same(full.sequences, expected)
        with pytest.raises(RuntimeError, match="already patched"):
            apply_vspec(target, close, cfg)
    assert "generate" not in target.__dict__
    _assert_same(target.generate(**inputs, max_new_tokens=12, do_sample=False), before)


def test_bad_inputs_raise_clear_errors(models):
    target, close, _ = models["qwen2_5_vl"]
    other_vocab = tiny_model("qwen2_5_vl", role="draft", vocab_size=1200)
    other_vocab.generation_config.eos_token_id = 17  # a different tokenizer, not padding (tests/runtime/test_vocab.py)
    with pytest.raises(ValueError, match="vocabulary"):
        SpecDecoder(target, other_vocab)
    with pytest.raises(ValueError, match="one family"):
        SpecDecoder(target, models["qwen2_vl"][1])
    for bad in (dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(draft_len=0), dict(prune="best"),
                dict(prune_source="oracle")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SpecConfig(**bad)
    with pytest.raises(ValueError, match="query_rows"):
        PruneConfig(query_rows=0)

    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(ValueError, match="supported: qwen2_5_vl"):
        SpecDecoder(Fake(), close)
    inputs = make_inputs(target, batch_size=1)
    dec = SpecDecoder(target, close)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(**inputs, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        dec.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="num_beams"):
        dec.generate(**inputs, max_new_tokens=3, num_beams=2)


@pytest.mark.parametrize("noise", [0.1, 2.0], ids=["close_draft", "far_draft"])
def test_sampling_follows_the_target_distribution(models, noise, monkeypatch):
    """The first two generated tokens (the second one speculative) follow the target's joint distribution.

    Exact joint p(t1, t2) under top-k 4 / temperature 0.8 is computed from the target; 3,000 draws of vspec are
    compared with a chi-square test whose false-alarm rate is 1e-3 (fixed seeds make the test deterministic).
    The ops run on the reference backend here: 500-row batches are minutes in Triton's interpreter, and
    tests/kernels/test_verify.py proves the sampling kernel token-for-token equal to the reference.
    """
    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    target = models["qwen2_5_vl"][0]
    draft = perturbed_copy(target, noise=noise, seed=7)
    one = make_inputs(target, batch_size=1, prompt_lens=[4], seed=11)
    temperature, top_k = 0.8, 4
    joint = target_sequence_probs(target, one, 2, temperature=temperature, top_k=top_k)

    rows, calls = 500, 6
    dec = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="none"))
    counts = sample_continuations(dec, one, rows=rows, calls=calls, n_tokens=2,
                                  generator=torch.Generator().manual_seed(1234), temperature=temperature,
                                  top_k=top_k, top_p=1.0)
    assert_follows(counts, joint, rows * calls)
