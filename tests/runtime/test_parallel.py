"""Parallel speculative decoding (SpecConfig(parallel=True)) is lossless and takes each path it claims.

On the CPU the parallel schedule runs its steps sequentially (the overlap is a CUDA property, the bookkeeping is
not), so these tests check exactly the acceptance/rollback logic the CUDA streams run.
"""

import copy

import pytest
import torch

from vspec import LooseConfig, SpecConfig, SpecDecoder
from vspec.runtime import parallel
from vspec.testing import (
    assert_follows,
    make_inputs,
    pairwise,
    perturbed_copy,
    sample_continuations,
    target_sequence_probs,
    tiny_pair,
)

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
MODES = ["post", "pre", "pearl"]


def forced_draft(target, wrong):
    """A copy of ``target`` whose argmax is forced WRONG where ``wrong(q)`` holds for the logical position q of the
    query (the draft's guess for the token at q + 1); elsewhere it is the target itself (same weights)."""
    draft = copy.deepcopy(target)
    seen = {}

    def grab_positions(_module, _args, kwargs):
        pos = kwargs.get("position_ids")
        seen["pos"] = pos[0] if pos.ndim == 3 else pos  # Qwen: [3, B, L] (t row = text position); else [B, L]

    def force(_module, _args, logits):
        q = seen["pos"][:, -logits.shape[1]:]
        mask = torch.tensor([[wrong(int(p)) for p in row] for row in q.tolist()], dtype=torch.bool)
        if not mask.any():
            return logits
        best = logits.argmax(dim=-1, keepdim=True)
        top = logits.amax(dim=-1, keepdim=True)
        other = (best + 1) % logits.shape[-1]
        forced = logits.scatter(-1, other, top + 10.0)
        return torch.where(mask[..., None], forced, logits)

    draft.register_forward_pre_hook(grab_positions, with_kwargs=True)
    draft.get_output_embeddings().register_forward_hook(force)
    return draft


def _check(out, ref):
    assert out.sequences.shape == ref.shape, (out.sequences.shape, ref.shape)
    assert torch.equal(out.sequences, ref), f"\nvspec:\n{out.sequences}\nreference:\n{ref}"


def _check_stats(st, mode):
    assert st.target_calls == st.rounds  # a round is one target forward, in every mode
    assert sum(st.accept_histogram) == st.row_rounds
    if mode == "post":
        assert st.pre_verify_rounds == 0 and st.post_verify_rounds == st.rounds
    if mode == "pre":
        assert st.post_verify_rounds == 0 and st.spec_drafts_kept == st.spec_drafts_discarded == 0
        assert st.pre_verify_rounds > 0
    if mode == "pearl":
        assert st.pre_verify_rounds > 0 and st.pre_verify_rounds + st.post_verify_rounds == st.rounds
    assert st.draft_ms == st.verify_ms == st.overlap_ms == 0.0  # CPU: nothing is timed


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,batch,mode,gamma", pairwise(FAMILIES, [1, 4], MODES, [1, 4]))
def test_greedy_equals_generate(models, family, batch, mode, gamma):
    target, close = models[family]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5, 4][:batch], seed=batch)
    ref = target.generate(**inputs, max_new_tokens=23, do_sample=False)  # 23: no multiple of γ or γ+1
    cfg = SpecConfig(draft_len=gamma, prune="none", parallel=True, parallel_mode=mode)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=23)
    _check(out, ref)
    _check_stats(out.stats, mode)
    assert out.stats.draft_len_used == gamma


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,prune,source,mode", [
    (family, prune, source, mode) for family, (prune, source), mode in pairwise(
        FAMILIES, [("uniform", "target"), ("random", "target"), ("semantic", "target"), ("attention", "draft"),
                   ("semantic", "draft")], ["post", "pearl"])])
