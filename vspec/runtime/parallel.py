"""Parallel speculative decoding (HIPPO / PEARL): the draft works while the target verifies.

``SpecConfig(parallel=True)`` runs this schedule instead of the serial chain of :mod:`vspec.runtime.schedules`. It
runs the same round steps (:class:`~vspec.runtime.steps.RoundSteps`: ``draft_chain``, ``target_forward``,
``verify``, ``end_round``; ``DecodeState.commit``) and the hole-based caches of :mod:`vspec.runtime.state`; only
the ORDER of the steps and which tokens the draft is fed differ, so the guarantees are the serial schedule's:
greedy equals ``target.generate(do_sample=False)``, sampling follows the target's distribution.

Round kinds (a round is one target forward, as in the serial loop; each ends in ONE host sync, ``end_round``):

* **verify round** (drafts ``D'_1..D'_g`` given): the target runs one forward over ``[last, D'_1..D'_g]`` and
  verifies them. With post-verify (modes ``"post"``, ``"pearl"``) the draft meanwhile *speculates* the next round
  as if this one were fully accepted: it is fed ``D'_g`` and drafts γ+1 tokens ``e_1..e_{γ+1}`` (γ+1 forwards).
* **pre-verify round** (modes ``"pre"``, ``"pearl"``, whenever fresh drafts are needed): the draft drafts
  ``D_1..D_γ`` from its pending tokens while the target runs a 1-token forward over ``[last]`` and checks ``D_1``
  alone (``verify`` on that one position; greedy: ``D_1 == argmax``, sampling: the usual ``min(1, p/q)`` test
  with the residual draw on rejection, a bonus draw is discarded). The round commits exactly one token per row
  (``D_1`` if accepted, else the target's token). If any row accepted ``D_1``, the next round is a verify round
  over ``D_2..D_γ`` (g = γ−1, ``last`` = the committed ``D_1``); rows that rejected ``D_1`` ride along in it, but
  their verification result is replaced by the target's own token at position 0 (argmax, or a fresh draw from
  the warped target distribution). (Verifying their ``D_2..`` would be lossless too — they were drawn from the
  ``q`` that would be passed — but they continue ``D_1``, not the committed token, so they rarely pass, and one
  committed token keeps the draft's pending feed at two tokens at most.) If every row rejected ``D_1``, the
  verification of ``D_2..D_γ`` is skipped (the early stop) and another pre-verify round follows.
* mode ``"post"`` without a kept speculation: the draft first drafts γ tokens alone (target idle), then a verify
  round follows in the same round (one target forward, one sync) — the serial round plus speculation.

Acceptance of the speculative draft (post-verify). With ``acc`` accepted drafts and ``b`` the round's last emitted
token (correction or bonus), row r's speculation is KEPT iff ``acc == g`` (every draft accepted, so the committed
text ends ``... D'_g b``) and ``b == e_1`` (the draft guessed the target's bonus token): its next drafts are
``e_2..e_{γ+1}`` with ``last = e_1`` (already committed as ``b``), and the draft's cache already holds
``D'_g, e_1..e_γ`` — exactly what a serial ``draft_chain`` would have left. When every continuing row kept its
speculation, the next round is a verify round at once (no drafting phase). Otherwise the rows that did not keep
theirs need fresh drafts: a drafting phase (``"post"``) or a pre-verify round (``"pre"``/``"pearl"``) runs for the
batch, kept rows feed a hole and the slots it appends for them become holes, and they use (and, pre-verify, check
the first token of) their kept speculation. A DISCARDED speculation: the slots after the last committed token the
draft has been fed become holes (``ModelState.invalidate``; positions never move, as in the serial rollback) and
the pending token is ``b``. Lossless because a kept ``e_2..e_{γ+1}`` was drafted from exactly the committed prefix
(``e_1 == b``) and is verified like any draft: for greedy the output is the target's argmax chain whatever the
drafts; for sampling, given the committed prefix and the event ``e_1 == b``, ``e_2..`` are distributed as the
draft's ``q`` (drawn after ``e_1`` with fresh randomness) and independent of the next verification's uniforms,
which is all speculative sampling needs; the bonus ``b`` itself was drawn from ``p`` independently of ``e``.
Choosing between a kept and a fresh draft by a function of the past keeps that property.

Draft-cache bookkeeping (device ops, no sync): before a verify round the draft's last valid slots are
``[last, D'_1..D'_{g-1}]`` in every row that accepted its drafts so far (``base`` = the slot of ``last``, per row,
found from ``valid``: compaction and holes may have moved rows differently); speculation appends
``D'_g, e_1..e_γ`` at ``L0 = draft.length``. Discarding keeps ``D'_1..D'_acc``: holes from ``base + acc + 1`` when
``acc < g``, from ``L0 + 1`` (keep ``D'_g``) when ``acc == g``; rows that rejected ``D_1`` in the pre-verify round
lost ``D_1..D_{γ-1}`` there (a kept speculation: its ``e_2..``) and lose every appended slot from ``L0`` here, and
feed ``[their pre-verify token, b]``.

CUDA: the draft runs on its own stream (on its own device when ``draft.device != target.device``; token tensors
are copied across), the target, verification and bookkeeping on the caller's stream. Streams are ordered by
events only; every tensor one stream hands to the other gets ``record_stream`` (the caching allocator must not
recycle it while the other stream may still read it), and every tensor of the draft's state is allocated on the
draft stream (:class:`~vspec.runtime.draft_side.DraftSideState` runs each state method there). A round's one host
sync is ``end_round``'s ``.tolist()`` (it also waits for the draft stream, whose cache extent it reads). On the
CPU the same steps run in the same order, sequentially, so CPU tests exercise exactly this bookkeeping. Prefill:
when the draft's keep-set does not need the target's prefill (``PrefillPlan.scores_from_target`` False: ``prune``
"uniform"/"random"/"none", or ``prune_source="draft"``), the draft's prefill is queued on its stream right after
the target's, and both run at once.
"""

