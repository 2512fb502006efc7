"""Generation options as real checkpoints ship them: the same text as ``generate``, or a refusal by name.

Three layers: (1) ``LogitsRules`` against transformers' own processor classes, position by position, on random
histories; (2) end to end, ``SpecDecoder`` / ``apply_vspec`` against ``target.generate()`` under the
``generation_config`` that Qwen2-VL / Qwen2.5-VL Instruct checkpoints ship and under explicit penalties, for the
chain, tree and parallel schedules, batch 1 and 3; (3) refusals.
"""

import copy

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vspec import SpecConfig, SpecDecoder, TreeConfig, apply_vspec
from vspec.runtime.generation import GenerationSettings, History, LogitsRules, chain_extra, tree_extra
from vspec.testing import (
    assert_follows,
    make_inputs,
    pairwise,
    perturbed_copy,
    sample_continuations,
    target_sequence_probs,
)

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
# What Qwen2-VL / Qwen2.5-VL Instruct checkpoints ship in generation_config.json (HF_NOTES, fact 11).
INSTRUCT = dict(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)


# ---- (1) the rules against transformers' processors ----------------------------------------------------------------
def _hf_processors(s: GenerationSettings, pad_len: int):
    eos = list(s.eos_token_ids)
    procs = []
    if s.repetition_penalty != 1.0:
        # one row at a time: the int form of prompt_ignore_length (5.24 passes a per-row tensor; 5.17 has the int)
        procs.append(RepetitionPenaltyLogitsProcessor(
            s.repetition_penalty, prompt_ignore_length=pad_len if s.penalty_skips_padding else None))
    if s.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if s.bad_words_ids:
        procs.append(NoBadWordsLogitsProcessor([list(w) for w in s.bad_words_ids], eos))
    if s.min_length:
        procs.append(MinLengthLogitsProcessor(s.min_length, eos))
    if s.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(s.prompt_len, s.min_new_tokens, eos))
    if s.suppress_tokens:
        procs.append(SuppressTokensLogitsProcessor(s.suppress_tokens))
    if s.begin_suppress_tokens:
        procs.append(SuppressTokensAtBeginLogitsProcessor(s.begin_suppress_tokens, s.prompt_len))
    return procs


def _hf_warpers(s: GenerationSettings):
    out = []
    if s.temperature != 1.0:
        out.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k is not None:
        out.append(TopKLogitsWarper(s.top_k))
    if s.top_p is not None:
        out.append(TopPLogitsWarper(s.top_p))
    if s.min_p is not None:
        out.append(MinPLogitsWarper(s.min_p))
    return out


