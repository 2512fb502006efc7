"""Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's multimodal path on a hybrid Gated DeltaNet / attention decoder.

Facts this adapter depends on (probed on transformers 5.24, CPU, float32, tiny models; ``tests/runtime/
test_qwen3_5.py`` pins them down):

1. Prompt layout, ``get_rope_index`` and positions are Qwen3-VL's (:mod:`.qwen3_vl`: per temporal group the
   timestamp text, then the group's visual run; interleaved M-RoPE over ``[3, B, L]`` ids; decoding continues at the
   last prompt token's position + 1), so the adapter is :class:`~.qwen3_vl.Qwen3VLAdapter` with two changes.
2. No DeepStack: the language model takes ``inputs_embeds`` alone (no extras to capture or gather).
3. ``config.text_config.layer_types`` marks each decoder layer ``"linear_attention"`` (a Gated DeltaNet module at
   ``layers[i].linear_attn``, with a recurrent and a short-conv state) or ``"full_attention"``. The linear layers
   cannot be rolled back by masking; :meth:`Qwen3_5Adapter.linear_attention_modules` names them, and
   :class:`~vspec.runtime.linear_state.LinearAttentionState` runs them (``ModelState`` owns one per model).
4. transformers' ``generate`` refuses assisted generation for these models ("assisted generation is not supported
   with stateful models").
"""

from __future__ import annotations

from .qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    language_extra_keys = ()

    def linear_attention_modules(self) -> dict:
        """``{layer_idx: module}`` of the Gated DeltaNet layers, from ``layer_types``."""
        types = self.config.get_text_config().layer_types
        layers = self.language_model().layers
        return {i: layers[i].linear_attn for i, t in enumerate(types) if t == "linear_attention"}
