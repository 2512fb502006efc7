"""The steps of a decode round, shared by every schedule (docs/design.md, "Runtime invariants").

A serial chain round is: :meth:`RoundSteps.draft_chain` (the draft is fed the committed tokens it has not seen and
proposes γ tokens), :meth:`RoundSteps.target_forward` (ONE target forward over ``[last, d_1 .. d_γ]``),
:meth:`RoundSteps.verify` (accept lengths and the correction / bonus token), ``DecodeState.commit``, rollback of
rejected slots to holes, then :meth:`RoundSteps.end_round` (the round's ONE host sync). A tree round swaps in
:meth:`RoundSteps.draft_tree`, :meth:`RoundSteps.target_forward_tree` and :meth:`RoundSteps.verify_tree`. The
parallel schedule runs the same steps in another order (:mod:`vspec.runtime.parallel`).

The steps hold no per-call state: what a call owns (options, stats, loose verification's counters) comes in a
:class:`~vspec.runtime.loop.CallState`, the loop's bookkeeping in a :class:`~vspec.runtime.loop.DecodeState`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import ops
from .generation import History, chain_extra, tree_extra
from .loop import CallState, DecodeState, DraftView
from .models import Prompt
from .state import ModelState, compiled_runner
from .stats import SpecStats
from .trees import TreeLevels


@dataclass(frozen=True)
class RoundReport:
    """What the round's one host sync read (host ints): per active row the accepted draft count, the tokens
    emitted and whether the row finished; both caches' extents (``ModelState.extent``); and ``extra``, the
    caller's own values read in the same sync (the parallel schedule's per-round decisions)."""

    accepted: list[int]
    emitted: list[int]
    finished: list[int]
    target_extent: tuple[int, int]
    draft_extent: tuple[int, int]
    extra: list[int] | None


class RoundSteps:
    """The round steps for one target/draft pair: immutable after construction, shared by concurrent calls."""

    def __init__(self, target, draft, config, t_adapter, d_adapter, vocab):
        self.target = target
        self.draft = draft
        self.config = config
        self.t_adapter = t_adapter
        self.d_adapter = d_adapter
        self.vocab = vocab
        # what runs each model's fixed-shape decode forwards (SpecConfig.compile); built once, shared by calls
        self.t_runner = compiled_runner(target, config.compile)
        self.d_runner = compiled_runner(draft, config.compile)

    def state_kwargs(self, role: str) -> dict:
        """``ModelState`` keywords of the target's (``role="target"``) or the draft's state."""
        if self.config.compile is False:
            return {}
        return dict(fixed_shapes=True, runner=self.t_runner if role == "target" else self.d_runner)

    # ---- start of decode ------------------------------------------------------------------------------------
    def start_decode(self, prompt: Prompt, lp: DecodeState, target: ModelState, draft: ModelState,
                     first: torch.Tensor, call: CallState) -> bool:
        """Stream the prompt and the prefill's token; drop rows that token already ended (EOS or a budget of 1).

        Returns False when no row is left to decode.
        """
        if call.streamer is not None:
            call.streamer.put(prompt.input_ids.cpu())
            call.streamer.put(first.cpu())
        done = torch.isin(first, call.eos_ids) | (call.max_new_tokens <= 1)
        keep = [j for j, d in enumerate(done.tolist()) if not d]
        if not keep:
            return False
        if len(keep) < first.shape[0]:
            self._select_rows(torch.tensor(keep, dtype=torch.long, device=first.device), lp, target, draft, call)
        return True

    # ---- drafting -------------------------------------------------------------------------------------------
    def draft_chain(self, draft: ModelState, view: DraftView, call: CallState, generator, *,
                    gamma: int | None = None):
        """Feed the draft the committed tokens it has not seen, then let it propose γ tokens (γ forwards).

        Returns ``drafts [B, γ]`` and, when sampling, the draft's warped distributions ``[B, γ, V]``.
        ``gamma`` defaults to ``config.draft_len``. The draft proposes under the same logits rules as the target,
        after ``view.hist`` plus its own drafts so far (``view.hist`` None: history unknown, only the history-free
        rules apply; proposals only affect acceptance, never the output).
        """
        rules = call.rules
        gamma = self.config.draft_len if gamma is None else gamma
        device = view.last.device
        w = view.pend_width
        feed = view.pend_d[:, -w:]
        feed_pos = (view.next_pos - w)[:, None] + torch.arange(w, device=device)[None]
        logits = draft.forward(input_ids=self.vocab.draft_ids(feed.clamp_min(0)),
                               positions=self.d_adapter.decode_positions(feed_pos), new_valid=feed >= 0,
                               logits_to_keep=1)[:, -1]
        d_tokens, d_probs = [], []
        pos = view.next_pos
        ones = torch.ones_like(view.last, dtype=torch.bool)[:, None]
        for i in range(gamma):
            so_far = torch.stack(d_tokens, dim=1)[:, None] if d_tokens else None
            x = rules.apply(self.vocab.draft_logits(logits)[:, None], view.hist, so_far)[:, 0]
            if rules.sample:
                probs = rules.warp(x).softmax(dim=-1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                d_probs.append(probs)
            else:
                tok = x.argmax(dim=-1)
            d_tokens.append(tok)
            if i + 1 < gamma:
                logits = draft.forward(input_ids=tok[:, None], positions=self.d_adapter.decode_positions(pos[:, None]),
                                       new_valid=ones, logits_to_keep=1)[:, -1]
                pos = pos + 1
        return torch.stack(d_tokens, dim=1), (torch.stack(d_probs, dim=1) if d_probs else None)

    def draft_tree(self, draft: ModelState, lp: DecodeState, levels: TreeLevels, call: CallState):
        """Feed the draft its pending committed tokens, then expand the tree one level per forward.

        Returns ``tokens [B, N]`` (node 0 = the last committed token), ``parents [B, N]`` (−1 at the root),
        ``anc [B, N, N]`` bool (node i sees node j iff j is i or an ancestor of i) and ``d_base``, the draft's
        physical slot of node 1 (nodes 1 .. num_drafted occupy consecutive slots from there).
        """
        B = lp.last.shape[0]
        device = lp.last.device
        N, D = levels.num_nodes, levels.max_depth
        w = lp.pend_width
        feed = lp.pend_d[:, -w:]
        feed_pos = (lp.next_pos - w)[:, None] + torch.arange(w, device=device)[None]
        logits = draft.forward(input_ids=self.vocab.draft_ids(feed.clamp_min(0)),
                               positions=self.d_adapter.decode_positions(feed_pos), new_valid=feed >= 0,
                               logits_to_keep=1)  # [B, 1, V]: the root's
        d_base = draft.length
        tokens = torch.empty(B, N, dtype=torch.long, device=device)
        tokens[:, 0] = lp.last
        parents = torch.full((B, N), -1, dtype=torch.long, device=device)
        anc = torch.zeros(B, N, N, dtype=torch.bool, device=device)
        anc[:, 0, 0] = True
        scores = torch.zeros(B, 1, dtype=torch.float32, device=device)
        for d in range(1, D + 1):
            lo, hi = levels.bounds[d]
            plo, phi = levels.bounds[d - 1]
            # the draft proposes under the target's rules, after the committed history plus each parent's path
            logits = call.rules.apply(self.vocab.draft_logits(logits), lp.hist, tree_extra(tokens, anc[:, plo:phi]))
            tok, par_local, scores = expand_level(levels, d, logits, scores)
            par = par_local + plo
            tokens[:, lo:hi] = tok
            parents[:, lo:hi] = par
            own = torch.arange(lo, hi, device=device)
            anc[:, lo:hi] = torch.gather(anc, 1, par[..., None].expand(-1, -1, N))
            anc[:, own, own] = True
            if d < D:
                pos = (lp.next_pos - 1 + d)[:, None].expand(-1, hi - lo)
                logits = draft.forward_tree(input_ids=tok, positions=self.d_adapter.decode_positions(pos),
                                            tree_mask=anc[:, lo:hi, 1:hi])
        return tokens, parents, anc, d_base

    # ---- target forward -------------------------------------------------------------------------------------
    def target_forward(self, target: ModelState, lp: DecodeState, drafts: torch.Tensor,
                       call: CallState) -> torch.Tensor:
        """One target forward over ``[last, d_1 .. d_γ]``; logits ``[B, γ+1, V]`` (the anchor detector, if any,
        watches it)."""
        t_in = torch.cat([lp.last[:, None], drafts], dim=1)
        t_pos = (lp.next_pos - 1)[:, None] + torch.arange(t_in.shape[1], device=t_in.device)[None]
        watch = call.anchors.verify(drafts, target) if call.anchors is not None else contextlib.nullcontext()
        with watch:
            return target.forward(input_ids=t_in, positions=self.t_adapter.decode_positions(t_pos),
                                  new_valid=torch.ones_like(t_in, dtype=torch.bool))

    def target_forward_tree(self, target: ModelState, lp: DecodeState, tokens: torch.Tensor, anc: torch.Tensor,
                            levels: TreeLevels) -> torch.Tensor:
        """One target forward over all N tree nodes under tree attention (node i at position root + depth(i));
        logits ``[B, N, V]``."""
        pos = (lp.next_pos - 1)[:, None] + levels.depth[None]
        return target.forward_tree(input_ids=tokens, positions=self.t_adapter.decode_positions(pos), tree_mask=anc)

    # ---- verification ---------------------------------------------------------------------------------------
    def next_token(self, logits: torch.Tensor, call: CallState, hist: History | None) -> torch.Tensor:
        """The target's own next token from ``logits [B, V]`` after the committed history ``hist`` (rules
        applied): argmax, or a draw from the warped distribution."""
        return call.rules.select(logits, hist, call.generator)

    def verify(self, t_logits, drafts, d_probs, call: CallState, hist: History | None):
        """``(accept_len [B], tokens [B, γ+1])``: tokens[:, :acc+1] are the round's tokens (accepted drafts, then
        the target's correction or bonus token). ``t_logits [B, γ+1, V]`` are the target's raw logits over
        ``[last, d_1 .. d_γ]``; position i is processed after the committed history ``hist`` plus ``d_1 .. d_i``.
        Loose verification leaves the round's loosely accepted positions in ``call.round_loose``."""
        rules = call.rules
        t_logits = rules.apply(t_logits, hist, chain_extra(drafts, t_logits.shape[1]))
        if call.anchors is not None:
            strict = call.anchors.strict(drafts)
            acc, tokens, loose = ops.verify_loose(t_logits, drafts, strict, return_loose=True, check_ids=False,
                                                  **self.config.loose.rule())
            call.round_loose = loose  # counted in end_round, where the emitted length is known
            return acc, tokens
        if not rules.sample:
            return ops.verify_greedy(t_logits, drafts, check_ids=False)
        return ops.verify_sampling(rules.warp(t_logits), d_probs, drafts, temperature=1.0, generator=call.generator,
                                   check_ids=False)

    def verify_tree(self, t_logits, tokens, parents, anc, levels: TreeLevels, call: CallState,
                    hist: History | None):
        """Greedy tree verification of the target's raw logits ``[B, N, V]`` (node i processed after ``hist`` plus
        its path). Returns ``(acc [B], path_tok [B, D+1] root first, on_path [B, N] bool, emitted [B, D+1])``:
        ``emitted[:, :acc+1]`` are the accepted path's drafts, then the target's next token."""
        depth = levels.max_depth
        t_logits = call.rules.apply(t_logits, hist, tree_extra(tokens, anc))
        acc, path, nxt = ops.verify_tree_greedy(t_logits, tokens, parents, width=depth + 1, check_ids=False)
        # path[:, 0] is the root (node 0); −1 padding points at the root too, which is on every path anyway.
        on_path = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, torch.where(path >= 0, path, 0), True)
        path_tok = torch.gather(tokens, 1, path.clamp_min(0))  # [B, D+1], root first
        after = torch.cat([path_tok[:, 1:], torch.full_like(path_tok[:, :1], -1)], dim=1)
        cols = torch.arange(depth + 1, device=tokens.device)[None]
        emitted = torch.where(cols < acc[:, None], after, torch.where(cols == acc[:, None], nxt[:, None], -1))
        return acc, path_tok, on_path, emitted

    # ---- end of round ---------------------------------------------------------------------------------------
    def end_round(self, lp: DecodeState, target: ModelState, draft: ModelState, acc, n_new, fin, emitted,
                  call: CallState, *, extra: torch.Tensor | None = None) -> bool:
        """The round's ONE host sync (accept lengths, finished rows, both caches' extents), then what depends on it:
        stats, streaming, trimming and compaction of both caches, removal of finished rows.

        Returns False when no row is left. ``extra``: a 1-D integer tensor read in the same sync, left in
        ``lp.extra`` as a list (the parallel schedule's per-round decisions).
        """
        count_loose(call, n_new)
        report = read_round(acc, n_new, fin, target, draft, extra)  # the sync
        if extra is not None:
            lp.extra = report.extra
        record_round(call.stats, report)
        stream_round(call.streamer, emitted, report)
        self.trim_caches(target, draft, report, call)
        return self.drop_finished(lp, target, draft, report, call, acc.device)

    def drop_finished(self, lp: DecodeState, target: ModelState, draft: ModelState, report: RoundReport,
                      call: CallState, device) -> bool:
        """Remove the rows that finished this round from the loop, both caches and the anchor detector; set the
        next round's pending feed width. False when no row is left."""
        keep = [j for j, f in enumerate(report.finished) if not f]
        if not keep:
            return False
        acc_h = report.accepted
        if len(keep) < len(acc_h):
            self._select_rows(torch.tensor(keep, dtype=torch.long, device=device), lp, target, draft, call)
            acc_h = [acc_h[j] for j in keep]
        lp.pend_width = 2 if max(acc_h) == lp.depth else 1
        return True

    def trim_caches(self, target: ModelState, draft: ModelState, report: RoundReport, call: CallState) -> None:
        """Drop both caches' trailing all-hole slots; compact a cache once ``config.compact_holes`` slots are holes
        in every row (the anchor detector remaps its record of the target's slots first)."""
        for state, (used, full) in ((target, report.target_extent), (draft, report.draft_extent)):
            state.truncate(used)
            if used - full >= self.config.compact_holes:
                if state is target and call.anchors is not None:
                    call.anchors.compacted(state.valid)
                state.compact_(full)
                call.stats.compactions += 1

    @staticmethod
    def _select_rows(idx: torch.Tensor, lp: DecodeState, target: ModelState, draft: ModelState,
                     call: CallState) -> None:
        """Keep only the active rows ``idx`` in the loop, both caches and the anchor detector."""
        for part in (lp, target, draft) + ((call.anchors,) if call.anchors is not None else ()):
            part.select_rows(idx)


