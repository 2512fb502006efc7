"""SpecDecoder: lossless speculative decoding of an HF Video-LLM with a pruned-vision draft.

Serial chain schedule, per round and for every active batch row b:

1. the draft is fed the committed tokens it has not seen (1 or 2) and proposes γ tokens, one forward each;
2. the target runs ONE forward over ``[last committed token, d_1 .. d_γ]``;
3. ``verify_greedy`` / ``verify_sampling`` give ``accept_len[b]`` and the correction/bonus token;
4. rejected slots become holes in both caches (see :mod:`vspec.runtime.state`); positions never move.

Tree schedule (``SpecConfig.tree``, greedy): the draft expands a token tree one level per forward, the target
verifies all N nodes in ONE forward under a 4-D tree mask, ``verify_tree_greedy`` picks the accepted root path
and every node off it becomes a hole (:meth:`SpecDecoder._decode_tree`).

One host sync per round (accept lengths, finished rows and cache extents read together). Rows that hit EOS or
``max_new_tokens`` leave the batch. ``SpecConfig(parallel=True)`` runs these same steps in the parallel schedule of
:mod:`vspec.runtime.parallel` (the draft drafts while the target verifies).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import ops
from .anchors import make_detector
from .capture import ScoreCapture, capturing
from .config import SpecConfig
from .devices import input_device
from .generation import GenerationSettings, History, LogitsRules, chain_extra, resolve_generation, tree_extra
from .loop import DecodeState
from .models import Prompt, get_adapter
from .parallel import ParallelSchedule, draft_state
from .state import ModelState, padded_indices
from .trees import TreeLevels, tree_from_choices
from .vocab import SharedVocab


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


@dataclass
class SpecOutput:
    """Like HF generate's output: ``sequences`` = prompt + new tokens, rows padded with ``pad_token_id``.

    settings: the resolved generation options the call decoded with."""

    sequences: torch.Tensor
    stats: SpecStats
    settings: GenerationSettings | None = None


class SpecDecoder:
    """Speculative decoder for an unmodified HF target and a smaller draft of the same family.

    ``generate(**processor_inputs, max_new_tokens, do_sample, ...)`` returns :class:`SpecOutput`. With greedy
    decoding the sequences equal ``target.generate(do_sample=False)`` token for token, for every batch row; with
    sampling they follow the target's distribution.
    """

    # State of the generate call running in this thread (threads may share one decoder: apply_vspec patches a
    # model that several threads call): loose verification's anchor detector and its counters.
    _anchors = property(lambda self: getattr(self._calls, "anchors", None),
                        lambda self, v: setattr(self._calls, "anchors", v))
    _loose_accepted = property(lambda self: getattr(self._calls, "loose_accepted", None),
                               lambda self, v: setattr(self._calls, "loose_accepted", v))
    _round_loose = property(lambda self: getattr(self._calls, "round_loose", None),
                            lambda self, v: setattr(self._calls, "round_loose", v))

    def __init__(self, target, draft, config: SpecConfig | None = None, *, tokenizer=None):
        """``tokenizer``: the pair's tokenizer or processor (optional). Target and draft may differ in their logit
        counts when that is padding of one vocabulary (:mod:`vspec.runtime.vocab`); the tokenizer's length then
        bounds the shared range."""
        self.target = target
        self.draft = draft
        self.config = config or SpecConfig()
        self._calls = threading.local()
        self.t_adapter = get_adapter(target)
        self.d_adapter = get_adapter(draft)
        self.vocab = SharedVocab(target, draft, self.t_adapter.vocab_size, self.d_adapter.vocab_size,
                                 tokenizer=getattr(tokenizer, "tokenizer", tokenizer))
        if self.t_adapter.visual_token_ids != self.d_adapter.visual_token_ids:
            raise ValueError(
                f"target and draft must use the same visual token ids (image, video): target "
                f"{self.t_adapter.visual_token_ids}, draft {self.d_adapter.visual_token_ids}"
            )
        if target.config.model_type != draft.config.model_type:
            raise ValueError(
                f"target ({target.config.model_type}) and draft ({draft.config.model_type}) must be of one family"
            )

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        generation_config=None,
        streamer=None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> SpecOutput:
        """Speculative ``generate``: the same inputs and generation options as ``target.generate``.

        Generation options resolve as in transformers (the target's ``generation_config``, then ``generation_config=``,
        then keyword arguments) and are applied to the target's verification logits and the draft's proposals alike
        (:mod:`vspec.runtime.generation`); an option vspec does not apply raises ``ValueError`` naming it. ``generator``
        seeds sampling (default: ``SpecConfig.seed``).
        """
        cfg = self.config
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds-only generation is not supported)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        settings, model_kwargs = resolve_generation(self.target, input_ids, generation_config, **kwargs)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, model_kwargs)
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("streamer supports batch size 1 only (as in transformers)")
        if cfg.verify == "loose" and settings.sample:
            raise ValueError("verify='loose' is defined for greedy decoding only; use do_sample=False (or top_k=1) "
                             "or verify='strict'")
        if cfg.tree is not None:
            self._check_tree(settings)
        if settings.sample and generator is None:
            generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
        max_new_tokens, pad = settings.max_new_tokens, settings.pad_token_id
        eos_ids = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=input_ids.device)
        rules = LogitsRules(settings, self.t_adapter.vocab_size, input_ids.device)
        hist = History(settings, input_ids, attention_mask, self.t_adapter.vocab_size,
                       max_new_tokens + (cfg.tree.depth if cfg.tree is not None else cfg.draft_len) + 2)
        self._anchors = make_detector(cfg.loose, self.target, self.t_adapter) if cfg.verify == "loose" else None
        self._loose_accepted = None
        self._round_loose = None

        stats = SpecStats(accept_histogram=[0] * ((cfg.tree.depth if cfg.tree is not None else cfg.draft_len) + 1))
        t0 = time.perf_counter()
        prompt = self.t_adapter.prompt(input_ids, attention_mask, model_kwargs)
        decode = self._decode
        if cfg.parallel:  # the same steps on two streams (vspec/runtime/parallel.py)
            par = ParallelSchedule(self, generator)
            target, draft = par.states()
            first = par.prefill(prompt, target, draft, stats, rules, generator, hist=hist)
            decode = par.decode
        else:
            target = ModelState(self.target, self.t_adapter)
            draft = draft_state(self.draft, self.d_adapter, input_ids.device)  # a ModelState; bridged across devices
            first = self._prefill(prompt, target, draft, stats, rules, generator, hist=hist)
        stats.prefill_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        new_tokens = decode(prompt, target, draft, first, max_new_tokens, eos_ids, pad, stats, rules, generator,
                            streamer, hist=hist)
        stats.decode_seconds = time.perf_counter() - t1
        if self._loose_accepted is not None:
            stats.loose_accepted = int(self._loose_accepted)
        self._anchors = None
        stats.target_calls = target.calls - 1
        stats.draft_calls = draft.calls
        if streamer is not None:
            streamer.end()
        return SpecOutput(sequences=torch.cat([input_ids, new_tokens], dim=1), stats=stats, settings=settings)

    # ------------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, model_kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        # The target's input device (a sharded target's is its input embeddings', not .device). The draft may sit
        # on another device in every schedule: tokens are moved across (runtime/devices.py, runtime/parallel.py).
        t_dev = input_device(self.target)
        if input_ids.device != t_dev:
            raise ValueError(f"input_ids are on {input_ids.device} but the target takes its inputs on {t_dev} (the "
                             f"device of its input embeddings); move the inputs there")
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids and the processor's visual inputs")
        for name in ("past_key_values", "cache"):
            if model_kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported: SpecDecoder manages both models' caches")
            model_kwargs.pop(name, None)
        return input_ids, attention_mask

    def _select(self, logits: torch.Tensor, rules: LogitsRules, generator, hist: History | None) -> torch.Tensor:
        """Next token from the target's ``logits [B, V]`` after the committed history ``hist`` (rules applied)."""
        return rules.select(logits, hist, generator)

    # ------------------------------------------------------------------------------------------------
    def _prefill(self, prompt: Prompt, target: ModelState, draft: ModelState | None, stats, rules: LogitsRules,
                 generator, *, hist: History | None = None):
        """Target prefill, its first token, then (unless ``draft`` is None) the draft's prefill.

        ``hist``: the prompt's history for the rules (the first token is selected after it)."""
        cfg = self.config
        valid = prompt.attention_mask.bool()
        vis = prompt.visual_mask
        n_vis = vis.sum(dim=1)
        stats.total_visual_tokens = int(n_vis.sum())
        prune = cfg.prune if stats.total_visual_tokens else "none"
        need_scores = prune in ("semantic", "attention")
        pos_ids = self.t_adapter.model_position_ids(prompt.positions)
        visual_idx = padded_indices(vis)

        # ---- target prefill (scores captured from its q/k when the target is the prune source) ----------
        capture = None
        embeds_t = None
        if need_scores and cfg.prune_source == "target":
            capture = self._make_capture(self.target, prompt, visual_idx)
            embeds_t, extras_t = self.t_adapter.language_inputs(prompt.input_ids, prompt.attention_mask,
                                                                prompt.model_kwargs, pos_ids)
            with (capturing(self.target, capture), self._watch_prefill(visual_idx),
                  self.t_adapter.language_kwargs(extras_t)):
                logits = target.forward(inputs_embeds=embeds_t, positions=prompt.positions, new_valid=valid,
                                        logits_to_keep=1)
        else:
            with self._watch_prefill(visual_idx):
                logits = target.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=valid,
                                        logits_to_keep=1, **prompt.model_kwargs)
        first = self._select(logits[:, -1], rules, generator, hist)

        if draft is not None:
            self._prefill_draft(prompt, draft, stats, capture, embeds_t, visual_idx)
        return first

    def _prefill_draft(self, prompt: Prompt, draft: ModelState, stats, capture=None, embeds_t=None, visual_idx=None):
        """The draft's prefill on its keep-set; runs after the target's (``stats.total_visual_tokens`` is set).

        capture / embeds_t: the target prefill's scores and input embeddings when the target is the prune source.
        """
        cfg = self.config
        valid = prompt.attention_mask.bool()
        vis = prompt.visual_mask
        prune = cfg.prune if stats.total_visual_tokens else "none"
        need_scores = prune in ("semantic", "attention")
        if visual_idx is None:
            visual_idx = padded_indices(vis)

        # ---- keep-set ------------------------------------------------------------------------------------
        if prune == "none":
            draft.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=valid, logits_to_keep=1,
                          **prompt.model_kwargs)
            stats.kept_visual_tokens = stats.total_visual_tokens
            return

        if cfg.prune_source == "draft":
            d_pos = self.d_adapter.model_position_ids(prompt.positions)
            embeds_d, extras_d = self.d_adapter.language_inputs(prompt.input_ids, prompt.attention_mask,
                                                                prompt.model_kwargs, d_pos)
            with self.d_adapter.language_kwargs(extras_d):
                if need_scores:
                    capture = self._make_capture(self.draft, prompt, visual_idx)
                    with capturing(self.draft, capture):
                        draft.forward(inputs_embeds=embeds_d, positions=prompt.positions, new_valid=valid,
                                      logits_to_keep=1)
                else:
                    draft.forward(inputs_embeds=embeds_d, positions=prompt.positions, new_valid=valid,
                                  logits_to_keep=1)
            keep_phys = self._keep_rows(prompt, visual_idx, capture, embeds_d, prune)
            stats.kept_visual_tokens = int((keep_phys & vis).sum())
            draft.valid = keep_phys
            draft.compact_()
            return

        keep_phys = self._keep_rows(prompt, visual_idx, capture, embeds_t, prune)
        stats.kept_visual_tokens = int((keep_phys & vis).sum())
        d_pos = self.d_adapter.model_position_ids(prompt.positions)
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

    def _make_capture(self, model, prompt: Prompt, visual_idx: torch.Tensor) -> ScoreCapture:
        pc = self.config.prune_config
        n_layers = model.config.get_text_config().num_hidden_layers
        layers = range(n_layers) if pc.score_layers is None else [i % n_layers for i in pc.score_layers]
        # Text queries: the trailing prompt positions after the last visual token, in every row.
        phys = torch.arange(prompt.input_ids.shape[1], device=prompt.input_ids.device)
        last_vis = torch.where(prompt.visual_mask, phys, -1).amax(dim=1)
        tail = int((prompt.input_ids.shape[1] - 1 - last_vis).min())
        return ScoreCapture(visual_idx=visual_idx, attention_mask=prompt.attention_mask, layers=frozenset(layers),
                            query_rows=max(1, min(pc.query_rows, tail)), normalize=pc.normalize)

    def _keep_rows(self, prompt: Prompt, visual_idx, capture, embeds, prune: str) -> torch.Tensor:
        """Physical slots ``[B, L]`` the draft keeps: every valid text token plus the kept visual tokens."""
        from . import pruning

        cfg, pc = self.config, self.config.prune_config
        keep = prompt.attention_mask.bool() & ~prompt.visual_mask
        is_vis = visual_idx >= 0
        temporal = spatial = frame_ids = None
        if prune == "semantic":
            temporal, spatial, frame_ids = (torch.stack(t) for t in zip(*(
                _semantics(embeds[b], spans, visual_idx[b]) for b, spans in enumerate(prompt.spans))))
        kept = pruning.select_keep(
            is_vis,
            method=prune,
            keep=cfg.keep_count if cfg.keep_count is not None else cfg.keep_ratio,
            attention=capture.result() if capture is not None else None,
            temporal=temporal,
            spatial=spatial,
            frame_ids=frame_ids,
            weights=pc.weights,
            per_frame_floor=pc.per_frame_floor,
            score_norm=pc.score_norm,
            mass_fraction=pc.mass_fraction,
            generator=torch.Generator().manual_seed(cfg.seed),
            padded=True,
        ).to(visual_idx.device)
        cols = torch.gather(visual_idx, 1, kept.clamp_min(0))
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(cols)
        ok = kept >= 0
        keep[rows[ok], cols[ok]] = True
        return keep

    # ------------------------------------------------------------------------------------------------
    def _decode(self, prompt, target, draft, first, max_new_tokens, eos_ids, pad, stats, rules, generator,
                streamer, *, hist: History | None = None):
        if self.config.tree is not None:
            return self._decode_tree(prompt, target, draft, first, max_new_tokens, eos_ids, pad, stats, streamer,
                                     rules=rules, hist=hist)
        gamma = self.config.draft_len
        lp = DecodeState(first, prompt.next_pos + 1, max_new_tokens, gamma, pad, eos_ids, hist=hist)
        if not self._start_decode(prompt, lp, target, draft, first, max_new_tokens, eos_ids, streamer):
            return lp.result()
        while True:
            drafts, d_probs = self._draft_chain(draft, lp, rules, generator)
            t_base = target.length
            t_logits = self._target_chain(target, lp, drafts)
            acc, emitted = self._verify(t_logits, drafts, d_probs, rules, generator, hist=lp.hist)
            n_new, fin = lp.commit(acc, emitted)
            # Roll both caches back by marking rejected slots as holes (device ops; lengths trimmed after the sync).
            # target holds [last, d_1..d_γ]: valid are last + the first acc drafts.
            target.invalidate(t_base + 1 + acc, t_base + gamma + 1, trim=False)
            # draft holds its pending feed + d_1..d_{γ-1}: valid are d_1..d_min(acc, γ-1).
            d_base = draft.length - (gamma - 1)
            draft.invalidate(d_base + torch.clamp(acc, max=gamma - 1), draft.length, trim=False)
            lp.pend_d = torch.stack([torch.where(acc == gamma, drafts[:, -1], -1), lp.last], dim=1)
            if not self._end_round(lp, target, draft, acc, n_new, fin, emitted, stats, streamer):
                break
        return lp.result()

    def _start_decode(self, prompt, lp, target, draft, first, max_new_tokens, eos_ids, streamer) -> bool:
        """Stream the prompt and the prefill's token; drop rows that token already ended (EOS or a budget of 1).

        Returns False when no row is left to decode. Shared by the chain, tree and parallel schedules.
        """
        if streamer is not None:
            streamer.put(prompt.input_ids.cpu())
            streamer.put(first.cpu())
        keep = [j for j, d in enumerate((torch.isin(first, eos_ids) | (max_new_tokens <= 1)).tolist()) if not d]
        if not keep:
            return False
        if len(keep) < first.shape[0]:
            idx = torch.tensor(keep, dtype=torch.long, device=first.device)
            for part in (lp, target, draft) + ((self._anchors,) if self._anchors is not None else ()):
                part.select_rows(idx)
        return True

    def _draft_chain(self, draft: ModelState, lp: DecodeState, rules: LogitsRules, generator, *,
                     gamma: int | None = None):
        """Feed the draft the committed tokens it has not seen, then let it propose γ tokens (γ forwards).

        Returns ``drafts [B, γ]`` and, when sampling, the draft's warped distributions ``[B, γ, V]``.
        ``gamma`` defaults to ``config.draft_len``. Reads only ``lp.pend_d``, ``lp.pend_width``, ``lp.next_pos``,
        ``lp.last`` and ``lp.hist`` (the parallel schedule passes a stand-in holding them). The draft proposes under
        the same logits rules as the target, after the committed history plus its own drafts so far (``lp.hist``
        None: history unknown, only the history-free rules apply; proposals only affect acceptance, never the output).
        """
        gamma = self.config.draft_len if gamma is None else gamma
        device = lp.last.device
        w = lp.pend_width
        feed = lp.pend_d[:, -w:]
        feed_pos = (lp.next_pos - w)[:, None] + torch.arange(w, device=device)[None]
        logits = draft.forward(input_ids=self.vocab.draft_ids(feed.clamp_min(0)),
                               positions=self.d_adapter.decode_positions(feed_pos), new_valid=feed >= 0,
                               logits_to_keep=1)[:, -1]
        d_tokens, d_probs = [], []
        pos = lp.next_pos
        ones = torch.ones_like(lp.last, dtype=torch.bool)[:, None]
        hist = getattr(lp, "hist", None)
        for i in range(gamma):
            so_far = torch.stack(d_tokens, dim=1)[:, None] if d_tokens else None
            x = rules.apply(self.vocab.draft_logits(logits)[:, None], hist, so_far)[:, 0]
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

    def _target_chain(self, target: ModelState, lp: DecodeState, drafts: torch.Tensor) -> torch.Tensor:
        """One target forward over ``[last, d_1 .. d_γ]``; logits ``[B, γ+1, V]``."""
        t_in = torch.cat([lp.last[:, None], drafts], dim=1)
        t_pos = (lp.next_pos - 1)[:, None] + torch.arange(t_in.shape[1], device=t_in.device)[None]
        watch = self._anchors.verify(drafts, target) if self._anchors is not None else contextlib.nullcontext()
        with watch:
            return target.forward(input_ids=t_in, positions=self.t_adapter.decode_positions(t_pos),
                                  new_valid=torch.ones_like(t_in, dtype=torch.bool))

    def _watch_prefill(self, visual_idx):
        """Lets the loose-verification anchor detector see the target's prefill (no-op in strict mode)."""
        return self._anchors.prefill(visual_idx) if self._anchors is not None else contextlib.nullcontext()

    def _verify(self, t_logits, drafts, d_probs, rules: LogitsRules, generator, *, hist: History | None):
        """``(accept_len [B], tokens [B, γ+1])``: tokens[:, :acc+1] are the round's tokens (accepted drafts, then
        the target's correction or bonus token). ``t_logits [B, γ+1, V]`` are the target's raw logits over
        ``[last, d_1 .. d_γ]``; position i is processed after the committed history ``hist`` plus ``d_1 .. d_i``."""
        t_logits = rules.apply(t_logits, hist, chain_extra(drafts, t_logits.shape[1]))
        if self._anchors is not None:
            strict = self._anchors.strict(drafts)
            acc, tokens, loose = ops.verify_loose(t_logits, drafts, strict, return_loose=True, check_ids=False,
                                                  **self.config.loose.rule())
            self._round_loose = loose  # counted in _end_round, where the emitted length is known
            return acc, tokens
        if not rules.sample:
            return ops.verify_greedy(t_logits, drafts, check_ids=False)
        return ops.verify_sampling(rules.warp(t_logits), d_probs, drafts, temperature=1.0, generator=generator,
                                   check_ids=False)

    def _end_round(self, lp: DecodeState, target: ModelState, draft: ModelState, acc, n_new, fin, emitted, stats,
                   streamer, *, extra: torch.Tensor | None = None) -> bool:
        """The round's ONE host sync: accept lengths, finished rows and both caches' extents.

        Updates stats, streams, trims and (when holes pile up) compacts both caches, drops finished rows.
        Returns False when no row is left. ``extra``: a 1-D integer tensor read in the same sync, left in
        ``lp.extra`` as a list (the parallel schedule's per-round decisions).
        """
        B = acc.shape[0]
        if self._round_loose is not None:  # loosely accepted tokens that were emitted (not cut by EOS / budget)
            loose, self._round_loose = self._round_loose, None
            pos = torch.arange(loose.shape[1], device=loose.device)[None]
            n = (loose & (pos < n_new[:, None])).sum()
            self._loose_accepted = n if self._loose_accepted is None else self._loose_accepted + n
        parts = [acc, n_new, fin.long(), target.extent(), draft.extent()]
        host = torch.cat(parts + ([extra.long()] if extra is not None else [])).tolist()
        if extra is not None:
            lp.extra, host = host[len(host) - extra.numel():], host[:len(host) - extra.numel()]
        acc_h, n_new_h, fin_h = host[:B], host[B:2 * B], host[2 * B:3 * B]
        t_used, t_full, d_used, d_full = host[3 * B:]
        stats.rounds += 1
        stats.row_rounds += B
        stats.emitted += sum(n_new_h)
        for a in acc_h:
            stats.accept_histogram[a] += 1
        if streamer is not None and n_new_h[0] > 0:
            streamer.put(emitted[0, :n_new_h[0]].cpu())
        for state, used, full in ((target, t_used, t_full), (draft, d_used, d_full)):
            state.truncate(used)
            if used - full >= self.config.compact_holes:
                if state is target and self._anchors is not None:
                    self._anchors.compacted(state.valid)
                state.compact_(full)
                stats.compactions += 1
        keep = [j for j, f in enumerate(fin_h) if not f]
        if not keep:
            return False
        if len(keep) < B:
            idx = torch.tensor(keep, dtype=torch.long, device=acc.device)
            for part in (lp, target, draft) + ((self._anchors,) if self._anchors is not None else ()):
                part.select_rows(idx)
            acc_h = [acc_h[j] for j in keep]
            acc = acc[idx]
        lp.pend_width = 2 if max(acc_h) == lp.depth else 1
        return True

    # ---- tree drafting (SpecConfig.tree) ---------------------------------------------------------------
    def _check_tree(self, settings) -> None:
        """Errors for what tree drafting does not support, raised before any work is done."""
        if settings.sample:
            raise ValueError("SpecConfig.tree supports greedy decoding only (verify_tree_greedy); use "
                             "do_sample=False (or top_k=1), or tree=None for speculative sampling with a chain")
        from .capture import text_attn_implementation

        for name, model in (("target", self.target), ("draft", self.draft)):
            impl = text_attn_implementation(model)
            if impl.removeprefix("vspec_") not in ("sdpa", "eager"):
                raise ValueError(f"SpecConfig.tree needs the {name}'s text attention to accept a 4-D mask ('sdpa' or "
                                 f"'eager'), got {impl!r}")

    def _decode_tree(self, prompt, target, draft, first, max_new_tokens, eos_ids, pad, stats, streamer, *,
                     rules: LogitsRules, hist: History | None = None):
        """Greedy decode rounds with a token tree; one host sync per round (in :meth:`_end_round`).

        Per round: the draft is fed its pending committed tokens and expands the tree level by level
        (:meth:`_draft_tree`); the target runs ONE forward over all N nodes under tree attention
        (:meth:`ModelState.forward_tree`, node i at position root + depth(i)); ``verify_tree_greedy`` picks the
        longest accepted root path. Every node off that path becomes a hole in both caches; the path's nodes keep
        their slots: a parent's slot precedes its children's and positions are explicit, so the kept path reads
        exactly like an accepted chain, and a row's neighbours may keep a different path.
        """
        tree = self.config.tree
        depth = tree.depth
        device = first.device
        levels = (TreeLevels.dynamic(tree.width, depth, device) if tree.choices is None
                  else TreeLevels.static(tree_from_choices(tree.choices), device))
        lp = DecodeState(first, prompt.next_pos + 1, max_new_tokens, depth, pad, eos_ids, hist=hist)
        if not self._start_decode(prompt, lp, target, draft, first, max_new_tokens, eos_ids, streamer):
            return lp.result()
        cols = torch.arange(depth + 1, device=device)[None]
        while True:
            tokens, parents, anc, d_base = self._draft_tree(draft, lp, levels, rules)
            t_base = target.length
            pos = (lp.next_pos - 1)[:, None] + levels.depth[None]
            t_logits = target.forward_tree(input_ids=tokens, positions=self.t_adapter.decode_positions(pos),
                                           tree_mask=anc)
            t_logits = rules.apply(t_logits, lp.hist, tree_extra(tokens, anc))
            acc, path, nxt = ops.verify_tree_greedy(t_logits, tokens, parents, width=depth + 1, check_ids=False)
            # path[:, 0] is the root (node 0); −1 padding points at the root too, which is on every path anyway.
            on_path = torch.zeros_like(tokens, dtype=torch.bool).scatter_(
                1, torch.where(path >= 0, path, 0), True)
            path_tok = torch.gather(tokens, 1, path.clamp_min(0))  # [B, D+1], root first
            after = torch.cat([path_tok[:, 1:], torch.full_like(path_tok[:, :1], -1)], dim=1)
            emitted = torch.where(cols < acc[:, None], after, torch.where(cols == acc[:, None], nxt[:, None], -1))
            n_new, fin = lp.commit(acc, emitted)
            target.keep_only(t_base, on_path)
            draft.keep_only(d_base, on_path[:, 1:1 + levels.num_drafted])
            lp.pend_d = torch.stack([torch.where(acc == depth, path_tok[:, depth], -1), lp.last], dim=1)
            if not self._end_round(lp, target, draft, acc, n_new, fin, emitted, stats, streamer):
                break
        return lp.result()

    def _draft_tree(self, draft: ModelState, lp: DecodeState, levels: TreeLevels, rules: LogitsRules):
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
            logits = rules.apply(self.vocab.draft_logits(logits), lp.hist, tree_extra(tokens, anc[:, plo:phi]))
            tok, par_local, scores = _expand_level(levels, d, logits, scores)
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


def _expand_level(levels: TreeLevels, d: int, logits: torch.Tensor, scores: torch.Tensor):
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


def _semantics(embeds_row: torch.Tensor, spans, visual_idx_row: torch.Tensor):
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
