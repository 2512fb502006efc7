"""A synthetic video-captioning task that a tiny Video-LLM can learn on a CPU in minutes.

A clip is 8 RGB frames of 112×112 on a plain grey background with 1–3 solid coloured squares. The frame is a 4×4
grid of 28×28 cells, one cell per merged Qwen2.5-VL visual token (14-px patches, 2×2 merge); each square sits
inside one cell. Frames come in pairs (Qwen's temporal patch is 2 frames) and both frames of a pair are equal, so a
clip has 4 time slots and the vision tower sees a (4, 8, 8) patch grid: 64 merged visual tokens.

Each square has a colour (distinct within a clip) and one motion:

- ``stays``: the same cell in all 4 slots;
- ``right`` / ``left`` / ``up`` / ``down``: moves one cell per slot for two slots (cells s, s+1, s+2, s+2), which
  always carries it into the neighbouring quadrant;
- ``appears``: absent in slots 0–1, present in slots 2–3;  ``vanishes``: present in slots 0–1, absent in 2–3.

Its *position* is the quadrant (``top left`` ... ``bottom right``) of the first cell where it is seen.

A caption is made of ANCHOR words, fixed by the video (the object count, colours, positions and motions), and
FILLER words drawn at random from interchangeable synonyms with skewed weights (e.g. ``a`` 0.6 / ``one`` 0.4).
A model trained on such captions puts a genuinely spread distribution on fillers while anchors are determined by
the clip, which is what loose verification (anchors strict, fillers loose) needs to be measured on. Objects are
listed in palette order (red, green, blue, yellow, white), so the anchor sequence of a clip is unique.

    there are 2 objects . a red square at the top left then moves right . one blue block in the bottom right stays .

:func:`score` (fraction of anchor fields right) is the task's quality measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = [
    "FRAMES",
    "SIZE",
    "CELL",
    "GRID",
    "COLOURS",
    "MOTIONS",
    "POSITIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "TRAIN_SEEDS",
    "TEST_SEEDS",
    "VAL_SEEDS",
    "WORDS",
    "DEFAULT_PROMPT",
    "CAPTION_STYLES",
    "ObjectTrack",
    "ClipMeta",
    "clip_seed",
    "make_clip",
    "render",
    "caption",
    "canonical_caption",
    "parse_caption",
    "score",
    "anchor_fields",
    "is_anchor_word",
    "anchor_token_ids",
]

FRAMES = 8
SIZE = 112
CELL = 28
GRID = SIZE // CELL  # 4 cells a side
SLOTS = FRAMES // 2  # time slots: Qwen's temporal patch pairs frames
SQUARE = 22  # side of a square in pixels; it is placed at a random offset inside its cell

# Qwen2-VL / Qwen2.5-VL normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

COLOURS = {
    "red": (0.95, 0.1, 0.1),
    "green": (0.1, 0.85, 0.15),
    "blue": (0.1, 0.2, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0),
}
MOTIONS = ("stays", "right", "left", "up", "down", "appears", "vanishes")
_STEP = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}
ROWS = ("top", "bottom")
COLS = ("left", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLS)

# Train, test and validation clips come from disjoint seed ranges: clip i of a split is
# make_clip(clip_seed(split, i)). Validation clips are for choosing settings (e.g. pruning weights), so the test
# clips that the README's figures come from are never tuned on.
TRAIN_SEEDS = range(0, 1_000_000_000)
TEST_SEEDS = range(1_000_000_000, 1_000_100_000)
VAL_SEEDS = range(1_000_100_000, 1_000_200_000)

DEFAULT_PROMPT = "describe the video :"

# Filler slots: interchangeable synonyms with their sampling weights (skewed, so greedy decoding has a clear
# winner while the distribution stays spread).
_FILLERS = {
    "intro": ((("there", "are"), 0.5), (("we", "see"), 0.3), (("i", "count"), 0.2)),
    "article": ((("a",), 0.6), (("one",), 0.4)),
    "noun": ((("square",), 0.6), (("block",), 0.4)),
    "prep": ((("at",), 0.6), (("in",), 0.4)),
    "then": (((), 0.6), (("then",), 0.4)),
    "verb": ((("moves",), 0.5), (("goes",), 0.3), (("travels",), 0.2)),
}
# Caption styles: "skewed" is the task's own (the target's); "inverted" is an equally valid style with every slot's
# weights reversed, so its most likely filler differs from the skewed style's in every slot (the divergent draft's).
_STYLES = {
    "skewed": _FILLERS,
    "inverted": {slot: tuple(zip([w for w, _ in options], [p for _, p in options][::-1]))
                 for slot, options in _FILLERS.items()},
}
CAPTION_STYLES = tuple(_STYLES)

_COUNT_WORDS = ("1", "2", "3")
_ANCHOR_WORDS = frozenset(
    [*COLOURS, *_COUNT_WORDS, *ROWS, *COLS, "up", "down", "stays", "appears", "vanishes"]
)
_OTHER_WORDS = ("object", "objects", "the", ".", "describe", "video", ":")
WORDS = tuple(sorted(
    _ANCHOR_WORDS
    | {w for options in _FILLERS.values() for words, _ in options for w in words}
    | set(_OTHER_WORDS)
))


@dataclass(frozen=True)
class ObjectTrack:
    """One square: its colour, motion, and its cell ``(row, col)`` in each of the 4 time slots (None: absent)."""

    colour: str
    motion: str
    cells: tuple[tuple[int, int] | None, ...]
    offset: tuple[int, int]  # pixel offset of the square inside its cell

    @property
    def position(self) -> str:
        """Quadrant of the first cell where the square is seen, e.g. ``"top left"``."""
        r, c = next(cell for cell in self.cells if cell is not None)
        return f"{ROWS[r * 2 // GRID]} {COLS[c * 2 // GRID]}"


@dataclass(frozen=True)
class ClipMeta:
    """Ground truth of a clip: its seed and its squares in palette order."""

    seed: int
    objects: tuple[ObjectTrack, ...]

    @property
    def count(self) -> int:
        return len(self.objects)


def clip_seed(split: str, index: int) -> int:
    """Seed of clip ``index`` of ``split`` ("train", "test" or "val"); no two splits share a seed."""
    seeds = {"train": TRAIN_SEEDS, "test": TEST_SEEDS, "val": VAL_SEEDS}.get(split)
    if seeds is None:
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    if not 0 <= index < len(seeds):
        raise ValueError(f"index must be in [0, {len(seeds)}) for split {split!r}, got {index}")
    return seeds[index]


def _track(rng: random.Random, colour: str) -> ObjectTrack:
    motion = rng.choice(MOTIONS)
    offset = (rng.randint(0, CELL - SQUARE), rng.randint(0, CELL - SQUARE))
    if motion in _STEP:
        dr, dc = _STEP[motion]
        # Start where two steps stay inside the grid: the square always crosses into the next quadrant.
        rows = range(GRID) if dr == 0 else (range(0, GRID - 2) if dr > 0 else range(2, GRID))
        cols = range(GRID) if dc == 0 else (range(0, GRID - 2) if dc > 0 else range(2, GRID))
        r, c = rng.choice(rows), rng.choice(cols)
        steps = (0, 1, 2, 2)
        cells = tuple((r + dr * k, c + dc * k) for k in steps)
    else:
        cell = (rng.randrange(GRID), rng.randrange(GRID))
        present = {"stays": (1, 1, 1, 1), "appears": (0, 0, 1, 1), "vanishes": (1, 1, 0, 0)}[motion]
        cells = tuple(cell if p else None for p in present)
    return ObjectTrack(colour=colour, motion=motion, cells=cells, offset=offset)


def _meta(seed: int) -> ClipMeta:
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    colours = sorted(rng.sample(list(COLOURS), n), key=list(COLOURS).index)
    while True:
        tracks = tuple(_track(rng, c) for c in colours)
        # No two squares in one cell at one time: every square stays fully visible.
        if all(len({t.cells[s] for t in tracks if t.cells[s] is not None})
               == sum(t.cells[s] is not None for t in tracks) for s in range(SLOTS)):
            return ClipMeta(seed=seed, objects=tracks)


def render(meta: ClipMeta) -> torch.Tensor:
    """The frames of ``meta``: float32 ``[8, 3, 112, 112]`` RGB in [0, 1].

    The background is exactly ``CLIP_MEAN`` per channel, so it is exactly 0 after Qwen's normalisation.
    """
    frames = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1).repeat(FRAMES, 1, SIZE, SIZE)
    for obj in meta.objects:
        colour = torch.tensor(COLOURS[obj.colour], dtype=torch.float32).view(3, 1, 1)
        for slot, cell in enumerate(obj.cells):
            if cell is None:
                continue
            y = cell[0] * CELL + obj.offset[0]
            x = cell[1] * CELL + obj.offset[1]
            frames[2 * slot: 2 * slot + 2, :, y: y + SQUARE, x: x + SQUARE] = colour
    return frames


def make_clip(seed: int) -> tuple[torch.Tensor, ClipMeta]:
    """``(frames, meta)`` of the clip with this seed: frames float32 ``[8, 3, 112, 112]`` in [0, 1] (see
    :func:`render`). The same seed always gives the same clip; use :func:`clip_seed` for the train/test splits."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    meta = _meta(seed)
    return render(meta), meta


