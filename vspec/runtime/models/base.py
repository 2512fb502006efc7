"""The adapter interface shared by every model family."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..devices import input_device


@dataclass(frozen=True)
class VisualSpan:
    """A run of visual placeholder tokens in one batch row.

    start/length: physical indices ``[start, start+length)`` in the row. grid: ``(T, H, W)`` of the first
    ``T*H*W`` tokens in (t, h, w) raster order, or ``None`` when the tokens have no frame structure; tokens of
    the span beyond the grid (LLaVA-OneVision's newline token) have no grid cell.
    """

    start: int
    length: int
    grid: tuple[int, int, int] | None


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
    """Base adapter. Subclasses implement :meth:`prompt_positions` and :meth:`visual_spans`."""

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

    # ---- embeddings ------------------------------------------------------------------------------
    def language_model(self):
        return self.model.model.language_model

    def input_embeddings(self, input_ids, attention_mask, model_kwargs, position_ids) -> torch.Tensor:
        """``inputs_embeds [B, L, H]`` exactly as the model's own forward builds them (visual rows merged in).

        Runs the model's multimodal merge and stops before the language model, so the merge logic is the
        model's own for every family and input kind.
        """
        stash = {}

        class _Stop(Exception):
            pass

        owner = threading.get_ident()

        def hook(_module, _args, kwargs):
            if threading.get_ident() != owner:  # another thread's forward on the shared model: not ours to stop
                return None
            stash["embeds"] = kwargs["inputs_embeds"]
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
        return stash["embeds"].to(input_ids.device)


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