from __future__ import annotations

import contextlib

import torch

from .devices import input_device
from .draft_side import DraftSide, DraftSideState
from .loop import CallState, DecodeState, DraftView
from .models import Prompt
from .prefill import Prefill, PrefillPlan
from .schedules import Schedule
from .state import ModelState
from .steps import RoundSteps

PRE_MODES = ("pre", "pearl")
#: rollback periods a hybrid draft's linear-attention journal keeps (``LinearAttentionState.keep_rounds``)
LINEAR_KEEP_ROUNDS = 3
POST_MODES = ("post", "pearl")


class _ParLoop(DecodeState):
    """The serial loop's bookkeeping plus what a round hands to the next, filtered with the batch rows.

    next_drafts / next_probs: drafts (and, sampling, their draft probabilities) for the next round — kept
    speculations (rows in ``carried``) or the rest of a pre-verified draft (every row); ready (host): every row
    has them, so the next round is a verify round; carried: ``[B]`` bool, rows whose speculation was kept while
    others need fresh drafts; rej_a / tok_a: after a pre-verify round, the rows that rejected ``D_1`` and the token
    each row committed there.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.next_drafts = self.next_probs = self.carried = self.rej_a = self.tok_a = None
        self.ready = False
        self.extra = None

    def select_rows(self, idx: torch.Tensor) -> None:
        super().select_rows(idx)
        for name in ("next_drafts", "next_probs", "carried", "rej_a", "tok_a"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[idx])


class _Timer:
    """CUDA-event spans of the target's forwards and of the draft's work, read once after decoding.

    Without CUDA nothing is recorded (:attr:`can_measure` is False) and the stats stay 0.
    """

    def __init__(self, side: DraftSide):
        self.side = side
        self.on = side.cuda
        self.round = 0
        self.t_spans: list[tuple[int, object, object]] = []
        self.d_spans: list[tuple[int, object, object, int]] = []
        self.ref = self._event(side.main) if self.on else None

    @property
    def can_measure(self) -> bool:
        return self.on

    @staticmethod
    def _event(stream):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    @contextlib.contextmanager
    def target(self):
        if not self.on:
            yield
            return
        start = self._event(self.side.main)
        yield
        self.t_spans.append((self.round, start, self._event(self.side.main)))

    @contextlib.contextmanager
    def draft(self, forwards: int):
        """Time the body's work on the draft stream (call inside ``DraftSide.run``)."""
        if not self.on:
            yield
            return
        start = self._event(self.side.stream)
        yield
        self.d_spans.append((self.round, start, self._event(self.side.stream), forwards))

    def warmup_ratio(self) -> float | None:
        """T_target / T_draft of the round just ended (a serial warm-up round: no contention between the two):
        one target forward over one draft forward. Its events are complete: the round's sync waited for both."""
        t = [s.elapsed_time(e) for r, s, e in self.t_spans if r == self.round]
        d = [(s.elapsed_time(e), n) for r, s, e, n in self.d_spans if r == self.round]
        if not t or not d or sum(n for _, n in d) == 0:
            return None
        per_draft = sum(ms for ms, _ in d) / sum(n for _, n in d)
        return (sum(t) / len(t)) / per_draft if per_draft > 0 else None

    def finish(self, stats) -> None:
        if not self.on or not (self.t_spans or self.d_spans):
            return
        for spans in (self.t_spans, self.d_spans):
            if spans:
                spans[-1][2].synchronize()
        stats.verify_ms = sum(s.elapsed_time(e) for _, s, e in self.t_spans)
        stats.draft_ms = sum(s.elapsed_time(e) for _, s, e, _ in self.d_spans)
        if self.side.cross:
            return  # events of two devices share no clock
        t_iv, d_iv = {}, {}
        for r, s, e in self.t_spans:
            t_iv.setdefault(r, []).append((self.ref.elapsed_time(s), self.ref.elapsed_time(e)))
        for r, s, e, _ in self.d_spans:
            d_iv.setdefault(r, []).append((self.ref.elapsed_time(s), self.ref.elapsed_time(e)))
        stats.overlap_ms = sum(max(0.0, min(b, d) - max(a, c))
                               for r, ivs in d_iv.items() for c, d in ivs for a, b in t_iv.get(r, ()))


