"""Capture post-RoPE q/k of chosen target layers during the prefill, without forking modeling files.

A wrapper attention function is registered in transformers' ``AttentionInterface`` under ``"vspec_<impl>"``
(with the mask function of ``<impl>`` registered in ``AttentionMaskInterface``, or left-padded rows would lose
their causal mask). It calls the model's own attention function for the output, so logits are unchanged, and,
while a :class:`ScoreCapture` is armed, feeds the layer's queries and keys to ``ops.visual_attention_mass``
which accumulates the attention mass on each visual key. No attention map is materialised.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from dataclasses import dataclass, field

import torch

from .. import ops
from .devices import on_device

_ARMED: contextvars.ContextVar[ScoreCapture | None] = contextvars.ContextVar("vspec_capture", default=None)
_REGISTERED: set[str] = set()
# Concurrent captures on one model (threads sharing a patched model): the first switches the text attention to
# the wrapper, the last switches it back. Uncaptured forwards meanwhile run through the wrapper unarmed (their
# thread's _ARMED is None), which delegates to the same attention function: identical outputs.
_SWITCH_LOCK = threading.Lock()
_SWITCHED: dict[int, list] = {}  # id(model) -> [active captures, implementation to restore]


@dataclass
class ScoreCapture:
    """Accumulates ``visual_attention_mass`` over the armed layers of one prefill.

    visual_idx: ``[B, Nv]`` physical key positions of visual tokens (−1 padding); attention_mask: ``[B, S]``;
    layers: layer indices to score (non-negative); query_rows: trailing query positions used as text queries.
    """

    visual_idx: torch.Tensor
    attention_mask: torch.Tensor
    layers: frozenset[int]
    query_rows: int
    normalize: str = "visual"
    scores: torch.Tensor | None = None
    layers_seen: list[int] = field(default_factory=list)
    # A sharded model's layers run on several devices. Per device: (visual_idx, attention_mask, partial sum), so
    # q/k never leave their layer's device; result() adds the partial sums up on visual_idx's device.
    _per_device: dict = field(default_factory=dict, repr=False)

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, **_) -> None:
        if layer_idx not in self.layers:
            return
        dev = query.device
        if dev not in self._per_device:
            self._per_device[dev] = (self.visual_idx.to(dev), self.attention_mask.to(dev),
                                     torch.zeros(self.visual_idx.shape, dtype=torch.float32, device=dev))
        visual_idx, attention_mask, out = self._per_device[dev]
        lq = min(self.query_rows, query.shape[2])
        with on_device(dev):  # Triton launches on the current CUDA device
            ops.visual_attention_mass(
                query[:, :, -lq:], key, visual_idx, attention_mask=attention_mask,
                normalize=self.normalize, out=out, check_indices=False,  # built by the runtime: no sync
            )
        self.layers_seen.append(layer_idx)

    def result(self) -> torch.Tensor:
        """Mean mass over the scored layers, ``[B, Nv]`` float32, on ``visual_idx``'s device."""
        if not self._per_device or not self.layers_seen:
            raise RuntimeError("no layer was scored: the target's attention did not route through vspec's capture")
        home = self.visual_idx.device
        self.scores = sum(out.to(home) for _, _, out in self._per_device.values())
        return self.scores / len(self.layers_seen)


def _eager_function_of(module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"cannot find eager_attention_forward for {type(module).__name__}")
    return fn


def _make_wrapper(base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def vspec_attention(module, query, key, value, attention_mask, **kwargs):
        cap = _ARMED.get()
        if cap is not None:
            cap.record(module.layer_idx, query, key, value=value, module=module)
        fn = _eager_function_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return vspec_attention


def register(base: str) -> str:
    """Register ``"vspec_<base>"`` wrapping attention implementation ``base``; returns the new name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"vspec_{base}"
    if name in _REGISTERED:
        return name
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not supported for score capture")
    AttentionInterface.register(name, _make_wrapper(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    _REGISTERED.add(name)
    return name


def text_attn_implementation(model) -> str:
    return model.config.get_text_config()._attn_implementation or "eager"


@contextlib.contextmanager
def capturing(model, capture: ScoreCapture):
    """Route ``model``'s text layers through the capture wrapper and arm ``capture`` for the block (this thread)."""
    with _SWITCH_LOCK:
        entry = _SWITCHED.get(id(model))
        if entry is None:
            restore = base = text_attn_implementation(model)
            if base.startswith("vspec_"):
                base = base[len("vspec_"):]
            _set_text_attention(model, register(base))
            entry = _SWITCHED[id(model)] = [0, restore]
        entry[0] += 1
    token = _ARMED.set(capture)
    try:
        yield capture
    finally:
        _ARMED.reset(token)
        with _SWITCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _SWITCHED[id(model)]
                _set_text_attention(model, entry[1])


def _set_text_attention(model, name: str) -> None:
    if model.config.get_text_config() is model.config:
        model.set_attn_implementation(name)
    else:
        model.set_attn_implementation({"text_config": name})