SETTINGS = {
    "penalty": dict(repetition_penalty=1.3),
    "penalty_padding_counted": dict(repetition_penalty=0.7, penalty_skips_padding=False),
    "ngram2": dict(no_repeat_ngram_size=2),
    "ngram1": dict(no_repeat_ngram_size=1),
    "ngram3_bad_words": dict(no_repeat_ngram_size=3, bad_words_ids=((5,), (7, 8), (3, 4, 9), (2,))),
    "min_lengths": dict(min_length=14, min_new_tokens=5),
    "suppress": dict(suppress_tokens=(0, 6), begin_suppress_tokens=(1, 3)),
    "everything": dict(repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=((4, 5),), min_new_tokens=3,
                       suppress_tokens=(9,), begin_suppress_tokens=(2,)),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_rules_equal_transformers_processors_at_every_position(name):
    """Random left-padded prompts, per-row generated lengths and chain drafts over a 12-token vocabulary (so
    repeats, n-grams and bad-word prefixes actually occur): each verify position equals transformers' processors
    run on that position's own history."""
    V, B, L, gamma = 12, 3, 6, 4
    g = torch.Generator().manual_seed(hash(name) % 1000)
    s = GenerationSettings(max_new_tokens=20, eos_token_ids=(1, 2), pad_token_id=0, prompt_len=L,
                           **SETTINGS[name])
    rules = LogitsRules(s, V, "cpu")
    input_ids = torch.randint(3, V, (B, L), generator=g)
    pads = [0, 2, 4]
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        input_ids[b, :p] = 0
        mask[b, :p] = 0
    hist = History(s, input_ids, mask, V, capacity=20 + gamma + 2)
    gen_lens = [0, 3, 7]
    gen = torch.randint(0, V, (B, max(gen_lens)), generator=g)
    hist.commit(gen, torch.tensor(gen_lens))
    drafts = torch.randint(0, V, (B, gamma), generator=g)
    logits = torch.randn(B, gamma + 1, V, generator=g) * 3
    logits[0, 0, 3] = float("-inf")  # a cut token stays cut
    ours = rules.apply(logits, hist, chain_extra(drafts, gamma + 1))
    for b in range(B):
        procs = _hf_processors(s, pads[b])
        for i in range(gamma + 1):
            ids = torch.cat([input_ids[b], gen[b, :gen_lens[b]], drafts[b, :i]])[None]
            ref = logits[b, i][None].clone()
            for p in procs:
                ref = p(ids, ref)
            assert torch.equal(ours[b, i], ref[0]), (name, b, i, ours[b, i], ref[0])


def test_tree_positions_see_their_own_paths():
    """Tree nodes: each node's history is the committed one plus its path (ancestors in depth order)."""
    V, L = 10, 4
    s = GenerationSettings(max_new_tokens=20, eos_token_ids=(1,), pad_token_id=0, prompt_len=L,
                           repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3)
    rules = LogitsRules(s, V, "cpu")
    input_ids = torch.tensor([[3, 4, 5, 3]])
    hist = History(s, input_ids, torch.ones_like(input_ids), V, capacity=30)
    hist.commit(torch.tensor([[4]]), torch.tensor([1]))
    # root 0, children 1, 2 of the root, 3 under 1, 4 under 3, 5 under 2
    parents = [-1, 0, 0, 1, 3, 2]
    tokens = torch.tensor([[4, 6, 3, 6, 4, 5]])
    N = len(parents)
    anc = torch.zeros(1, N, N, dtype=torch.bool)
    for i in range(N):
        j = i
        while j >= 0:
            anc[0, i, j] = True
            j = parents[j]
    logits = torch.randn(1, N, V, generator=torch.Generator().manual_seed(3))
    ours = rules.apply(logits, hist, tree_extra(tokens, anc))
    procs = _hf_processors(s, 0)
    for i in range(N):
        path = [int(tokens[0, j]) for j in range(1, N) if anc[0, i, j]]
        ids = torch.tensor([[3, 4, 5, 3, 4] + path])
        ref = logits[0, i][None].clone()
        for p in procs:
            ref = p(ids, ref)
        assert torch.equal(ours[0, i], ref[0]), (i, path)


@pytest.mark.parametrize("warp", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                  dict(min_p=0.1), dict(temperature=0.5, top_k=7, top_p=0.9, min_p=0.05)])
def test_warpers_equal_transformers(warp):
    s = GenerationSettings(max_new_tokens=4, eos_token_ids=(), pad_token_id=0, prompt_len=3, sample=True, **warp)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2
    ref = x.clone()
    for w in _hf_warpers(s):
        ref = w(None, ref)
    assert torch.equal(LogitsRules(s, 50, "cpu").warp(x), ref)


# ---- (2) end to end ------------------------------------------------------------------------------------------------
def _with_generation_config(target, **fields):
    """A shallow copy of ``target`` (shared weights) whose generation_config carries ``fields``."""
    t = copy.copy(target)
    t.generation_config = copy.deepcopy(target.generation_config)
    for k, v in fields.items():
        setattr(t.generation_config, k, v)
    return t


SCHEDULES = {
    "chain": dict(draft_len=3),
    "tree": dict(draft_len=3, tree=TreeConfig(width=2, depth=3)),
    "parallel": dict(draft_len=3, parallel=True),
}


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,batch,schedule", pairwise(FAMILIES, [1, 3], SCHEDULES))
def test_instruct_generation_config_equals_generate(models, family, batch, schedule):
    """The Instruct checkpoints' generation_config (sampling flags with top_k=1, repetition penalty): plain
    ``target.generate(**inputs)`` honours it, and so do SpecDecoder and the patched generate."""
    target, close = models[family]
    target = _with_generation_config(target, **INSTRUCT)
    seed = {("qwen2_5_vl", 1): 1, ("qwen2_5_vl", 3): 3, ("llava_onevision", 1): 1, ("llava_onevision", 3): 4}
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5][:batch], seed=seed[family, batch])
    ref = target.generate(**inputs, max_new_tokens=24)
    # inputs chosen so that the penalty changes every row's text: ignoring it could not pass unnoticed
    plain = target.generate(**inputs, max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
    assert (ref != plain).any(dim=1).all()
    cfg = SpecConfig(keep_ratio=0.25, **SCHEDULES[schedule])
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=24)
    assert torch.equal(out.sequences, ref), f"\nvspec:\n{out.sequences}\nreference:\n{ref}"
    assert out.stats.mean_accepted_length > 1.0
    with apply_vspec(target, close, cfg):
        patched = target.generate(**inputs, max_new_tokens=24)
    assert torch.equal(patched, ref)


