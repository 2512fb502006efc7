"""Generation settings resolved as ``generate`` resolves them, and the logits rules they imply.

``resolve_generation`` merges the model's ``generation_config``, a ``generation_config=`` argument and keyword
arguments with transformers' own precedence (it calls the model's ``_prepare_generation_config`` and
``_prepare_generated_length``), validates the model inputs as ``generate`` does, and refuses by name every option
that would change the tokens and that vspec does not apply. Nothing generation-related reaches a model's forward.

:class:`LogitsRules` applies the supported logits processors to MANY positions at once: every verify position of a
round (chain: ``[last, d_1 .. d_γ]``; tree: every node) has its own history — the row's prompt and committed tokens
plus the drafts before it — and the rules see exactly that history, batched on the device, no host sync. The
processors and their order are transformers' (``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``,
``min_length``, ``min_new_tokens``, ``suppress_tokens``, ``begin_suppress_tokens``; then, when sampling,
``temperature``, ``top_k``, ``top_p``, ``min_p``); each is written to give the same floats as transformers' class
(tests compare them position by position with the classes themselves).

A position is described by its *extra* tokens: ``extra [B, n, m]`` holds, per position, the tokens appended after
the row's committed history (the drafts before it, in order), left-aligned and −1-padded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# Options applied by vspec (to the target's verification logits and to the draft's proposals alike).
APPLIED = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "eos_token_id", "pad_token_id", "return_dict_in_generate",
})
# Options that do not change which tokens greedy or sampled decoding with ``num_beams=1`` produces (how the cache is
# built, ids used by encoder-decoders only, beam-search-only knobs that transformers ignores for one beam, knobs of
# assistant models, which vspec never uses).
NEUTRAL = frozenset({
    "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "compile_config", "disable_compile", "prefill_chunk_size", "continuous_batching_config", "is_assistant",
    "early_stopping", "length_penalty", "low_memory", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "max_matching_ngram_size", "assistant_lookbehind", "target_lookbehind",
    "transformers_version",
})
# ``generate`` arguments that are not generation-config fields, refused unless empty.
GENERATE_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
                 "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer",
                 "use_model_defaults")


@dataclass(frozen=True)
class GenerationSettings:
    """What one ``generate`` call decodes with (resolved; see :func:`resolve_generation`).

    ``sample``: draw tokens (``do_sample`` with a non-deterministic warper). ``do_sample=True`` with ``top_k=1`` — what
    Qwen2-VL / Qwen2.5-VL Instruct checkpoints ship — keeps one token per step, so it decodes greedily on the processed
    logits (``sample`` False), as ``generate`` does in effect. ``min_length`` is absolute (prompt length included, the
    left padding too, as in transformers); ``prompt_len`` is the padded prompt length. ``penalty_skips_padding``:
    whether the installed transformers leaves left padding out of the repetition penalty (5.24 does, 5.17 does not).
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    prompt_len: int
    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    penalty_skips_padding: bool = True
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    min_length: int = 0
    min_new_tokens: int = 0
    return_dict_in_generate: bool = False

    @property
    def needs_sequence(self) -> bool:
        """Whether a rule reads the token order of the history (not only the set of tokens in it)."""
        return self.no_repeat_ngram_size > 0 or any(len(w) > 1 for w in self.bad_words_ids)

    @property
    def history_free(self) -> bool:
        return self.repetition_penalty == 1.0 and not self.needs_sequence and not self.begin_suppress_tokens and \
            self.min_length == 0 and self.min_new_tokens == 0


def _penalty_skips_padding() -> bool:
    from transformers.generation.utils import GenerationMixin

    try:
        return "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor)
    except (OSError, TypeError):  # no source shipped: assume the newest behaviour
        return True


def _default(key):
    from transformers import GenerationConfig

    return GenerationConfig._get_default_generation_params().get(key)


def _is_default(key, value) -> bool:
    if key.startswith("_"):
        return True
    d = _default(key)
    if value == d:
        return True
    # False / empty against an unset default (a number is never taken as unset: guidance_scale=0 is not None)
    empty = value is False or (isinstance(value, (list, tuple, dict, str)) and not value)
    return empty and not d


