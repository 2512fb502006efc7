"""A word-level tokenizer for the demo task, with the special ids of :mod:`vspec.testing`.

Ids: ``PAD=0, BOS=1, EOS=2, VISION_START=3, VISION_END=4, IMAGE=5, VIDEO=6, UNK=7``, then the task's words in
sorted order from 8. Text is split on whitespace, with ``.`` and ``:`` always separate words.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..testing import BOS_ID, EOS_ID, FIRST_TEXT_ID, IMAGE_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID

__all__ = ["WordTokenizer", "UNK_ID", "SPECIAL_TOKENS"]

UNK_ID = 7
SPECIAL_TOKENS = {
    "<pad>": PAD_ID,
    "<s>": BOS_ID,
    "</s>": EOS_ID,
    "<vision_start>": VISION_START_ID,
    "<vision_end>": VISION_END_ID,
    "<image>": IMAGE_ID,
    "<video>": VIDEO_ID,
    "<unk>": UNK_ID,
}


class WordTokenizer:
    """Maps words to ids and back. ``WordTokenizer(words)`` gives the words ids ``8, 9, ...`` in sorted order."""

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    unk_token_id = UNK_ID
    vision_start_token_id = VISION_START_ID
    vision_end_token_id = VISION_END_ID
    image_token_id = IMAGE_ID
    video_token_id = VIDEO_ID

    def __init__(self, words: Iterable[str]):
        words = sorted(set(words))
        bad = [w for w in words if not w or any(ch.isspace() for ch in w) or w in SPECIAL_TOKENS]
        if bad:
            raise ValueError(f"words must be non-empty, without whitespace and not special tokens, got {bad}")
        self._id_to_token = [""] * FIRST_TEXT_ID
        for tok, i in SPECIAL_TOKENS.items():
            self._id_to_token[i] = tok
        self._id_to_token += words
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}

    @classmethod
    def for_task(cls) -> WordTokenizer:
        """The tokenizer of :mod:`vspec.demo.task` (built from its word list; the same on every call)."""
        from .task import WORDS

        return cls(WORDS)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def words(self) -> list[str]:
        """The ordinary words, in id order (ids from 8)."""
        return self._id_to_token[FIRST_TEXT_ID:]

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int:
        """Id of ``token`` (a word or a special token such as ``"<video>"``); unknown words give ``UNK_ID``."""
        return self._token_to_id.get(token, UNK_ID)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id must be in [0, {self.vocab_size}), got {i}")
        return self._id_to_token[i]

    @staticmethod
    def split(text: str) -> list[str]:
        """The words of ``text``: whitespace-separated, with ``.`` and ``:`` split off as words of their own."""
        return text.replace(".", " . ").replace(":", " : ").split()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.token_to_id(w) for w in self.split(text)]
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int] | Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Words joined by single spaces; with ``skip_special_tokens`` every id below 8 except UNK is dropped."""
        out = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i < FIRST_TEXT_ID and i != UNK_ID:
                continue
            out.append(self.id_to_token(i))
        return " ".join(out)

    def batch_decode(self, rows, *, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def save(self, path: str | Path) -> None:
        """Write ``{"special": {token: id}, "words": [...]}`` as JSON."""
        data = {"special": SPECIAL_TOKENS, "words": self.words}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        data = json.loads(Path(path).read_text())
        if data.get("special") != SPECIAL_TOKENS:
            raise ValueError(f"{path}: special tokens {data.get('special')} differ from {SPECIAL_TOKENS}")
        tok = cls(data["words"])
        if tok.words != list(data["words"]):
            raise ValueError(f"{path}: words must be sorted and unique")
        return tok
