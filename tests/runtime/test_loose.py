"""Loose verification (LVSpec): zero tolerance equals strict, anchors are exact, detectors compute what they say."""

import pytest
import torch

from vspec import LooseConfig, SpecConfig, SpecDecoder
from vspec.runtime.anchors import AttentionDetector, GroundedDetector, HiddenStateDetector, make_detector
from vspec.runtime.models import get_adapter
from vspec.runtime.state import ModelState, padded_indices
from vspec.testing import make_inputs, pairwise, perturbed_copy, tiny_pair

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
DETECTORS = ["hidden", "attention", "grounded", "attribution", "none"]


@pytest.fixture(scope="module")
def models():
    out = {}
    for fam in FAMILIES:
        target, _ = tiny_pair(fam)
        out[fam] = (target, perturbed_copy(target, noise=0.3, seed=1))
    return out


def _fast_attention_scoring(monkeypatch, detector):
    """The attention detector calls visual_attention_mass once per draft token and layer; under Triton's CPU
    interpreter that made these tests the slowest of the suite (~110 s). Its kernel equals the reference
    (tests/kernels/test_scoring.py) and the detector still runs through the kernels in
    test_tree_decoding.py::test_one_host_sync_per_round[loose_attention], so here the ops run on the reference."""
    if detector in ("attention", "grounded", "attribution"):
        monkeypatch.setenv("VSPEC_BACKEND", "reference")


def _loose(target, draft, inputs, n, gamma=4, **loose):
    cfg = SpecConfig(draft_len=gamma, prune="semantic", keep_ratio=0.5, verify="loose", loose=LooseConfig(**loose))
    return SpecDecoder(target, draft, cfg).generate(**inputs, max_new_tokens=n)


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,batch,detector", pairwise(FAMILIES, [1, 3], DETECTORS))
def test_zero_tolerance_equals_strict(models, family, batch, detector, monkeypatch):
    _fast_attention_scoring(monkeypatch, detector)
    target, draft = models[family]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 6, 4][:batch], seed=5)
    ref = target.generate(**inputs, max_new_tokens=19, do_sample=False)
    out = _loose(target, draft, inputs, 19, detector=detector, top_k=1, shift=0)
    assert torch.equal(out.sequences, ref)
    assert out.stats.loose_accepted == 0


@pytest.mark.parametrize("detector,threshold", [("hidden", -1.0), ("attention", 0.0), ("grounded", 0.0),
                                                ("attribution", 0.0)])
def test_every_token_an_anchor_equals_strict(models, detector, threshold, monkeypatch):
    """A threshold every relevance reaches makes every draft token an anchor: the output is the target's."""
    _fast_attention_scoring(monkeypatch, detector)
    target, draft = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6], seed=6)
    ref = target.generate(**inputs, max_new_tokens=17, do_sample=False)
    out = _loose(target, draft, inputs, 17, detector=detector, threshold=threshold, top_k=8, min_prob_ratio=0.0)
    assert torch.equal(out.sequences, ref)


def _teacher_forced_argmax(target, inputs, sequence):
    """Target argmax after every prefix of ``sequence`` (batch 1, no padding): ``[len(sequence) - L]``."""
    L = inputs["input_ids"].shape[1]
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        pad = torch.zeros(1, sequence.shape[1] - L, dtype=inputs["mm_token_type_ids"].dtype)
        kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
    logits = target(input_ids=sequence, attention_mask=torch.ones_like(sequence), **kw).logits
    return logits[0, L - 1:-1].argmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_anchor_tokens_are_never_accepted_loosely(models, family):
    """With anchors known by id, every emitted anchor token is the target's argmax after the emitted prefix,
    while fillers may differ (and do: the test checks that loose acceptance happened)."""
    target, draft = models[family]
    L0 = make_inputs(target, batch_size=1, prompt_lens=[5], seed=11)["input_ids"].shape[1]
    total_loose = total_anchor_emitted = 0
    for seed in range(4):
        inputs = make_inputs(target, batch_size=1, prompt_lens=[5], seed=11 + seed)
        strict = target.generate(**inputs, max_new_tokens=24, do_sample=False)
        # the anchor vocabulary: the ids the target itself emits most (so anchors do occur), half of them
        ids = strict[0, L0:].unique().tolist()
        anchors = tuple(ids[::2])
        out = _loose(target, draft, inputs, 24, detector="token_ids", anchor_token_ids=anchors, top_k=4,
                     min_prob_ratio=0.0, entropy_gate=0.0)
        seq = out.sequences
        assert torch.equal(_teacher_forced_argmax(target, inputs, strict), strict[0, L0:])  # the oracle is sound
        want = _teacher_forced_argmax(target, inputs, seq)
        got = seq[0, L0:]
        differs = got != want
        is_anchor = torch.isin(got, torch.tensor(anchors))
        assert not (differs & is_anchor).any(), f"anchor accepted loosely: got {got.tolist()} want {want.tolist()}"
        assert int(differs.sum()) == out.stats.loose_accepted
        total_loose += out.stats.loose_accepted
        total_anchor_emitted += int(is_anchor.sum())
    assert total_loose > 0 and total_anchor_emitted > 0


