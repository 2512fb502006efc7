"""Decode schedules: the order in which a call runs the round steps (:mod:`vspec.runtime.steps`).

Every schedule implements :class:`Schedule`: ``prefill(prompt, call) -> (target, draft, first)`` builds both
models' states and prefills them, ``decode(prompt, target, draft, first, call) -> tokens [B, n]`` runs the rounds.
The serial ones live here:

* :class:`ChainSchedule` — per round and for every active batch row b: the draft is fed the committed tokens it
  has not seen (1 or 2) and proposes γ tokens, one forward each; the target runs ONE forward over
  ``[last committed token, d_1 .. d_γ]``; ``verify_greedy`` / ``verify_sampling`` give ``accept_len[b]`` and the
  correction/bonus token; rejected slots become holes in both caches (:mod:`vspec.runtime.state`); positions
  never move.
* :class:`TreeSchedule` (``SpecConfig.tree``, greedy) — the draft expands a token tree one level per forward, the
  target verifies all N nodes in ONE forward under a 4-D tree mask, ``verify_tree_greedy`` picks the accepted root
  path and every node off it becomes a hole.

The parallel schedule (:class:`vspec.runtime.parallel.ParallelSchedule`) runs the same steps while the draft works
beside the target. Every round ends in ``RoundSteps.end_round``, the round's one host sync.
"""

from __future__ import annotations

import torch

from .draft_side import draft_state
from .loop import CallState, DecodeState
from .models import Prompt
from .prefill import Prefill, PrefillPlan, plan_prefill
from .state import ModelState
from .steps import RoundSteps
from .trees import TreeLevels, tree_from_choices


class Schedule:
    """One call's decode schedule. Built per call from the decoder's (immutable) steps; the serial prefill is
    shared, ``decode`` is each schedule's own."""

    def __init__(self, steps: RoundSteps, prefill: Prefill):
        self.steps = steps
        self.prefill_steps = prefill
        self.config = steps.config

    def reserve(self, call: CallState) -> int:
        """Slots each model's storage holds beyond the prompt: the budget, the holes allowed before compaction,
        and two rounds' appends (``ModelState`` grows, and counts it, should this ever be short)."""
        tree = self.config.tree
        width = tree.num_nodes if tree is not None else self.config.draft_len + 1
        return call.max_new_tokens + self.config.compact_holes + 2 * width + 8

    def states(self, prompt: Prompt, call: CallState) -> tuple[ModelState, ModelState]:
        """Fresh states of both models; a draft on another device gets a bridged state (copies, no streams)."""
        reserve = self.reserve(call)
        target = ModelState(self.steps.target, self.steps.t_adapter, reserve=reserve,
                            **self.steps.state_kwargs("target"))
        draft = draft_state(self.steps.draft, self.steps.d_adapter, prompt.input_ids.device, reserve=reserve,
                            **self.steps.state_kwargs("draft"))
        return target, draft

    def prefill(self, prompt: Prompt, call: CallState) -> tuple[ModelState, ModelState, torch.Tensor]:
        """Both models' states after the prefill, and the target's first token ``[B]``."""
        target, draft = self.states(prompt, call)
        first = self.run_prefill(prompt, target, draft, plan_prefill(self.config, prompt), call)
        return target, draft, first

    def run_prefill(self, prompt: Prompt, target: ModelState, draft: ModelState, plan: PrefillPlan,
                    call: CallState) -> torch.Tensor:
        """The target's prefill, then the draft's (serial); the target's first token ``[B]``."""
        first, scored = self.prefill_steps.target_prefill(prompt, target, plan, call)
        self.prefill_steps.draft_prefill(prompt, draft, plan, call.stats, scored)
        return first

    def decode(self, prompt: Prompt, target: ModelState, draft: ModelState, first: torch.Tensor,
               call: CallState) -> torch.Tensor:
        """The generated tokens ``[B, n]`` (the prefill's token first), rows padded with ``call.pad``."""
        raise NotImplementedError


class ChainSchedule(Schedule):
    """Serial chain drafting: draft γ tokens, then one target forward verifies them (module docstring)."""

    def decode(self, prompt, target, draft, first, call):
        steps = self.steps
        gamma = self.config.draft_len
        lp = DecodeState(first, prompt.next_pos + 1, call.max_new_tokens, gamma, call.pad, call.eos_ids,
                         hist=call.hist)
        if not steps.start_decode(prompt, lp, target, draft, first, call):
            return lp.result()
        while True:
            drafts, d_probs = steps.draft_chain(draft, lp.draft_view(), call, call.generator)
            t_base = target.length
            t_logits = steps.target_forward(target, lp, drafts, call)
            acc, emitted = steps.verify(t_logits, drafts, d_probs, call, lp.hist)
            n_new, fin = lp.commit(acc, emitted)
            # Roll both caches back by marking rejected slots as holes (device ops; lengths trimmed after the sync).
            # target holds [last, d_1..d_γ]: valid are last + the first acc drafts.
            target.invalidate(t_base + 1 + acc, t_base + gamma + 1, trim=False)
            # draft holds its pending feed + d_1..d_{γ-1}: valid are d_1..d_min(acc, γ-1).
            d_base = draft.length - (gamma - 1)
            draft.invalidate(d_base + torch.clamp(acc, max=gamma - 1), draft.length, trim=False)
            lp.pend_d = torch.stack([torch.where(acc == gamma, drafts[:, -1], -1), lp.last], dim=1)
            if not steps.end_round(lp, target, draft, acc, n_new, fin, emitted, call):
                break
        return lp.result()


class TreeSchedule(Schedule):
    """Greedy decode rounds with a token tree; one host sync per round (in ``RoundSteps.end_round``).

    Per round: the draft is fed its pending committed tokens and expands the tree level by level
    (``RoundSteps.draft_tree``); the target runs ONE forward over all N nodes under tree attention
    (``ModelState.forward_tree``, node i at position root + depth(i)); ``verify_tree_greedy`` picks the longest
    accepted root path. Every node off that path becomes a hole in both caches; the path's nodes keep their slots:
    a parent's slot precedes its children's and positions are explicit, so the kept path reads exactly like an
    accepted chain, and a row's neighbours may keep a different path.
    """

    def decode(self, prompt, target, draft, first, call):
        steps = self.steps
        tree = self.config.tree
        depth = tree.depth
        device = first.device
        levels = (TreeLevels.dynamic(tree.width, depth, device) if tree.choices is None
                  else TreeLevels.static(tree_from_choices(tree.choices), device))
        lp = DecodeState(first, prompt.next_pos + 1, call.max_new_tokens, depth, call.pad, call.eos_ids,
                         hist=call.hist)
        if not steps.start_decode(prompt, lp, target, draft, first, call):
            return lp.result()
        while True:
            tokens, parents, anc, d_base = steps.draft_tree(draft, lp, levels, call)
            t_base = target.length
            t_logits = steps.target_forward_tree(target, lp, tokens, anc, levels)
            acc, path_tok, on_path, emitted = steps.verify_tree(t_logits, tokens, parents, anc, levels, call,
                                                                lp.hist)
            n_new, fin = lp.commit(acc, emitted)
            target.keep_only(t_base, on_path)
            draft.keep_only(d_base, on_path[:, 1:1 + levels.num_drafted])
            lp.pend_d = torch.stack([torch.where(acc == depth, path_tok[:, depth], -1), lp.last], dim=1)
            if not steps.end_round(lp, target, draft, acc, n_new, fin, emitted, call):
                break
        return lp.result()
