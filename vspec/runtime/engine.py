"""SpecDecoder: lossless speculative decoding of an HF Video-LLM with a pruned-vision draft.

Serial chain schedule, per round and for every active batch row b:

1. the draft is fed the committed tokens it has not seen (1 or 2) and proposes γ tokens, one forward each;
2. the target runs ONE forward over ``[last committed token, d_1 .. d_γ]``;
3. ``verify_greedy`` / ``verify_sampling`` give ``accept_len[b]`` and the correction/bonus token;
4. rejected slots become holes in both caches (see :mod:`vspec.runtime.state`); positions never move.

One host sync per round (the accepted lengths). Rows that hit EOS or ``max_new_tokens`` leave the batch.
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
        device = first.device
        B = first.shape[0]
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        n_out = torch.zeros(B, dtype=torch.long, device=device)
        out[:, 0] = first
        n_out[:] = 1
        if streamer is not None:
            streamer.put(prompt.input_ids.cpu())
            streamer.put(first.cpu())
        done = torch.isin(first, eos_ids) | (n_out >= max_new_tokens)
        rows = torch.arange(B, device=device)  # original batch index of each active row
        next_pos = prompt.next_pos + 1  # logical position of the token after `last`, per active row
        # Committed tokens not yet in each model's cache (right-aligned, -1 = none): target 1, draft 1 or 2.
        pend_d = torch.stack([torch.full_like(first, -1), first], dim=1)
        last = first.clone()

        while True:
            active = ~done[rows]
            if not bool(active.all()):
                keep = active.nonzero().flatten()
                if keep.numel() == 0:
                    break
                rows, next_pos, pend_d, last = rows[keep], next_pos[keep], pend_d[keep], last[keep]
                target.select_rows(keep)
                draft.select_rows(keep)
            budget = max_new_tokens - n_out[rows]  # tokens each row may still emit

            # ---- draft: catch up on pending tokens, then propose γ tokens -----------------------------
            has = pend_d >= 0
            width = 2 if bool(has[:, 0].any()) else 1
            feed = pend_d[:, -width:]
            feed_valid = has[:, -width:]
            feed_pos = (next_pos - width)[:, None] + torch.arange(width, device=device)[None]
            logits = draft.forward(input_ids=feed.clamp_min(0), positions=self.d_adapter.decode_positions(feed_pos),
                                   new_valid=feed_valid, logits_to_keep=1)[:, -1]
            d_tokens, d_probs = [], []
            pos = next_pos.clone()
            for i in range(gamma):
                if sampling is not None:
                    probs = _warp(logits, *sampling).softmax(dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                    d_probs.append(probs)
                else:
                    tok = logits.argmax(dim=-1)
                d_tokens.append(tok)
                if i + 1 < gamma:
                    logits = draft.forward(input_ids=tok[:, None],
                                           positions=self.d_adapter.decode_positions(pos[:, None]),
                                           new_valid=torch.ones_like(tok, dtype=torch.bool)[:, None],
                                           logits_to_keep=1)[:, -1]
                    pos = pos + 1
            drafts = torch.stack(d_tokens, dim=1)  # [B, γ]

            # ---- target: one forward over [last, d_1 .. d_γ] ----------------------------------------
            t_in = torch.cat([last[:, None], drafts], dim=1)
            t_pos = (next_pos - 1)[:, None] + torch.arange(gamma + 1, device=device)[None]
            t_base = target.length
            t_logits = target.forward(input_ids=t_in, positions=self.t_adapter.decode_positions(t_pos),
                                      new_valid=torch.ones_like(t_in, dtype=torch.bool))
            if sampling is None:
                acc, tgt = ops.verify_greedy(t_logits, drafts, check_ids=False)
            else:
                warped = _warp(t_logits, *sampling)
                acc, tgt = ops.verify_sampling(warped, torch.stack(d_probs, dim=1), drafts, temperature=1.0,
                                               generator=generator, check_ids=False)
            # Greedy: target argmaxes, of which the first acc equal the drafts. Sampling: the accepted drafts, then
            # the drawn token. Either way positions 0..acc are the round's tokens.
            emitted = tgt
            # Truncate at EOS (inclusive) and at the budget.
            n_new = acc + 1
            idx = torch.arange(gamma + 1, device=device)[None]
            is_eos = torch.isin(emitted, eos_ids) & (idx < n_new[:, None])
            first_eos = torch.where(is_eos, idx, gamma + 1).amin(dim=1)
            n_new = torch.minimum(torch.minimum(n_new, first_eos + 1), budget)
            n_new_h, acc_h = n_new.tolist(), acc.tolist()  # the round's one host sync

            stats.rounds += 1
            for a, n in zip(acc_h, n_new_h):
                stats.row_rounds += 1
                stats.emitted += n
                stats.accept_histogram[a] += 1
            for j, (r, n) in enumerate(zip(rows.tolist(), n_new_h)):
                start = int(n_out[r])
                out[r, start:start + n] = emitted[j, :n]
            if streamer is not None and n_new_h[0] > 0:
                streamer.put(emitted[0, :n_new_h[0]].cpu())
            n_out[rows] += n_new
            done[rows] |= (first_eos < n_new) | (n_out[rows] >= max_new_tokens)

            # ---- roll both caches back to what was accepted ----------------------------------------
            # target cache holds [last, d_1..d_γ]: valid are last + the first acc accepted drafts
            target.invalidate(t_base + 1 + acc, t_base + gamma + 1)
            # draft cache holds the pending feed + d_1..d_{γ-1}: valid are d_1..d_min(acc, γ-1)
            d_base = draft.length - (gamma - 1)
            draft.invalidate(d_base + torch.clamp(acc, max=gamma - 1), draft.length)
            last = torch.gather(emitted, 1, (n_new - 1).clamp_min(0)[:, None]).squeeze(1)
            all_acc = acc == gamma
            pend_d = torch.stack([torch.where(all_acc, drafts[:, -1], -1), last], dim=1)
            next_pos = next_pos + n_new
            for state in (target, draft):
                if state.holes() >= self.config.compact_holes:
                    state.compact_()
                    stats.compactions += 1

        width = int(n_out.max())
        return out[:, :width]


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