EXPLICIT = {
    "repetition_penalty": dict(repetition_penalty=1.3),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "min_new_tokens": dict(min_new_tokens=14),
    "bad_words_suppress": dict(bad_words_ids=[[7], [11, 12]], suppress_tokens=[13], begin_suppress_tokens=[14]),
}


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,option,schedule", pairwise(FAMILIES, EXPLICIT, SCHEDULES))
def test_explicit_options_equal_generate(models, family, option, schedule):
    """Each option on its own, batch 3 with ragged prompts; the option must change ``generate``'s greedy text (so
    the equality below could fail if vspec ignored it)."""
    target, close = models[family]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5], seed=5)
    kw = dict(max_new_tokens=20, do_sample=False, **EXPLICIT[option])
    if option == "min_new_tokens":  # EOS must come early for min_new_tokens to matter: make the tiny model's
        target = _with_generation_config(target, eos_token_id=_early_token(target, inputs))
    elif option == "bad_words_suppress":
        kw["bad_words_ids"], kw["suppress_tokens"], kw["begin_suppress_tokens"] = _frequent_tokens(target, inputs)
    ref = target.generate(**inputs, **kw)
    plain = target.generate(**inputs, **dict(kw, **{k: None for k in EXPLICIT[option]}))
    assert not torch.equal(ref, plain), f"{option} does not change the tiny model's text: the test would be vacuous"
    out = SpecDecoder(target, close, SpecConfig(keep_ratio=0.25, **SCHEDULES[schedule])).generate(**inputs, **kw)
    assert torch.equal(out.sequences, ref), f"\nvspec:\n{out.sequences}\nreference:\n{ref}"


def _greedy_tokens(target, inputs, n=20):
    L = inputs["input_ids"].shape[1]
    return target.generate(**inputs, max_new_tokens=n, do_sample=False)[:, L:]


def _early_token(target, inputs):
    """A token every row's greedy text reaches within 12 steps (used as EOS: rows then stop early)."""
    toks = _greedy_tokens(target, inputs)
    for t in toks[0, :12].tolist():
        if all(t in row[:12].tolist() for row in toks):
            return t
    return int(toks[0, 2])


def _frequent_tokens(target, inputs):
    """Bad words, suppress and begin-suppress lists made of tokens the greedy text actually produces."""
    toks = _greedy_tokens(target, inputs)
    counts = torch.bincount(toks.flatten(), minlength=target.config.get_text_config().vocab_size)
    top = torch.argsort(counts, descending=True).tolist()
    row = toks[0].tolist()
    pair = [row[3], row[4]]
    return [[top[0]], pair], [top[1]], [int(toks[1, 0])]


def test_sampling_with_repetition_penalty_follows_the_target(models, monkeypatch):
    """Sampling stays lossless with the penalty on: the first two tokens follow the target's joint distribution
    under repetition_penalty 0.3 (< 1 rewards repeats, which moves this tiny model's top-4 far more than a
    penalty > 1 would; the second token's factor depends on the first, a draft), top-k 4, T = 0.8."""
    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    target = models["qwen2_5_vl"][0]
    draft = perturbed_copy(target, noise=0.1, seed=7)
    one = make_inputs(target, batch_size=1, prompt_lens=[4], seed=11)
    temperature, top_k, penalty = 0.8, 4, 0.3
    joint = target_sequence_probs(target, one, 2, temperature=temperature, top_k=top_k, repetition_penalty=penalty)
    plain = target_sequence_probs(target, one, 2, temperature=temperature, top_k=top_k)
    assert max(abs(joint.get(k, 0) - plain.get(k, 0)) for k in set(joint) | set(plain)) > 0.05, \
        "the penalty barely changes the distribution: the test would not see it ignored"
    rows, calls = 500, 6
    dec = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="none"))
    counts = sample_continuations(dec, one, rows=rows, calls=calls, n_tokens=2,
                                  generator=torch.Generator().manual_seed(4321), temperature=temperature,
                                  top_k=top_k, top_p=1.0, repetition_penalty=penalty)
    assert_follows(counts, joint, rows * calls)


