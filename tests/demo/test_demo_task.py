"""The demo task, its tokenizer and pixel layout, and the shipped target/draft weights."""

import dataclasses
import random

import pytest
import torch

from vspec import SpecDecoder
from vspec.demo import (
    WordTokenizer,
    anchor_token_ids,
    canonical_caption,
    caption,
    clip_seed,
    is_anchor_word,
    load_pair,
    make_clip,
    make_inputs,
    parse_caption,
    score,
    video_patches,
)
from vspec.demo.models import VIDEO_TOKENS, WEIGHTS_DIR
from vspec.demo.task import CELL, CLIP_MEAN, CLIP_STD, COLOURS, MOTIONS, TEST_SEEDS, TRAIN_SEEDS, VAL_SEEDS, WORDS
from vspec.testing import BOS_ID, EOS_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID


def _clips(split, n, start=0):
    return [make_clip(clip_seed(split, start + i)) for i in range(n)]


def test_clips_are_deterministic_and_vary():
    f1, m1 = make_clip(123)
    f2, m2 = make_clip(123)
    assert torch.equal(f1, f2) and m1 == m2
    assert f1.shape == (8, 3, 112, 112) and f1.dtype == torch.float32
    metas = [make_clip(s)[1] for s in range(40)]
    assert len({m.objects for m in metas}) == 40
    assert {m.count for m in metas} == {1, 2, 3}
    assert {o.motion for m in metas for o in m.objects} == set(MOTIONS)


def test_train_test_and_val_splits_are_disjoint():
    assert TRAIN_SEEDS.stop <= TEST_SEEDS.start and TEST_SEEDS.stop <= VAL_SEEDS.start
    assert len({clip_seed("train", 0), clip_seed("test", 0), clip_seed("val", 0)}) == 3
    assert clip_seed("test", 5) in TEST_SEEDS and clip_seed("train", 5) in TRAIN_SEEDS
    assert clip_seed("val", 5) in VAL_SEEDS
    with pytest.raises(ValueError, match="split"):
        clip_seed("validation", 0)
    with pytest.raises(ValueError, match="index"):
        clip_seed("test", len(TEST_SEEDS))


