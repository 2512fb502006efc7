"""Qwen3.5 and Qwen3.5-MoE (issue 17): a hybrid Gated DeltaNet / attention decoder, rolled back exactly.

First the state itself: after ragged feeds (a hole in the middle of a row) and a rollback that cuts each row in a
different step, every row's recurrent and conv state equals what transformers' own forward over the row's kept tokens
holds, and the next token's logits agree. Then every supported mode against ``target.generate(do_sample=False)``
token for token (video, image and text-only batches of 1 and 3 ragged rows, γ 1..6, pruning at keep 0.1 / 0.25 /
1.0 from either source), sampling against the target's exact distribution, MAL = γ + 1 with the target as its own
draft, and the refusals: trees and the parallel schedule (vspec), assisted generation (transformers).
"""

import pytest
import torch
from transformers import DynamicCache

from vspec import SpecConfig, SpecDecoder, TreeConfig
from vspec.runtime.models import get_adapter
from vspec.runtime.state import ModelState, cache_keyword
from vspec.testing import (
    assert_follows,
    family_models,
    make_inputs,
    perturbed_copy,
    sample_continuations,
    target_sequence_probs,
)

FAMILIES = ["qwen3_5", "qwen3_5_moe"]
# Tests that run the ops through the Triton kernels (Triton's CPU interpreter without a GPU); the others use the
# reference ops, which the kernels equal (tests/kernels/test_gated_delta.py): the interpreter is slow per launch and
# the linear layers launch two ops per layer and forward.
KERNEL_TESTS = {"test_identical_draft_accepts_everything"}


@pytest.fixture(scope="module")
def models():
    """Per family: the target, a close draft (perturbed copy: partial acceptance) and the small random draft."""
    return family_models(FAMILIES)


def _inputs(target, modality, batch, seed=0, frames=8):
    return make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5][:batch], modality=modality, frames=frames,
                       seed=seed)


def _kw(inputs):
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


