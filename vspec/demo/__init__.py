"""Synthetic video-captioning task and a small trained Qwen2.5-VL target/draft pair shipped with vspec.

See :mod:`vspec.demo.task` for the task, :mod:`vspec.demo.models` for the models and :mod:`vspec.demo.train` for
how ``weights/`` was made (``weights/TRAINING.md`` records the run), :mod:`vspec.demo.video` for clips as mp4 files
(:func:`write_clip`, :func:`read_clip`: what ``vspec generate`` does to a video) and the training augmentation.
"""

from .models import load_pair, make_inputs, video_patches
from .task import (
    DEFAULT_PROMPT,
    ClipMeta,
    anchor_token_ids,
    canonical_caption,
    caption,
    clip_seed,
    is_anchor_word,
    make_clip,
    parse_caption,
    score,
)
from .tokenizer import WordTokenizer
from .video import read_clip, write_clip

__all__ = [
    "DEFAULT_PROMPT",
    "ClipMeta",
    "WordTokenizer",
    "anchor_token_ids",
    "canonical_caption",
    "caption",
    "clip_seed",
    "is_anchor_word",
    "load_pair",
    "make_clip",
    "make_inputs",
    "parse_caption",
    "read_clip",
    "score",
    "video_patches",
    "write_clip",
]