def test_pruned_draft_is_lossless(models, family, prune, source, mode):
    """Prefill overlap (the draft's prefill beside the target's) where the keep-set allows, serial where not."""
    target, close = models[family]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[4, 6, 3], frames=8)
    ref = target.generate(**inputs, max_new_tokens=17, do_sample=False)
    cfg = SpecConfig(draft_len=3, prune=prune, prune_source=source, keep_ratio=0.25, parallel=True,
                     parallel_mode=mode)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=17)
    _check(out, ref)
    assert out.stats.kept_visual_tokens < out.stats.total_visual_tokens
    serial = SpecDecoder(target, close, SpecConfig(draft_len=3, prune=prune, prune_source=source, keep_ratio=0.25))
    assert serial.generate(**inputs, max_new_tokens=17).stats.kept_visual_tokens == out.stats.kept_visual_tokens


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_eos_inside_a_draft_stops_each_row_like_generate(models, family, mode):
    target, close = models[family]
    inputs = make_inputs(target, batch_size=4, prompt_lens=[3, 7, 5, 4], seed=3)
    free = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    L = inputs["input_ids"].shape[1]
    eos = int(free[0, L + 6])
    ref = target.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    cfg = SpecConfig(draft_len=4, prune="none", parallel=True, parallel_mode=mode)
    _check(SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=20, eos_token_id=eos), ref)
    assert ref.shape[1] < free.shape[1] or (ref[:, L:] == eos).any()


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_copy_keeps_every_speculative_draft(models, family, gamma):
    """A draft equal to the target: every round accepts all γ and the bonus equals the draft's first speculative
    token, so after the first round the draft never drafts afresh: it only speculates (γ+1 forwards a round)."""
    target, _ = models[family]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6])
    rounds = 4
    n = 1 + rounds * (gamma + 1)
    ref = target.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=10**6)
    cfg = SpecConfig(draft_len=gamma, prune="none", parallel=True)
    out = SpecDecoder(target, copy.deepcopy(target), cfg).generate(**inputs, max_new_tokens=n, eos_token_id=10**6)
    _check(out, ref)
    st = out.stats
    assert st.rounds == rounds and st.mean_accepted_length == gamma + 1
    assert st.spec_drafts_kept == 2 * (rounds - 1) and st.spec_drafts_discarded == 0  # last round: rows finish
    assert st.draft_calls == 1 + gamma + rounds * (gamma + 1)  # prefill, one fresh chain, then speculation only


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_always_wrong_draft_discards_every_speculation(models, family, mode):
    """A draft wrong at every position: the first draft token is rejected in every round."""
    target, _ = models[family]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[4, 6, 3], seed=2)
    ref = target.generate(**inputs, max_new_tokens=13, do_sample=False)
    cfg = SpecConfig(draft_len=3, prune="none", parallel=True, parallel_mode=mode)
    out = SpecDecoder(target, forced_draft(target, lambda q: True), cfg).generate(**inputs, max_new_tokens=13)
    _check(out, ref)
    st = out.stats
    assert st.accept_histogram[0] == st.row_rounds and st.mean_accepted_length == 1.0
    assert st.spec_drafts_kept == 0
    if mode == "post":
        assert st.spec_drafts_discarded > 0
    if mode != "post":
        # every pre-verify round rejects in every row, so no verification forward over D_2..D_γ ever runs
        assert st.pre_verify_rejected == st.row_rounds and st.post_verify_rounds == 0


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,batch,mode", pairwise(FAMILIES, [1, 3], MODES))
def test_draft_wrong_at_chosen_positions_keeps_and_discards(models, family, batch, mode):
    """Wrong at two of every 7 logical positions, right elsewhere: some speculations are kept, some discarded,
    pre-checks both pass and fail (the second wrong position is where a pre-check lands after a rejection at the
    first). Rows of one batch sit at different positions, so in one round some keep their speculation while others
    draft afresh; compaction after every round stresses the per-row rollback."""
    target, _ = models[family]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[5, 3, 8][:batch], seed=4)
    ref = target.generate(**inputs, max_new_tokens=31, do_sample=False)
    draft = forced_draft(target, lambda q: q % 7 in (0, 1))
    cfg = SpecConfig(draft_len=2, prune="none", parallel=True, parallel_mode=mode, compact_holes=1)
    out = SpecDecoder(target, draft, cfg).generate(**inputs, max_new_tokens=31)
    _check(out, ref)
    st = out.stats
    _check_stats(st, mode)
    if mode != "pre":
        assert st.spec_drafts_kept > 0 and st.spec_drafts_discarded > 0
    if mode != "post":
        assert 0 < st.pre_verify_rejected < st.pre_verify_rounds * batch
    assert 0 < st.accept_histogram[0] < st.row_rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_draft_len_from_a_fixed_ratio(models, family):
    target, close = models[family]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6])
    ref = target.generate(**inputs, max_new_tokens=19, do_sample=False)
    for mode, ratio, gamma in (("post", 3.4, 2), ("pearl", 3.4, 3), ("post", 40.0, 5), ("pre", 0.2, 1)):
        cfg = SpecConfig(draft_len=5, prune="none", parallel=True, parallel_mode=mode, adaptive_draft_len=True,
                         draft_time_ratio=ratio)
        out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=19)
        _check(out, ref)
        assert out.stats.draft_len_used == gamma
    # without a ratio on the CPU nothing is measured: γ stays draft_len (reproducible runs)
    cfg = SpecConfig(draft_len=4, prune="none", parallel=True, adaptive_draft_len=True)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=19)
    _check(out, ref)
    assert out.stats.draft_len_used == 4 and out.stats.post_verify_rounds == out.stats.rounds