def test_loose_rejects_sampling_and_bad_configs(models):
    target, draft = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1, prompt_lens=[3])
    dec = SpecDecoder(target, draft, SpecConfig(verify="loose"))
    with pytest.raises(ValueError, match="greedy"):
        dec.generate(**inputs, max_new_tokens=4, do_sample=True)
    with pytest.raises(ValueError, match="detector"):
        LooseConfig(detector="magic")
    with pytest.raises(ValueError, match="anchor_token_ids"):
        LooseConfig(detector="token_ids")
    with pytest.raises(ValueError, match="visual_layers"):
        LooseConfig(detector="grounded", visual_layers=())
    with pytest.raises(ValueError, match="candidates"):
        LooseConfig(detector="attribution", candidates=1)
    for bad in (LooseConfig(detector="hidden", layer=99), LooseConfig(detector="grounded", visual_layers=(99,))):
        with pytest.raises(ValueError, match="layer"):
            SpecDecoder(target, draft, SpecConfig(verify="loose", loose=bad)).generate(**inputs, max_new_tokens=4)


def test_text_only_rows_are_strict(models, monkeypatch):
    _fast_attention_scoring(monkeypatch, "grounded")
    target, draft = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 7], modality="text")
    ref = target.generate(**inputs, max_new_tokens=15, do_sample=False)
    for det in ("hidden", "attention", "grounded", "attribution"):
        out = _loose(target, draft, inputs, 15, detector=det, threshold=1e9)
        assert torch.equal(out.sequences, ref)


# ---- the detectors compute what their docstrings say ----------------------------------------------------


def _prefill_then_verify(target, detector, inputs, drafts):
    """Prefill ``inputs`` (no padding) into a ModelState under the detector, then a verification forward over
    ``[last prompt token's successor placeholder .. drafts]`` as the engine runs it; returns the strict mask."""
    adapter = get_adapter(target)
    prompt = adapter.prompt(inputs["input_ids"], inputs["attention_mask"],
                            {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    state = ModelState(target, adapter)
    vis_idx = padded_indices(prompt.visual_mask)
    with detector.prefill(vis_idx):
        state.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=prompt.attention_mask.bool(),
                      **prompt.model_kwargs)
    pos = prompt.next_pos[:, None] + torch.arange(drafts.shape[1], device=drafts.device)[None]
    with detector.verify(drafts, state):
        state.forward(input_ids=drafts, positions=adapter.decode_positions(pos),
                      new_valid=torch.ones_like(drafts, dtype=torch.bool))
    return detector.strict(drafts), prompt


def test_hidden_state_detector_matches_direct_computation(models):
    target, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1, prompt_lens=[4], seed=3)
    drafts = torch.tensor([[9, 17, 33]])
    cfg = LooseConfig(detector="hidden", layer=1, top_n=3, threshold=0.2)
    det = HiddenStateDetector(cfg, target, get_adapter(target))
    strict, prompt = _prefill_then_verify(target, det, inputs, drafts)
    # direct: one full forward over prompt + drafts, hidden_states[2] = output of decoder layer 1
    seq = torch.cat([inputs["input_ids"], drafts], dim=1)
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(drafts)], dim=1)
    hs = target(input_ids=seq, attention_mask=torch.ones_like(seq), output_hidden_states=True, **kw).hidden_states[2]
    L = inputs["input_ids"].shape[1]
    vis = torch.nn.functional.normalize(hs[0, :L][prompt.visual_mask[0]], dim=-1)
    tok = torch.nn.functional.normalize(hs[0, L:], dim=-1)
    expect = (tok @ vis.T).topk(3, dim=-1).values.mean(-1)
    torch.testing.assert_close(det.last_relevance[0], expect, atol=1e-4, rtol=1e-4)
    assert torch.equal(strict[0], expect >= 0.2)