def _assert_same(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(out, ref), f"\nvspec:\n{out}\nreference:\n{ref}"


def _hf_linear_states(model, tokens):
    """transformers' own forward over one row's ``tokens [L]`` with a fresh cache: ``({layer: (recurrent, conv)},
    last logits [V])``."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=tokens[None], use_cache=True, **{cache_keyword(model): cache})
    states = {}
    for i in get_adapter(model).linear_attention_modules():
        layer = cache.layers[i]
        states[i] = (layer.recurrent_states[0][0], layer.conv_states[0][0])
    return states, out.logits[0, -1]


# ---- facts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_the_linear_layers_and_positions_are_generates(models, family):
    """layer_types picks the Gated DeltaNet modules; prompt positions are get_rope_index's (generate's rows 1-3) and
    decoding continues at the last prompt position + 1, as for Qwen3-VL."""
    target = models[family][0]
    adapter = get_adapter(target)
    types = target.config.text_config.layer_types
    linear = adapter.linear_attention_modules()
    assert sorted(linear) == [i for i, t in enumerate(types) if t == "linear_attention"] == [0, 2]
    assert all(type(m).__name__.endswith("GatedDeltaNet") for m in linear.values())
    inputs = _inputs(target, "video", 3)
    seen = []
    hook = adapter.language_model().register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        target.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    prompt = adapter.prompt(inputs["input_ids"], inputs["attention_mask"], _kw(inputs))
    valid = inputs["attention_mask"].bool()
    assert torch.equal(seen[0][1:][:, valid], prompt.positions[:, valid])
    for k, pos in enumerate(seen[1:]):
        assert torch.equal(pos[1:, :, -1], (prompt.next_pos + k)[None].expand(3, -1))
    assert len(prompt.spans[0]) == 1 and prompt.spans[0][0].pieces is not None  # per-frame runs, one grid


def test_hf_assisted_generation_refuses_the_model(models):
    """The README's claim: transformers' assisted generation refuses Qwen3.5 (a stateful model) outright."""
    target, close, _ = models["qwen3_5"]
    inputs = _inputs(target, "text", 1)
    with pytest.raises(ValueError, match="assisted generation is not supported with stateful models"):
        target.generate(**inputs, assistant_model=close, max_new_tokens=4, do_sample=False)


def test_trees_are_refused(models):
    target, close, _ = models["qwen3_5"]
    with pytest.raises(ValueError, match="tree is not supported with linear-attention layers.*state per node"):
        SpecDecoder(target, close, SpecConfig(tree=TreeConfig(width=2, depth=3)))


def test_compiled_path_is_refused(models):
    target, close, _ = models["qwen3_5"]
    with pytest.raises(ValueError, match="compile is not supported with linear-attention layers"):
        SpecDecoder(target, close, SpecConfig(compile={"backend": "eager"}))


# ---- the state: holes skipped, rollback exact ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_leaves_each_row_the_state_of_its_kept_tokens(models, family):
    """Prefill 3 ragged rows, then a ragged 2-token feed (row 0: a hole, then a token), a 1-token step and a 4-token
    step; roll row 0 back into the feed, row 1 into the 4-token step and keep all of row 2. Each row's recurrent and
    conv state then equals transformers' forward over that row's kept tokens, and so does the next token's output.
    Then a second rollback reaches back past the first one (row 2 into the 4-token step; the journal keeps two
    rollback periods, as the parallel schedule's draft does): row 2's state is again that of its kept tokens."""
    target = models[family][0]
    adapter = get_adapter(target)
    inputs = _inputs(target, "text", 3, seed=3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = adapter.prompt(ids, mask, {})
    st = ModelState(target, adapter)
    st.linear.keep_rounds = 2
    st.forward(input_ids=ids, positions=prompt.positions, new_valid=mask.bool(), logits_to_keep=1)
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randint(8, 1000, (3, n), generator=gen) for n in (2, 1, 4)]
    valids = [torch.tensor([[False, True], [True, True], [True, True]]), torch.ones(3, 1, dtype=torch.bool),
              torch.ones(3, 4, dtype=torch.bool)]
    next_pos = prompt.next_pos.clone()
    starts = []
    for tok, valid in zip(steps, valids):
        starts.append(st.length)
        pos = next_pos[:, None] + valid.long().cumsum(1) - 1
        st.forward(input_ids=tok, positions=adapter.decode_positions(pos), new_valid=valid, logits_to_keep=1)
        next_pos = next_pos + valid.sum(1)
    end = st.length
    cut = torch.tensor([starts[0] + 2, starts[2] + 2, end])  # row 0 keeps its feed token, row 1 two of the four
    st.invalidate(cut, end, trim=False)
    kept = []
    for b in range(3):
        row = [ids[b][mask[b].bool()]]
        for tok, valid, s in zip(steps, valids, starts):
            take = valid[b] & (torch.arange(tok.shape[1]) < int(cut[b]) - s)
            row.append(tok[b][take])
        kept.append(torch.cat(row))
    for b in range(3):
        ref, _ = _hf_linear_states(target, kept[b])
        for i, layer in st.linear.layers.items():
            torch.testing.assert_close(layer.rec[b], ref[i][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(layer.conv[b], ref[i][1], atol=1e-5, rtol=1e-5)
    # the next forward continues every row from its kept tokens
    nxt = torch.randint(8, 1000, (3, 1), generator=gen)
    pos = torch.tensor([len(k) for k in kept])[:, None]
    logits = st.forward(input_ids=nxt, positions=adapter.decode_positions(pos),
                        new_valid=torch.ones(3, 1, dtype=torch.bool), logits_to_keep=1)[:, -1]
    for b in range(3):
        _, ref_logits = _hf_linear_states(target, torch.cat([kept[b], nxt[b]]))
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-4, rtol=1e-4)
    # row 2 now rejects the last token of its 4-token step and the one after (fed after the first rollback)
    cut2 = torch.tensor([st.length, st.length, starts[2] + 3])
    st.invalidate(cut2, st.length, trim=False)
    ref, _ = _hf_linear_states(target, kept[2][:-1])
    for i, layer in st.linear.layers.items():
        torch.testing.assert_close(layer.rec[2], ref[i][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.conv[2], ref[i][1], atol=1e-5, rtol=1e-5)
    assert not bool(st.linear.overreach)
    # with one period kept (the chain's setting) the same reach-back is flagged: it cannot be undone
    st.linear.keep_rounds = 1
    st.forward(input_ids=nxt, positions=adapter.decode_positions(pos + 1), new_valid=torch.ones(3, 1, dtype=torch.bool),
               logits_to_keep=1)
    st.invalidate(torch.tensor([st.length] * 2 + [starts[2] + 2]), st.length, trim=False)
    assert bool(st.linear.overreach)


def test_a_masked_hole_is_not_a_skipped_token(models):
    """Why holes are skipped rather than masked: transformers zeroes a masked token's input, but a zero input still
    decays the recurrent state (through g) and shifts the conv window, so a hole in the middle of a row changes the
    state; vspec's forward leaves it unchanged (test above)."""
    target = models["qwen3_5"][0]
    gen = torch.Generator().manual_seed(2)
    row = torch.randint(8, 1000, (9,), generator=gen)
    with_hole = torch.cat([row[:6], torch.tensor([0]), row[6:]])
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 6] = 0
    cache = DynamicCache(config=target.config)
    target(input_ids=with_hole[None], attention_mask=mask, use_cache=True, **{cache_keyword(target): cache})
    ref, _ = _hf_linear_states(target, row)
    i = min(get_adapter(target).linear_attention_modules())
    assert (cache.layers[i].recurrent_states[0][0] - ref[i][0]).abs().max() > 1e-3
    assert not torch.equal(cache.layers[i].conv_states[0][0], ref[i][1])


