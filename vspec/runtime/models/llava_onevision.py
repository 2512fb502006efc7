"""LLaVA-OneVision: 1-D positions; video frames pooled to a (ceil(n/2))² grid plus one newline token."""

from __future__ import annotations

import math

import torch

from .base import ModelAdapter, VisualSpan, runs


class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    position_rows = 1

    def prompt_positions(self, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
        # What generate uses: the cumulative count of valid tokens.
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return pos.unsqueeze(0)

    def visual_spans(self, input_ids, attention_mask, model_kwargs) -> list[list[VisualSpan]]:
        n = self.config.vision_config.image_size // self.config.vision_config.patch_size
        side = math.ceil(n / 2)
        videos = model_kwargs.get("pixel_values_videos")
        frames = videos.shape[1] if videos is not None else 0
        valid = attention_mask.bool()
        spans: list[list[VisualSpan]] = []
        for b in range(input_ids.shape[0]):
            row: list[VisualSpan] = []
            for start, length in runs((input_ids[b] == self.config.video_token_id) & valid[b]):
                grid = (frames, side, side) if frames * side * side + 1 == length else None
                row.append(VisualSpan(start, length, grid))
            for start, length in runs((input_ids[b] == self.config.image_token_id) & valid[b]):
                row.append(VisualSpan(start, length, None))  # anyres tiles: no single frame grid
            spans.append(sorted(row, key=lambda s: s.start))
        return spans
