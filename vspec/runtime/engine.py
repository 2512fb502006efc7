"""SpecDecoder: lossless speculative decoding of an HF Video-LLM with a pruned-vision draft.

``SpecDecoder.generate`` resolves the generation options, builds the call's state
(:class:`~vspec.runtime.loop.CallState`) and runs one schedule: serial chain or tree
(:mod:`vspec.runtime.schedules`) or parallel (:mod:`vspec.runtime.parallel`). Every schedule runs the prefill of
:mod:`vspec.runtime.prefill` and the round steps of :mod:`vspec.runtime.steps` (one host sync per round); the
decoder itself holds no per-call state, so threads may share it (docs/design.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .anchors import make_detector
from .config import SpecConfig
from .devices import input_device
from .generation import GenerationSettings, History, LogitsRules, resolve_generation
from .loop import CallState
from .models import get_adapter
from .parallel import ParallelSchedule
from .prefill import Prefill
from .schedules import ChainSchedule, TreeSchedule
from .stats import SpecStats
from .steps import RoundSteps
from .vocab import SharedVocab

__all__ = ["SpecDecoder", "SpecOutput", "SpecStats"]


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
    sampling they follow the target's distribution. Immutable after construction (threads may share it): each call's
    state lives in the :class:`~vspec.runtime.loop.CallState` that ``generate`` creates and hands to the schedule.
    """

    def __init__(self, target, draft, config: SpecConfig | None = None, *, tokenizer=None):
        """``tokenizer``: the pair's tokenizer or processor (optional). Target and draft may differ in their logit
        counts when that is padding of one vocabulary (:mod:`vspec.runtime.vocab`); the tokenizer's length then
        bounds the shared range."""
        self.target = target
        self.draft = draft
        self.config = config or SpecConfig()
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
        self._check_hybrid()
        self.steps = RoundSteps(target, draft, self.config, self.t_adapter, self.d_adapter, self.vocab)
        self.prefill_steps = Prefill(target, draft, self.config, self.t_adapter, self.d_adapter)

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
        depth = cfg.tree.depth if cfg.tree is not None else cfg.draft_len
        call = CallState(
            rules=LogitsRules(settings, self.t_adapter.vocab_size, input_ids.device),
            stats=SpecStats(accept_histogram=[0] * (depth + 1)),
            max_new_tokens=settings.max_new_tokens,
            eos_ids=torch.tensor(settings.eos_token_ids, dtype=torch.long, device=input_ids.device),
            pad=settings.pad_token_id,
            hist=History(settings, input_ids, attention_mask, self.t_adapter.vocab_size,
                         settings.max_new_tokens + depth + 2),
            generator=generator,
            streamer=streamer,
            anchors=make_detector(cfg.loose, self.target, self.t_adapter) if cfg.verify == "loose" else None,
        )
        stats = call.stats
        t0 = time.perf_counter()
        prompt = self.t_adapter.prompt(input_ids, attention_mask, model_kwargs)
        schedule = self._schedule(generator)
        target, draft, first = schedule.prefill(prompt, call)
        stats.prefill_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        new_tokens = schedule.decode(prompt, target, draft, first, call)
        stats.decode_seconds = time.perf_counter() - t1
        if call.loose_accepted is not None:
            stats.loose_accepted = int(call.loose_accepted)
        stats.target_calls = target.calls - 1
        stats.draft_calls = draft.calls
        if streamer is not None:
            streamer.end()
        return SpecOutput(sequences=torch.cat([input_ids, new_tokens], dim=1), stats=stats, settings=settings)

    def _schedule(self, generator):
        """This call's schedule: parallel (the draft works beside the target), tree or chain."""
        if self.config.parallel:
            return ParallelSchedule(self.steps, self.prefill_steps, generator)
        if self.config.tree is not None:
            return TreeSchedule(self.steps, self.prefill_steps)
        return ChainSchedule(self.steps, self.prefill_steps)

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

    def _check_hybrid(self) -> None:
        """Schedules that a hybrid model's linear-attention layers (Qwen3.5) cannot roll back are refused: only a
        rejected suffix of each row's tokens can be undone there (:mod:`vspec.runtime.linear_state`), so trees are
        (the chain and the parallel schedule reject suffixes only)."""
        hybrid = [name for name, adapter in (("target", self.t_adapter), ("draft", self.d_adapter))
                  if adapter.linear_attention_modules()]
        if not hybrid:
            return
        which = f"the {' and '.join(hybrid)} of {self.target.config.model_type}"
        if self.config.tree is not None:
            raise ValueError(f"SpecConfig.tree is not supported with linear-attention layers ({which}): a tree would "
                             f"need a recurrent state per node; use tree=None (chain drafting)")
        if self.config.compile is not False:
            raise ValueError(f"SpecConfig.compile is not supported with linear-attention layers ({which}) yet: their "
                             f"state step (hole skipping, the rollback journal) is not capturable; use the eager path "
                             f"(compile=False)")

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