def count_loose(call: CallState, n_new: torch.Tensor) -> None:
    """Add the round's loosely accepted tokens that were emitted (not cut by EOS or the budget) to
    ``call.loose_accepted`` (device ops; no-op in strict mode)."""
    if call.round_loose is None:
        return
    loose, call.round_loose = call.round_loose, None
    pos = torch.arange(loose.shape[1], device=loose.device)[None]
    n = (loose & (pos < n_new[:, None])).sum()
    call.loose_accepted = n if call.loose_accepted is None else call.loose_accepted + n


def read_round(acc, n_new, fin, target: ModelState, draft: ModelState, extra: torch.Tensor | None) -> RoundReport:
    """The round's one host sync: every value the host needs, read in ONE ``.tolist()``."""
    B = acc.shape[0]
    parts = [acc, n_new, fin.long(), target.extent(), draft.extent()]
    host = torch.cat(parts + ([extra.long()] if extra is not None else [])).tolist()
    extra_h = None
    if extra is not None:
        extra_h, host = host[len(host) - extra.numel():], host[:len(host) - extra.numel()]
    t_used, t_full, d_used, d_full = host[3 * B:]
    return RoundReport(accepted=host[:B], emitted=host[B:2 * B], finished=host[2 * B:3 * B],
                       target_extent=(t_used, t_full), draft_extent=(d_used, d_full), extra=extra_h)


