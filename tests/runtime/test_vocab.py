"""Pairs whose vocabularies differ only by padding (Qwen2.5-VL 3B with 7B/32B/72B; LLaVA-OV 0.5B with 7B/72B).

Tiny pairs: the target has 1000 logits and the draft 1024 (draft larger), or the reverse (target larger). The padding
rows are made *attractive* (copies of the rows of tokens the model actually produces, scaled up), so that a draft
whose padding rows were not masked would propose them, and a target with padding rows emits them: the tests check
that the setup really exercises that, then demand equality with ``target.generate``.
"""

import copy

import pytest
import torch

from vspec import SpecConfig, SpecDecoder, TreeConfig, apply_vspec
from vspec.runtime import vocab as vocab_mod
from vspec.testing import assert_follows, make_inputs, pairwise, sample_continuations, target_sequence_probs

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
V, PADDED = 1000, 1024


def _pad_vocab(model, inputs, *, scale: float):
    """A deep copy of ``model`` with PADDED logits; rows V.. copy the rows of its most frequent greedy tokens,
    times ``scale``."""
    m = copy.deepcopy(model)
    L = inputs["input_ids"].shape[1]
    toks = model.generate(**inputs, max_new_tokens=16, do_sample=False)[:, L:].flatten()
    top = torch.argsort(torch.bincount(toks, minlength=V), descending=True)[: PADDED - V]
    m.resize_token_embeddings(PADDED, mean_resizing=False)
    with torch.no_grad():
        w = m.get_output_embeddings().weight
        w[V:] = w[top] * scale
    return m


@pytest.fixture(scope="module")
def pairs(models):
    out = {}
    for fam in FAMILIES:
        target, close = models[fam]
        inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5], seed=3)
        out[fam] = dict(
            target=target,
            draft_larger=_pad_vocab(close, inputs, scale=3.0),
            target_larger=_pad_vocab(target, inputs, scale=1.5),
            close=close,
        )
    return out


SCHEDULES = {"chain": dict(draft_len=3), "tree": dict(draft_len=3, tree=TreeConfig(width=2, depth=3)),
             "parallel": dict(draft_len=3, parallel=True)}


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,batch,schedule", pairwise(FAMILIES, [1, 3], SCHEDULES))
def test_draft_larger_never_proposes_padding(pairs, family, batch, schedule, monkeypatch):
    p = pairs[family]
    target, draft = p["target"], p["draft_larger"]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5][:batch], seed=3)
    ref = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    raw_hits, proposals = [], []
    orig = vocab_mod.SharedVocab.draft_logits

    def spy(self, logits):
        raw_hits.append(bool((logits.argmax(-1) >= V).any()))
        out = orig(self, logits)
        proposals.append(int(out.argmax(-1).max()))
        return out

    monkeypatch.setattr(vocab_mod.SharedVocab, "draft_logits", spy)
    out = SpecDecoder(target, draft, SpecConfig(keep_ratio=0.25, **SCHEDULES[schedule])).generate(
        **inputs, max_new_tokens=20)
    assert torch.equal(out.sequences, ref), f"\nvspec:\n{out.sequences}\nreference:\n{ref}"
    assert any(raw_hits), "the draft's padding rows never win: the test would not see them proposed"
    assert max(proposals) < V
    assert out.stats.mean_accepted_length > 1.0


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,batch,schedule", pairwise(FAMILIES, [1, 3], SCHEDULES))
def test_target_larger_emits_its_padding_rows_like_generate(pairs, family, batch, schedule):
    p = pairs[family]
    target, draft = p["target_larger"], p["close"]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5][:batch], seed=3)
    ref = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    L = inputs["input_ids"].shape[1]
    assert (ref[:, L:] >= V).any(), "the target never emits a padding row: the draft-feed path is not exercised"
    out = SpecDecoder(target, draft, SpecConfig(keep_ratio=0.25, **SCHEDULES[schedule])).generate(
        **inputs, max_new_tokens=20)
    assert torch.equal(out.sequences, ref), f"\nvspec:\n{out.sequences}\nreference:\n{ref}"
    with apply_vspec(target, draft, SpecConfig(**SCHEDULES[schedule])):
        assert torch.equal(target.generate(**inputs, max_new_tokens=20, do_sample=False), ref)


def test_sampling_covers_the_targets_padding_mass(pairs, monkeypatch):
    """The target puts probability on its padding rows; drafts never do. The first two tokens still follow the
    target's joint distribution (chi-square, 3,000 draws): the residual covers the target's whole vocabulary."""
    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    p = pairs["qwen2_5_vl"]
    target, draft = p["target_larger"], p["close"]
    one = make_inputs(target, batch_size=1, prompt_lens=[4], seed=11)
    temperature, top_k = 1.0, 6
    joint = target_sequence_probs(target, one, 2, temperature=temperature, top_k=top_k)
    padding_mass = sum(q for k, q in joint.items() if max(k) >= V)
    assert padding_mass > 0.05, f"padding rows hold only {padding_mass:.3f} of the mass: the test would be vacuous"
    rows, calls = 500, 6
    dec = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="none"))
    counts = sample_continuations(dec, one, rows=rows, calls=calls, n_tokens=2,
                                  generator=torch.Generator().manual_seed(99), temperature=temperature,
                                  top_k=top_k, top_p=1.0)
    assert_follows(counts, joint, rows * calls)


def test_pairs_that_differ_in_a_special_id_are_refused(pairs):
    p = pairs["qwen2_5_vl"]
    draft = copy.copy(p["draft_larger"])
    draft.generation_config = copy.deepcopy(draft.generation_config)
    draft.generation_config.eos_token_id = 17
    with pytest.raises(ValueError, match=r"generation_config\.eos_token_id: target \d+, draft 17"):
        SpecDecoder(p["target"], draft)


def test_a_tokenizer_bounds_the_shared_range(pairs):
    p = pairs["qwen2_5_vl"]

    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    dec = SpecDecoder(p["target"], p["draft_larger"], tokenizer=Tok(990))
    assert dec.vocab.shared == 990
    x = torch.zeros(2, PADDED)
    assert torch.isinf(dec.vocab.draft_logits(x)[:, 990:]).all() and dec.vocab.draft_logits(x).shape == (2, V)
    with pytest.raises(ValueError, match="not the pair's tokenizer"):
        SpecDecoder(p["target"], p["draft_larger"], tokenizer=Tok(1010))
