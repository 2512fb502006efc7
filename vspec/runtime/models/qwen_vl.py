"""Qwen2.5-VL and Qwen2-VL: M-RoPE (t, h, w) positions, merged-patch frame grids."""

from __future__ import annotations

import warnings

import torch

from .base import ModelAdapter, VisualSpan, runs

MISSING_TYPES_WARNING = (
    "Qwen-VL inputs with image/video grids but no `mm_token_type_ids`: transformers' generate then gives every token "
    "1-D text positions instead of M-RoPE, and vspec does the same so that its output stays identical to generate's. "
    "For the model's M-RoPE positions pass `mm_token_type_ids` ([B, L]: 0 text, 1 image placeholder, 2 video "
    "placeholder): the Qwen2-VL / Qwen2.5-VL processors return it by default (processor(...) and "
    "apply_chat_template(..., tokenize=True, return_dict=True)); do not drop it or set return_mm_token_type_ids=False."
)


class QwenVLAdapter(ModelAdapter):
    family = "qwen_vl"
    position_rows = 3

    def prompt_positions(self, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
        has_visual = model_kwargs.get("image_grid_thw") is not None or model_kwargs.get("video_grid_thw") is not None
        if has_visual and model_kwargs.get("mm_token_type_ids") is None:
            # transformers' generate computes M-RoPE only when mm_token_type_ids is passed; without it every token
            # (visual ones included) gets 1-D text positions, for Qwen2-VL and Qwen2.5-VL alike. Do the same, so
            # the output stays generate's, and say so: it is rarely what the caller meant.
            warnings.warn(MISSING_TYPES_WARNING, UserWarning, stacklevel=2)
        if not has_visual or model_kwargs.get("mm_token_type_ids") is None:
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
