"""Per-call state, passed explicitly to every step (the decoder holds none): :class:`CallState` (one ``generate``
call: options, stats, loose verification's counters), :class:`DecodeState` (the decode loop's bookkeeping over the
active batch rows) and :class:`DraftView` (what the draft's chain step reads of the loop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import History, LogitsRules
from .stats import SpecStats


@dataclass
class CallState:
    """One ``generate`` call's state, created by ``SpecDecoder.generate`` and passed to the schedule's ``prefill``
    and ``decode`` (threads sharing one decoder each have their own).

    rules / hist: the resolved logits rules and the prompt's history (:mod:`vspec.runtime.generation`); generator:
    the sampling generator (None when greedy); max_new_tokens, eos_ids ``[E]``, pad: the budget and end tokens.
    anchors: loose verification's anchor detector (:mod:`vspec.runtime.anchors`; None in strict mode);
    round_loose ``[B, γ+1]`` bool: the loosely accepted positions of the round in flight (set by the verify step,
    counted by ``end_round``); loose_accepted: their running count over emitted tokens (a device scalar, None
    until a round counted one).
    """

    rules: LogitsRules
    stats: SpecStats
    max_new_tokens: int
    eos_ids: torch.Tensor
    pad: int
    hist: History | None = None
    generator: torch.Generator | None = None
    streamer: object | None = None
    anchors: object | None = None
    round_loose: torch.Tensor | None = None
    loose_accepted: torch.Tensor | None = None


@dataclass(frozen=True)
class DraftView:
    """The draft's view of the decode loop: everything ``RoundSteps.draft_chain`` reads.

    pend_d: ``[B, w]`` committed tokens the draft has not seen, right-aligned, −1 = none; pend_width: host-known
    number of trailing columns of pend_d to feed; next_pos: ``[B]`` logical position of the token after ``last``;
    last: ``[B]`` each row's last token; hist: the committed history for the logits rules (None: unknown, e.g. when
    drafting past unverified tokens; only the history-free rules apply then).
    """

    pend_d: torch.Tensor
    pend_width: int
    next_pos: torch.Tensor
    last: torch.Tensor
    hist: History | None = None


class DecodeState:
    """Bookkeeping of the decode loop over the active batch rows (device tensors, no host syncs).

    out: ``[B, max_new_tokens + γ + 1]`` generated tokens per ORIGINAL row (the tail is scratch for masked
    scatters); n_out: tokens each original row has; rows: original index of each active row; next_pos: logical
    position of the token after ``last``; last: each active row's last committed token (not yet in the target's
    cache); pend_d: committed tokens the draft has not seen, right-aligned, −1 = none; pend_width: host-known
    number of columns of pend_d to feed (2 only after a round in which some row accepted every draft token);
    depth: draft tokens a round can accept at most (γ, or the tree's depth); hist: the active rows' history for the
    logits rules (:class:`~vspec.runtime.generation.History`), committed to with the tokens.
    """

    def __init__(self, first, next_pos, max_new_tokens, gamma, pad, eos_ids, *, hist: History | None = None):
        B = first.shape[0]
        device = first.device
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.out = torch.full((B, max_new_tokens + gamma + 1), pad, dtype=torch.long, device=device)
        self.out[:, 0] = first
        self.n_out = torch.ones(B, dtype=torch.long, device=device)
        self.rows = torch.arange(B, device=device)
        self.next_pos = next_pos
        self.last = first.clone()
        self.pend_d = torch.stack([torch.full_like(first, -1), first], dim=1)
        self.pend_width = 1
        self.depth = gamma
        self.hist = hist
        if hist is not None:
            hist.commit(first[:, None], torch.ones_like(first))

    def commit(self, acc: torch.Tensor, emitted: torch.Tensor):
        """Cut each row's round tokens ``emitted[:, :acc+1]`` at EOS (inclusive) and the budget, append them.

        Returns ``(n_new [B], finished [B] bool)``; updates last and next_pos.
        """
        R = emitted.shape[1]
        idx = torch.arange(R, device=acc.device)[None]
        n_new = acc + 1
        is_eos = torch.isin(emitted, self.eos_ids) & (idx < n_new[:, None])
        first_eos = torch.where(is_eos, idx, R).amin(dim=1)
        budget = self.max_new_tokens - self.n_out[self.rows]
        n_new = torch.minimum(torch.minimum(n_new, first_eos + 1), budget)
        cols = self.n_out[self.rows][:, None] + idx
        cols = torch.where(idx < n_new[:, None], cols, self.out.shape[1] - 1)  # masked slots hit the scratch tail
        self.out[self.rows[:, None].expand_as(cols), cols] = emitted.clamp_min(0)
        self.n_out[self.rows] += n_new
        fin = (first_eos < n_new) | (self.n_out[self.rows] >= self.max_new_tokens)
        self.last = torch.gather(emitted, 1, (n_new - 1).clamp_min(0)[:, None]).squeeze(1)
        self.next_pos = self.next_pos + n_new
        if self.hist is not None:
            self.hist.commit(emitted, n_new)
        return n_new, fin

    def draft_view(self) -> DraftView:
        """The draft's view of this loop (its pending feed, width, next position, last token and history)."""
        return DraftView(self.pend_d, self.pend_width, self.next_pos, self.last, self.hist)

    def select_rows(self, idx: torch.Tensor) -> None:
        self.rows, self.next_pos, self.last = self.rows[idx], self.next_pos[idx], self.last[idx]
        self.pend_d = self.pend_d[idx]
        if self.hist is not None:
            self.hist.select_rows(idx)

    def result(self) -> torch.Tensor:
        width = int(self.n_out.max())
        return self.out[:, :width]