def resolve_generation(model, input_ids: torch.Tensor, generation_config=None, **kwargs):
    """``(GenerationSettings, model_kwargs)`` for ``model.generate(input_ids, generation_config=..., **kwargs)``.

    Raises ``ValueError`` naming every option that changes the tokens and is not applied by vspec, every ``generate``
    argument it does not support, and (through transformers' own check) every keyword that is neither a generation
    option nor a model input.
    """
    for name in GENERATE_ARGS:
        value = kwargs.pop(name, None)
        if value is None or value is False or (hasattr(value, "__len__") and len(value) == 0):
            continue
        raise ValueError(f"vspec does not support generate's {name}= argument (it would change the tokens or the "
                         f"decoding mode); got {type(value).__name__}")
    kwargs.pop("tokenizer", None)  # only read by stop_strings, which is refused below
    user_max_length = kwargs.get("max_length")
    user_min_length = kwargs.get("min_length")
    has_default_max = user_max_length is None and (generation_config is None or generation_config.max_length is None) \
        and model.generation_config.max_length is None
    has_default_min = user_min_length is None and (generation_config is None or generation_config.min_length is None) \
        and model.generation_config.min_length is None
    gen, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    # _prepare_generation_config hands output_attentions / output_hidden_states on to the forward; vspec refuses them
    for key in ("output_attentions", "output_hidden_states"):
        model_kwargs.pop(key, None)
    model._validate_model_kwargs(dict(model_kwargs))

    refused = sorted(k for k, v in gen.to_dict().items()
                     if k not in APPLIED and k not in NEUTRAL and not _is_default(k, v))
    if gen.num_beams not in (None, 1) and "num_beams" not in refused:
        refused.append("num_beams")
    if refused:
        raise ValueError(
            "vspec does not apply these generation options, which would change the tokens (or the output format): "
            + ", ".join(f"{k}={getattr(gen, k)!r}" for k in refused)
            + ". Unset them (they may come from the model's generation_config) or use the unpatched generate."
        )

    L = input_ids.shape[1]
    gen = model._prepare_generated_length(gen, has_default_max, has_default_min, "input_ids", L, input_ids)
    max_new = gen.max_length - L
    if max_new < 1:
        raise ValueError(f"max_length ({gen.max_length}) leaves no room for a new token after the {L}-token prompt; "
                         "set max_new_tokens")

    eos = gen.eos_token_id
    eos_ids = () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos))
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    do_sample = bool(gen.do_sample)
    temperature = 1.0 if gen.temperature is None else float(gen.temperature)
    top_k = gen.top_k if gen.top_k not in (None, 0) else None
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {gen.temperature}")
    rep = 1.0 if gen.repetition_penalty is None else float(gen.repetition_penalty)
    if not rep > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {gen.repetition_penalty}")
    bad = gen.bad_words_ids
    if bad is not None:
        if not isinstance(bad, list) or not bad or any(not isinstance(w, list) or not w for w in bad):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad}")
        bad = tuple(tuple(int(t) for t in w) for w in bad)
    settings = GenerationSettings(
        max_new_tokens=int(max_new),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        prompt_len=L,
        sample=do_sample and top_k != 1,
        temperature=temperature,
        top_k=top_k,
        top_p=float(gen.top_p) if gen.top_p is not None and gen.top_p < 1.0 else None,
        min_p=float(gen.min_p) if gen.min_p is not None else None,
        repetition_penalty=rep,
        penalty_skips_padding=_penalty_skips_padding(),
        no_repeat_ngram_size=int(gen.no_repeat_ngram_size or 0),
        bad_words_ids=bad or (),
        suppress_tokens=tuple(int(t) for t in (gen.suppress_tokens or ())),
        begin_suppress_tokens=tuple(int(t) for t in (gen.begin_suppress_tokens or ())),
        min_length=int(gen.min_length or 0) if eos_ids else 0,
        min_new_tokens=int(gen.min_new_tokens or 0) if eos_ids else 0,
        return_dict_in_generate=bool(gen.return_dict_in_generate),
    )
    return settings, model_kwargs