def test_adaptive_draft_len_switches_after_the_warmup(models, monkeypatch):
    """The CUDA path, with the event timer replaced by a fixed measurement: two serial warm-up rounds at
    draft_len, then γ from the measured ratio, with no loss."""
    monkeypatch.setattr(parallel._Timer, "can_measure", property(lambda self: True))
    monkeypatch.setattr(parallel._Timer, "warmup_ratio", lambda self: 2.6)
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[4, 6, 3])
    ref = target.generate(**inputs, max_new_tokens=25, do_sample=False)
    cfg = SpecConfig(draft_len=5, prune="none", parallel=True, parallel_mode="post", adaptive_draft_len=True)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=25)
    _check(out, ref)
    st = out.stats
    assert st.draft_len_used == 2  # round(2.6) − 1
    assert st.post_verify_rounds == st.rounds - 2  # the warm-up rounds ran serially


def test_loose_verification_runs_post_verify_like_serial(models):
    target, _ = models["qwen2_5_vl"]
    draft = perturbed_copy(target, noise=0.3, seed=1)
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6], seed=6)
    loose = LooseConfig(detector="none", top_k=3, min_prob_ratio=0.1)
    serial = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="none", verify="loose", loose=loose))
    par = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="none", verify="loose", loose=loose,
                                                parallel=True))
    a, b = serial.generate(**inputs, max_new_tokens=21), par.generate(**inputs, max_new_tokens=21)
    assert b.stats.loose_accepted > 0
    assert torch.equal(a.sequences, b.sequences)


def test_bad_parallel_configs_raise():
    with pytest.raises(ValueError, match="parallel_mode"):
        SpecConfig(parallel=True, parallel_mode="both")
    with pytest.raises(ValueError, match="need parallel=True"):
        SpecConfig(adaptive_draft_len=True)
    with pytest.raises(ValueError, match="draft_time_ratio"):
        SpecConfig(parallel=True, draft_time_ratio=2.0)
    with pytest.raises(ValueError, match="draft_time_ratio"):
        SpecConfig(parallel=True, adaptive_draft_len=True, draft_time_ratio=0.0)
    with pytest.raises(ValueError, match="loose"):
        SpecConfig(parallel=True, parallel_mode="pearl", verify="loose")


