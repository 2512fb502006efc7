"""A preallocated KV cache for the speculative-decoding runtime, usable as HF ``past_key_values``.

One storage tensor ``[L, 2, B, Hkv, S_max, D]`` holds keys (``[:, 0]``) and values (``[:, 1]``) of every
layer, so one :func:`vspec.ops.compact_kv_` call compacts the whole cache. A model sharded over several devices
(accelerate ``device_map``) gets one such storage per device, holding the layers that run there
(:meth:`SpecCache.from_dynamic` groups them): one launch per device. All batch rows share one
*physical* length (every forward appends the same number of slots to every row); a boolean
``valid [B, S_max]`` mask says which slots hold real tokens. Left padding, pruned tokens and rejected
speculative tokens are holes (``False``): pass :meth:`SpecCache.attention_mask` as the model's 2-D
``attention_mask`` so holes are never attended.

Physical slots are not positions. RoPE is applied before a key is cached, so a compacted key keeps the
position it was computed with; the runtime tracks each row's next *logical* position itself and passes
``position_ids`` explicitly on every forward (HF would otherwise derive positions from
``get_seq_length()``, the physical length).

Interface used by transformers (checked against 5.23, and the 5.17 sources):

* ``update(key_states, value_states, layer_idx, ...)``: each attention layer of Qwen2 / Qwen2-VL /
  Qwen2.5-VL (LLaVA-OneVision's LM is Qwen2) writes its new states and attends over the returned views.
* ``get_seq_length(layer_idx=0)``: the models derive default positions from it; ``get_query_offset`` (5.23),
  ``get_mask_sizes(query_length, layer_idx)``, ``is_sliding``/``is_linear``/``is_dummy``, ``is_compileable``
  are read by ``transformers.masking_utils`` while building the causal mask.
* ``len(cache)``, ``cache.layers[i].keys/.values`` (``[B, Hkv, length, D]`` views), iteration,
  ``crop``, ``reorder_cache``/``batch_select_indices``, ``reset``, ``get_max_length``, ``batch_size``,
  ``early_initialization`` behave as for HF caches.

Views returned by ``update`` and ``layers[i].keys`` alias the storage: they are valid until the next
``compact_``, ``select_rows`` or growth of the storage.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["SpecCache"]


class _StorageLayer(CacheLayerMixin):
    """Layer ``layer_idx`` of a :class:`SpecCache`: a window onto the shared storage, plus its own length."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: SpecCache, layer_idx: int):
        # CacheLayerMixin.__init__ would assign keys/values, which are views here: deliberately not called.
        self._cache = cache
        self.layer_idx = layer_idx
        self.length = 0

    def __repr__(self):
        return f"{type(self).__name__}(layer_idx={self.layer_idx}, length={self.length})"

    @property
    def is_initialized(self) -> bool:
        return bool(self._cache.storages)

    def _slab(self) -> torch.Tensor | None:
        """This layer's ``[2, B, Hkv, S_max, D]`` slice of its device's storage (None before allocation)."""
        c = self._cache
        if not c.storages:
            return None
        store, j = c._where[self.layer_idx]
        return c.storages[store][j]

    @property
    def keys(self) -> torch.Tensor | None:
        st = self._slab()
        return None if st is None else st[0, :, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        st = self._slab()
        return None if st is None else st[1, :, :, : self.length]

    @property
    def batch_size(self) -> int:
        if not self._cache.storages:
            raise AttributeError("batch_size is unknown before the storage is allocated")
        return self._slab().shape[1]

    @property
    def dtype(self) -> torch.dtype | None:
        st = self._slab()
        return None if st is None else st.dtype

    @property
    def device(self) -> torch.device | None:
        st = self._slab()
        return None if st is None else st.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self._cache.storages:
            B, H, _, D = key_states.shape
            self._cache._allocate(B, H, D, key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[B, Hkv, q, D]`` states at slots ``[length, length + q)``; return the
        ``[B, Hkv, length + q, D]`` key and value views."""
        c = self._cache
        if c.write_pos is not None:  # fixed shapes: write at the given slots, attend over all S_max slots
            st = self._slab()
            st[0].index_copy_(2, c.write_pos, key_states)
            st[1].index_copy_(2, c.write_pos, value_states)
            return st[0], st[1]
        self.lazy_initialization(key_states, value_states)
        _, B, H, _, D = self._slab().shape
        q = key_states.shape[-2]
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if t.ndim != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
                raise ValueError(f"{name} must be [B={B}, Hkv={H}, q, D={D}] to match the cache storage, got "
                                 f"{tuple(t.shape)}")
        start, end = self.length, self.length + q
        c.ensure_capacity(end)
        st = self._slab()
        st[0, :, :, start:end].copy_(key_states)
        st[1, :, :, start:end].copy_(value_states)
        if self.layer_idx == 0 and c.mark_appends_valid:
            # The first layer of a forward marks the new slots as real tokens; holes are set by the runtime.
            c.valid[:, start:end] = True
        self.length = end
        return st[0, :, :, :end], st[1, :, :, :end]

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if self._cache.write_pos is not None:
            return self._cache.max_length, 0
        if isinstance(query_length, torch.Tensor):  # older releases passed cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._cache.max_length

    def get_max_cache_shape(self) -> int:
        return self._cache.max_length

    def crop(self, tokens_to_remove: int) -> None:
        self._cache.crop(tokens_to_remove)

    def reset(self) -> None:
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("reorder a SpecCache as a whole: SpecCache.select_rows(batch_idx)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise RuntimeError("select rows of a SpecCache as a whole: SpecCache.select_rows(batch_idx)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("repeat rows of a SpecCache as a whole: SpecCache.batch_repeat_interleave()")

    def offload(self):
        raise NotImplementedError("SpecCache does not offload")

    def prefetch(self):
        raise NotImplementedError("SpecCache does not offload")


class _NoKVLayer(_StorageLayer):
    """A layer that holds no keys or values (a hybrid model's linear-attention layer, whose state the runtime keeps
    itself): it reports the first KV layer's length, so transformers' mask sizing reads the same from any layer."""

    @property
    def length(self) -> int:
        c = self._cache
        return c.layers[c.kv_layers[0]].length if c.kv_layers else 0

    @length.setter
    def length(self, n: int) -> None:
        pass

    def _slab(self):
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(f"layer {self.layer_idx} of this SpecCache holds no keys/values (a linear-attention layer)")


class SpecCache(Cache):
    """Static KV cache: one ``[L, 2, B, Hkv, S_max, D]`` storage, a shared physical length, a validity mask.

    Args:
        config: the model's config (a VLM config or its text config); gives ``num_layers`` and, for eager
            allocation, ``num_kv_heads``/``head_dim``.
        max_length: ``S_max``, slots per row.
        num_layers: overrides ``config``'s decoder layer count (one of the two is required).
        batch_size, num_kv_heads, head_dim, dtype, device: with ``batch_size`` given, the storage is allocated
            now; otherwise on the first ``update`` (from the key states' shape, dtype and device).
        grow: when an update would pass ``max_length``, reallocate with twice the room (copying, and
            invalidating earlier views) instead of raising.
        no_kv: indices of layers that hold no keys/values (a hybrid model's linear-attention layers); they get
            no storage and report the first KV layer's length.

    Attributes:
        storage: ``[L, 2, B, Hkv, S_max, D]`` or None before allocation (a cache spanning several devices:
            ``storages``, one ``[L_d, 2, B, Hkv, S_max, D]`` per device, and ``storage`` raises).
        valid: ``bool [B, S_max]``; False for holes and for every slot ``>= length``.
        mark_appends_valid: whether an update marks its new slots valid (default True); a runtime that sets
            ``valid`` itself before each forward (holes among the new slots) turns it off.
        reallocations: how often the storage grew (``grow=True``); 0 when ``max_length`` was sized right.
        write_pos: None, or ``[q]`` int64 slots: fixed-shape mode for one forward (set by the runtime around
            it). Every layer then writes its q new states at those slots and attends over all ``S_max`` slots
            (the caller's 4-D mask hides the unused ones); no Python state changes inside the forward, so its
            shapes do not depend on the length and a compiled or captured forward replays. The runtime moves
            ``length`` afterwards.
    """

    def __init__(self, config=None, *, max_length: int, num_layers: int | None = None,
                 batch_size: int | None = None, num_kv_heads: int | None = None,
                 head_dim: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, grow: bool = False, no_kv=frozenset()):
        text = config.get_text_config(decoder=True) if config is not None else None
        if num_layers is None:
            if text is None:
                raise ValueError("SpecCache needs num_layers or a config to count the decoder layers")
            num_layers = text.num_hidden_layers
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.kv_layers = [i for i in range(num_layers) if i not in no_kv]
        if not self.kv_layers:
            raise ValueError("SpecCache needs at least one layer with keys/values")
        super().__init__(layers=[_NoKVLayer(self, i) if i in no_kv else _StorageLayer(self, i)
                                 for i in range(num_layers)])
        self.max_length = max_length
        self.grow = grow
        self.storages: list[torch.Tensor] = []
        self._where = {i: (0, j) for j, i in enumerate(self.kv_layers)}  # KV layer -> (storage, index in it)
        self.valid: torch.Tensor | None = None
        self.mark_appends_valid = True
        self.reallocations = 0
        self.write_pos: torch.Tensor | None = None
        if batch_size is not None:
            if num_kv_heads is None and text is not None:
                num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            if head_dim is None and text is not None:
                head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            if num_kv_heads is None or head_dim is None:
                raise ValueError("eager allocation (batch_size given) needs num_kv_heads and head_dim, "
                                 "or a config")
            self._allocate(batch_size, num_kv_heads, head_dim, dtype or torch.get_default_dtype(),
                           torch.device(device) if device is not None else torch.device("cpu"))

    # ---- storage ------------------------------------------------------------------------------------------

    def _allocate(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> None:
        shape = (len(self.kv_layers), 2, batch_size, num_kv_heads, self.max_length, head_dim)
        self.storages = [torch.zeros(shape, dtype=dtype, device=device)]
        self._where = {i: (0, j) for j, i in enumerate(self.kv_layers)}
        self.valid = torch.zeros(batch_size, self.max_length, dtype=torch.bool, device=device)

    @property
    def storage(self) -> torch.Tensor | None:
        """The ``[L, 2, B, Hkv, S_max, D]`` storage (None before allocation); see ``storages`` for a cache that
        spans devices."""
        if len(self.storages) > 1:
            raise RuntimeError(f"this SpecCache spans {len(self.storages)} devices: use .storages")
        return self.storages[0] if self.storages else None

    def ensure_capacity(self, end: int) -> None:
        """Make room for ``end`` slots per row: grow (``grow=True``: reallocate with twice the room, copying;
        counted in ``reallocations``) or raise."""
        if end <= self.max_length:
            return
        if not self.grow:
            raise ValueError(f"SpecCache is full: {end} slots needed but max_length={self.max_length}; "
                             f"allocate a larger max_length (or pass grow=True)")
        new_max = max(end, 2 * self.max_length)
        filled = max(layer.length for layer in self.layers)
        grown = []
        for old in self.storages:
            new = old.new_zeros(old.shape[:4] + (new_max, old.shape[5]))
            new[..., :filled, :].copy_(old[..., :filled, :])
            grown.append(new)
        valid = self.valid.new_zeros(self.valid.shape[0], new_max)
        valid[:, :filled].copy_(self.valid[:, :filled])
        self.storages, self.valid, self.max_length = grown, valid, new_max
        self.reallocations += 1

    @property
    def length(self) -> int:
        """Physical length shared by all rows (slots ``[0, length)`` are in use, holes included)."""
        return self.layers[self.kv_layers[0]].length

    @property
    def batch_size(self) -> int:
        return -1 if not self.storages else self.storages[0].shape[2]

    def _common_length(self, what: str) -> int:
        lengths = {layer.length for layer in self.layers}
        if len(lengths) != 1:
            raise RuntimeError(f"{what} needs every layer at the same length (not mid-forward), "
                               f"got lengths {[layer.length for layer in self.layers]}")
        return lengths.pop()

    def set_length(self, n: int) -> None:
        """Set every layer's length to ``n`` (after a fixed-shape forward, or a rollback); slots ``>= n`` become
        invalid."""
        for layer in self.layers:
            layer.length = n
        if self.valid is not None:
            self.valid[:, n:] = False

    # ---- HF Cache interface -------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` states to layer ``layer_idx``; return its updated key/value views."""
        return self.layers[layer_idx].update(key_states, value_states)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def __iter__(self):
        for layer in self.layers:
            yield layer.keys, layer.values

    def crop(self, tokens_to_remove_or_length: int) -> None:
        """Roll back by pointer: ``n >= 0`` keeps the first ``n`` slots (gpt-fast, legacy HF); ``n < 0``
        drops the last ``-n`` slots (HF 5.x ``DynamicCache.crop``). Slots past the new length become
        invalid."""
        n = int(tokens_to_remove_or_length)
        length = self._common_length("crop")
        new = length + n if n < 0 else n
        if not 0 <= new <= length:
            raise ValueError(f"crop({n}) on a cache of length {length} would give length {new}; "
                             f"expected a result in [0, {length}]")
        self.set_length(new)

    def reset(self) -> None:
        self.set_length(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.storages:
            idx = torch.arange(self.batch_size, device=self.valid.device).repeat_interleave(repeats)
            self.select_rows(idx)

    # ---- runtime methods ----------------------------------------------------------------------------------

    def attention_mask(self, num_new: int = 0, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """The 2-D ``attention_mask [B, length + num_new]`` for a forward appending ``num_new`` tokens."""
        if self.valid is None:
            raise RuntimeError("the cache is empty: no storage allocated yet")
        n = self._common_length("attention_mask")
        mask = torch.ones(self.valid.shape[0], n + num_new, dtype=dtype, device=self.valid.device)
        mask[:, :n] = self.valid[:, :n]
        return mask

    def set_valid(self, mask: torch.Tensor) -> None:
        """Set which of the first ``n`` slots hold real tokens from ``mask [B, n]`` (bool or 0/1), e.g. the
        prefill's ``attention_mask``; slots ``>= n`` are unchanged."""
        if self.valid is None:
            raise RuntimeError("set_valid before the storage is allocated")
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != self.valid.shape[0] \
                or mask.shape[1] > self.length:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be [B={self.valid.shape[0]}, n] with n <= length={self.length}, "
                             f"got {shape}")
        self.valid[:, : mask.shape[1]] = mask.to(device=self.valid.device, dtype=torch.bool)

    def mark_valid(self, start: int, end: int | None = None, value: bool = True,
                   rows: torch.Tensor | None = None) -> None:
        """Mark slots ``[start, end)`` (default: to ``length``) of ``rows`` (default: all) valid or holes."""
        if self.valid is None:
            raise RuntimeError("mark_valid before the storage is allocated")
        end = self.length if end is None else end
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"slots [start={start}, end={end}) must lie within [0, length={self.length}]")
        if rows is None:
            self.valid[:, start:end] = value
        else:
            self.valid[rows, start:end] = value

    def compact_(self, src_idx: torch.Tensor, dst_start: int | torch.Tensor, *, length: int | None = None,
                 check: bool | None = None) -> None:
        """Compact every layer's keys and values with ONE :func:`vspec.ops.compact_kv_` call (per device).

        For row ``b``: slots ``[0, dst_start[b])`` are kept as they are; slot ``dst_start[b] + j`` receives
        slot ``src_idx[b, j]`` (``-1``: a hole); everything after row ``b``'s last kept entry is dropped.
        ``valid`` follows the moved slots. The new physical length is the largest row end (``length`` given:
        used as is, skipping the one host sync; it must be at least every row's end); shorter rows get
        trailing holes.

        src_idx ``[B, K]`` integer, ascending among valid entries, ``dst_start[b] + j <= src_idx[b, j] <
        length``; dst_start ``int`` or ``[B]``.
        """
        from vspec import ops

        from .devices import on_device

        n = self._common_length("compact_")
        if not self.storages:
            raise RuntimeError("compact_ before the storage is allocated")
        if length is not None and not 0 <= int(length) <= n:
            raise ValueError(f"length must be in [0, {n}] (the length before compaction), got {length}")
        dev = self.valid.device
        for st in self.storages:
            with on_device(st.device):
                ops.compact_kv_(st[:, :, :, :, :n], src_idx.to(st.device),
                                dst_start.to(st.device) if isinstance(dst_start, torch.Tensor) else dst_start,
                                check=check)

        B, K = src_idx.shape
        src = src_idx.to(device=dev, dtype=torch.int64)
        if isinstance(dst_start, torch.Tensor):
            dst = dst_start.to(device=dev, dtype=torch.int64).reshape(-1).expand(B)
        else:
            dst = torch.full((B,), int(dst_start), dtype=torch.int64, device=dev)
        kept = src >= 0
        moved_valid = kept & self.valid.gather(1, src.clamp(min=0))  # [B, K]
        j = torch.arange(K, device=dev)
        ends = torch.where(kept, j + 1, torch.zeros_like(j))  # [B, K]
        row_end = dst + (ends.amax(dim=1) if K > 0 else 0)  # [B]
        rel = torch.arange(self.max_length, device=dev)[None, :] - dst[:, None]  # [B, S_max]
        in_window = (rel >= 0) & (rel < K)
        if K > 0:
            window = moved_valid.gather(1, rel.clamp(0, K - 1)) & in_window
        else:
            window = torch.zeros_like(in_window)
        self.valid.copy_(torch.where(rel < 0, self.valid, window))
        self.set_length(int(row_end.max()) if length is None else int(length))

    def select_rows(self, batch_idx: torch.Tensor) -> None:
        """Keep (and reorder to) batch rows ``batch_idx`` (``[B']`` integer), e.g. to drop finished rows."""
        if not self.storages:
            return
        if not isinstance(batch_idx, torch.Tensor) or batch_idx.ndim != 1 or batch_idx.is_floating_point():
            raise ValueError(f"batch_idx must be a 1-D integer tensor, got {batch_idx!r}")
        self.storages = [st.index_select(2, batch_idx.to(device=st.device, dtype=torch.int64))
                         for st in self.storages]
        self.valid = self.valid.index_select(0, batch_idx.to(device=self.valid.device, dtype=torch.int64))

    @classmethod
    def from_dynamic(cls, cache: Cache, *, max_length: int, valid: torch.Tensor | None = None,
                     config=None, grow: bool = False, no_kv=frozenset()) -> SpecCache:
        """A SpecCache holding a copy of ``cache``'s layers (e.g. a ``DynamicCache`` after a prefill).

        Layers on different devices (a sharded model) go to one storage per device; ``valid`` lives on the
        device of ``valid`` when given, else on the first KV layer's. ``no_kv``: layers to leave out (a hybrid
        model's linear-attention layers; see ``SpecCache``).

        valid: ``[B, S]`` mask of real tokens (the prefill's ``attention_mask``); default all valid.
        """
        n_layers = len(cache.layers)
        layers = {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers) if i not in no_kv}
        if not layers or any(k is None or k.numel() == 0 for k, _ in layers.values()):
            raise ValueError("cache must have every layer filled (run the prefill first)")
        first = min(layers)
        k0 = layers[first][0]
        B, H, S, D = k0.shape
        if S > max_length:
            raise ValueError(f"max_length={max_length} is smaller than the cache's length {S}")
        out = cls(config, max_length=max_length, num_layers=n_layers, grow=grow, no_kv=no_kv)
        devices: list[torch.device] = []
        for i, (k, v) in layers.items():
            if k.shape != (B, H, S, D) or v.shape != (B, H, S, D):
                raise ValueError(f"layer {i} of cache has keys {tuple(k.shape)} / values {tuple(v.shape)}, "
                                 f"expected {(B, H, S, D)} like layer {first}")
            if k.device not in devices:
                devices.append(k.device)
        counts = [0] * len(devices)
        for i, (k, _) in layers.items():
            d = devices.index(k.device)
            out._where[i] = (d, counts[d])
            counts[d] += 1
        out.storages = [torch.zeros((c, 2, B, H, max_length, D), dtype=k0.dtype, device=dev)
                        for c, dev in zip(counts, devices)]
        vdev = valid.device if valid is not None else k0.device
        out.valid = torch.zeros(B, max_length, dtype=torch.bool, device=vdev)
        for i, (k, v) in layers.items():
            slab = out.layers[i]._slab()
            slab[0, :, :, :S].copy_(k)
            slab[1, :, :, :S].copy_(v)
        out.set_length(S)
        out.valid[:, :S] = True
        if valid is not None:
            out.set_valid(valid)
        return out