def record_round(stats: SpecStats, report: RoundReport) -> None:
    """Count the round in ``stats`` (rounds, row-rounds, emitted tokens, the accept histogram)."""
    stats.rounds += 1
    stats.row_rounds += len(report.accepted)
    stats.emitted += sum(report.emitted)
    for a in report.accepted:
        stats.accept_histogram[a] += 1


def stream_round(streamer, emitted: torch.Tensor, report: RoundReport) -> None:
    """Hand the round's tokens of row 0 to the streamer (batch 1 only)."""
    if streamer is not None and report.emitted[0] > 0:
        streamer.put(emitted[0, :report.emitted[0]].cpu())


def expand_level(levels: TreeLevels, d: int, logits: torch.Tensor, scores: torch.Tensor):
    """The nodes of level ``d`` from the draft's logits ``[B, n_{d-1}, V]`` at level d − 1.

    Returns ``(tokens [B, n_d], parent [B, n_d] as an index into level d − 1, scores [B, n_d])``.
    Static tree: node j carries the ``rank[j]``-th best token of its fixed parent. Dynamic tree: slot 0 is the
    draft's greedy token after slot 0 of the level above (so the tree always contains the chain a chain draft
    would propose: per round it accepts at least as much as the chain), the other ``width − 1`` slots are the
    best of the remaining ``n_{d-1} · width`` candidates (each node's top-``width`` tokens) by cumulative draft
    log-probability ``scores``. Ties: lowest token id for the greedy slot, as ``argmax``.
    """
    B, n_prev, _ = logits.shape
    greedy = logits.argmax(dim=-1)  # [B, n_prev]
    if levels.width is None:
        par = levels.parent_local[d - 1]
        rank = levels.rank[d - 1]
        k = levels.top_k[d - 1]
        top = greedy[..., None] if k == 1 else torch.topk(logits, k, dim=-1).indices
        top[..., 0] = greedy
        tok = top[:, par, rank]
        return tok, par[None].expand(B, -1), scores
    w = levels.width
    logp = torch.log_softmax(logits.float(), dim=-1)
    g_score = scores[:, :1] + logp[:, 0].gather(-1, greedy[:, :1])  # [B, 1]
    if w == 1:
        return greedy[:, :1], torch.zeros_like(greedy[:, :1]), g_score
    vals, toks = torch.topk(logp, w, dim=-1)  # [B, n_prev, w]
    toks[..., 0] = greedy
    cand = (scores[:, :, None] + vals).flatten(1)  # [B, n_prev·w]
    cand[:, 0] = float("-inf")  # the greedy slot is taken already
    best, idx = torch.topk(cand, w - 1, dim=-1)
    tok = torch.cat([greedy[:, :1], toks.flatten(1).gather(1, idx)], dim=1)
    par = torch.cat([torch.zeros_like(idx[:, :1]), idx // w], dim=1)
    return tok, par, torch.cat([g_score, best], dim=1)
