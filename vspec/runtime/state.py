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

from .. import ops
from .devices import group_by_device, on_device
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


class ModelState:
    """Cache + validity mask of one model for the active batch rows.

    valid: ``[B, S]`` bool over the physical cache slots. linear: the states of a hybrid model's linear-attention
    layers (:class:`~vspec.runtime.linear_state.LinearAttentionState`, None for a pure-attention model): every
    forward feeds them (skipping holes), :meth:`invalidate` rolls them back exactly (not by masking: only a suffix of
    each row can be rejected), :meth:`truncate` / :meth:`compact_` / :meth:`select_rows` keep their journal in step;
    the KV methods below touch the attention layers only.
    """

    def __init__(self, model, adapter: ModelAdapter):
        from transformers import DynamicCache

        self.model = model
        self.adapter = adapter
        self.cache = DynamicCache(config=model.config)
        self._cache_kw = cache_keyword(model)
        self.valid: torch.Tensor | None = None
        self.calls = 0
        # [linear-attention hook] the linear layers' states live outside the cache; only attention layers hold KV
        linear = adapter.linear_attention_modules()
        self.linear = LinearAttentionState(linear) if linear else None
        self._kv_skip = frozenset(linear)

    def _kv_layers(self) -> list:
        """The cache layers that hold keys and values (a hybrid model's linear-attention layers do not)."""
        return [layer for i, layer in enumerate(self.cache.layers) if i not in self._kv_skip]

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def forward(self, *, positions: torch.Tensor, new_valid: torch.Tensor, input_ids=None, inputs_embeds=None,
                logits_to_keep: int = 0, **model_kwargs) -> torch.Tensor:
        """Append ``n`` slots per row and return logits ``[B, n or logits_to_keep, V]``.

        positions: ``[P, B, n]`` logical positions; new_valid: ``[B, n]`` bool.
        """
        start = self.length
        self.valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=1)
        # [linear-attention hook] linear layers read/write self.linear during this forward, skipping holes
        linear = self.linear.step(start, new_valid) if self.linear is not None else contextlib.nullcontext()
        with linear:
            out = self.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                position_ids=self.adapter.model_position_ids(positions),
                attention_mask=self.valid.long(),
                **{self._cache_kw: self.cache},
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **model_kwargs,
            )
        self.calls += 1
        return out.logits

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
        prev = self.valid if self.valid is not None else tree_mask.new_zeros(B, 0)
        head = prev[:, : prev.shape[1] + n - k]
        self.valid = torch.cat([prev, tree_mask.new_ones(B, n)], dim=1)
        allowed = torch.cat([head[:, None, :].expand(B, n, head.shape[1]), tree_mask], dim=2)
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model(
            input_ids=input_ids,
            position_ids=self.adapter.model_position_ids(positions),
            attention_mask=mask[:, None],
            **{self._cache_kw: self.cache},
            use_cache=True,
        )
        self.calls += 1
        return out.logits

    def keep_only(self, start: int, keep: torch.Tensor) -> None:
        """Slots ``[start, start + n)`` of row b stay valid only where ``keep[b]`` ``[B, n]`` is True (the rest
        become holes): a device op, no sync."""
        if self.linear is not None:  # [linear-attention hook]
            raise NotImplementedError("keep_only cannot roll back linear-attention layers (only a suffix can be "
                                      "rejected: ModelState.invalidate)")
        n = keep.shape[1]
        self.valid[:, start:start + n] &= keep

    def truncate(self, n: int) -> None:
        """Roll the physical length back to ``n`` slots (a pointer move on every layer)."""
        if n >= self.length:
            return
        if self.linear is not None:  # [linear-attention hook]
            self.linear.truncate(n)
        for layer in self._kv_layers():
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]
        self.valid = self.valid[:, :n]

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
        cols = torch.arange(self.length, device=self.valid.device)
        self.valid &= ~((cols[None, :] >= start[:, None]) & (cols[None, :] < stop))
        if self.linear is not None:  # [linear-attention hook] (2/2) exact rollback to each row's valid slots
            self.linear.rollback(self.valid, before)
        if trim:
            self.truncate(int(self.extent()[0]))

    def extent(self) -> torch.Tensor:
        """Device tensor ``[2]``: (slots up to the last one any row uses, valid slots of the fullest row)."""
        cols = torch.arange(1, self.length + 1, device=self.valid.device)
        used = torch.where(self.valid.any(dim=0), cols, 0).amax() if self.length else cols.new_zeros(())
        fullest = self.valid.sum(dim=1).amax() if self.length else cols.new_zeros(())
        return torch.stack([used, fullest])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished rows stop costing work)."""
        if self.linear is not None:  # [linear-attention hook]
            self.linear.select_rows(rows)
        for device, layers in group_by_device(self._kv_layers()).items():  # a sharded model's layers span devices
            idx = rows.to(device)
            for layer in layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        self.valid = self.valid.index_select(0, rows)

    def holes(self) -> int:
        """Physical slots that the fullest row does not use."""
        return self.length - int(self.valid.sum(dim=1).max())

    def compact_(self, fullest: int | None = None) -> None:
        """Move every row's valid slots to the front of its cache (one ``compact_kv_`` over all layers and k/v).

        fullest: valid slots of the fullest row, when the caller has it on the host (no sync then).
        """
        src_idx = padded_indices(self.valid, fullest)
        if self.linear is not None:  # [linear-attention hook] the states hold no slots; their journal follows
            self.linear.compacted(src_idx, self.length)
        k_max = src_idx.shape[1]
        # one launch per device the cache spans (a sharded model: its layers' devices; else one)
        for device, layers in group_by_device(self._kv_layers()).items():
            with on_device(device):
                kv = torch.stack([torch.stack([layer.keys, layer.values]) for layer in layers])
                ops.compact_kv_(kv, src_idx.to(device), 0)
            for i, layer in enumerate(layers):
                layer.keys = kv[i, 0, :, :, :k_max].clone()
                layer.values = kv[i, 1, :, :, :k_max].clone()
        self.valid = src_idx >= 0
