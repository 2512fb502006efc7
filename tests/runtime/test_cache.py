"""SpecCache: HF Cache interface, rollback, compaction, row selection; DynamicCache equality, tiny models."""

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache

from vspec.runtime.cache import SpecCache
from vspec.runtime.state import cache_keyword
from vspec.testing import make_inputs, tiny_model


def _kv(model, cache) -> dict:
    """The cache keyword the installed transformers expects (``cache`` from 5.24, ``past_key_values`` before)."""
    return {cache_keyword(model): cache}


L, B, H, D = 3, 2, 2, 4


def _states(q: int, b: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, q, D, generator=g), torch.randn(b, H, q, D, generator=g)


def _fill(cache: SpecCache, q: int, seed: int = 0):
    """One 'forward': every layer appends q slots; returns the per-layer (k, v) that went in."""
    written = []
    for layer in range(L):
        k, v = _states(q, seed=seed * 100 + layer)
        cache.update(k, v, layer)
        written.append((k, v))
    return written


# ---- interface ---------------------------------------------------------------------------------------------


def test_update_returns_views_and_tracks_length():
    cache = SpecCache(num_layers=L, max_length=16)
    assert isinstance(cache, Cache) and len(cache) == L
    assert cache.get_seq_length() == 0 and cache.storage is None and not cache.is_initialized
    first = _fill(cache, 5, seed=1)
    assert cache.storage.shape == (L, 2, B, H, 16, D)
    assert cache.get_seq_length() == 5 and cache.length == 5
    k, v = _states(2, seed=7)
    keys, values = cache.update(k, v, 0)
    assert keys.shape == (B, H, 7, D)
    assert keys.data_ptr() == cache.storage.data_ptr()  # a view, not a copy
    assert torch.equal(keys, torch.cat([first[0][0], k], dim=2))
    assert torch.equal(values, torch.cat([first[0][1], v], dim=2))
    # Layer 0 moved ahead (mid-forward): per-layer lengths.
    assert cache.get_seq_length(0) == 7 and cache.get_seq_length(1) == 5
    assert cache.get_mask_sizes(3, 1) == (8, 0)
    assert torch.equal(cache.layers[1].keys, first[1][0])
    with pytest.raises(RuntimeError, match="same length"):
        cache.crop(2)
    for layer in (1, 2):
        cache.update(*_states(2, seed=layer), layer)
    assert cache.length == 7
    assert [kv[0].shape[2] for kv in cache] == [7] * L
    assert cache.get_max_length() == 16 and cache.batch_size == B
    assert cache.is_compileable is False and cache.is_sliding == [False] * L
    assert bool(cache.valid[:, :7].all()) and not bool(cache.valid[:, 7:].any())


def test_eager_allocation_from_config():
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=32)
    cache = SpecCache(cfg, max_length=8, batch_size=3, dtype=torch.bfloat16)
    assert cache.storage.shape == (2, 2, 3, 2, 8, 8) and cache.storage.dtype == torch.bfloat16
    assert cache.is_initialized and cache.get_seq_length() == 0


def test_errors():
    with pytest.raises(ValueError, match="num_layers"):
        SpecCache(max_length=4)
    with pytest.raises(ValueError, match="max_length"):
        SpecCache(num_layers=2, max_length=0)
    cache = SpecCache(num_layers=L, max_length=6)
    _fill(cache, 4)
    with pytest.raises(ValueError, match="key_states must be"):
        cache.update(*_states(1, b=B + 1), 0)
    with pytest.raises(ValueError, match="SpecCache is full"):
        cache.update(*_states(3), 0)
    with pytest.raises(ValueError, match=r"crop\(5\)"):
        cache.crop(5)
    with pytest.raises(ValueError, match=r"crop\(-5\)"):
        cache.crop(-5)
    with pytest.raises(ValueError, match="mask must be"):
        cache.set_valid(torch.ones(B, 5))
    with pytest.raises(ValueError, match="batch_idx"):
        cache.select_rows(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="length must be in"):
        cache.compact_(torch.tensor([[1], [2]]), 0, length=9)
    # A rejected compaction (bad src_idx) leaves the cache as it was.
    before, valid = cache.storage.clone(), cache.valid.clone()
    with pytest.raises(ValueError, match="src_idx"):
        cache.compact_(torch.tensor([[0, 1], [4, 5]]), 1, check=True)
    assert torch.equal(cache.storage, before) and torch.equal(cache.valid, valid) and cache.length == 4