# ---- (3) resolution and refusals -----------------------------------------------------------------------------------
def test_options_resolve_with_transformers_precedence(models):
    """model.generation_config < generation_config= < keyword arguments, as in transformers."""
    target, close = models["qwen2_5_vl"]
    target = _with_generation_config(target, max_new_tokens=5, repetition_penalty=1.3)
    inputs = make_inputs(target, batch_size=1, seed=2)
    dec = SpecDecoder(target, close, SpecConfig(draft_len=2, keep_ratio=0.25))
    out = dec.generate(**inputs)
    assert out.settings.max_new_tokens == 5 and out.settings.repetition_penalty == 1.3
    assert torch.equal(out.sequences, target.generate(**inputs))
    gc = GenerationConfig(max_new_tokens=7, no_repeat_ngram_size=2)
    out = dec.generate(**inputs, generation_config=gc)
    assert out.settings.max_new_tokens == 7 and out.settings.no_repeat_ngram_size == 2
    assert torch.equal(out.sequences, target.generate(**inputs, generation_config=gc))
    out = dec.generate(**inputs, max_new_tokens=9, repetition_penalty=1.0)
    assert out.settings.max_new_tokens == 9 and out.settings.repetition_penalty == 1.0
    assert torch.equal(out.sequences, target.generate(**inputs, max_new_tokens=9, repetition_penalty=1.0))


@pytest.mark.parametrize("option", [
    dict(num_beams=2), dict(num_return_sequences=2), dict(penalty_alpha=0.6, top_k=4), dict(typical_p=0.9),
    dict(epsilon_cutoff=0.01), dict(guidance_scale=1.5), dict(sequence_bias={(3,): -1.0}),
    dict(forced_eos_token_id=2), dict(exponential_decay_length_penalty=(2, 1.1)), dict(max_time=1.0),
    dict(output_scores=True), dict(output_logits=True), dict(output_attentions=True), dict(renormalize_logits=True),
    dict(encoder_repetition_penalty=1.2), dict(remove_invalid_values=True), dict(stop_strings=["x"]),
    dict(prompt_lookup_num_tokens=3),
], ids=lambda d: next(iter(d)))
def test_unapplied_options_are_refused_by_name(models, option):
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1)
    dec = SpecDecoder(target, close)
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        dec.generate(**inputs, max_new_tokens=3, **option)
    # ... also when the option comes from the model's generation_config
    t2 = _with_generation_config(target, **option)
    with pytest.raises(ValueError, match=name):
        SpecDecoder(t2, close).generate(**inputs, max_new_tokens=3)


@pytest.mark.parametrize("arg", ["logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                                 "assistant_model"])
def test_generate_arguments_that_change_tokens_are_refused(models, arg):
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1)
    value = {"logits_processor": [lambda ids, s: s], "stopping_criteria": [lambda ids, s: False],
             "prefix_allowed_tokens_fn": lambda b, ids: [1], "assistant_model": close}[arg]
    with pytest.raises(ValueError, match=arg):
        SpecDecoder(target, close).generate(**inputs, max_new_tokens=3, **{arg: value})


def test_unknown_keyword_is_refused_and_never_reaches_the_forward(models):
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1)
    with pytest.raises(ValueError, match="repetiton_penalty"):
        SpecDecoder(target, close).generate(**inputs, max_new_tokens=3, repetiton_penalty=1.2)
    seen = []
    hook = target.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    try:
        SpecDecoder(target, close).generate(**inputs, max_new_tokens=4, repetition_penalty=1.2, top_k=3,
                                            min_new_tokens=2, no_repeat_ngram_size=3, use_cache=True)
    finally:
        hook.remove()
    generation_keys = set(GenerationConfig().to_dict()) - {"use_cache", "output_attentions", "output_hidden_states"}
    assert seen and not any(kw & generation_keys for kw in seen), [kw & generation_keys for kw in seen]


def test_return_dict_in_generate_from_the_generation_config(models):
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1)
    t2 = _with_generation_config(target, return_dict_in_generate=True)
    with apply_vspec(t2, close, SpecConfig(draft_len=2)):
        out = t2.generate(**inputs, max_new_tokens=4)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4 and out.stats.rounds > 0


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_qwen3_vl_with_penalties_through_apply_vspec(schedule, monkeypatch):
    """Qwen3-VL (timestamped video runs, DeepStack) under repetition_penalty + no_repeat_ngram_size, batch 3, through
    the patched generate. Ops on the reference backend (the interpreter path is covered by the other families)."""
    from vspec.testing import tiny_pair

    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    target, _ = tiny_pair("qwen3_vl")
    close = perturbed_copy(target, noise=0.1, seed=1)
    inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5], seed=2)
    kw = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)
    ref = target.generate(**inputs, **kw)
    plain = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert not torch.equal(ref, plain), "the options do not change the tiny model's text: the test would be vacuous"
    with apply_vspec(target, close, SpecConfig(keep_ratio=0.25, **SCHEDULES[schedule])) as handle:
        out = target.generate(**inputs, **kw)
    assert torch.equal(out, ref), f"\nvspec:\n{out}\nreference:\n{ref}"
    assert handle.last_stats.mean_accepted_length > 1.0