# ---- lossless chain decoding ----------------------------------------------------------------------------------------
CHAIN = [  # (draft, γ, prune, source, keep)
    ("close", 1, "none", "target", 1.0),
    ("close", 2, "semantic", "target", 0.1),
    ("close", 3, "attention", "draft", 0.25),
    ("close", 4, "semantic", "target", 0.25),
    ("small", 5, "uniform", "target", 0.1),
    ("close", 6, "semantic", "draft", 0.1),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_greedy_equals_generate(models, family):
    target, close, small = models[family]
    drafts = {"close": close, "small": small}
    cases = [("video", 3), ("video", 1), ("image", 3), ("text", 3)]
    full_rounds = 0
    for i, (modality, batch) in enumerate(cases):
        inputs = _inputs(target, modality, batch, seed=i)
        ref = target.generate(**inputs, max_new_tokens=15, do_sample=False)
        chain = CHAIN if modality == "video" and batch == 3 else CHAIN[1::2]
        for name, gamma, prune, source, keep in chain:
            cfg = SpecConfig(draft_len=gamma, prune=prune, prune_source=source, keep_ratio=keep)
            out = SpecDecoder(target, drafts[name], cfg).generate(**inputs, max_new_tokens=15)
            _assert_same(out.sequences, ref)
            st = out.stats
            assert st.target_calls == st.rounds and sum(st.accept_histogram) == st.row_rounds
            if prune != "none" and modality != "text":
                assert 0 < st.kept_visual_tokens < st.total_visual_tokens
            if name == "close":
                full_rounds += st.accept_histogram[gamma]
                if modality == "video" and batch == 3:
                    assert st.mean_accepted_length > 1.0  # partial acceptance: rollback is exercised
    assert full_rounds > 0  # some row accepted every draft: the draft's ragged 2-token feed (a hole) is exercised
    # compaction after every round (the linear states hold no slots: compaction settles them, nothing moves)
    inputs = _inputs(target, "video", 3, seed=0)
    ref = target.generate(**inputs, max_new_tokens=15, do_sample=False)
    cfg = SpecConfig(draft_len=4, prune="semantic", prune_source="draft", keep_ratio=0.25, compact_holes=1)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=15)
    _assert_same(out.sequences, ref)
    assert out.stats.compactions > 0


@pytest.fixture
def draft_states(monkeypatch):
    """The parallel schedule's draft states, as the calls create them."""
    from vspec.runtime.parallel import ParallelSchedule

    seen = []
    states = ParallelSchedule.states

    def capture(self, prompt, call):
        target, draft = states(self, prompt, call)
        seen.append(draft)
        return target, draft

    monkeypatch.setattr(ParallelSchedule, "states", capture)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_greedy_equals_generate(models, family, draft_states):
    """The parallel schedule (the draft drafts past unverified tokens; its rollbacks reach back up to two earlier
    rollbacks) is lossless, and no draft rollback ever reaches past its journal (the draft's state stays exact)."""
    target, close, _ = models[family]
    for i, (modality, batch, prune, source, keep, mode) in enumerate([
            ("video", 3, "semantic", "target", 0.25, "post"),
            ("video", 3, "attention", "draft", 0.1, "pearl"),
            ("image", 3, "semantic", "draft", 0.25, "pre"),
            ("text", 1, "none", "target", 1.0, "post")]):
        inputs = _inputs(target, modality, batch, seed=20 + i)
        ref = target.generate(**inputs, max_new_tokens=15, do_sample=False)
        # every other case compacts both caches after every round: the draft's journal follows the moved slots
        cfg = SpecConfig(draft_len=3, prune=prune, prune_source=source, keep_ratio=keep, parallel=True,
                         parallel_mode=mode, compact_holes=1 if i % 2 else 64)
        _assert_same(SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=15).sequences, ref)
    assert len(draft_states) == 4 and not any(bool(d.linear.overreach) for d in draft_states)