@pytest.mark.parametrize("mode,gamma", [("post", 1), ("pearl", 1), ("pearl", 2)])
def test_sampling_follows_the_target_distribution(models, mode, gamma, monkeypatch):
    """The first FOUR generated tokens follow the target's joint distribution (top-k 2, temperature 0.8: 16 cells).

    Four tokens reach past the first round, so kept speculative drafts (γ = 1: the third or fourth token is
    verified from a kept speculation), pre-verified first tokens, and rows that rejected theirs riding along in a
    verification of D_2.. (pearl γ = 2) all shape the counted tokens; the test asserts those paths ran. 3,000
    draws, chi-square with false-alarm rate 1e-3, fixed seeds. Reference backend: see tests/runtime/test_engine.py's
    sampling test.
    """
    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    target = models["qwen2_5_vl"][0]
    # noise 0.1: close enough that ~40% of row-rounds keep their speculation, far enough (q != p) that wrong
    # draft probabilities for a kept speculation fail this test (checked by hand: p < 1e-7)
    draft = perturbed_copy(target, noise=0.1, seed=7)
    one = make_inputs(target, batch_size=1, prompt_lens=[4], seed=11)
    temperature, top_k, n_tok = 0.8, 2, 4
    joint = target_sequence_probs(target, one, n_tok, temperature=temperature, top_k=top_k)

    rows, calls = 500, 6
    cfg = SpecConfig(draft_len=gamma, prune="none", parallel=True, parallel_mode=mode)
    dec = SpecDecoder(target, draft, cfg)
    stats = []
    counts = sample_continuations(dec, one, rows=rows, calls=calls, n_tokens=n_tok,
                                  generator=torch.Generator().manual_seed(4321),
                                  on_output=lambda o: stats.append(o.stats), temperature=temperature, top_k=top_k,
                                  top_p=1.0)
    kept, discarded = sum(st.spec_drafts_kept for st in stats), sum(st.spec_drafts_discarded for st in stats)
    pre_rej, pre_rounds = sum(st.pre_verify_rejected for st in stats), sum(st.pre_verify_rounds for st in stats)
    assert discarded > 0
    if gamma == 1:
        assert kept > 0  # with γ = 2 a kept speculation would be used only past the fourth token
    if mode == "pearl":
        assert 0 < pre_rej < pre_rounds * rows  # pre-checks accepted and rejected within one batch
    assert_follows(counts, joint, rows * calls, min_dof=6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the draft stream, events and overlap timing")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_streams_are_lossless_and_timed(mode):
    """On a GPU (float32, tiny models): same tokens as target.generate, and the CUDA-event figures are filled."""
    target, _ = tiny_pair("qwen2_5_vl", device="cuda")
    draft = perturbed_copy(target, noise=0.1, seed=1)
    inputs = make_inputs(target, batch_size=3, prompt_lens=[4, 7, 5], frames=8)
    ref = target.generate(**inputs, max_new_tokens=25, do_sample=False)
    for prune in ("uniform", "semantic"):  # prefill beside the target's / after it
        cfg = SpecConfig(draft_len=3, prune=prune, keep_ratio=0.25, parallel=True, parallel_mode=mode)
        out = SpecDecoder(target, draft, cfg).generate(**inputs, max_new_tokens=25)
        _check(out, ref)
        st = out.stats
        assert st.draft_ms > 0 and st.verify_ms > 0 and 0 <= st.overlap_ms <= min(st.draft_ms, st.verify_ms)
    cfg = SpecConfig(draft_len=5, prune="none", parallel=True, parallel_mode=mode, adaptive_draft_len=True)
    out = SpecDecoder(target, draft, cfg).generate(**inputs, max_new_tokens=25)
    _check(out, ref)
    assert 1 <= out.stats.draft_len_used <= 5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_draft_on_a_second_device():
    target, _ = tiny_pair("qwen2_5_vl", device="cuda:0")
    draft = perturbed_copy(target, noise=0.1, seed=1).to("cuda:1")
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 7], frames=8)
    ref = target.generate(**inputs, max_new_tokens=21, do_sample=False)
    for mode in MODES:
        cfg = SpecConfig(draft_len=3, prune="uniform", keep_ratio=0.25, parallel=True, parallel_mode=mode)
        _check(SpecDecoder(target, draft, cfg).generate(**inputs, max_new_tokens=21), ref)
    out = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="none", parallel=True)).generate(
        **inputs, max_new_tokens=8, do_sample=True)
    assert out.sequences.shape[1] <= inputs["input_ids"].shape[1] + 8