class ParallelSchedule(Schedule):
    """One ``generate`` call's parallel schedule (built by ``SpecDecoder.generate`` when ``config.parallel``)."""

    def __init__(self, steps: RoundSteps, prefill: Prefill, generator):
        super().__init__(steps, prefill)
        # input_device, not .device: a dispatched target's first parameter may be offloaded (on meta)
        self.side = DraftSide(input_device(steps.target), input_device(steps.draft))
        self.timer = _Timer(self.side)
        self.pre = self.config.parallel_mode in PRE_MODES
        self.post = self.config.parallel_mode in POST_MODES
        self.gen_d = generator
        if generator is not None and torch.device(generator.device) != self.side.device:
            # a draft on a second device draws from its own generator, seeded from the caller's
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            self.gen_d = torch.Generator(device=self.side.device).manual_seed(seed)

    def states(self, prompt: Prompt, call: CallState) -> tuple[ModelState, DraftSideState]:
        reserve = self.reserve(call)
        target = ModelState(self.steps.target, self.steps.t_adapter, reserve=reserve,
                            **self.steps.state_kwargs("target"))
        draft = DraftSideState(self.steps.draft, self.steps.d_adapter, self.side, reserve=reserve,
                               **self.steps.state_kwargs("draft"))
        if draft.linear is not None:
            # A hybrid draft's rollback may reach back past two earlier rollbacks (a kept speculation, fed in the
            # previous verify round, rejected after a drafting phase or pre-verify round): keep three periods.
            draft.linear.keep_rounds = LINEAR_KEEP_ROUNDS
        return target, draft

    # ---- prefill ------------------------------------------------------------------------------------------
    def run_prefill(self, prompt: Prompt, target: ModelState, draft: DraftSideState, plan: PrefillPlan,
                    call: CallState) -> torch.Tensor:
        """The serial prefill; the draft's part runs beside the target's when it does not need the target's
        scores."""
        if plan.scores_from_target:
            return super().run_prefill(prompt, target, draft, plan, call)
        side, pre = self.side, self.prefill_steps
        with side.run():
            d_prompt = side.prompt(prompt)  # copies (second device) are queued before the target's prefill
        ev = side.mark()
        first, _ = pre.target_prefill(prompt, target, plan, call)
        with side.run(after=ev):
            pre.draft_prefill(d_prompt, draft, plan, call.stats)
        return first

    # ---- decode -------------------------------------------------------------------------------------------
    def gamma_from_ratio(self, ratio: float) -> int:
        """γ for a target/draft cost ratio (SpecConfig.adaptive_draft_len)."""
        g = round(ratio) - (1 if self.config.parallel_mode == "post" else 0)
        return max(1, min(self.config.draft_len, g))

    def decode(self, prompt, target, draft, first, call):
        cfg, steps, stats = self.config, self.steps, call.stats
        gamma = cfg.draft_len
        warmup = 0
        if cfg.adaptive_draft_len:
            if cfg.draft_time_ratio is not None:
                gamma = self.gamma_from_ratio(cfg.draft_time_ratio)
            elif self.timer.can_measure:
                warmup = 2  # serial rounds; the second (past first-call overheads) is measured
        lp = _ParLoop(first, prompt.next_pos + 1, call.max_new_tokens, cfg.draft_len, call.pad, call.eos_ids,
                      hist=call.hist)
        if not steps.start_decode(prompt, lp, target, draft, first, call):
            return lp.result()
        args = (target, draft, lp, call)
        while True:
            self.timer.round += 1
            warm = stats.rounds < warmup
            if lp.ready:
                drafts, probs = lp.next_drafts, lp.next_probs
                lp.next_drafts = lp.next_probs = None
                lp.ready = False
                alive = self._verify_round(*args, drafts, probs, gamma, spec=self.post and not warm)
            elif warm or not self.pre:
                drafts, probs = self._fresh(draft, lp, gamma, call)
                alive = self._verify_round(*args, drafts, probs, gamma, spec=self.post and not warm)
            else:
                alive = self._pre_round(*args, gamma)
            if warmup and stats.rounds == warmup:
                ratio = self.timer.warmup_ratio()
                if ratio is not None:
                    gamma = self.gamma_from_ratio(ratio)
            if not alive:
                break
        stats.draft_len_used = gamma
        self.timer.finish(stats)
        return lp.result()

    def _view(self, lp) -> DraftView:
        """The loop's :class:`DraftView` on the draft side (call inside ``DraftSide.run``)."""
        s = self.side
        # the committed history for the logits rules (on a second device the draft proposes without it)
        return DraftView(pend_d=s.send(lp.pend_d), pend_width=lp.pend_width, next_pos=s.send(lp.next_pos),
                         last=s.send(lp.last), hist=None if s.cross else lp.hist)

    def _fresh(self, draft, lp, gamma, call):
        """γ fresh drafts from the draft's pending tokens (nothing else runs meanwhile). Rows in ``lp.carried`` keep
        their kept speculation instead: their pending feed is a hole and the slots the chain appends for them
        become holes."""
        carried = lp.carried
        if carried is not None:
            gamma = lp.next_drafts.shape[1]
        with self.side.run():
            view = self._view(lp)
            chain_start = draft.length
            with self.timer.draft(gamma):
                drafts, probs = self.steps.draft_chain(draft, view, call, self.gen_d, gamma=gamma)
        drafts, probs = self.side.fetch(drafts), self.side.fetch(probs)
        if carried is not None:
            draft.invalidate(torch.where(carried, chain_start, draft.length), draft.length, trim=False)
            drafts = torch.where(carried[:, None], lp.next_drafts, drafts)
            if probs is not None:
                probs = torch.where(carried[:, None, None], lp.next_probs, probs)
            lp.next_drafts = lp.next_probs = lp.carried = None
        return drafts, probs

    def _verify(self, t_logits, drafts, probs, call, hist):
        """The serial verification; with no drafts (g = 0) the target's own next token."""
        if drafts.shape[1] == 0:
            tok = self.steps.next_token(t_logits[:, 0], call, hist)
            return torch.zeros_like(tok), tok[:, None]
        return self.steps.verify(t_logits, drafts, probs, call, hist)

    def _verify_round(self, target, draft, lp, call, drafts, probs, gamma, *, spec: bool) -> bool:
        """One target forward over ``[last, drafts]``; with ``spec`` the draft speculates γ+1 tokens meanwhile."""
        steps, side, stats = self.steps, self.side, call.stats
        g = drafts.shape[1]
        rej_a, tok_a = lp.rej_a, lp.tok_a
        lp.rej_a = lp.tok_a = None
        L0 = draft.length
        last_in = lp.last
        base = draft.last_valid() - (g - 1)  # slot of `last` in rows whose drafts so far were all accepted
        if spec:
            with side.run():  # inputs first: a copy to a second device is ordered on the main stream
                feed = side.send(drafts[:, -1] if g else lp.last)
                # drafting past unverified tokens: their history is not known yet (hist=None)
                view = DraftView(pend_d=feed[:, None], pend_width=1, next_pos=side.send(lp.next_pos + g), last=feed)
        ev = side.mark()
        t_base = target.length
        with self.timer.target():
            t_logits = steps.target_forward(target, lp, drafts, call)
        if spec:
            with side.run(after=ev), self.timer.draft(gamma + 1):
                e_tok, e_probs = steps.draft_chain(draft, view, call, self.gen_d, gamma=gamma + 1)
        acc, emitted = self._verify(t_logits, drafts, probs, call, lp.hist)
        if rej_a is not None:  # rows that rejected D_1: the target's own token, not a verdict on D_2..
            own = steps.next_token(t_logits[:, 0], call, lp.hist)
            acc = torch.where(rej_a, 0, acc)
            alone = torch.cat([own[:, None], torch.full_like(emitted[:, 1:], -1)], dim=1)
            emitted = torch.where(rej_a[:, None], alone, emitted)
        n_new, fin = lp.commit(acc, emitted)
        target.invalidate(t_base + 1 + acc, t_base + g + 1, trim=False)
        b = emitted.gather(1, acc[:, None]).squeeze(1)

        # draft rollback: keep D'_1..D'_acc (and D'_g, fed by the speculation, when acc == g)
        start = torch.where(acc < g, base + acc + 1, L0 + 1)
        unfed = torch.full_like(b, -1)
        if not spec:
            unfed = torch.where(acc == g, drafts[:, -1] if g else last_in, -1)
        if rej_a is not None:
            start = torch.where(rej_a, L0, start)
            unfed = torch.where(rej_a, tok_a, unfed)
        alive_rows = ~fin
        pend_last = lp.last
        if spec:
            e_tok, e_probs = side.fetch(e_tok), side.fetch(e_probs)
            consistent = (acc == g) & (b == e_tok[:, 0]) & alive_rows
            if rej_a is not None:
                consistent &= ~rej_a
            start = torch.where(consistent, draft.length, start)  # kept: the draft has seen everything
            pend_last = torch.where(consistent, -1, pend_last)
            lp.next_drafts = e_tok[:, 1:]
            lp.next_probs = e_probs[:, 1:] if e_probs is not None else None
            lp.carried = consistent
        else:
            consistent = torch.zeros_like(alive_rows)
        draft.invalidate(start, draft.length, trim=False)
        lp.pend_d = torch.stack([unfed, pend_last], dim=1)
        extra = torch.stack([consistent.sum(), alive_rows.sum(), ((unfed >= 0) & alive_rows).any().long()])
        alive = steps.end_round(lp, target, draft, acc, n_new, fin, emitted, call, extra=extra)
        n_kept, n_alive, wide = lp.extra
        lp.pend_width = 2 if wide else 1
        if spec:
            stats.post_verify_rounds += 1
            stats.spec_drafts_kept += n_kept
            stats.spec_drafts_discarded += n_alive - n_kept
        lp.ready = n_alive > 0 and n_kept == n_alive
        if n_kept == 0:
            lp.next_drafts = lp.next_probs = lp.carried = None
        elif lp.ready:
            lp.carried = None
        return alive

    def _pre_round(self, target, draft, lp, call, gamma) -> bool:
        """The draft drafts γ tokens while the target's 1-token forward over ``[last]`` checks ``D_1``.

        Rows in ``lp.carried`` check their kept speculation's first token instead (the chain's slots for them become
        holes); a rejection there drops their speculation from its second token on.
        """
        steps, side, stats = self.steps, self.side, call.stats
        B = lp.last.shape[0]
        carried = lp.carried
        if carried is not None:
            gamma = lp.next_drafts.shape[1]
            base_c = draft.last_valid() - (gamma - 1)  # slot of `last` (= e_1) in carried rows
        with side.run():
            view = self._view(lp)
            chain_start = draft.length
        ev = side.mark()
        with self.timer.target():
            t_logits = steps.target_forward(target, lp, lp.last.new_empty(B, 0), call)  # [B, 1, V]
        with side.run(after=ev), self.timer.draft(gamma):
            d1, p1 = steps.draft_chain(draft, view, call, self.gen_d, gamma=1)  # [B, 1], [B, 1, V]
            d_mark = draft.length  # D_1's slot once it is fed below
            d1_main, p1_main = side.fetch(d1), side.fetch(p1)  # the check waits for D_1 only
            rest = rest_p = None
            if gamma > 1:
                view2 = DraftView(pend_d=d1, pend_width=1, next_pos=view.next_pos + 1, last=d1[:, 0])
                rest, rest_p = steps.draft_chain(draft, view2, call, self.gen_d, gamma=gamma - 1)
        if rest is None:
            rest = d1_main.new_empty(B, 0)
            rest_p = p1_main[:, :0] if p1_main is not None else None
        else:
            rest, rest_p = side.fetch(rest), side.fetch(rest_p)
        if carried is not None:
            d1_main = torch.where(carried[:, None], lp.next_drafts[:, :1], d1_main)
            rest = torch.where(carried[:, None], lp.next_drafts[:, 1:], rest)
            if p1_main is not None:
                p1_main = torch.where(carried[:, None, None], lp.next_probs[:, :1], p1_main)
                rest_p = torch.where(carried[:, None, None], lp.next_probs[:, 1:], rest_p)
        # check D_1 at the one position the forward scored; the second (bonus) position is a stand-in, unused
        acc_a, tokens = steps.verify(torch.cat([t_logits, t_logits], dim=1), d1_main, p1_main, call, lp.hist)
        tok = tokens[:, 0]
        n_new, fin = lp.commit(torch.zeros_like(acc_a), tok[:, None])
        rej = acc_a == 0
        start = torch.where(rej, d_mark, draft.length)  # rejected: D_1 (fed by the chain's second part) onward
        if carried is not None:
            start = torch.where(carried, torch.where(rej, base_c + 1, chain_start), start)
        draft.invalidate(start, draft.length, trim=False)
        lp.pend_d = torch.stack([torch.full_like(tok, -1), lp.last], dim=1)
        lp.next_drafts, lp.next_probs, lp.carried = rest, rest_p, None
        lp.rej_a, lp.tok_a = rej, tok
        alive_rows = ~fin
        extra = torch.stack([(~rej & alive_rows).sum(), rej.sum()])
        alive = steps.end_round(lp, target, draft, acc_a, n_new, fin, tok[:, None], call, extra=extra)
        n_acc, n_rej = lp.extra
        lp.pend_width = 1
        stats.pre_verify_rounds += 1
        stats.pre_verify_rejected += n_rej
        lp.ready = n_acc > 0
        if not lp.ready:  # early stop: nobody needs D_2..D_γ verified
            lp.next_drafts = lp.next_probs = lp.rej_a = lp.tok_a = None
        return alive