def test_parallel_identical_draft_keeps_every_speculation(models, draft_states):
    """The target as its own draft in post-verify mode: every speculation is kept (the draft's linear states after
    each rollback equal the target's), and so in pearl mode every D_1 passes the pre-verify check."""
    target = models["qwen3_5"][0]
    inputs = _inputs(target, "video", 3)
    for mode in ("post", "pearl"):
        cfg = SpecConfig(draft_len=3, prune="none", parallel=True, parallel_mode=mode)
        out = SpecDecoder(target, target, cfg).generate(**inputs, max_new_tokens=15, eos_token_id=10**6)
        st = out.stats
        assert st.spec_drafts_kept > 0 and st.spec_drafts_discarded == 0 and st.pre_verify_rejected == 0, st.as_dict()
    assert not any(bool(d.linear.overreach) for d in draft_states)


def test_identical_draft_accepts_everything(models):
    """The target as its own draft through the Triton kernels (under the interpreter without a GPU: one image row,
    to keep it cheap): MAL = γ + 1, whole prompt and through the gathered draft prefill at keep 1.0."""
    target = models["qwen3_5"][0]
    inputs = _inputs(target, "image", 1)
    gamma, rounds = 2, 2
    for prune in ("none", "uniform"):  # uniform: the gathered, left-padded prefill without the scoring kernels
        cfg = SpecConfig(draft_len=gamma, prune=prune, keep_ratio=1.0)
        out = SpecDecoder(target, target, cfg).generate(**inputs, max_new_tokens=1 + rounds * (gamma + 1),
                                                        eos_token_id=10**6)
        st = out.stats
        assert st.rounds == rounds and st.mean_accepted_length == gamma + 1, (prune, st.as_dict())
        assert st.kept_visual_tokens == st.total_visual_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_draft_mal_for_every_gamma(models, family):
    """MAL = γ + 1 for γ 1..6 on a ragged video batch (reference ops), the whole video or every token kept through
    either pruned prefill (target scores: gathered inputs_embeds; draft scores: its own full forward); the output is
    generate's."""
    target = models[family][0]
    inputs = _inputs(target, "video", 3)
    prunes = [("none", "target"), ("semantic", "target"), ("attention", "draft")]
    for gamma in range(1, 7):
        prune, source = prunes[gamma % 3]
        cfg = SpecConfig(draft_len=gamma, prune=prune, prune_source=source, keep_ratio=1.0)
        n = 1 + 2 * (gamma + 1)
        out = SpecDecoder(target, target, cfg).generate(**inputs, max_new_tokens=n, eos_token_id=10**6)
        _assert_same(out.sequences, target.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=10**6))
        st = out.stats
        assert st.rounds == 2 and st.mean_accepted_length == gamma + 1, (gamma, prune, st.as_dict())
        assert st.kept_visual_tokens == st.total_visual_tokens


@pytest.mark.parametrize("family,detector", [*((f, "hidden") for f in FAMILIES), ("qwen3_5", "attribution")])
def test_loose_zero_tolerance_equals_strict(models, family, detector):
    """Loose verification rolls back like the strict chain (a rejected suffix); at zero tolerance it is exact.
    ``attribution`` (the default detector) follows Qwen3.5's gated attention output."""
    from vspec import LooseConfig

    target, close, _ = models[family]
    inputs = _inputs(target, "video", 3, seed=30)
    ref = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    cfg = SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.25, verify="loose",
                     loose=LooseConfig(detector=detector, top_k=1, shift=0))
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=12)
    _assert_same(out.sequences, ref)
    assert out.stats.loose_accepted == 0


@pytest.mark.parametrize("parallel", [False, True], ids=["chain", "parallel"])
def test_sampling_follows_the_target_distribution(models, parallel):
    """The first two generated tokens (the second one speculative) follow the target's joint distribution under
    top-k 4 / temperature 0.8, with a pruned draft (keep 0.25) on a video prompt: 2,400 draws, chi-square with
    false-alarm rate 1e-3, fixed seeds."""
    target = models["qwen3_5"][0]
    draft = perturbed_copy(target, noise=0.1, seed=7)
    one = make_inputs(target, batch_size=1, prompt_lens=[4], seed=11)
    temperature, top_k = 0.8, 4
    joint = target_sequence_probs(target, one, 2, temperature=temperature, top_k=top_k)
    rows, calls = 400, 6
    dec = SpecDecoder(target, draft, SpecConfig(draft_len=2, prune="semantic", keep_ratio=0.25, parallel=parallel))
    counts = sample_continuations(dec, one, rows=rows, calls=calls, n_tokens=2,
                                  generator=torch.Generator().manual_seed(1234), temperature=temperature,
                                  top_k=top_k, top_p=1.0)
    assert_follows(counts, joint, rows * calls)