def _fillers(style: str) -> dict:
    if style not in _STYLES:
        raise ValueError(f"style must be one of {CAPTION_STYLES}, got {style!r}")
    return _STYLES[style]


def _pick(rng: random.Random, slot: str, style: str = "skewed") -> tuple[str, ...]:
    options = _fillers(style)[slot]
    return rng.choices([w for w, _ in options], weights=[p for _, p in options])[0]


def _motion_words(rng: random.Random, motion: str, style: str = "skewed") -> tuple[str, ...]:
    if motion in _STEP:
        return (*_pick(rng, "verb", style), motion)
    return (motion,)


def caption(meta: ClipMeta, rng: random.Random, *, style: str = "skewed") -> str:
    """A caption of ``meta`` with fillers drawn from ``rng`` (anchors are fixed by ``meta``).

    ``style``: the filler weights, ``"skewed"`` (the task's, default) or ``"inverted"`` (every slot's weights
    reversed: the same words and anchors, another most likely phrasing).
    """
    n = meta.count
    words = [*_pick(rng, "intro", style), _COUNT_WORDS[n - 1], "object" if n == 1 else "objects", "."]
    for obj in meta.objects:
        words += [*_pick(rng, "article", style), obj.colour, *_pick(rng, "noun", style), *_pick(rng, "prep", style),
                  "the", *obj.position.split(), *_pick(rng, "then", style), *_motion_words(rng, obj.motion, style),
                  "."]
    return " ".join(words)


