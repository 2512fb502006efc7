"""Prefill: the target's prefill and first token, the scoring capture, the draft's keep-set and its pruned prefill.

Whether the draft is pruned, whether scores are captured and from which model (``SpecConfig.prune`` /
``prune_source``, and no pruning for a prompt without visual tokens) is decided ONCE per call, in
:func:`plan_prefill`; every schedule follows that :class:`PrefillPlan`.

* ``source == "target"``: the scores (when the method needs them) come from the target's prefill q/k
  (:mod:`vspec.runtime.capture`); the draft then prefills only the kept tokens (text + kept visual), left-padded,
  at their ORIGINAL positions (M-RoPE ids for Qwen).
* ``source == "draft"``: the draft prefills every token (capturing its own scores when needed), then its cache is
  compacted to the kept slots.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import ops
from . import pruning
from .capture import ScoreCapture, capturing
from .config import SpecConfig
from .loop import CallState
from .models import Prompt
from .state import ModelState, padded_indices
from .stats import SpecStats


@dataclass(frozen=True)
class PrefillPlan:
    """The call's pruning decision. prune: the method applied (``"none"`` when the prompt has no visual token);
    scores: the method needs attention scores (``"semantic"``, ``"attention"``); source: the model they come from
    (``"target"`` or ``"draft"``); n_visual: visual tokens in the batch."""

    prune: str
    scores: bool
    source: str
    n_visual: int

    @property
    def scores_from_target(self) -> bool:
        """Scores come from the target's prefill: the draft's prefill needs the target's (its scores and input
        embeddings) and must wait for it."""
        return self.scores and self.source == "target"


def plan_prefill(config: SpecConfig, prompt: Prompt) -> PrefillPlan:
    """The pruning decision of one call (one host read of the visual-token count)."""
    n_visual = int(prompt.visual_mask.sum())
    prune = config.prune if n_visual else "none"
    return PrefillPlan(prune=prune, scores=prune in ("semantic", "attention"), source=config.prune_source,
                       n_visual=n_visual)


@dataclass
class TargetPrefill:
    """What the target's prefill hands to the draft's when the target is the prune source: the captured scores
    (None when the method needs none), the target's input embeddings ``[B, L, H]`` and ``visual_idx [B, Nmax]``."""

    capture: ScoreCapture | None
    embeds: torch.Tensor | None
    visual_idx: torch.Tensor


class Prefill:
    """The prefill steps for one target/draft pair (immutable; per-call state comes in a ``CallState``)."""

    def __init__(self, target, draft, config: SpecConfig, t_adapter, d_adapter):
        self.target = target
        self.draft = draft
        self.config = config
        self.t_adapter = t_adapter
        self.d_adapter = d_adapter

    def target_prefill(self, prompt: Prompt, target: ModelState, plan: PrefillPlan,
                       call: CallState) -> tuple[torch.Tensor, TargetPrefill]:
        """The target's prefill and its first token ``[B]`` (selected after ``call.hist``); scores are captured
        from its q/k when the plan takes them from the target. Sets ``stats.total_visual_tokens``."""
        call.stats.total_visual_tokens = plan.n_visual
        valid = prompt.attention_mask.bool()
        visual_idx = padded_indices(prompt.visual_mask)
        watch = call.anchors.prefill(visual_idx) if call.anchors is not None else contextlib.nullcontext()
        capture = embeds = None
        if plan.scores_from_target:
            capture = make_capture(self.config, self.target, prompt, visual_idx)
            pos_ids = self.t_adapter.model_position_ids(prompt.positions)
            embeds, extras = self.t_adapter.language_inputs(prompt.input_ids, prompt.attention_mask,
                                                            prompt.model_kwargs, pos_ids)
            with capturing(self.target, capture), watch, self.t_adapter.language_kwargs(extras):
                logits = target.forward(inputs_embeds=embeds, positions=prompt.positions, new_valid=valid,
                                        logits_to_keep=1)
        else:
            with watch:
                logits = target.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=valid,
                                        logits_to_keep=1, **prompt.model_kwargs)
        first = call.rules.select(logits[:, -1], call.hist, call.generator)
        return first, TargetPrefill(capture, embeds, visual_idx)

    def draft_prefill(self, prompt: Prompt, draft: ModelState, plan: PrefillPlan, stats: SpecStats,
                      scored: TargetPrefill | None = None) -> None:
        """The draft's prefill on its keep-set. ``scored``: the target prefill's hand-over (needed when
        ``plan.scores_from_target``; otherwise ``visual_idx`` is taken from it when given, else recomputed).
        Sets ``stats.kept_visual_tokens``."""
        valid = prompt.attention_mask.bool()
        vis = prompt.visual_mask
        if plan.prune == "none":
            draft.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=valid, logits_to_keep=1,
                          **prompt.model_kwargs)
            stats.kept_visual_tokens = stats.total_visual_tokens
            return
        visual_idx = scored.visual_idx if scored is not None else padded_indices(vis)
        d_pos = self.d_adapter.model_position_ids(prompt.positions)
        if plan.source == "draft":
            embeds_d, extras_d = self.d_adapter.language_inputs(prompt.input_ids, prompt.attention_mask,
                                                                prompt.model_kwargs, d_pos)
            capture = None
            with self.d_adapter.language_kwargs(extras_d):
                if plan.scores:
                    capture = make_capture(self.config, self.draft, prompt, visual_idx)
                    with capturing(self.draft, capture):
                        draft.forward(inputs_embeds=embeds_d, positions=prompt.positions, new_valid=valid,
                                      logits_to_keep=1)
                else:
                    draft.forward(inputs_embeds=embeds_d, positions=prompt.positions, new_valid=valid,
                                  logits_to_keep=1)
            keep_phys = keep_rows(self.config, prompt, visual_idx, capture, embeds_d, plan.prune)
            stats.kept_visual_tokens = int((keep_phys & vis).sum())
            draft.valid = keep_phys
            draft.compact_()
            return

        capture = scored.capture if scored is not None else None
        embeds_t = scored.embeds if scored is not None else None
        keep_phys = keep_rows(self.config, prompt, visual_idx, capture, embeds_t, plan.prune)
        stats.kept_visual_tokens = int((keep_phys & vis).sum())
        embeds_d, extras_d = self.d_adapter.language_inputs(prompt.input_ids, prompt.attention_mask,
                                                            prompt.model_kwargs, d_pos)
        # Gather each row's kept tokens (text + kept visual) to the right end, left-padded; ORIGINAL positions.
        counts = keep_phys.sum(dim=1)
        width = int(counts.max())
        order = torch.argsort(keep_phys.to(torch.int8), dim=1, stable=True)[:, -width:]
        new_valid = torch.gather(keep_phys, 1, order)
        embeds = torch.gather(embeds_d, 1, order[..., None].expand(-1, -1, embeds_d.shape[-1]))
        positions = torch.gather(prompt.positions, 2, order[None].expand(prompt.positions.shape[0], -1, -1))
        with self.d_adapter.language_kwargs(self.d_adapter.gather_language_extras(extras_d, order, new_valid)):
            draft.forward(inputs_embeds=embeds, positions=positions, new_valid=new_valid, logits_to_keep=1)


