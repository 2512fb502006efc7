"""One model's decoding state: its KV cache, which physical slots are valid, and forward calls.

Every forward appends the same number of physical slots to every batch row. Slots that do not hold a real token
of that row — left padding, rejected speculative tokens, a row with fewer tokens to feed this round — are
*holes*: ``valid`` is False there and the slot is passed as 0 in the 2-D attention mask, so no query ever
attends to it. Logical positions are always passed explicitly, so holes never shift a token's position, and a
batch row can accept a different number of tokens than its neighbours without moving any cache data.
:meth:`compact_` squeezes holes out with ``ops.compact_kv_`` when they pile up.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .cache import SpecCache
from .linear_state import LinearAttentionState
from .models import ModelAdapter


def padded_indices(mask: torch.Tensor, n_max: int | None = None) -> torch.Tensor:
    """``[B, L]`` bool → ``[B, Nmax]`` int64 ascending column indices of the True entries, −1 padded.

    ``n_max``: the largest row count when the caller already knows it on the host (saves a host sync).
    """
    counts = mask.sum(dim=1)
    if n_max is None:
        n_max = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n_max]
    keep = torch.arange(n_max, device=mask.device)[None, :] < counts[:, None]
    return torch.where(keep, order, torch.full_like(order, -1))


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.24 (``past_key_values`` is deprecated there,
    removal announced for 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def compiled_runner(model, setting):
    """What runs a model's fixed-shape decode forwards for ``SpecConfig.compile = setting``: the model itself
    (``False``), or ``torch.compile`` of it (``True``: default mode; a string: that mode; a dict: the keyword
    arguments of ``torch.compile``). ``dynamic=False``: every (batch, new tokens) shape gets its own graph."""
    if setting is False or setting is None:
        return model
    kwargs = {} if setting is True else {"mode": setting} if isinstance(setting, str) else dict(setting)
    kwargs.setdefault("dynamic", False)
    compiled = torch.compile(model, **kwargs)

    def run(**inputs):
        # one graph per (batch, new tokens) and model: more than dynamo's default of 8 per code object (the
        # models of one family share their forward's code), so the limit is raised for these calls only
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(**inputs)

    return run


RECOMPILE_LIMIT = 64  # graphs per code object on the compiled path (batch sizes × forward widths × models)


class ModelState:
    """KV storage + validity mask of one model for the active batch rows.

    The prefill runs on a ``DynamicCache``; right after it, the keys and values move once into a preallocated
    :class:`~vspec.runtime.cache.SpecCache` sized for the whole call (prefill + ``reserve`` slots): every later
    forward writes its new slots in place, rollback is a length move, compaction runs in place with one
    ``compact_kv_`` per device, and the validity mask is a preallocated ``[B, S_max]`` buffer. Storage is
    reallocated only when rows leave the batch (``select_rows``) or, should ``reserve`` be too small, when it grows
    (counted in ``cache.reallocations``).

    ``fixed_shapes`` (the compiled path, ``SpecConfig(compile=...)``): every forward after the prefill attends over
    all ``S_max`` slots under a 4-D mask built here, and the cache writes its new slots at explicit indices
    (``SpecCache.write_pos``), so a forward's shapes depend only on (batch, new tokens) and never on the length;
    ``runner`` (default: the model itself) is what runs those forwards, e.g. ``torch.compile(model)``.

    valid: ``[B, S]`` bool over the physical slots in use (a view of the mask buffer after the prefill).

    linear: the states of a hybrid model's linear-attention layers
    (:class:`~vspec.runtime.linear_state.LinearAttentionState`, None for a pure-attention model): every forward feeds
    them (skipping holes), :meth:`invalidate` rolls them back exactly (not by masking: only a suffix of each row can
    be rejected), :meth:`truncate` / :meth:`compact_` / :meth:`select_rows` keep their journal in step; the storage
    holds keys and values of the attention layers only. Hybrid models decode on the eager path.
    """

    def __init__(self, model, adapter: ModelAdapter, *, reserve: int = 256, fixed_shapes: bool = False,
                 runner=None):
        from transformers import DynamicCache

        self.model = model
        self.adapter = adapter
        self.reserve = reserve
        self.fixed_shapes = fixed_shapes
        self.runner = runner if runner is not None else model
        self.cache = DynamicCache(config=model.config)
        self._cache_kw = cache_keyword(model)
        self._valid: torch.Tensor | None = None  # the prefill's mask, until the storage is static
        self.calls = 0
        # [linear-attention hook] the linear layers' states live outside the cache; only attention layers hold KV
        linear = adapter.linear_attention_modules()
        self.linear = LinearAttentionState(linear) if linear else None
        self._kv_skip = frozenset(linear)
        if self.linear is not None and fixed_shapes:
            raise ValueError("fixed shapes (SpecConfig(compile=...)) are not supported for hybrid linear-attention "
                             "models yet: their layers' state step is not capturable; use the eager path")

    @property
    def static(self) -> bool:
        """Whether the state runs on its preallocated storage (every forward after the prefill)."""
        return isinstance(self.cache, SpecCache)

    @property
    def valid(self) -> torch.Tensor | None:
        if self.static:
            return self.cache.valid[:, :self.cache.length]
        return self._valid

    @valid.setter
    def valid(self, v: torch.Tensor) -> None:
        if not self.static:
            self._valid = v
            return
        n = v.shape[1]
        if n != self.cache.length:
            raise ValueError(f"valid must cover the {self.cache.length} slots in use, got {n}")
        self.cache.valid[:, :n] = v

    @property
    def length(self) -> int:
        if self.static:
            return self.cache.length
        return 0 if self._valid is None else self._valid.shape[1]

    def _make_static(self) -> None:
        """Move the prefill's keys/values into a SpecCache with room for ``reserve`` more slots (once)."""
        n = self._valid.shape[1]
        cache = SpecCache.from_dynamic(self.cache, max_length=n + self.reserve, valid=self._valid,
                                       config=self.model.config, grow=True, no_kv=self._kv_skip)
        cache.mark_appends_valid = False  # the state writes each forward's valid slots itself
        self.cache, self._valid = cache, None
        self._mark_static()

    def _mark_static(self) -> None:
        """Compiled path: tell dynamo the storages keep their addresses (CUDA graphs then write them in place
        instead of copying them in and out)."""
        if self.fixed_shapes and self.runner is not self.model:
            for st in self.cache.storages:
                torch._dynamo.mark_static_address(st)

    def _append_valid(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Record the validity of ``n`` new slots; return the 2-D mask over all slots the forward sees."""
        if not self.static:
            self._valid = new_valid if self._valid is None else torch.cat([self._valid, new_valid], dim=1)
            return self._valid
        c = self.cache
        start, end = c.length, c.length + new_valid.shape[1]
        c.ensure_capacity(end)
        c.valid[:, start:end] = new_valid
        return c.valid[:, :end]

    def _call(self, **kwargs):
        out = self.model(**{self._cache_kw: self.cache}, use_cache=True, **kwargs)
        self.calls += 1
        if not self.static:
            self._make_static()
        return out.logits

    def _fixed_call(self, new_valid: torch.Tensor, tree_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """A forward of ``q`` new slots per row at fixed shapes: writes at ``[length, length + q)`` through
        ``write_pos``, attends over all ``S_max`` slots under the 4-D additive mask ``[B, 1, q, S_max]``."""
        c = self.cache
        B, q = new_valid.shape
        start = c.length
        c.ensure_capacity(start + q)
        c.valid[:, start:start + q] = new_valid
        cols = torch.arange(c.max_length, device=c.valid.device)
        rows = start + torch.arange(q, device=c.valid.device)
        allowed = c.valid[:, None, :] & (cols[None, None, :] <= rows[None, :, None])  # causal over the new slots
        if tree_mask is not None:
            k = tree_mask.shape[2]
            allowed[:, :, start + q - k:start + q] = tree_mask
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        c.write_pos = rows
        try:
            out = self.runner(**{self._cache_kw: c}, use_cache=True, attention_mask=mask[:, None], **kwargs)
        finally:
            c.write_pos = None
        c.set_length(start + q)  # (keeps the new slots' validity, written above)
        self.calls += 1
        return out.logits

    def forward(self, *, positions: torch.Tensor, new_valid: torch.Tensor, input_ids=None, inputs_embeds=None,
                logits_to_keep: int = 0, **model_kwargs) -> torch.Tensor:
        """Append ``n`` slots per row and return logits ``[B, n or logits_to_keep, V]``.

        positions: ``[P, B, n]`` logical positions; new_valid: ``[B, n]`` bool.
        """
        if self.fixed_shapes and self.static:
            return self._fixed_call(new_valid, None, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                    position_ids=self.adapter.model_position_ids(positions),
                                    logits_to_keep=logits_to_keep, **model_kwargs)
        start = self.length
        mask = self._append_valid(new_valid)
        # [linear-attention hook] linear layers read/write self.linear during this forward, skipping holes
        with self.linear.step(start, new_valid) if self.linear is not None else contextlib.nullcontext():
            return self._call(input_ids=input_ids, inputs_embeds=inputs_embeds,
                              position_ids=self.adapter.model_position_ids(positions), attention_mask=mask.long(),
                              logits_to_keep=logits_to_keep, **model_kwargs)

    def forward_tree(self, *, input_ids: torch.Tensor, positions: torch.Tensor,
                     tree_mask: torch.Tensor) -> torch.Tensor:
        """Append ``n`` tree nodes per row under tree attention; logits ``[B, n, V]``.

        tree_mask: ``[B, n, k]`` bool, k >= n: which of the LAST k slots (after the append; the n new ones are the
        last n) each new node attends to (its ancestors and itself). Slots before those are seen as the 2-D
        ``valid`` says. positions: ``[P, B, n]`` logical positions (root position + depth).

        The model gets a 4-D additive float mask ``[B, 1, n, S]`` (0 = attend, dtype min = masked) in its own
        dtype: transformers passes a 4-D mask through unchanged, sdpa adds a float mask and eager attention adds
        whatever it gets (a bool mask would be added as 0/1 there), so this one format serves both.
        """
        if self.linear is not None:  # [linear-attention hook]
            raise NotImplementedError("tree forwards need a linear-attention state per tree node; hybrid models "
                                      "(Qwen3.5) decode with chains")
        B, n, k = tree_mask.shape
        if self.fixed_shapes and self.static:
            return self._fixed_call(tree_mask.new_ones(B, n), tree_mask, input_ids=input_ids,
                                    position_ids=self.adapter.model_position_ids(positions))
        valid = self._append_valid(tree_mask.new_ones(B, n))
        head = valid[:, : valid.shape[1] - k]
        allowed = torch.cat([head[:, None, :].expand(B, n, head.shape[1]), tree_mask], dim=2)
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return self._call(input_ids=input_ids, position_ids=self.adapter.model_position_ids(positions),
                          attention_mask=mask[:, None])

    def keep_only(self, start: int, keep: torch.Tensor) -> None:
        """Slots ``[start, start + n)`` of row b stay valid only where ``keep[b]`` ``[B, n]`` is True (the rest
        become holes): a device op, no sync."""
        if self.linear is not None:  # [linear-attention hook]
            raise NotImplementedError("keep_only cannot roll back linear-attention layers (only a suffix can be "
                                      "rejected: ModelState.invalidate)")
        n = keep.shape[1]
        self.valid[:, start:start + n] &= keep

    def truncate(self, n: int) -> None:
        """Roll the physical length back to ``n`` slots (a length move: the storage stays)."""
        if n >= self.length:
            return
        if self.linear is not None:  # [linear-attention hook]
            self.linear.truncate(n)
        self.cache.crop(n)

    def invalidate(self, start: torch.Tensor, stop: int, *, trim: bool = True) -> None:
        """Mark slots ``[start[b], stop)`` of every row b as holes.

        With ``trim`` the trailing all-hole slots are dropped at once (a host sync); the decode loop passes
        ``trim=False`` and calls :meth:`truncate` with the length from :meth:`extent`, read in its one sync.
        """
        before = None
        if self.linear is not None:  # [linear-attention hook] (1/2) only a suffix can be rejected
            if stop != self.length:
                raise NotImplementedError(f"linear-attention layers can only reject a suffix: stop must be the "
                                          f"length {self.length}, got {stop}")
            before = self.valid.clone()
        valid = self.valid
        cols = torch.arange(valid.shape[1], device=valid.device)
        valid &= ~((cols[None, :] >= start[:, None]) & (cols[None, :] < stop))
        if self.linear is not None:  # [linear-attention hook] (2/2) exact rollback to each row's valid slots
            self.linear.rollback(self.valid, before)
        if trim:
            self.truncate(int(self.extent()[0]))

    def extent(self) -> torch.Tensor:
        """Device tensor ``[2]``: (slots up to the last one any row uses, valid slots of the fullest row)."""
        valid = self.valid
        cols = torch.arange(1, self.length + 1, device=valid.device)
        used = torch.where(valid.any(dim=0), cols, 0).amax() if self.length else cols.new_zeros(())
        fullest = valid.sum(dim=1).amax() if self.length else cols.new_zeros(())
        return torch.stack([used, fullest])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished rows stop costing work; new, smaller storages)."""
        if self.linear is not None:  # [linear-attention hook]
            self.linear.select_rows(rows)
        self.cache.select_rows(rows)
        self._mark_static()

    def holes(self) -> int:
        """Physical slots that the fullest row does not use."""
        return self.length - int(self.valid.sum(dim=1).max())

    def compact_(self, fullest: int | None = None) -> None:
        """Move every row's valid slots to the front of its storage, in place (one ``compact_kv_`` per device over
        all layers, K and V).

        fullest: valid slots of the fullest row, when the caller has it on the host (no sync then).
        """
        src_idx = padded_indices(self.valid, fullest)
        if self.linear is not None:  # [linear-attention hook] the states hold no slots; their journal follows
            self.linear.compacted(src_idx, self.length)
        self.cache.compact_(src_idx, 0, length=src_idx.shape[1])