class History:
    """Per active row: what the history-dependent rules read (device tensors, updated without host syncs).

    cur: ``[B]`` committed length (padded prompt length + tokens generated so far), as transformers' ``cur_len``.
    seen: ``[B, V+1]`` bool, the tokens the repetition penalty applies to (column V absorbs padding), or None.
    seq: ``[B, W]`` prompt + committed tokens, or None when no rule reads the order. Updates build new tensors
    (never in place), so a draft running on another stream may keep reading the previous ones.
    """

    def __init__(self, settings: GenerationSettings, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 vocab_size: int, capacity: int):
        B, L = input_ids.shape
        device = input_ids.device
        self.vocab_size = vocab_size
        self.cur = torch.full((B,), L, dtype=torch.long, device=device)
        self.seen = None
        self.seq = None
        if settings.repetition_penalty != 1.0:
            ids = input_ids.clamp(max=vocab_size)
            if settings.penalty_skips_padding:  # transformers: the left padding before a row's first real token
                first = (attention_mask != 0).int().argmax(dim=1)
                ids = ids.masked_fill(torch.arange(L, device=device)[None] < first[:, None], vocab_size)
            self.seen = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=device).scatter_(1, ids, True)
        if settings.needs_sequence:
            self.seq = torch.cat([input_ids, input_ids.new_zeros(B, capacity + 1)], dim=1)

    def commit(self, emitted: torch.Tensor, n_new: torch.Tensor) -> None:
        """Append ``emitted[b, :n_new[b]]`` to each row's history."""
        idx = torch.arange(emitted.shape[1], device=emitted.device)[None]
        ok = idx < n_new[:, None]
        if self.seen is not None:
            self.seen = self.seen.scatter(1, torch.where(ok, emitted.clamp(0, self.vocab_size), self.vocab_size),
                                          True)
        if self.seq is not None:
            spare = self.seq.shape[1] - 1
            cols = torch.where(ok, self.cur[:, None] + idx, spare)
            self.seq = self.seq.scatter(1, cols, emitted.clamp_min(0))
        self.cur = self.cur + n_new

    def select_rows(self, idx: torch.Tensor) -> None:
        self.cur = self.cur[idx]
        if self.seen is not None:
            self.seen = self.seen[idx]
        if self.seq is not None:
            self.seq = self.seq[idx]


def chain_extra(drafts: torch.Tensor, n: int) -> torch.Tensor:
    """Extra tokens of the positions after ``[last, d_1 .. d_{n-1}]``: position i holds ``d_1 .. d_i``.

    Returns ``[B, n, n-1]``."""
    m = max(n - 1, 0)
    d = drafts[:, :m]
    low = torch.arange(m, device=drafts.device)[None, :] < torch.arange(n, device=drafts.device)[:, None]  # [n, m]
    return torch.where(low[None], d[:, None, :], -1)


def tree_extra(tokens: torch.Tensor, anc: torch.Tensor) -> torch.Tensor:
    """Extra tokens of tree nodes: node i holds the tokens of its path below the root, itself included, in depth order.

    tokens ``[B, N]`` (node 0 = the root, already committed), anc ``[B, n, N]`` bool (ancestors and self of n nodes;
    node indices grow along every path, so index order is depth order). Returns ``[B, n, N-1]``.
    """
    a = anc[..., 1:]
    order = torch.argsort((~a).to(torch.int8), dim=-1, stable=True)
    toks = torch.gather(tokens[:, None, 1:].expand_as(a), 2, order)
    return torch.where(torch.gather(a, 2, order), toks, -1)


