"""The demo's Qwen2.5-VL target and draft: configs, input building, and loading the shipped weights.

Target: text 6 layers, hidden 128 (4 heads / 2 kv heads, MLP 384); vision tower depth 2, hidden 64. Draft: text 2
layers, hidden 64 (2 heads / 1 kv head, MLP 192) on the same vocabulary and token ids, with a copy of the target's
vision tower whose blocks are frozen and whose last merger projection maps to the draft's width (64). Both are stock
``Qwen2_5_VLForConditionalGeneration`` models; :mod:`vspec.demo.train` produces the weights in ``weights/``.

    >>> from vspec.demo import load_pair, make_inputs, make_clip, clip_seed
    >>> target, draft, tok = load_pair()
    >>> clips = [make_clip(clip_seed("test", i)) for i in range(2)]
    >>> inputs = make_inputs(clips, tok)
    >>> out = target.generate(**inputs, max_new_tokens=48, do_sample=False)
    >>> tok.batch_decode(out[:, inputs["input_ids"].shape[1]:])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from ..testing import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID
from .task import CLIP_MEAN, CLIP_STD, DEFAULT_PROMPT, FRAMES, SIZE
from .tokenizer import WordTokenizer

__all__ = [
    "WEIGHTS_DIR",
    "PATCH",
    "TEMPORAL_PATCH",
    "MERGE",
    "VIDEO_TOKENS",
    "target_config",
    "draft_config",
    "new_target",
    "new_draft",
    "video_patches",
    "make_inputs",
    "build_batch",
    "load_pair",
    "DRAFTS",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2
GRID_THW = (FRAMES // TEMPORAL_PATCH, SIZE // PATCH, SIZE // PATCH)  # raw patch grid (4, 8, 8)
VIDEO_TOKENS = GRID_THW[0] * GRID_THW[1] * GRID_THW[2] // MERGE**2  # 64 merged visual tokens

# M-RoPE gives the time, height and width ids contiguous blocks of the rotary frequencies, highest first, so with
# head_dim 32 and the usual theta 10000 the width block turns by < 0.004 rad per merged token: a 4×4 frame's columns
# are indistinguishable. Theta 4 turns the width block by 0.27–0.42 rad per token (height 0.46–0.71, time
# 0.77–1.0); a target with theta 10000 trained as in train.py stalled at 64% anchor accuracy (colour and count
# only).
ROPE_THETA = 4.0

_VISION = dict(
    depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
    temporal_patch_size=TEMPORAL_PATCH, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2,
)
_TEXT = {
    "target": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=384),
    "draft": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=192),
}


def _config(role: str, vocab_size: int, **text):
    from transformers import Qwen2_5_VLConfig

    t = {**_TEXT[role], **text}
    half = t["hidden_size"] // t["num_attention_heads"] // 2
    hw = half // 4 + half // 8
    text = dict(
        vocab_size=vocab_size, max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": [half - 2 * hw, hw, hw]},
        **t,
    )
    vision = dict(_VISION, out_hidden_size=t["hidden_size"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, tie_word_embeddings=False,
    )


def target_config(vocab_size: int | None = None, **text):
    """Config of the demo target (``vocab_size`` defaults to the task tokenizer's). ``text``: overrides of the text
    model's shape (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ...)."""
    unknown = set(text) - set(_TEXT["target"])
    if unknown:
        raise ValueError(f"unknown text-model settings {sorted(unknown)}; known: {sorted(_TEXT['target'])}")
    return _config("target", vocab_size or WordTokenizer.for_task().vocab_size, **text)


def draft_config(vocab_size: int | None = None):
    """Config of the demo draft (``vocab_size`` defaults to the task tokenizer's)."""
    return _config("draft", vocab_size or WordTokenizer.for_task().vocab_size)


def _set_generation_ids(model) -> None:
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID


def new_target(seed: int = 0, **text):
    """A freshly initialised target (transformers' default init under ``torch.manual_seed(seed)``), train mode.
    ``text``: overrides of the text model's shape, as :func:`target_config` takes them."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(copy.deepcopy(target_config(**text)),
                                                            attn_implementation="sdpa", dtype=torch.float32)
    _set_generation_ids(model)
    return model


def new_draft(target, seed: int = 1):
    """A freshly initialised draft whose vision tower is a copy of ``target``'s, frozen except the last merger layer.

    The last merger projection (``visual.merger.mlp.2``) maps to the draft's text width, so it is new and trainable;
    every other vision weight is copied from ``target`` and has ``requires_grad=False``.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(copy.deepcopy(draft_config()),
                                                            attn_implementation="sdpa", dtype=torch.float32)
    src = target.model.visual.state_dict()
    own = model.model.visual.state_dict()
    copied = {k: v for k, v in src.items() if not k.startswith("merger.mlp.2.")}
    own.update(copied)
    model.model.visual.load_state_dict(own)
    for name, p in model.model.visual.named_parameters():
        p.requires_grad_(name.startswith("merger.mlp.2."))
    _set_generation_ids(model)
    return model


def video_patches(frames: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL ``pixel_values_videos`` rows of one clip: float32 ``[256, 1176]``.

    ``frames``: ``[8, 3, 112, 112]`` RGB in [0, 1]. Normalised with the CLIP mean/std, then flattened like
    transformers' ``Qwen2VLVideoProcessor.patchify``: rows in (t, h-block, w-block, merge-row, merge-col) order,
    each row (channel, temporal, patch-row, patch-col), so the 4 rows of one merged token are consecutive.
    """
    if tuple(frames.shape) != (FRAMES, 3, SIZE, SIZE):
        raise ValueError(f"frames must be [{FRAMES}, 3, {SIZE}, {SIZE}], got {tuple(frames.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = (frames.float() - mean) / std
    t, h, w = GRID_THW
    x = x.reshape(t, TEMPORAL_PATCH, 3, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH)


def _frames(clip) -> torch.Tensor:
    return clip[0] if isinstance(clip, (tuple, list)) else clip


def build_batch(
    clips: Sequence,
    tokenizer: WordTokenizer,
    *,
    prompt: str | Sequence[str] = DEFAULT_PROMPT,
    captions: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict, torch.Tensor | None]:
    """``(inputs, labels)``: left-padded model inputs for ``clips`` and, with ``captions``, training labels.

    Row b is ``[PAD...] BOS VISION_START <video>×64 VISION_END prompt`` followed, when ``captions`` is given, by
    ``caption[b] EOS``; ``prompt`` is one string for all rows or one per clip (words outside the vocabulary become
    UNK). ``labels`` ``[B, L]`` holds the caption and EOS ids at their positions and −100 elsewhere
    (None without captions). ``clips`` items are frames ``[8, 3, 112, 112]`` or ``(frames, meta)`` pairs.
    """
    if len(clips) < 1:
        raise ValueError("clips must hold at least one clip")
    if captions is not None and len(captions) != len(clips):
        raise ValueError(f"captions must have one entry per clip ({len(clips)}), got {len(captions)}")
    prompts = [prompt] * len(clips) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(clips):
        raise ValueError(f"prompt must be a str or one str per clip ({len(clips)}), got {len(prompts)}")
    rows, targets = [], []
    for i in range(len(clips)):
        head = [BOS_ID, VISION_START_ID] + [VIDEO_ID] * VIDEO_TOKENS + [VISION_END_ID] + tokenizer.encode(prompts[i])
        tail = tokenizer.encode(captions[i], add_eos=True) if captions is not None else []
        rows.append(head + tail)
        targets.append([-100] * len(head) + tail)
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    for b, (ids, tgt) in enumerate(zip(rows, targets)):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention_mask[b, width - len(ids):] = 1
        labels[b, width - len(ids):] = torch.tensor(tgt)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == VIDEO_ID).long() * 2,
        "pixel_values_videos": torch.cat([video_patches(_frames(c)) for c in clips]),
        "video_grid_thw": torch.tensor([GRID_THW] * batch, dtype=torch.long),
        "second_per_grid_ts": torch.ones(batch),
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs, (labels.to(device) if captions is not None else None)


def make_inputs(clips: Sequence, tokenizer: WordTokenizer, *, prompt: str | Sequence[str] = DEFAULT_PROMPT,
                device: str | torch.device = "cpu") -> dict:
    """Inputs for ``target.generate(**inputs)`` and ``SpecDecoder(target, draft).generate(**inputs)``.

    Left-padded ``input_ids`` / ``attention_mask`` ``[B, L]``, ``mm_token_type_ids`` (2 on video placeholders),
    ``pixel_values_videos`` ``[B·256, 1176]``, ``video_grid_thw`` ``[B, 3]`` (all (4, 8, 8)) and
    ``second_per_grid_ts`` ``[B]`` (ones). ``prompt``: one string, or one per clip (rows of different lengths are
    left-padded with PAD). ``clips``: frames ``[8, 3, 112, 112]`` or ``(frames, meta)`` pairs.
    """
    return build_batch(clips, tokenizer, prompt=prompt, device=device)[0]


DRAFTS = {"skewed": "draft", "divergent": "draft_divergent"}  # setting -> draft folder


def load_pair(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
              weights_dir: str | Path | None = None, setting: str = "skewed"):
    """``(target, draft, tokenizer)`` from the shipped weights (``weights/target`` and the setting's draft), eval
    mode. ``setting``: ``"skewed"`` (default: ``weights/draft``, trained on the target's own caption style) or
    ``"divergent"`` (``weights/draft_divergent``, trained on the inverted style: it phrases fillers differently)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if setting not in DRAFTS:
        raise ValueError(f"setting must be one of {tuple(DRAFTS)}, got {setting!r}")
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    models = []
    for role in ("target", DRAFTS[setting]):
        path = root / role
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"no {role} weights at {path}; train them with `python -m vspec.demo.train`")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        _set_generation_ids(model)
        models.append(model.to(device).eval())
    return models[0], models[1], WordTokenizer.for_task()
