"""The adapter interface shared by every model family."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from ..devices import input_device


@dataclass(frozen=True)
class VisualSpan:
    """The visual placeholder tokens of one image or video in one batch row.

    start/length: the first physical index and the number of tokens. pieces: ``None`` when the tokens are one run
    ``[start, start+length)``; else the runs ``((start, length), ...)`` in order, text between them (a Qwen3-VL
    video: one run per temporal group, its timestamp text in between), lengths summing to ``length``. grid:
    ``(T, H, W)`` of the first ``T*H*W`` tokens (in :meth:`indices` order) in (t, h, w) raster order, or ``None``
    when the tokens have no frame structure; tokens of the span beyond the grid (LLaVA-OneVision's newline token)
    have no grid cell.
    """

    start: int
    length: int
    grid: tuple[int, int, int] | None
    pieces: tuple[tuple[int, int], ...] | None = None

    def indices(self) -> list[int]:
        """Physical indices of the span's tokens, in order."""
        if self.pieces is None:
            return list(range(self.start, self.start + self.length))
        return [i for start, length in self.pieces for i in range(start, start + length)]


@dataclass
class Prompt:
    """A prompt as the runtime sees it.

    input_ids / attention_mask: ``[B, L]``; positions: ``[P, B, L]`` long logical positions (P = 3 for M-RoPE,
    1 otherwise); visual_mask: ``[B, L]`` bool; spans: per row, its visual spans; next_pos: ``[B]`` long, the
    position of the first generated token (the last prompt token's position + 1, as ``generate``; prompts are
    left-padded, so the last column is every row's last token).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    visual_mask: torch.Tensor
    spans: list[list[VisualSpan]]
    next_pos: torch.Tensor
    model_kwargs: dict


class ModelAdapter:
    """Base adapter. Subclasses implement :meth:`prompt_positions` and :meth:`visual_spans`; a family whose forward
    hands its language model more than ``inputs_embeds`` (Qwen3-VL's DeepStack) also sets
    :attr:`language_extra_keys` and implements :meth:`gather_language_extras`."""

    family = ""
    position_rows = 1

    def __init__(self, model):
        self.model = model
        self.config = model.config

    # ---- identity of the pair ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """``(image_token_id, video_token_id)`` of the model's config."""
        return (self.config.image_token_id, self.config.video_token_id)

    # ---- prompts ---------------------------------------------------------------------------------
    def prompt_positions(self, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
        raise NotImplementedError

    def visual_spans(self, input_ids, attention_mask, model_kwargs) -> list[list[VisualSpan]]:
        raise NotImplementedError

    def complete_kwargs(self, input_ids, attention_mask, model_kwargs) -> dict:
        """Fill inputs the model needs but a caller may have left out (none so far: a missing Qwen
        ``mm_token_type_ids`` means 1-D positions in ``generate``, so it is not filled)."""
        return dict(model_kwargs)

    def prompt(self, input_ids, attention_mask, model_kwargs) -> Prompt:
        kwargs = self.complete_kwargs(input_ids, attention_mask, model_kwargs)
        positions = self.prompt_positions(input_ids, attention_mask, kwargs)
        vis = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in self.visual_token_ids:
            vis |= input_ids == tid
        vis &= attention_mask.bool()
        # generate continues at (position of the last prompt token) + 1. That is NOT max(positions) + 1 when a
        # video's temporal ids run past the text after it (Qwen2.5-VL with T > max(h, w) / merge).
        next_pos = positions[:, :, -1].amax(dim=0) + 1
        return Prompt(
            input_ids=input_ids,
            attention_mask=attention_mask,
            positions=positions,
            visual_mask=vis,
            spans=self.visual_spans(input_ids, attention_mask, kwargs),
            next_pos=next_pos,
            model_kwargs=kwargs,
        )

    def model_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """What to pass as ``position_ids`` for logical positions ``[P, B, n]``."""
        return positions if self.position_rows > 1 else positions[0]

    def decode_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Logical positions ``[B, n]`` of generated tokens as ``[P, B, n]``."""
        return pos.unsqueeze(0).expand(self.position_rows, -1, -1)

    # ---- hybrid models -------------------------------------------------------------------------
    def linear_attention_modules(self) -> dict:
        """``{layer_idx: module}`` of the decoder's linear-attention layers (a recurrent state that masking cannot
        roll back: :mod:`vspec.runtime.linear_state`); ``{}`` for a pure-attention model."""
        return {}

    # ---- embeddings ------------------------------------------------------------------------------
    def language_model(self):
        return self.model.model.language_model

    #: Keyword arguments besides ``inputs_embeds`` that the model's forward hands its language model and that a
    #: forward from ``inputs_embeds`` must be given again (Qwen3-VL's DeepStack inputs). None for most families.
    language_extra_keys: tuple[str, ...] = ()

    def input_embeddings(self, input_ids, attention_mask, model_kwargs, position_ids) -> torch.Tensor:
        """``inputs_embeds [B, L, H]`` exactly as the model's own forward builds them (visual rows merged in).

        Runs the model's multimodal merge and stops before the language model, so the merge logic is the
        model's own for every family and input kind.
        """
        return self.language_inputs(input_ids, attention_mask, model_kwargs, position_ids)[0]

    def language_inputs(self, input_ids, attention_mask, model_kwargs, position_ids) -> tuple[torch.Tensor, dict]:
        """``(inputs_embeds, extras)``: :meth:`input_embeddings` and the other language-model inputs the model's
        forward built with them (:attr:`language_extra_keys`; ``{}`` for most families). Forward from
        ``inputs_embeds`` inside :meth:`language_kwargs` ``(extras)`` to compute what the model computes from
        ``input_ids``; :meth:`gather_language_extras` cuts the extras to a kept subset of the rows' slots.
        """
        stash = {}

        class _Stop(Exception):
            pass

        owner = threading.get_ident()

        def hook(_module, _args, kwargs):
            if threading.get_ident() != owner:  # another thread's forward on the shared model: not ours to stop
                return None
            stash["embeds"] = kwargs["inputs_embeds"]
            stash["extras"] = {k: kwargs.get(k) for k in self.language_extra_keys if kwargs.get(k) is not None}
            raise _Stop

        # Inputs on the model's input device (the draft may sit on another device than the caller's tensors); the
        # embeddings come back on input_ids' device (a sharded model builds them on its embeddings' device).
        device = input_device(self.model)

        def to(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        handle = self.language_model().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=to(input_ids), attention_mask=to(attention_mask), position_ids=to(position_ids),
                       use_cache=False, **{k: to(v) for k, v in model_kwargs.items()})
        except _Stop:
            pass
        finally:
            handle.remove()
        if "embeds" not in stash:
            raise RuntimeError("could not capture inputs_embeds from the model's forward")
        return stash["embeds"].to(input_ids.device), stash["extras"]

    def gather_language_extras(self, extras: dict, order: torch.Tensor, new_valid: torch.Tensor) -> dict:
        """The ``extras`` of :meth:`language_inputs` for the slots ``order [B, W]`` (column indices per row) of each
        row, of which those with ``new_valid`` are real tokens: what the model would have built for a prompt of just
        those tokens. Families without extras return ``{}``."""
        if extras:
            raise NotImplementedError(f"{type(self).__name__} has language-model extras but cannot gather them")
        return {}

    @contextlib.contextmanager
    def language_kwargs(self, extras: dict):
        """Hand ``extras`` to the language model in every forward inside the block (they replace what the model's
        forward passes; from ``inputs_embeds`` it passes ``None``). A no-op when ``extras`` is empty."""
        if not extras:
            yield
            return

        owner = threading.get_ident()

        def hook(_module, args, kwargs):
            if threading.get_ident() != owner:  # another thread's forward on the shared model: not its inputs
                return None
            return args, {**kwargs, **extras}

        handle = self.language_model().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool tensor as ``(start, length)``."""
    idx = torch.nonzero(mask_row, as_tuple=False).flatten().tolist()
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