class LogitsRules:
    """The logits processors of one ``generate`` call, applied to many positions at once (module docstring)."""

    def __init__(self, settings: GenerationSettings, vocab_size: int, device):
        s = settings
        self.settings = s
        self.sample = s.sample
        self.vocab_size = V = vocab_size
        self.identity = s.history_free and not s.suppress_tokens and not s.bad_words_ids
        ar = torch.arange(V, device=device)

        def mask(ids):
            return torch.isin(ar, torch.tensor(ids, dtype=torch.long, device=device)) if ids else None

        self.eos_mask = mask(s.eos_token_ids)
        single = [w[0] for w in s.bad_words_ids if len(w) == 1 and w[0] not in s.eos_token_ids]  # as transformers
        self.static_ban = mask(list(s.suppress_tokens) + single)
        self.begin_ban = mask(s.begin_suppress_tokens)
        groups: dict[int, list[tuple[int, ...]]] = {}
        for w in s.bad_words_ids:
            if len(w) > 1:
                groups.setdefault(len(w) - 1, []).append(w)
        self.bad_groups = [(torch.tensor([w[:-1] for w in ws], device=device),
                            torch.tensor([w[-1] for w in ws], device=device)) for ws in groups.values()]

    def apply(self, logits: torch.Tensor, hist: History | None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Processed logits ``[B, n, V]`` (float32) for ``n`` positions per row.

        ``extra [B, n, m]``: each position's tokens after the committed history (module docstring); None = none.
        ``hist`` None means the history is not known here (a draft speculating past unverified tokens): only the
        rules that read no history are applied. Returns ``logits`` unchanged when no rule is active.
        """
        if self.identity:
            return logits
        s = self.settings
        x = logits.float()
        B, n, V = x.shape
        if hist is None:
            return x.masked_fill(self.static_ban, float("-inf")) if self.static_ban is not None else x
        device = x.device
        if extra is None:
            extra = torch.full((B, n, 0), -1, dtype=torch.long, device=device)
        ext_len = (extra >= 0).sum(dim=-1)  # [B, n]
        cur = hist.cur[:, None] + ext_len  # transformers' cur_len at each position
        if s.repetition_penalty != 1.0:
            seen = hist.seen[:, None, :].expand(B, n, V + 1)
            if extra.shape[-1]:
                seen = seen.scatter(2, torch.where(extra >= 0, extra.clamp(0, V), V), True)
            pen = torch.where(x < 0, x * s.repetition_penalty, x / s.repetition_penalty)
            x = torch.where(seen[..., :V], pen, x)
        ban = torch.zeros(B, n, V + 1, dtype=torch.bool, device=device)
        if hist.seq is not None:
            seq = self._sequences(hist, extra, ext_len)  # [B, n, W]
            if s.no_repeat_ngram_size > 0:
                self._ban_ngrams(ban, seq, cur, s.no_repeat_ngram_size)
            for prefixes, last in self.bad_groups:
                P = prefixes.shape[1]
                cols = (cur[..., None] - P + torch.arange(P, device=device)).clamp_min(0)
                tail = torch.gather(seq, 2, cols)  # [B, n, P]
                hit = (tail[:, :, None, :] == prefixes[None, None]).all(dim=-1) & (cur >= P)[..., None]  # [B, n, G]
                ban.scatter_(2, torch.where(hit, last[None, None].expand_as(hit), V), True)
        ban = ban[..., :V]
        if self.eos_mask is not None:
            short = (cur < s.min_length) | (cur - s.prompt_len < s.min_new_tokens)
            ban |= short[..., None] & self.eos_mask
        if self.static_ban is not None:
            ban |= self.static_ban
        if self.begin_ban is not None:
            ban |= (cur == s.prompt_len)[..., None] & self.begin_ban
        return x.masked_fill(ban, float("-inf"))

    def _sequences(self, hist: History, extra: torch.Tensor, ext_len: torch.Tensor) -> torch.Tensor:
        B, n, m = extra.shape
        W = hist.seq.shape[1]
        seq = hist.seq[:, None, :].expand(B, n, W)
        if m == 0:
            return seq
        cols = hist.cur[:, None, None] + torch.arange(m, device=extra.device)
        cols = torch.where(extra >= 0, cols, W - 1)  # the spare last column
        return seq.scatter(2, cols, extra.clamp_min(0))

    @staticmethod
    def _ban_ngrams(ban: torch.Tensor, seq: torch.Tensor, cur: torch.Tensor, g: int) -> None:
        V = ban.shape[-1] - 1
        win = seq.unfold(2, g, 1)  # [B, n, K, g]
        k = torch.arange(win.shape[2], device=seq.device)
        if g > 1:
            cols = (cur[..., None] - g + 1 + torch.arange(g - 1, device=seq.device)).clamp_min(0)
            prefix = torch.gather(seq, 2, cols)  # [B, n, g-1]
            match = (win[..., :-1] == prefix[:, :, None, :]).all(dim=-1)
        else:
            match = torch.ones(win.shape[:3], dtype=torch.bool, device=seq.device)
        match &= (k[None, None] <= (cur - g)[..., None]) & (cur >= g)[..., None]
        ban.scatter_(2, torch.where(match, win[..., -1].clamp(max=V), V), True)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """transformers' sampling warpers in its order: temperature, top-k, top-p, min-p (float32, −inf cuts)."""
        s = self.settings
        x = logits.float()
        if s.temperature != 1.0:
            x = x / s.temperature
        V = x.shape[-1]
        if s.top_k is not None and s.top_k < V:
            kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if s.top_p is not None:
            sorted_x, sorted_idx = torch.sort(x, dim=-1, descending=False)
            cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cum <= (1 - s.top_p)
            remove_sorted[..., -1:] = False
            x = x.masked_fill(remove_sorted.scatter(-1, sorted_idx, remove_sorted), float("-inf"))
        if s.min_p is not None:
            probs = x.softmax(dim=-1)
            remove = probs < s.min_p * probs.amax(dim=-1, keepdim=True)
            top = torch.topk(probs, 1, dim=-1).indices
            remove = remove.scatter(-1, top, False)
            x = x.masked_fill(remove, float("-inf"))
        return x

    def select(self, logits: torch.Tensor, hist: History | None, generator=None) -> torch.Tensor:
        """The next token at one position per row (``logits [B, V]``): argmax (ties → lowest id) or a draw."""
        x = self.apply(logits[:, None], hist)[:, 0]
        if not self.sample:
            return x.argmax(dim=-1)
        return torch.multinomial(self.warp(x).softmax(dim=-1), 1, generator=generator).squeeze(-1)
