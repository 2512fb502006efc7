"""Per-family adapters: where the visual tokens sit, their frame grid, and the model's positions.

Every adapter produces logical positions with ONE convention for draft and target (the one ``generate`` uses):
prompt positions from the model's own rope-index routine, and decode positions continuing at the last prompt
token's position + 1 for every row. Positions are always passed to the model explicitly.
"""

from __future__ import annotations

from .base import ModelAdapter, Prompt, VisualSpan
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_vl import QwenVLAdapter

_ADAPTERS = {
    "qwen2_5_vl": QwenVLAdapter,
    "qwen2_vl": QwenVLAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen3_vl": Qwen3VLAdapter,
    "qwen3_vl_moe": Qwen3VLAdapter,
    "qwen3_5": Qwen3_5Adapter,
    "qwen3_5_moe": Qwen3_5Adapter,
}
SUPPORTED_MODEL_TYPES = tuple(_ADAPTERS)


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model`` (dispatch on ``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise ValueError(
            f"vspec does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return cls(model)


__all__ = ["ModelAdapter", "Prompt", "VisualSpan", "get_adapter", "SUPPORTED_MODEL_TYPES"]