def test_clip_pixels_follow_metadata():
    frames, meta = make_clip(clip_seed("test", 3))
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    # Both frames of a temporal pair are equal; the background is exactly the CLIP mean (0 once normalised).
    assert torch.equal(frames[0::2], frames[1::2])
    for slot in range(4):
        occupied = {o.cells[slot] for o in meta.objects if o.cells[slot] is not None}
        for r in range(4):
            for c in range(4):
                cell = frames[2 * slot, :, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
                assert torch.equal(cell == mean, torch.ones_like(cell, dtype=torch.bool)) != ((r, c) in occupied)


def _patches_by_loops(frames):
    """The Qwen2-VL processor's flattened-patch layout, written as explicit loops over (t, hb, wb, mh, mw)."""
    x = (frames - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    rows = []
    for t in range(4):
        for hb in range(4):
            for wb in range(4):
                for mh in range(2):
                    for mw in range(2):
                        y, xx = (2 * hb + mh) * 14, (2 * wb + mw) * 14
                        patch = x[2 * t: 2 * t + 2, :, y: y + 14, xx: xx + 14]  # [T=2, C, 14, 14]
                        rows.append(patch.permute(1, 0, 2, 3).reshape(-1))  # (C, T, ph, pw)
    return torch.stack(rows)


def test_pixel_layout_matches_processor_layout():
    frames, meta = make_clip(clip_seed("test", 7))
    got = video_patches(frames)
    assert got.shape == (256, 1176)
    assert torch.equal(got, _patches_by_loops(frames))
    # Merged token k of slot s covers rows 4k..4k+3: non-zero exactly where a square is.
    merged = got.view(4, 16, 4, -1)
    for slot in range(4):
        occupied = {o.cells[slot] for o in meta.objects if o.cells[slot] is not None}
        for k in range(16):
            assert bool(merged[slot, k].abs().sum() > 0) == (divmod(k, 4) in occupied)


def test_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.for_task()
    assert tok.vocab_size == 8 + len(WORDS)
    assert tok.words == sorted(WORDS)
    for tid, token in ((PAD_ID, "<pad>"), (BOS_ID, "<s>"), (EOS_ID, "</s>"), (VISION_START_ID, "<vision_start>"),
                       (VISION_END_ID, "<vision_end>"), (VIDEO_ID, "<video>")):
        assert tok.token_to_id(token) == tid
    for seed in range(20):
        text = caption(make_clip(seed)[1], random.Random(seed))
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and min(ids[1:-1]) >= 8
        assert tok.decode(ids) == text
    tok.save(tmp_path / "tok.json")
    again = WordTokenizer.load(tmp_path / "tok.json")
    assert again.words == tok.words and again.encode("a red square .") == tok.encode("a red square .")
    assert tok.encode("zebra") == [tok.unk_token_id]


def test_score_is_one_on_true_captions_and_drops_on_wrong_anchors():
    for seed in range(80):
        meta = make_clip(seed)[1]
        assert score(caption(meta, random.Random(seed)), meta) == 1.0
        assert score(canonical_caption(meta), meta) == 1.0
    for i in range(20):
        meta = make_clip(clip_seed("test", i))[1]
        obj = meta.objects[0]
        other_colour = next(c for c in COLOURS if c not in {o.colour for o in meta.objects})
        other_motion = "appears" if obj.motion != "appears" else "vanishes"
        flipped = tuple(None if c is None else ((c[0] + 2) % 4, c[1]) for c in obj.cells)  # other quadrant row
        wrong = [
            dataclasses.replace(obj, colour=other_colour),
            dataclasses.replace(obj, motion=other_motion),
            dataclasses.replace(obj, cells=flipped),
        ]
        for bad_obj in wrong:
            bad = dataclasses.replace(meta, objects=(bad_obj, *meta.objects[1:]))
            assert score(canonical_caption(bad), meta) == pytest.approx(1 - 1 / (1 + 3 * meta.count))
        text = canonical_caption(meta)
        n = meta.count
        assert score(text.replace(f" {n} ", f" {n % 3 + 1} ", 1), meta) == pytest.approx(1 - 1 / (1 + 3 * n))
        if n > 1:  # the last square left out: its 3 fields are missing, the count is still right
            dropped = " . ".join(text.split(" . ")[:-1]) + " ."
            assert score(dropped, meta) == pytest.approx((1 + 3 * (n - 1)) / (1 + 3 * n))
        assert score("", meta) == 0.0


def test_parse_caption_reads_fields():
    parsed = parse_caption("we see 2 objects . one red block in the top left then travels down . "
                           "a white square at the bottom right vanishes .")
    assert parsed == {"count": 2, "objects": [
        {"colour": "red", "position": "top left", "motion": "down"},
        {"colour": "white", "position": "bottom right", "motion": "vanishes"},
    ]}


def test_fillers_vary_and_anchors_do_not():
    meta = make_clip(clip_seed("test", 2))[1]
    texts = [caption(meta, random.Random(i)) for i in range(200)]
    anchors = {tuple(w for w in t.split() if is_anchor_word(w)) for t in texts}
    assert len(anchors) == 1
    words = {w for t in texts for w in t.split()}
    assert {"a", "one", "square", "block", "then"} <= words
    assert len(set(texts)) > 20
    for w in ("red", "top", "left", "stays", "appears", "vanishes", "up", "2"):
        assert is_anchor_word(w)
    for w in ("a", "one", "moves", "goes", "travels", "then", "there", "the", "."):
        assert not is_anchor_word(w)
    tok = WordTokenizer.for_task()
    ids = anchor_token_ids(tok)
    assert ids == sorted(tok.token_to_id(w) for w in tok.words if is_anchor_word(w))
    assert tok.unk_token_id not in ids


def test_make_inputs_left_pads_rows():
    tok = WordTokenizer.for_task()
    clips = _clips("test", 2)
    inputs = make_inputs(clips, tok, prompt=["describe the video :", "describe :"])
    ids = inputs["input_ids"]
    assert ids.shape[0] == 2 and (ids == VIDEO_ID).sum(1).tolist() == [VIDEO_TOKENS, VIDEO_TOKENS]
    assert ids[1, :2].tolist() == [PAD_ID, PAD_ID] and inputs["attention_mask"][1, :2].tolist() == [0, 0]
    assert torch.equal(inputs["attention_mask"].bool(), ids != PAD_ID)
    assert torch.equal(inputs["mm_token_type_ids"], (ids == VIDEO_ID).long() * 2)
    assert inputs["pixel_values_videos"].shape == (512, 1176)
    assert inputs["video_grid_thw"].tolist() == [[4, 8, 8]] * 2
    assert inputs["second_per_grid_ts"].tolist() == [1.0, 1.0]


@pytest.fixture(scope="module")
def pair():
    if not (WEIGHTS_DIR / "target" / "model.safetensors").exists():
        pytest.fail(f"shipped demo weights missing under {WEIGHTS_DIR}")
    torch.manual_seed(0)
    return load_pair()


def test_shipped_weights_are_small_and_share_the_vision_tower(pair):
    target, draft, tok = pair
    size = sum((WEIGHTS_DIR / r / "model.safetensors").stat().st_size for r in ("target", "draft"))
    assert size < 20e6
    assert target.config.get_text_config().vocab_size == draft.config.get_text_config().vocab_size == tok.vocab_size
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    t_vis, d_vis = target.model.visual.state_dict(), draft.model.visual.state_dict()
    for name, value in t_vis.items():
        if not name.startswith("merger.mlp.2."):
            assert torch.equal(value, d_vis[name]), name


def test_shipped_target_captions_held_out_clips(pair):
    target, _, tok = pair
    clips = _clips("test", 2, start=500)
    inputs = make_inputs(clips, tok)
    out = target.generate(**inputs, max_new_tokens=48, do_sample=False)
    texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:])
    for text, (_, meta) in zip(texts, clips):
        assert score(text, meta) >= 0.5, (text, canonical_caption(meta))


def test_spec_decoder_equals_target_greedy_on_shipped_pair(pair):
    target, draft, tok = pair
    inputs = make_inputs(_clips("test", 2, start=600), tok, prompt=["describe the video :", "describe :"])
    ref = target.generate(**inputs, max_new_tokens=40, do_sample=False)
    out = SpecDecoder(target, draft).generate(**inputs, max_new_tokens=40, do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_accepted_length > 1.0