def canonical_caption(meta: ClipMeta, *, style: str = "skewed") -> str:
    """The caption a token-by-token greedy decoder of the true caption distribution of ``style`` says.

    Every filler is at its most likely synonym, except the optional ``then``: it is said when its weight beats
    the first word of what follows without it. In the skewed style ``then`` (0.4) is said before a move (the verbs
    split the remaining 0.6 over ``moves`` / ``goes`` / ``travels``) and not before ``stays``, ``appears`` or
    ``vanishes`` (0.6); in the inverted style (0.6) it is said before every motion.
    """

    class _Mode(random.Random):
        def choices(self, population, weights=None, **kw):
            return [population[max(range(len(population)), key=lambda i: weights[i])]]

    fillers = _fillers(style)
    p_then = sum(p for w, p in fillers["then"] if w)
    p_verb = max(p for _, p in fillers["verb"])
    n = meta.count
    mode = _Mode()
    words = [*_pick(mode, "intro", style), _COUNT_WORDS[n - 1], "object" if n == 1 else "objects", "."]
    for obj in meta.objects:
        first = (1 - p_then) * (p_verb if obj.motion in _STEP else 1.0)
        then = ("then",) if p_then > first else ()
        words += [*_pick(mode, "article", style), obj.colour, *_pick(mode, "noun", style), *_pick(mode, "prep", style),
                  "the", *obj.position.split(), *then, *_motion_words(mode, obj.motion, style), "."]
    return " ".join(words)


def _split_words(text: str) -> list[str]:
    return text.replace(".", " . ").replace(":", " : ").split()


def parse_caption(text: str) -> dict:
    """Anchor fields read from a caption: ``{"count": int | None, "objects": [{"colour", "position", "motion"}]}``.

    Unreadable fields are None. The first sentence holds the count; every later non-empty sentence describes one
    square (colour = first colour word, position = first row word and the column word after it, motion = the first
    motion word after the position).
    """
    sentences = [s.split() for s in " ".join(_split_words(text)).split(".")]
    sentences = [s for s in sentences if s]
    count = None
    if sentences:
        digits = [w for w in sentences[0] if w in _COUNT_WORDS]
        count = int(digits[0]) if digits else None
    objects = []
    for words in sentences[1:]:
        colour = next((w for w in words if w in COLOURS), None)
        position, rest = None, words
        for i, w in enumerate(words):
            if w in ROWS and i + 1 < len(words) and words[i + 1] in COLS:
                position, rest = f"{w} {words[i + 1]}", words[i + 2:]
                break
        motion = next((w for w in rest if w in MOTIONS), None) if position else None
        objects.append({"colour": colour, "position": position, "motion": motion})
    return {"count": count, "objects": objects}


def anchor_fields(meta: ClipMeta) -> dict:
    """The ground-truth anchor fields of ``meta`` in :func:`parse_caption`'s form."""
    return {
        "count": meta.count,
        "objects": [{"colour": o.colour, "position": o.position, "motion": o.motion} for o in meta.objects],
    }


def score(text: str, meta: ClipMeta) -> float:
    """Fraction of anchor fields of ``meta`` that ``text`` states correctly, in [0, 1].

    Fields: the count, and colour, position and motion of each square. A described square is matched to the true
    square of its colour (else to the true square at its index, with the colour counted wrong). The denominator is
    ``1 + 3 * max(true squares, described squares)``, so describing extra squares costs as much as missing them.
    """
    truth = anchor_fields(meta)
    parsed = parse_caption(text)
    right = int(parsed["count"] == truth["count"])
    by_colour = {o["colour"]: o for o in parsed["objects"] if o["colour"] is not None}
    for i, obj in enumerate(truth["objects"]):
        said = by_colour.get(obj["colour"])
        if said is None:
            said = parsed["objects"][i] if i < len(parsed["objects"]) else None
            if said is None:
                continue
        else:
            right += 1
        right += int(said["position"] == obj["position"]) + int(said["motion"] == obj["motion"])
    return right / (1 + 3 * max(len(truth["objects"]), len(parsed["objects"])))


def is_anchor_word(word: str) -> bool:
    """True for words fixed by the video (counts, colours, position and motion words); False for fillers."""
    return word in _ANCHOR_WORDS


def anchor_token_ids(tokenizer) -> list[int]:
    """Sorted token ids of the anchor words in ``tokenizer`` (a :class:`vspec.demo.tokenizer.WordTokenizer`)."""
    return sorted(tokenizer.token_to_id(w) for w in _ANCHOR_WORDS)