def test_attention_detector_matches_eager_attention(models):
    target, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1, prompt_lens=[4], seed=4)
    drafts = torch.tensor([[9, 17, 33]])
    cfg = LooseConfig(detector="attention", attention_layers=(0, 2), threshold=0.3)
    det = AttentionDetector(cfg, target)
    strict, prompt = _prefill_then_verify(target, det, inputs, drafts)
    seq = torch.cat([inputs["input_ids"], drafts], dim=1)
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(drafts)], dim=1)
    target.set_attn_implementation({"text_config": "eager"})
    try:
        att = target(input_ids=seq, attention_mask=torch.ones_like(seq), output_attentions=True, **kw).attentions
    finally:
        target.set_attn_implementation({"text_config": "sdpa"})
    L = inputs["input_ids"].shape[1]
    vis = prompt.visual_mask[0]
    mass = torch.stack([att[i][0, :, L:, :L][..., vis].sum(-1).mean(0) for i in (0, 2)]).mean(0)
    torch.testing.assert_close(det.last_relevance[0], mass, atol=1e-4, rtol=1e-4)
    assert torch.equal(strict[0], mass >= 0.3)


def _grounded_verify(target, inputs, last, drafts, cfg):
    """A grounded (or attribution) detector watching a target prefill of ``inputs`` and the verification forward of
    ``last`` + ``drafts``: ``(detector, state, prompt, verification input, logits)``; ``strict`` is left to the
    caller."""
    adapter = get_adapter(target)
    det = make_detector(cfg, target, adapter)
    assert isinstance(det, GroundedDetector)
    prompt = adapter.prompt(inputs["input_ids"], inputs["attention_mask"],
                            {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    state = ModelState(target, adapter)
    with det.prefill(padded_indices(prompt.visual_mask)):
        state.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=prompt.attention_mask.bool(),
                      **prompt.model_kwargs)
    t_in = torch.cat([last, drafts], dim=1)  # the engine's verification input: [last, d_1 .. d_γ]
    pos = prompt.next_pos[:, None] + torch.arange(t_in.shape[1])[None]
    with det.verify(drafts, state):
        logits = state.forward(input_ids=t_in, positions=adapter.decode_positions(pos),
                               new_valid=torch.ones_like(t_in, dtype=torch.bool))
    return det, state, prompt, t_in, logits


def _grounded_relevance(target, inputs, last, drafts, cfg):
    det = _grounded_verify(target, inputs, last, drafts, cfg)[0]
    det.strict(drafts)
    return det.last_relevance


def test_grounded_detector_matches_eager_attention_and_logits(models, monkeypatch):
    """Relevance of d_j = (largest attention probability one query head puts on one visual key, max over the scored
    layers, for the query BEFORE d_j) × (top-1 probability of the target's distribution there), from one eager
    forward over prompt + last + drafts."""
    _fast_attention_scoring(monkeypatch, "grounded")
    target, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1, prompt_lens=[4], seed=4)
    last, drafts = torch.tensor([[21]]), torch.tensor([[9, 17, 33]])
    cfg = LooseConfig(detector="grounded", visual_layers=(0, 2), threshold=0.05)
    det, state, prompt, t_in, logits = _grounded_verify(target, inputs, last, drafts, cfg)
    assert "forward" not in vars(state)  # the logits wrapper is gone
    strict = det.strict(drafts)

    seq = torch.cat([inputs["input_ids"], t_in], dim=1)
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(t_in)], dim=1)
    target.set_attn_implementation({"text_config": "eager"})
    try:
        out = target(input_ids=seq, attention_mask=torch.ones_like(seq), output_attentions=True, **kw)
    finally:
        target.set_attn_implementation({"text_config": "sdpa"})
    L = inputs["input_ids"].shape[1]
    vis = prompt.visual_mask[0]
    rows = slice(L, L + drafts.shape[1])  # the queries of last, d_1, d_2: they predict d_1, d_2, d_3
    look = torch.stack([out.attentions[i][0, :, rows, :L][:, :, vis].amax(-1).amax(0) for i in (0, 2)]).amax(0)
    expect = look * torch.softmax(out.logits[0, rows].float(), dim=-1).amax(-1)
    torch.testing.assert_close(logits[0, :3], out.logits[0, rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(det.last_relevance[0], expect, atol=1e-4, rtol=1e-4)
    assert torch.equal(strict[0], expect >= 0.05)
    assert (expect > 0).all() and (expect < 1).all()


def _one_row(inputs: dict, b: int) -> dict:
    """Row ``b`` of a make_inputs batch as a batch of one, its left padding removed (every row's video has the same
    size here, so the pixel rows split evenly)."""
    B = inputs["input_ids"].shape[0]
    keep = inputs["attention_mask"][b].bool()
    out = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[k] = v[b:b + 1][:, keep]
        elif k.startswith("pixel_values"):
            out[k] = v.chunk(B)[b]
        else:
            out[k] = v[b:b + 1]
    return out


@pytest.mark.parametrize("detector", ["grounded", "attribution"])
def test_grounded_detector_rows_are_independent(models, monkeypatch, detector):
    """Left padding and the other rows of a batch change nothing: each row of a ragged batch scores as alone."""
    _fast_attention_scoring(monkeypatch, detector)
    target, _ = models["qwen2_5_vl"]
    cfg = LooseConfig(detector=detector, visual_layers=None)
    inputs = make_inputs(target, batch_size=2, prompt_lens=[3, 7], seed=9)
    last, drafts = torch.tensor([[21], [5]]), torch.tensor([[9, 17, 33], [4, 40, 2]])
    both = _grounded_relevance(target, inputs, last, drafts, cfg)
    assert not torch.allclose(both[0], both[1])
    for b in range(2):
        alone = _grounded_relevance(target, _one_row(inputs, b), last[b:b + 1], drafts[b:b + 1], cfg)
        torch.testing.assert_close(both[b:b + 1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_5"])
def test_attribution_detector_matches_an_eager_logit_attribution(models, monkeypatch, family):
    """Relevance of d_j: take the visual keys' share of the attention output (Σ_v p(v)·value_v per head, times the
    output gate where the attention has one (Qwen3.5), through o_proj, summed over the scored layers) out of the
    residual stream entering the final norm at the query before d_j; relevance = max - min over the target's
    top-`candidates` tokens of the change in their logits. Recomputed here from one eager forward over prompt + last
    + drafts (attention probabilities, q_proj / v_proj outputs, the final norm's input)."""
    _fast_attention_scoring(monkeypatch, "attribution")
    if family in models:
        target = models[family][0]
    else:
        target, _ = tiny_pair(family)
    inputs = make_inputs(target, batch_size=1, prompt_lens=[4], seed=4)
    last, drafts = torch.tensor([[21]]), torch.tensor([[9, 17, 33]])
    text = get_adapter(target).language_model()
    attn_layers = [i for i, layer in enumerate(text.layers) if hasattr(layer, "self_attn")]
    layers = {"qwen2_5_vl": (0, 2), "llava_onevision": (1,)}.get(family, tuple(attn_layers))
    cfg = LooseConfig(detector="attribution", visual_layers=layers, candidates=4, threshold=0.05)
    det, state, prompt, t_in, logits = _grounded_verify(target, inputs, last, drafts, cfg)
    assert "forward" not in vars(state)
    assert bool(det._gated) == (family == "qwen3_5")
    strict = det.strict(drafts)

    seq = torch.cat([inputs["input_ids"], t_in], dim=1)
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(t_in)], dim=1)
    grabbed = {}
    hooks = []
    for i in layers:
        a = text.layers[i].self_attn
        hooks.append(a.v_proj.register_forward_hook(lambda m, x, o, i=i: grabbed.__setitem__(("v", i), o)))
        hooks.append(a.q_proj.register_forward_hook(lambda m, x, o, i=i: grabbed.__setitem__(("q", i), o)))
    hooks.append(text.norm.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("x", a[0])))
    target.set_attn_implementation({"text_config": "eager"})
    try:
        out = target(input_ids=seq, attention_mask=torch.ones_like(seq), output_attentions=True, **kw)
    finally:
        target.set_attn_implementation({"text_config": "sdpa"})
        for h in hooks:
            h.remove()
    L = inputs["input_ids"].shape[1]
    vis = prompt.visual_mask[0]
    rows = slice(L, L + drafts.shape[1])  # the queries of last, d_1, d_2: they predict d_1, d_2, d_3
    tc = target.config.get_text_config()
    Hq, Hkv = tc.num_attention_heads, tc.num_key_value_heads
    # a hybrid model returns attentions of its attention layers only
    att = dict(zip(attn_layers, out.attentions)) if len(out.attentions) == len(attn_layers) else dict(
        enumerate(out.attentions))
    contrib = 0
    for i in layers:
        attn = text.layers[i].self_attn
        D = attn.head_dim
        p = att[i][0, :, rows][:, :, :L][:, :, vis]  # [Hq, γ, Nv]
        v = grabbed[("v", i)][0, :L][vis].view(-1, Hkv, D).repeat_interleave(Hq // Hkv, dim=1)  # [Nv, Hq, D]
        heads = torch.einsum("hqv,vhd->qhd", p, v)  # [γ, Hq, D]
        if family == "qwen3_5":
            heads = heads * torch.sigmoid(grabbed[("q", i)][0, rows].view(-1, Hq, 2 * D)[..., D:])
        contrib = contrib + attn.o_proj(heads.reshape(heads.shape[0], -1))
    x = grabbed["x"][0, rows]
    cand = out.logits[0, rows].topk(4, dim=-1).indices
    w = target.get_output_embeddings().weight
    change = (text.norm(x) @ w.T - text.norm(x - contrib) @ w.T).gather(-1, cand)
    expect = change.amax(-1) - change.amin(-1)
    torch.testing.assert_close(logits[0, :3], out.logits[0, rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(det.last_relevance[0], expect.detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(strict[0], expect >= 0.05)
    assert (expect > 0).all()