def test_grow():
    cache = SpecCache(num_layers=L, max_length=4, grow=True)
    first = _fill(cache, 3)
    cache.mark_valid(1, 2, value=False)
    second = _fill(cache, 3, seed=1)
    assert cache.max_length == 8 and cache.length == 6
    assert torch.equal(cache.layers[2].keys, torch.cat([first[2][0], second[2][0]], dim=2))
    assert cache.valid[:, :6].tolist() == [[True, False, True, True, True, True]] * B


def test_crop_rollback_by_pointer():
    cache = SpecCache(num_layers=L, max_length=12)
    first = _fill(cache, 4)
    _fill(cache, 3, seed=1)
    cache.crop(-3)  # HF 5.x convention: drop the last 3
    assert cache.length == 4 and not bool(cache.valid[:, 4:].any())
    third = _fill(cache, 2, seed=2)
    assert torch.equal(cache.layers[1].values, torch.cat([first[1][1], third[1][1]], dim=2))
    cache.crop(4)  # absolute length
    assert cache.length == 4
    cache.reset()
    assert cache.length == 0 and not bool(cache.valid.any())


def test_attention_mask_and_valid():
    cache = SpecCache(num_layers=L, max_length=10)
    _fill(cache, 4)
    cache.set_valid(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    cache.mark_valid(3, 4, value=False, rows=torch.tensor([1]))
    m = cache.attention_mask(2)
    assert m.dtype == torch.long
    assert m.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]]


def test_compact_moves_every_layer_and_updates_valid():
    cache = SpecCache(num_layers=L, max_length=12)
    _fill(cache, 8)
    cache.mark_valid(5, 6, value=False, rows=torch.tensor([0]))  # a hole that gets moved
    before = cache.storage.clone()
    valid_before = cache.valid.clone()
    # Row 0 keeps slots 2, 5, 7 after a kept prefix of 1; row 1 keeps 3, 4 (trailing -1) after a prefix of 2.
    src = torch.tensor([[2, 5, 7], [3, 4, -1]])
    dst = torch.tensor([1, 2])
    cache.compact_(src, dst, check=True)
    assert cache.length == 4  # max(1 + 3, 2 + 2)
    want = before.clone()
    for b in range(B):
        for j, s in enumerate(src[b].tolist()):
            if s >= 0:
                want[:, :, b, :, int(dst[b]) + j] = before[:, :, b, :, s]
    assert torch.equal(cache.storage[..., :4, :], want[..., :4, :])
    assert cache.valid[0, :4].tolist() == [valid_before[0, 0].item(), True, False, True]
    assert cache.valid[1, :4].tolist() == [True, True, True, True]
    assert not bool(cache.valid[:, 4:].any())
    assert [kv[0].shape[2] for kv in cache] == [4] * L


def test_compact_with_given_length_and_trailing_holes():
    cache = SpecCache(num_layers=L, max_length=12)
    _fill(cache, 8)
    cache.compact_(torch.tensor([[1, 3, 5, 7], [2, -1, -1, -1]]), 0, length=4)
    assert cache.length == 4
    assert cache.valid[:, :4].tolist() == [[True] * 4, [True, False, False, False]]


def test_select_rows_and_from_dynamic():
    dyn = DynamicCache()
    ks = []
    for layer in range(L):
        k, v = _states(5, b=3, seed=layer)
        dyn.update(k, v, layer)
        ks.append((k, v))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    cache = SpecCache.from_dynamic(dyn, max_length=9, valid=mask)
    assert cache.length == 5 and len(cache) == L
    assert cache.attention_mask(1)[:, :5].tolist() == mask.tolist()
    cache.select_rows(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    assert torch.equal(cache.layers[1].keys, ks[1][0][[2, 0]])
    assert cache.valid[:, :5].tolist() == mask[[2, 0]].bool().tolist()
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[2].values, ks[2][1][[0]])


# ---- tiny models ------------------------------------------------------------------------------------------


