"""SpecDecoder: lossless speculative decoding of an HF Video-LLM with a pruned-vision draft.

Serial chain schedule, per round and for every active batch row b:

1. the draft is fed the committed tokens it has not seen (1 or 2) and proposes γ tokens, one forward each;
2. the target runs ONE forward over ``[last committed token, d_1 .. d_γ]``;
3. ``verify_greedy`` / ``verify_sampling`` give ``accept_len[b]`` and the correction/bonus token;
4. rejected slots become holes in both caches (see :mod:`vspec.runtime.state`); positions never move.

One host sync per round (accept lengths, finished rows and cache extents read together). Rows that hit EOS or
``max_new_tokens`` leave the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import ops
from .capture import ScoreCapture, capturing
from .config import SpecConfig
from .models import Prompt, get_adapter
from .state import ModelState, padded_indices


@dataclass
class SpecStats:
    """Figures of one ``generate`` call (DESIGN.md, Figures that matter).

    mean_accepted_length: tokens emitted per verification round and row (correction/bonus token included; the
    prefill's token is not a round). accept_histogram[k]: row-rounds that accepted k draft tokens.
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

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    @property
    def target_calls_per_token(self) -> float:
        return self.target_calls / self.emitted if self.emitted else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["mean_accepted_length"] = self.mean_accepted_length
        d["target_calls_per_token"] = self.target_calls_per_token
        return d


@dataclass
class SpecOutput:
    """Like HF generate's output: ``sequences`` = prompt + new tokens, rows padded with ``pad_token_id``."""

    sequences: torch.Tensor
    stats: SpecStats


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """HF's sampling warpers in HF's order: temperature, top-k, top-p. Returns float32 logits with −inf cuts."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class SpecDecoder:
    """Speculative decoder for an unmodified HF target and a smaller draft of the same family.

    ``generate(**processor_inputs, max_new_tokens, do_sample, ...)`` returns :class:`SpecOutput`. With greedy
    decoding the sequences equal ``target.generate(do_sample=False)`` token for token, for every batch row; with
    sampling they follow the target's distribution.
    """

    def __init__(self, target, draft, config: SpecConfig | None = None):
        self.target = target
        self.draft = draft
        self.config = config or SpecConfig()
        self.t_adapter = get_adapter(target)
        self.d_adapter = get_adapter(draft)
        if self.t_adapter.vocab_size != self.d_adapter.vocab_size:
            raise ValueError(
                f"target and draft must share the vocabulary: target has {self.t_adapter.vocab_size} logits, draft "
                f"{self.d_adapter.vocab_size}"
            )
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
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ) -> SpecOutput:
        cfg = self.config
        gen_cfg = self.target.generation_config
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, model_kwargs)
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("streamer supports batch size 1 only (as in transformers)")
        if max_new_tokens is None:
            max_new_tokens = gen_cfg.max_new_tokens if gen_cfg.max_new_tokens is not None else 20
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = eos_token_id if eos_token_id is not None else gen_cfg.eos_token_id
        eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                               dtype=torch.long, device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else gen_cfg.pad_token_id
        if pad is None:
            pad = int(eos_ids[0]) if eos_ids.numel() else 0
        if do_sample:
            temperature = gen_cfg.temperature if temperature is None else temperature
            top_k = gen_cfg.top_k if top_k is None else top_k
            top_p = gen_cfg.top_p if top_p is None else top_p
            if temperature is None or temperature <= 0:
                raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
            if generator is None:
                generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
        sampling = (temperature or 1.0, top_k, top_p) if do_sample else None

        stats = SpecStats(accept_histogram=[0] * (cfg.draft_len + 1))
        t0 = time.perf_counter()
        prompt = self.t_adapter.prompt(input_ids, attention_mask, model_kwargs)
        target = ModelState(self.target, self.t_adapter)
        draft = ModelState(self.draft, self.d_adapter)
        first = self._prefill(prompt, target, draft, stats, sampling, generator)
        stats.prefill_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        new_tokens = self._decode(prompt, target, draft, first, max_new_tokens, eos_ids, pad, stats, sampling,
                                  generator, streamer)
        stats.decode_seconds = time.perf_counter() - t1
        stats.target_calls = target.calls - 1
        stats.draft_calls = draft.calls
        if streamer is not None:
            streamer.end()
        return SpecOutput(sequences=torch.cat([input_ids, new_tokens], dim=1), stats=stats)

    # ------------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, model_kwargs):
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds-only generation is not supported)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        for name, model in (("target", self.target), ("draft", self.draft)):
            if model.device != input_ids.device:
                raise ValueError(f"input_ids are on {input_ids.device} but the {name} is on {model.device}")
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids and the processor's visual inputs")
        if model_kwargs.get("past_key_values") is not None:
            raise ValueError("past_key_values is not supported: SpecDecoder manages both models' caches")
        for unsupported in ("num_beams", "num_return_sequences", "assistant_model", "logits_processor"):
            if model_kwargs.get(unsupported) not in (None, 1):
                raise ValueError(f"{unsupported} is not supported by SpecDecoder")
            model_kwargs.pop(unsupported, None)
        for ignored in ("use_cache", "return_dict_in_generate", "output_scores", "generation_config"):
            model_kwargs.pop(ignored, None)
        return input_ids, attention_mask

    def _select(self, logits: torch.Tensor, sampling, generator) -> torch.Tensor:
        """Next token from ``logits [B, V]``: argmax (ties → lowest id) or a draw from the warped distribution."""
        if sampling is None:
            return logits.argmax(dim=-1)
        probs = _warp(logits, *sampling).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # ------------------------------------------------------------------------------------------------
    def _prefill(self, prompt: Prompt, target: ModelState, draft: ModelState, stats, sampling, generator):
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
            embeds_t = self.t_adapter.input_embeddings(prompt.input_ids, prompt.attention_mask,
                                                       prompt.model_kwargs, pos_ids)
            with capturing(self.target, capture):
                logits = target.forward(inputs_embeds=embeds_t, positions=prompt.positions, new_valid=valid,
                                        logits_to_keep=1)
        else:
            logits = target.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=valid,
                                    logits_to_keep=1, **prompt.model_kwargs)
        first = self._select(logits[:, -1], sampling, generator)

        # ---- keep-set ------------------------------------------------------------------------------------
        if prune == "none":
            draft.forward(input_ids=prompt.input_ids, positions=prompt.positions, new_valid=valid, logits_to_keep=1,
                          **prompt.model_kwargs)
            stats.kept_visual_tokens = stats.total_visual_tokens
            return first

        if cfg.prune_source == "draft":
            d_pos = self.d_adapter.model_position_ids(prompt.positions)
            embeds_d = self.d_adapter.input_embeddings(prompt.input_ids, prompt.attention_mask,
                                                       prompt.model_kwargs, d_pos)
            if need_scores:
                capture = self._make_capture(self.draft, prompt, visual_idx)
                with capturing(self.draft, capture):
                    draft.forward(inputs_embeds=embeds_d, positions=prompt.positions, new_valid=valid,
                                  logits_to_keep=1)
            else:
                draft.forward(inputs_embeds=embeds_d, positions=prompt.positions, new_valid=valid, logits_to_keep=1)
            keep_phys = self._keep_rows(prompt, visual_idx, capture, embeds_d, prune)
            stats.kept_visual_tokens = int((keep_phys & vis).sum())
            draft.valid = keep_phys
            draft.compact_()
            return first

        keep_phys = self._keep_rows(prompt, visual_idx, capture, embeds_t, prune)
        stats.kept_visual_tokens = int((keep_phys & vis).sum())
        d_pos = self.d_adapter.model_position_ids(prompt.positions)
        embeds_d = self.d_adapter.input_embeddings(prompt.input_ids, prompt.attention_mask, prompt.model_kwargs,
                                                   d_pos)
        # Gather each row's kept tokens (text + kept visual) to the right end, left-padded; ORIGINAL positions.
        counts = keep_phys.sum(dim=1)
        width = int(counts.max())
        order = torch.argsort(keep_phys.to(torch.int8), dim=1, stable=True)[:, -width:]
        new_valid = torch.gather(keep_phys, 1, order)
        embeds = torch.gather(embeds_d, 1, order[..., None].expand(-1, -1, embeds_d.shape[-1]))
        positions = torch.gather(prompt.positions, 2, order[None].expand(prompt.positions.shape[0], -1, -1))
        draft.forward(inputs_embeds=embeds, positions=positions, new_valid=new_valid, logits_to_keep=1)
        return first

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
    def _decode(self, prompt, target, draft, first, max_new_tokens, eos_ids, pad, stats, sampling, generator,
                streamer):
        gamma = self.config.draft_len
        lp = _Loop(first, prompt.next_pos + 1, max_new_tokens, gamma, pad, eos_ids)
        if streamer is not None:
            streamer.put(prompt.input_ids.cpu())
            streamer.put(first.cpu())
        # Rows that the prefill's token already ended leave before the first round.
        keep = [j for j, d in enumerate((torch.isin(first, eos_ids) | (max_new_tokens <= 1)).tolist()) if not d]
        if not keep:
            return lp.result()
        if len(keep) < first.shape[0]:
            idx = torch.tensor(keep, dtype=torch.long, device=first.device)
            for part in (lp, target, draft):
                part.select_rows(idx)
        while True:
            drafts, d_probs = self._draft_chain(draft, lp, sampling, generator)
            t_base = target.length
            t_logits = self._target_chain(target, lp, drafts)
            acc, emitted = self._verify(t_logits, drafts, d_probs, sampling, generator)
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

    def _draft_chain(self, draft: ModelState, lp: _Loop, sampling, generator):
        """Feed the draft the committed tokens it has not seen, then let it propose γ tokens (γ forwards).

        Returns ``drafts [B, γ]`` and, when sampling, the draft's warped distributions ``[B, γ, V]``.
        """
        gamma = self.config.draft_len
        device = lp.last.device
        w = lp.pend_width
        feed = lp.pend_d[:, -w:]
        feed_pos = (lp.next_pos - w)[:, None] + torch.arange(w, device=device)[None]
        logits = draft.forward(input_ids=feed.clamp_min(0), positions=self.d_adapter.decode_positions(feed_pos),
                               new_valid=feed >= 0, logits_to_keep=1)[:, -1]
        d_tokens, d_probs = [], []
        pos = lp.next_pos
        ones = torch.ones_like(lp.last, dtype=torch.bool)[:, None]
        for i in range(gamma):
            if sampling is not None:
                probs = _warp(logits, *sampling).softmax(dim=-1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                d_probs.append(probs)
            else:
                tok = logits.argmax(dim=-1)
            d_tokens.append(tok)
            if i + 1 < gamma:
                logits = draft.forward(input_ids=tok[:, None], positions=self.d_adapter.decode_positions(pos[:, None]),
                                       new_valid=ones, logits_to_keep=1)[:, -1]
                pos = pos + 1
        return torch.stack(d_tokens, dim=1), (torch.stack(d_probs, dim=1) if d_probs else None)

    def _target_chain(self, target: ModelState, lp: _Loop, drafts: torch.Tensor) -> torch.Tensor:
        """One target forward over ``[last, d_1 .. d_γ]``; logits ``[B, γ+1, V]``."""
        t_in = torch.cat([lp.last[:, None], drafts], dim=1)
        t_pos = (lp.next_pos - 1)[:, None] + torch.arange(t_in.shape[1], device=t_in.device)[None]
        return target.forward(input_ids=t_in, positions=self.t_adapter.decode_positions(t_pos),
                              new_valid=torch.ones_like(t_in, dtype=torch.bool))

    def _verify(self, t_logits, drafts, d_probs, sampling, generator):
        """``(accept_len [B], tokens [B, γ+1])``: tokens[:, :acc+1] are the round's tokens (accepted drafts, then
        the target's correction or bonus token)."""
        if sampling is None:
            return ops.verify_greedy(t_logits, drafts, check_ids=False)
        return ops.verify_sampling(_warp(t_logits, *sampling), d_probs, drafts, temperature=1.0, generator=generator,
                                   check_ids=False)

    def _end_round(self, lp: _Loop, target: ModelState, draft: ModelState, acc, n_new, fin, emitted, stats,
                   streamer) -> bool:
        """The round's ONE host sync: accept lengths, finished rows and both caches' extents.

        Updates stats, streams, trims and (when holes pile up) compacts both caches, drops finished rows.
        Returns False when no row is left.
        """
        B = acc.shape[0]
        host = torch.cat([acc, n_new, fin.long(), target.extent(), draft.extent()]).tolist()
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
                state.compact_()
                stats.compactions += 1
        keep = [j for j, f in enumerate(fin_h) if not f]
        if not keep:
            return False
        if len(keep) < B:
            idx = torch.tensor(keep, dtype=torch.long, device=acc.device)
            for part in (lp, target, draft):
                part.select_rows(idx)
            acc_h = [acc_h[j] for j in keep]
            acc = acc[idx]
        lp.pend_width = 2 if max(acc_h) == self.config.draft_len else 1
        return True


class _Loop:
    """Bookkeeping of the decode loop over the active batch rows (device tensors, no host syncs).

    out: ``[B, max_new_tokens + γ + 1]`` generated tokens per ORIGINAL row (the tail is scratch for masked
    scatters); n_out: tokens each original row has; rows: original index of each active row; next_pos: logical
    position of the token after ``last``; last: each active row's last committed token (not yet in the target's
    cache); pend_d: committed tokens the draft has not seen, right-aligned, −1 = none; pend_width: host-known
    number of columns of pend_d to feed (2 only after a round in which some row accepted every draft token).
    """

    def __init__(self, first, next_pos, max_new_tokens, gamma, pad, eos_ids):
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
        return n_new, fin

    def select_rows(self, idx: torch.Tensor) -> None:
        self.rows, self.next_pos, self.last = self.rows[idx], self.next_pos[idx], self.last[idx]
        self.pend_d = self.pend_d[idx]

    def result(self) -> torch.Tensor:
        width = int(self.n_out.max())
        return self.out[:, :width]


def _semantics(embeds_row: torch.Tensor, spans, visual_idx_row: torch.Tensor):
    """Temporal novelty, spatial complexity and frame id of one row's visual tokens, in visual_idx order.

    visual_idx_row: ``[Nmax]`` physical indices of the row's visual tokens (−1 padding: zeros there).
    """
    n = visual_idx_row.shape[0]
    device = embeds_row.device
    temporal = torch.zeros(n, dtype=torch.float32, device=device)
    spatial = torch.zeros_like(temporal)
    frame_ids = torch.zeros(n, dtype=torch.long, device=device)
    where = {int(r): i for i, r in enumerate(visual_idx_row.tolist()) if r >= 0}
    frame_base = 0
    for span in spans:
        first = where[span.start]
        if span.grid is None:
            frame_ids[first:first + span.length] = frame_base
            frame_base += 1
            continue
        t, h, w = span.grid
        x = embeds_row[span.start:span.start + t * h * w].float()[None]
        tem, spa = ops.frame_semantic_scores(x, (t, h, w))
        temporal[first:first + t * h * w] = tem[0]
        spatial[first:first + t * h * w] = spa[0]
        frame_ids[first:first + t * h * w] = frame_base + torch.arange(t, device=device).repeat_interleave(h * w)
        if span.length > t * h * w:  # LLaVA-OneVision's newline token joins the last frame
            frame_ids[first + t * h * w:first + span.length] = frame_base + t - 1
        frame_base += t
    return temporal, spatial, frame_ids
