"""Figures of one ``generate`` call, filled in by the round steps (:mod:`vspec.runtime.steps`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Figures of one ``generate`` call (docs/design.md; the README defines MAL).

    mean_accepted_length: tokens emitted per verification round and row (correction/bonus token included; the
    prefill's token is not a round). accept_histogram[k]: row-rounds that accepted k draft tokens.
    loose_accepted: draft tokens accepted by the loose rule although they differ from the target's argmax
    (``verify="loose"`` only; 0 in strict mode).

    Parallel decoding (``SpecConfig(parallel=True)``; all 0 in serial runs): pre_verify_rounds — rounds whose
    target forward was the 1-token check of the first draft token, run while the draft drafted (they count as
    rounds: one target forward each, so MAL is lower than in serial runs by construction);
    pre_verify_rejected — row-rounds in which that check rejected the first draft token; post_verify_rounds —
    verification rounds during which the draft speculated the next round; spec_drafts_kept / spec_drafts_discarded —
    row-rounds whose speculative draft became the next round's draft / was thrown away (rows that finished are
    not counted); draft_len_used — γ of the last round (differs from ``draft_len`` with ``adaptive_draft_len``);
    draft_ms / verify_ms / overlap_ms — CUDA-event time of the draft's work, of the target's forwards and of
    the draft's work that ran while a target forward ran, summed over rounds (0 on the CPU, and overlap_ms
    stays 0 when the draft sits on another device); overlap_fraction = overlap_ms / draft_ms.
    """

    rounds: int = 0
    row_rounds: int = 0
    emitted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    accept_histogram: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kept_visual_tokens: int = 0
    total_visual_tokens: int = 0
    compactions: int = 0
    loose_accepted: int = 0
    pre_verify_rounds: int = 0
    pre_verify_rejected: int = 0
    post_verify_rounds: int = 0
    spec_drafts_kept: int = 0
    spec_drafts_discarded: int = 0
    draft_len_used: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    overlap_ms: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    @property
    def target_calls_per_token(self) -> float:
        return self.target_calls / self.emitted if self.emitted else 0.0

    @property
    def overlap_fraction(self) -> float:
        return self.overlap_ms / self.draft_ms if self.draft_ms else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["mean_accepted_length"] = self.mean_accepted_length
        d["target_calls_per_token"] = self.target_calls_per_token
        d["overlap_fraction"] = self.overlap_fraction
        return d
