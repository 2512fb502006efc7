"""Qwen3-VL and Qwen3-VL-MoE: per-frame visual runs, interleaved M-RoPE, DeepStack.

Facts this adapter depends on (probed on transformers 5.24, CPU, float32, tiny models; ``tests/runtime/
test_qwen3_vl.py`` pins each down):

1. Prompt layout. ``Qwen3VLProcessor.replace_video_token`` expands a video into, per temporal group of
   ``temporal_patch_size`` frames, the timestamp text ``<{t:.1f} seconds>`` (t = mean time of the group's first and
   last frame, from ``video_metadata``; 24 fps assumed without it), then ``<|vision_start|>``, the group's
   ``H*W/merge²`` ``<|video_pad|>`` tokens, ``<|vision_end|>``. transformers 5.x replaces only the pad token, so the
   chat template's own ``<|vision_start|>`` … ``<|vision_end|>`` stay around the whole expansion (4.57 replaced
   the triple). One video is therefore T runs of visual tokens with text between them; ``video_grid_thw`` keeps
   ONE row ``(T, H, W)`` per video. Images are one run, as in Qwen2.5-VL. ``mm_token_type_ids`` is 2 on the video
   pads only (timestamps and vision_start/end are text, 0).
2. ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask)`` repeats each
   video's grid row T times with T set to 1 (one grid per frame group) and walks the runs of equal
   ``mm_token_type_ids``: a text run continues from the current position; a visual run takes the next grid and gets
   t = start, h = start + row, w = start + column (merged), then the position moves on by max(H, W)/merge. So each
   frame group's temporal id is its own start position (time is told by the timestamp text), and text after a
   visual run never sits below the run's ids: the last prompt token's position + 1 equals max + 1 for a prompt
   ending in text. No ``second_per_grid_ts``. The rotary embedding interleaves the t/h/w frequencies
   (``mrope_interleaved``; ``mrope_section`` counts each axis's frequencies); it reads the same ``[3, B, L]`` ids.
3. Positions in ``generate``: ``_prepare_position_ids_for_generation`` gives ``[4, B, L]`` (row 0 the 1-D text
   positions, rows 1-3 the rope index) when ``mm_token_type_ids`` and a grid are passed, else 1-D text positions
   for every token (as Qwen2.5-VL: see ``qwen_vl.MISSING_TYPES_WARNING``). Decoding continues at the last prompt
   token's position + 1 on all three rows (equality tests against ``generate`` pin it). vspec passes the 3-row form
   (row 0 of the 4-row form is only the causal mask's packed-sequence hint).
4. DeepStack. The vision tower returns, besides the merged features (``pooler_output``), one merged feature per
   index in ``vision_config.deepstack_visual_indexes`` (``deepstack_features``); ``Qwen3VLModel.forward`` hands the
   language model ``visual_pos_masks [B, L]`` (image | video placeholder positions) and
   ``deepstack_visual_embeds`` (a list, one ``[N_visual, C]`` per level, rows in the row-major order of the mask;
   image and video rows interleaved as they sit), and the text model adds level i to the hidden states at the
   masked positions after decoder layer i. A forward from ``inputs_embeds`` gets neither (the model passes
   ``None``; the language model's kwargs cannot be passed through the outer forward, which sets them itself), so
   the adapter captures both with the embeddings (:meth:`ModelAdapter.language_inputs`) and re-injects them with a
   pre-hook on the language model (:meth:`ModelAdapter.language_kwargs`); a pruned draft gets the kept tokens'
   rows and a mask of the kept slots (:meth:`Qwen3VLAdapter.gather_language_extras`).
5. Qwen3-VL-MoE (``qwen3_vl_moe``) has the same multimodal path (processor, rope index, DeepStack); only the text
   MLPs are sparse MoE blocks.
"""

from __future__ import annotations

import torch

from .base import VisualSpan, runs
from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    position_rows = 3
    language_extra_keys = ("visual_pos_masks", "deepstack_visual_embeds")

    def visual_spans(self, input_ids, attention_mask, model_kwargs) -> list[list[VisualSpan]]:
        """One span per image (one run) and per video (its frame groups' runs, in order: ``pieces``)."""
        merge = self.config.vision_config.spatial_merge_size

        def grids(key):
            g = model_kwargs.get(key)
            return iter([] if g is None else g.tolist())

        images, videos = grids("image_grid_thw"), grids("video_grid_thw")
        valid = attention_mask.bool()
        spans: list[list[VisualSpan]] = []
        for b in range(input_ids.shape[0]):
            row: list[VisualSpan] = []
            for start, length in runs((input_ids[b] == self.config.image_token_id) & valid[b]):
                t, h, w = next(images, (0, 0, 0))
                grid = (int(t), int(h) // merge, int(w) // merge)
                if grid[0] * grid[1] * grid[2] != length:
                    raise ValueError(f"row {b}: a run of {length} image tokens does not match its image_grid_thw "
                                     f"{[t, h, w]} (expects {grid[0] * grid[1] * grid[2]} after {merge}x{merge} merge)")
                row.append(VisualSpan(start, length, grid))
            pending = runs((input_ids[b] == self.config.video_token_id) & valid[b])
            i = 0
            while i < len(pending):
                thw = next(videos, None)
                if thw is None:
                    raise ValueError(f"row {b}: video tokens at {pending[i][0]} have no video_grid_thw row left")
                grid = (int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge)
                frame, need = grid[1] * grid[2], grid[0] * grid[1] * grid[2]
                pieces, got = [], 0
                while got < need and i < len(pending):
                    start, length = pending[i]
                    if length % frame or got + length > need:
                        raise ValueError(f"row {b}: a run of {length} video tokens at {start} is not a whole number "
                                         f"of frame groups of the video's grid_thw {thw} ({frame} tokens each, "
                                         f"{need - got} left of the video)")
                    pieces.append((start, length))
                    got += length
                    i += 1
                if got != need:
                    raise ValueError(f"row {b}: the video with grid_thw {thw} has {got} tokens in the prompt, expects "
                                     f"{need} (T*H*W/{merge}²)")
                row.append(VisualSpan(pieces[0][0], need, grid, tuple(pieces) if len(pieces) > 1 else None))
            spans.append(sorted(row, key=lambda s: s.start))
        return spans

    def gather_language_extras(self, extras: dict, order: torch.Tensor, new_valid: torch.Tensor) -> dict:
        """DeepStack inputs of the kept slots: the mask at ``order`` (valid slots only) and the feature rows of the
        visual slots kept, in the row-major order of the new mask (``order`` is ascending over each row's kept
        slots, so the features keep their order)."""
        if not extras:
            return {}
        mask = extras["visual_pos_masks"].to(order.device)
        row_of = (mask.flatten().long().cumsum(0) - 1).view_as(mask)  # feature row of each visual slot
        kept = torch.gather(mask, 1, order) & new_valid
        rows = torch.gather(row_of, 1, order)[kept]
        feats = [f[rows.to(f.device)] for f in extras["deepstack_visual_embeds"]]
        return {"visual_pos_masks": kept, "deepstack_visual_embeds": feats}
