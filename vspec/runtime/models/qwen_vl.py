"""Qwen2.5-VL and Qwen2-VL: M-RoPE (t, h, w) positions, merged-patch frame grids."""

from __future__ import annotations

import torch

from .base import ModelAdapter, VisualSpan, runs


class QwenVLAdapter(ModelAdapter):
    family = "qwen_vl"
    position_rows = 3

    def complete_kwargs(self, input_ids, attention_mask, model_kwargs) -> dict:
        kwargs = dict(model_kwargs)
        if kwargs.get("mm_token_type_ids") is None:
            # Without it transformers silently falls back to 1-D positions (HF_NOTES, pitfall 1).
            types = torch.zeros_like(input_ids)
            types[input_ids == self.config.image_token_id] = 1
            types[input_ids == self.config.video_token_id] = 2
            kwargs["mm_token_type_ids"] = types
        return kwargs

    def prompt_positions(self, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
        has_visual = model_kwargs.get("image_grid_thw") is not None or model_kwargs.get("video_grid_thw") is not None
        if not has_visual:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
        extra = {}
        if self.config.model_type == "qwen2_5_vl" and model_kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = model_kwargs["second_per_grid_ts"]
        pos, _ = self.model.model.get_rope_index(
            input_ids,
            model_kwargs["mm_token_type_ids"],
            image_grid_thw=model_kwargs.get("image_grid_thw"),
            video_grid_thw=model_kwargs.get("video_grid_thw"),
            attention_mask=attention_mask,
            **extra,
        )
        return pos

    def visual_spans(self, input_ids, attention_mask, model_kwargs) -> list[list[VisualSpan]]:
        merge = self.config.vision_config.spatial_merge_size
        def grid_iter(key):
            g = model_kwargs.get(key)
            return iter([] if g is None else g.tolist())

        grids = {
            self.config.image_token_id: grid_iter("image_grid_thw"),
            self.config.video_token_id: grid_iter("video_grid_thw"),
        }
        valid = attention_mask.bool()
        spans: list[list[VisualSpan]] = []
        for b in range(input_ids.shape[0]):
            row: list[VisualSpan] = []
            for tid in self.visual_token_ids:
                for start, length in runs((input_ids[b] == tid) & valid[b]):
                    t, h, w = next(grids[tid], (0, 0, 0))
                    grid = (int(t), int(h) // merge, int(w) // merge)
                    if grid[0] * grid[1] * grid[2] != length:
                        raise ValueError(
                            f"row {b}: a run of {length} visual tokens does not match its grid_thw {[t, h, w]} "
                            f"(expects {grid[0] * grid[1] * grid[2]} tokens after {merge}x{merge} merge)"
                        )
                    row.append(VisualSpan(start, length, grid))
            spans.append(sorted(row, key=lambda s: s.start))
        return spans
