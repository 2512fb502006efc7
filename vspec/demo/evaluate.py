"""Run decoding methods on held-out clips of the synthetic task and measure them on the same inputs.

Used by ``python -m vspec demo`` (one comparison table) and ``python -m vspec bench quality`` (sweeps). Every
figure is measured in the call: wall time, tokens, verification rounds, MAL, outputs identical to the target's
greedy output, and the task score (:func:`vspec.demo.task.score`, fraction of anchor fields right).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import make_inputs
from .task import clip_seed, make_clip, score

__all__ = ["Workload", "Result", "workload", "run_method"]


@dataclass
class Workload:
    """Held-out clips in batches, with the target's greedy outputs as the reference."""

    batches: list[dict]
    metas: list[list]
    refs: list[torch.Tensor]
    max_new_tokens: int
    tokenizer: object

    @property
    def clips(self) -> int:
        return sum(len(m) for m in self.metas)


@dataclass
class Result:
    """Totals of one method over a workload. ``rounds`` = target verification calls (prefill excluded)."""

    label: str
    seconds: float = 0.0
    tokens: int = 0
    rounds: int = 0
    row_rounds: int = 0
    emitted: int = 0
    identical: int = 0
    rows: int = 0
    score_sum: float = 0.0
    loose_accepted: int = 0
    kept_visual: int = 0
    total_visual: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def mal(self) -> float:
        return self.emitted / self.row_rounds if self.row_rounds else float("nan")

    @property
    def score(self) -> float:
        return self.score_sum / self.rows if self.rows else float("nan")

    @property
    def target_calls_per_token(self) -> float:
        """Target forwards per generated token of one sequence, the prefill included (1.0 for plain decoding):
        (verification rounds each row took part in + one prefill per row) / tokens. Counted per row, so batch
        rows sharing a forward do not divide it (with batch 1 it is target calls / tokens)."""
        if not self.row_rounds:
            return 1.0
        return (self.row_rounds + self.rows) / self.tokens if self.tokens else float("nan")


def workload(n_clips: int, *, batch_size: int, max_new_tokens: int, target, tokenizer, start: int = 0,
             split: str = "test", via_mp4: bool = False) -> Workload:
    """``n_clips`` held-out clips of ``split`` ("test", or "val" for choosing settings) from index ``start``,
    batched, with target.generate references. ``via_mp4``: each clip is written to an H.264 mp4 and read back as
    ``vspec generate`` reads a video (:func:`vspec.demo.video.write_clip` / :func:`~vspec.demo.video.read_clip`)."""
    clips = [make_clip(clip_seed(split, start + i)) for i in range(n_clips)]
    if via_mp4:
        from .video import read_clip, write_clip

        with tempfile.TemporaryDirectory() as tmp:
            for i, (frames, meta) in enumerate(clips):
                path = Path(tmp) / f"{i}.mp4"
                write_clip(path, frames)
                clips[i] = (read_clip(path)[0], meta)
    batches, metas, refs = [], [], []
    for i in range(0, n_clips, batch_size):
        chunk = clips[i:i + batch_size]
        inputs = make_inputs(chunk, tokenizer, device=target.device)
        batches.append(inputs)
        metas.append([m for _, m in chunk])
        refs.append(target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
    return Workload(batches, metas, refs, max_new_tokens, tokenizer)


def _rows(seq: torch.Tensor, prompt_len: int, eos_id: int) -> list[list[int]]:
    """Each row's generated ids up to and including its first EOS (later columns are batch padding)."""
    out = []
    for row in seq[:, prompt_len:].tolist():
        out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return out


def run_method(label: str, wl: Workload, fn, *, repeats: int = 1, progress=None) -> Result:
    """Run ``fn(inputs) -> sequences | SpecOutput`` on every batch; time = median of ``repeats`` runs per batch.

    A row is *identical* when its generated ids (up to EOS) equal the target's greedy ones.
    """
    res = Result(label)
    eos = wl.tokenizer.eos_token_id
    for bi, (inputs, metas, ref) in enumerate(zip(wl.batches, wl.metas, wl.refs)):
        if progress is not None:
            progress(bi)
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn(inputs)
            times.append(time.perf_counter() - t0)
        times.sort()
        res.seconds += times[len(times) // 2]
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        L = inputs["input_ids"].shape[1]
        got, want = _rows(seq, L, eos), _rows(ref, L, eos)
        res.tokens += sum(len(r) for r in got)
        res.identical += sum(int(g == w) for g, w in zip(got, want))
        res.rows += len(got)
        for ids, meta in zip(got, metas):
            res.score_sum += score(wl.tokenizer.decode(ids), meta)
        if not isinstance(out, torch.Tensor):
            st = out.stats
            res.rounds += st.target_calls
            res.row_rounds += st.row_rounds
            res.emitted += st.emitted
            res.loose_accepted += st.loose_accepted
            res.kept_visual += st.kept_visual_tokens
            res.total_visual += st.total_visual_tokens
    return res