def make_capture(config: SpecConfig, model, prompt: Prompt, visual_idx: torch.Tensor) -> ScoreCapture:
    """A :class:`ScoreCapture` of ``model``'s prefill over ``config.prune_config.score_layers``, with the trailing
    text positions after the last visual token as queries."""
    pc = config.prune_config
    n_layers = model.config.get_text_config().num_hidden_layers
    layers = range(n_layers) if pc.score_layers is None else [i % n_layers for i in pc.score_layers]
    # Text queries: the trailing prompt positions after the last visual token, in every row.
    phys = torch.arange(prompt.input_ids.shape[1], device=prompt.input_ids.device)
    last_vis = torch.where(prompt.visual_mask, phys, -1).amax(dim=1)
    tail = int((prompt.input_ids.shape[1] - 1 - last_vis).min())
    return ScoreCapture(visual_idx=visual_idx, attention_mask=prompt.attention_mask, layers=frozenset(layers),
                        query_rows=max(1, min(pc.query_rows, tail)), normalize=pc.normalize)


def keep_rows(config: SpecConfig, prompt: Prompt, visual_idx, capture, embeds, prune: str) -> torch.Tensor:
    """Physical slots ``[B, L]`` the draft keeps: every valid text token plus the kept visual tokens."""
    pc = config.prune_config
    keep = prompt.attention_mask.bool() & ~prompt.visual_mask
    is_vis = visual_idx >= 0
    temporal = spatial = frame_ids = None
    if prune == "semantic":
        temporal, spatial, frame_ids = (torch.stack(t) for t in zip(*(
            semantics(embeds[b], spans, visual_idx[b]) for b, spans in enumerate(prompt.spans))))
    kept = pruning.select_keep(
        is_vis,
        method=prune,
        keep=config.keep_count if config.keep_count is not None else config.keep_ratio,
        attention=capture.result() if capture is not None else None,
        temporal=temporal,
        spatial=spatial,
        frame_ids=frame_ids,
        weights=pc.weights,
        per_frame_floor=pc.per_frame_floor,
        score_norm=pc.score_norm,
        mass_fraction=pc.mass_fraction,
        generator=torch.Generator().manual_seed(config.seed),
        padded=True,
    ).to(visual_idx.device)
    cols = torch.gather(visual_idx, 1, kept.clamp_min(0))
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(cols)
    ok = kept >= 0
    keep[rows[ok], cols[ok]] = True
    return keep


def semantics(embeds_row: torch.Tensor, spans, visual_idx_row: torch.Tensor):
    """Temporal novelty, spatial complexity and frame id of one row's visual tokens, in visual_idx order.

    visual_idx_row: ``[Nmax]`` physical indices of the row's visual tokens (−1 padding: zeros there). A span's
    tokens may lie in several runs (``VisualSpan.pieces``: a Qwen3-VL video's frame groups); its grid covers them
    all, so temporal novelty compares each frame with the previous frame of the same video.
    """
    n = visual_idx_row.shape[0]
    device = embeds_row.device
    temporal = torch.zeros(n, dtype=torch.float32, device=device)
    spatial = torch.zeros_like(temporal)
    frame_ids = torch.zeros(n, dtype=torch.long, device=device)
    where = {int(r): i for i, r in enumerate(visual_idx_row.tolist()) if r >= 0}
    frame_base = 0
    for span in spans:
        phys = span.indices()
        slots = torch.tensor([where[p] for p in phys], dtype=torch.long, device=device)
        if span.grid is None:
            frame_ids[slots] = frame_base
            frame_base += 1
            continue
        t, h, w = span.grid
        cells = t * h * w
        x = embeds_row[torch.tensor(phys[:cells], dtype=torch.long, device=embeds_row.device)].float()[None]
        tem, spa = ops.frame_semantic_scores(x, (t, h, w))
        temporal[slots[:cells]] = tem[0]
        spatial[slots[:cells]] = spa[0]
        frame_ids[slots[:cells]] = frame_base + torch.arange(t, device=device).repeat_interleave(h * w)
        if span.length > cells:  # LLaVA-OneVision's newline token joins the last frame
            frame_ids[slots[cells:]] = frame_base + t - 1
        frame_base += t
    return temporal, spatial, frame_ids