def _qwen2_text():
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _text_inputs(batch: int):
    ids = torch.randint(3, 1000, (batch, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(batch, 9, dtype=torch.long)
    for b in range(batch):
        mask[b, : 2 * b] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


_MODELS = {}


def _model(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = _qwen2_text() if kind == "qwen2" else tiny_model(kind, num_layers=2)
    return _MODELS[kind]


def _inputs(kind: str, batch: int):
    if kind == "qwen2":
        return _text_inputs(batch)
    return make_inputs(_model(kind), batch_size=batch, modality="video", frames=2, height=28, width=56)


def _prefill_positions(model, inputs) -> torch.Tensor:
    """Explicit positions of the prompt: ``[3, B, P]`` for Qwen-VL, ``[B, P]`` otherwise."""
    mask = inputs["attention_mask"]
    if model.config.model_type in ("qwen2_5_vl", "qwen2_vl"):
        kw = {k: inputs[k] for k in ("video_grid_thw", "image_grid_thw", "second_per_grid_ts") if k in inputs}
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            attention_mask=mask, **kw)
        return pos
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _step_positions(prompt_pos: torch.Tensor, offset: int, n: int = 1) -> torch.Tensor:
    """Positions of ``n`` decode tokens ``offset`` steps after the prompt (last prompt position + 1 + ...)."""
    last = prompt_pos[..., -1:]
    return last + 1 + offset + torch.arange(n)


@torch.no_grad()
def _decode(model, inputs, cache, steps: int, *, prune_keep=None):
    """Prefill + greedy decode with explicit positions. ``cache`` is a DynamicCache or a SpecCache.

    prune_keep: optional ``[B, P]`` bool of prompt slots to keep after the prefill: a SpecCache compacts them
    away, a DynamicCache keeps them and masks them out instead (the equivalence under test).
    Returns (tokens [B, steps], logits [B, steps, V]).
    """
    pos = _prefill_positions(model, inputs)
    mask = inputs["attention_mask"]
    out = model(**inputs, position_ids=pos, **_kv(model, cache), use_cache=True)
    spec = isinstance(cache, SpecCache)
    if spec:
        cache.set_valid(mask)
    if prune_keep is not None:
        keep = prune_keep & mask.bool()
        if spec:
            width = int(keep.sum(1).max())
            src = torch.full((keep.shape[0], width), -1, dtype=torch.long)
            for b in range(keep.shape[0]):
                rows = torch.nonzero(keep[b]).reshape(-1)
                src[b, : rows.numel()] = rows
            cache.compact_(src, 0, check=True)
            assert cache.length == width
        else:
            mask = keep.long()
    logits, tokens = [out.logits[:, -1]], []
    for t in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        tokens.append(tok)
        if t == steps - 1:
            break
        if spec:
            step_mask = cache.attention_mask(1)
        else:
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            step_mask = mask
        out = model(input_ids=tok, attention_mask=step_mask, position_ids=_step_positions(pos, t),
                    **_kv(model, cache), use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


def _spec(model, max_length=128):
    return SpecCache(model.config, max_length=max_length)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl", "qwen2_vl", "llava_onevision"])
def test_greedy_decode_equals_dynamic_cache(kind, batch):
    model = _model(kind)
    inputs = _inputs(kind, batch)
    tok_d, log_d = _decode(model, inputs, DynamicCache(config=model.config), 6)
    tok_s, log_s = _decode(model, inputs, _spec(model), 6)
    assert torch.isfinite(log_s).all()
    torch.testing.assert_close(log_s, log_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(tok_s, tok_d)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
@torch.no_grad()
def test_rollback_then_redecode_equals_never_going_ahead(kind):
    model = _model(kind)
    inputs = _inputs(kind, 2)
    tok_ref, log_ref = _decode(model, inputs, DynamicCache(config=model.config), 5)

    cache = _spec(model)
    pos = _prefill_positions(model, inputs)
    out = model(**inputs, position_ids=pos, **_kv(model, cache), use_cache=True)
    cache.set_valid(inputs["attention_mask"])
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(first, tok_ref[:, :1])
    n0 = cache.length
    # Speculate 3 wrong tokens in one forward after the first one, then reject all but the first.
    wrong = (tok_ref[:, 1:4] + 1) % 1000
    draft = torch.cat([first, wrong], dim=1)
    model(input_ids=draft, attention_mask=cache.attention_mask(4), position_ids=_step_positions(pos, 0, 4),
          **_kv(model, cache), use_cache=True)
    assert cache.length == n0 + 4
    cache.crop(n0 + 1)
    assert cache.get_seq_length() == n0 + 1
    # Continue from the accepted first token: the next logits are those of a run that never went ahead.
    out = model(input_ids=tok_ref[:, 1:2], attention_mask=cache.attention_mask(1),
                position_ids=_step_positions(pos, 1), **_kv(model, cache), use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], log_ref[:, 2], rtol=1e-5, atol=1e-5)
    # Recompute the first decode step after rolling back to the prompt.
    cache.crop(n0)
    out = model(input_ids=first, attention_mask=cache.attention_mask(1), position_ids=_step_positions(pos, 0),
                **_kv(model, cache), use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], log_ref[:, 1], rtol=1e-5, atol=1e-5)


def _keep_pattern(model, inputs) -> torch.Tensor:
    """Keep every other prompt slot, plus the first and the last few (the tail the next token attends to)."""
    ids = inputs["input_ids"]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, ::2] = True
    keep[:, -3:] = True
    return keep


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
def test_compaction_equals_masking_pruned_slots(kind, batch):
    """Prefill everything, then drop slots: compacting them away == keeping them masked out (DynamicCache),
    with decode positions continuing from the ORIGINAL prompt length."""
    model = _model(kind)
    inputs = _inputs(kind, batch)
    keep = _keep_pattern(model, inputs)
    tok_d, log_d = _decode(model, inputs, DynamicCache(config=model.config), 6, prune_keep=keep)
    tok_s, log_s = _decode(model, inputs, _spec(model), 6, prune_keep=keep)
    torch.testing.assert_close(log_s, log_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(tok_s, tok_d)
    # The pruning did change what the model sees (the test would not notice a no-op compaction otherwise).
    _, log_full = _decode(model, inputs, DynamicCache(config=model.config), 6)
    assert not torch.allclose(log_full, log_d, atol=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_compaction_equals_pruned_inputs(batch):
    """Dropped tokens masked during the prefill, then compacted away == a DynamicCache prefilled on the pruned
    inputs only with the same (gapped, original) positions."""
    model = _model("qwen2")
    inputs = _text_inputs(batch)
    keep = _keep_pattern(model, inputs) & inputs["attention_mask"].bool()
    pos = _prefill_positions(model, inputs)  # original positions, holes or not

    cache = _spec(model)
    out = model(input_ids=inputs["input_ids"], attention_mask=keep.long(), position_ids=pos,
                **_kv(model, cache))
    cache.set_valid(keep)
    width = int(keep.sum(1).max())
    src = torch.full((batch, width), -1, dtype=torch.long)
    kept_ids = torch.zeros(batch, width, dtype=torch.long)
    kept_pos = torch.zeros(batch, width, dtype=torch.long)
    kept_mask = torch.zeros(batch, width, dtype=torch.long)
    for b in range(batch):
        rows = torch.nonzero(keep[b]).reshape(-1)
        src[b, : rows.numel()] = rows
        # Pruned inputs, LEFT-padded to a common width, with the original positions.
        kept_ids[b, width - rows.numel():] = inputs["input_ids"][b, rows]
        kept_pos[b, width - rows.numel():] = pos[b, rows]
        kept_mask[b, width - rows.numel():] = 1
    cache.compact_(src, 0, check=True)
    # Right-aligned compaction instead of left: rows with fewer kept tokens get trailing holes; both fine.
    dyn = DynamicCache(config=model.config)
    out_d = model(input_ids=kept_ids, attention_mask=kept_mask, position_ids=kept_pos, **_kv(model, dyn))
    torch.testing.assert_close(out.logits[:, -1], out_d.logits[:, -1], rtol=1e-5, atol=1e-5)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    mask_d = kept_mask
    for t in range(4):
        step_pos = _step_positions(pos, t)
        o_s = model(input_ids=tok, attention_mask=cache.attention_mask(1), position_ids=step_pos,
                    **_kv(model, cache))
        mask_d = torch.cat([mask_d, torch.ones_like(tok)], dim=1)
        o_d = model(input_ids=tok, attention_mask=mask_d, position_ids=step_pos, **_kv(model, dyn))
        torch.testing.assert_close(o_s.logits[:, -1], o_d.logits[:, -1], rtol=1e-5, atol=1e-5)
        tok = o_d.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def test_select_rows_mid_decode_equals_smaller_batch():
    """Dropping a finished batch row keeps the other rows' decoding unchanged."""
    model = _model("qwen2")
    inputs = _text_inputs(3)
    tok_ref, log_ref = _decode(model, inputs, _spec(model), 4)
    cache = _spec(model)
    pos = _prefill_positions(model, inputs)
    out = model(**inputs, position_ids=pos, **_kv(model, cache))
    cache.set_valid(inputs["attention_mask"])
    keep = torch.tensor([0, 2])
    cache.select_rows(keep)
    tok = out.logits[keep, -1].argmax(-1, keepdim=True)
    out = model(input_ids=tok, attention_mask=cache.attention_mask(1),
                position_ids=_step_positions(pos[keep], 0), **_kv(model, cache))
    torch.testing.assert_close(out.logits[:, -1], log_ref[keep, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
def test_hf_generate_accepts_spec_cache(kind):
    """``generate(**_kv(model, SpecCache))`` runs HF's own loop on the cache and gives the same tokens."""
    model = _model(kind)
    inputs = _inputs(kind, 2)
    want = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cache = _spec(model)
    got = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, **_kv(model, cache))
    assert torch.equal(got, want)
    assert cache.length == want.shape[1] - 1  # the last token is never fed back
