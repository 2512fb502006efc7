"""Tiny Video-LLMs and matching inputs, for tests, demos and users' own experiments.

Nothing here downloads anything: models are built from transformers configs with random weights (seeded),
small enough to run ``generate`` in well under a second on a CPU. A *target* and a *draft* of one family share
the vocabulary and every special-token id, as a real speculative pair must.

    >>> from vspec.testing import tiny_pair, make_inputs
    >>> target, draft = tiny_pair("qwen2_5_vl")
    >>> inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5])
    >>> out = target.generate(**inputs, max_new_tokens=8, do_sample=False)

Token ids (all families): ``PAD=0, BOS=1, EOS=2, VISION_START=3, VISION_END=4, IMAGE=5, VIDEO=6``; ordinary text
tokens are ``FIRST_TEXT_ID .. vocab_size-1``.

For the processor path, :func:`tiny_qwen_processor` builds a transformers Qwen2-VL / Qwen2.5-VL processor whose
tokenizer spells those ids as Qwen's special tokens (:data:`QWEN_SPECIAL_TOKENS`), and :func:`write_video` writes a
small H.264 mp4 with PyAV.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "SUPPORTED_FAMILIES",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "VISION_START_ID",
    "VISION_END_ID",
    "IMAGE_ID",
    "VIDEO_ID",
    "FIRST_TEXT_ID",
    "tiny_config",
    "tiny_model",
    "tiny_pair",
    "make_inputs",
    "qwen3_timestamps",
    "QWEN3_TIMESTAMP_IDS",
    "visual_token_count",
    "perturbed_copy",
    "chi_square_test",
    "repeat_rows",
    "target_sequence_probs",
    "pairwise",
    "QWEN_SPECIAL_TOKENS",
    "tiny_qwen_tokenizer",
    "tiny_qwen_processor",
    "video_processor_available",
    "write_video",
]

PAD_ID, BOS_ID, EOS_ID, VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = range(7)
FIRST_TEXT_ID = 8

SUPPORTED_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava_onevision", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                      "qwen3_5_moe")
_QWEN = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
_QWEN3 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # the timestamped per-frame video layout
_QWEN3_5 = ("qwen3_5", "qwen3_5_moe")

#: Text ids the tiny models' Qwen3-VL video prompts spell each frame group's timestamp ``<1.2 seconds>`` with: one id
#: per character of the number (as Qwen's tokenizer splits digits), one for ``<``, `` seconds`` and ``>``.
QWEN3_TIMESTAMP_IDS = {ch: FIRST_TEXT_ID + 1 + i
                       for i, ch in enumerate(["<", ">", " seconds", "."] + list("0123456789"))}

# Sizes of the two roles. The draft is shallower and narrower, but shares vocabulary and token ids.
_ROLE_SIZES = {
    "target": dict(hidden_size=64, num_layers=3, heads=4, kv_heads=2, intermediate=128),
    "draft": dict(hidden_size=32, num_layers=2, heads=2, kv_heads=1, intermediate=64),
}
# Qwen3.5's hybrid stack alternates linear and full attention: an even layer count (the target gets 4).
_QWEN3_5_LAYERS = {"target": 4, "draft": 2}


def _check_family(model_type: str) -> str:
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"model_type must be one of {SUPPORTED_FAMILIES}, got {model_type!r}")
    return model_type


def tiny_config(model_type: str = "qwen2_5_vl", *, role: str = "target", vocab_size: int = 1000, **sizes):
    """A transformers config for a tiny model of ``model_type`` (one of :data:`SUPPORTED_FAMILIES`).

    ``role`` picks default sizes (``"target"``: hidden 64, 3 layers, 4 heads / 2 kv heads; ``"draft"``: hidden
    32, 2 layers, 2 heads / 1 kv head); ``sizes`` overrides ``hidden_size``, ``num_layers``, ``heads``,
    ``kv_heads``, ``intermediate``. Qwen vision towers use 14-px patches, temporal patch 2 and 2×2 merge, like
    the real models; LLaVA-OneVision uses a 28-px SigLIP with 7-px patches (16 patches, pooled to 4 tokens a
    frame) and ``vision_feature_select_strategy="full"``. Qwen3-VL (and Qwen3-VL-MoE: 4 experts, 2 per token, every
    layer sparse) has interleaved M-RoPE, a 2-block vision tower whose blocks 0 and 1 feed DeepStack features into
    the first two decoder layers, and an 8×8 learned position grid. Qwen3.5 (and Qwen3.5-MoE: 4 experts, 2 per
    token, plus the shared expert) is hybrid: decoder layers alternate Gated DeltaNet (``linear_attention``: 2 key /
    4 value heads of 8 dims, conv kernel 4) and full attention, starting with a linear one (target 4 layers, draft
    2); its vision tower is Qwen3-VL's without DeepStack.
    """
    _check_family(model_type)
    if role not in _ROLE_SIZES:
        raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
    unknown = set(sizes) - set(_ROLE_SIZES[role])
    if unknown:
        raise TypeError(f"unknown size overrides {sorted(unknown)}; known: {sorted(_ROLE_SIZES[role])}")
    s = {**_ROLE_SIZES[role], **({"num_layers": _QWEN3_5_LAYERS[role]} if model_type in ("qwen3_5", "qwen3_5_moe")
                                 else {}), **sizes}
    text = dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    if model_type in _QWEN3_5:
        return _qwen3_5_config(model_type, text, s)
    if model_type in _QWEN3:
        return _qwen3_config(model_type, text, s)
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        head_dim = s["hidden_size"] // s["heads"]
        # M-RoPE sections (t, h, w) sum to head_dim / 2.
        half = head_dim // 2
        t_sec = half - 2 * (half // 4 + half // 8)
        section = [t_sec, half // 4 + half // 8, half // 4 + half // 8]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        ids = dict(
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )
        if model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig

            vision = dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], out_hidden_size=s["hidden_size"],
                tokens_per_second=2,
            )
            return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=2, embed_dim=32, hidden_size=s["hidden_size"], mlp_ratio=2, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)

    from transformers import LlavaOnevisionConfig

    text["model_type"] = "qwen2"
    vision = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=28, patch_size=7,
    )
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[28, 28]],
        tie_word_embeddings=False,
    )


def _qwen3_config(model_type: str, text: dict, s: dict):
    head_dim = s["hidden_size"] // s["heads"]
    half = head_dim // 2
    # (t, h, w) sections of the rotary half, in the real models' 24:20:20 proportion; Qwen3-VL interleaves them.
    hw = max(1, (half * 20) // 64)
    text = dict(text, head_dim=head_dim,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True})
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=s["hidden_size"], num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    if model_type == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    from transformers import Qwen3VLMoeConfig

    text = dict(text, moe_intermediate_size=s["intermediate"] // 4, num_experts=4, num_experts_per_tok=2,
                decoder_sparse_step=1)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)


def _qwen3_5_config(model_type: str, text: dict, s: dict):
    head_dim = s["hidden_size"] // s["heads"]
    # partial rotary (the real models rotate a quarter of each head); mrope sections count the rotated half's pairs
    rotary = head_dim // 2
    half = rotary // 2
    hw = max(1, (half * 20) // 64)
    layer_types = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(s["num_layers"])]
    text = dict(text, head_dim=head_dim, layer_types=layer_types, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=s["hidden_size"], num_position_embeddings=64)
    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
    if model_type == "qwen3_5":
        from transformers import Qwen3_5Config

        return Qwen3_5Config(text_config=text, vision_config=vision, **ids)
    from transformers import Qwen3_5MoeConfig

    expert = s["intermediate"] // 4
    text = dict(text, moe_intermediate_size=expert, shared_expert_intermediate_size=expert, num_experts=4,
                num_experts_per_tok=2)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids)


def _model_class(model_type: str):
    import transformers

    return {
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration,
    }[model_type]


def tiny_model(
    model_type: str = "qwen2_5_vl",
    *,
    role: str = "target",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    vocab_size: int = 1000,
    **sizes,
):
    """A tiny randomly initialised model in eval mode (see :func:`tiny_config` for the sizes).

    Weights are drawn from a private generator seeded with ``seed`` (the global RNG is left as it was), with a
    larger-than-default init scale so the tiny model's logits are not all near-ties.
    """
    config = copy.deepcopy(tiny_config(model_type, role=role, vocab_size=vocab_size, **sizes))
    cls = _model_class(model_type)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "embed" not in name:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
                elif "embed" in name:
                    p.normal_(0.0, 1.0)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model.to(device=device, dtype=dtype).eval()


def tiny_pair(model_type: str = "qwen2_5_vl", *, seed: int = 0, **kwargs):
    """``(target, draft)``: a tiny target and a smaller draft of the same family sharing vocabulary and ids."""
    target = tiny_model(model_type, role="target", seed=seed, **kwargs)
    draft = tiny_model(model_type, role="draft", seed=seed + 1, **kwargs)
    return target, draft


def visual_token_count(config, modality: str = "video", *, frames: int = 4, height: int = 56, width: int = 56) -> int:
    """Number of placeholder tokens one video/image of the given size takes in the language model."""
    mt = config.model_type
    if mt in _QWEN:
        vc = config.vision_config
        t = 1 if modality == "image" else max(1, frames // vc.temporal_patch_size)
        gh, gw = height // vc.patch_size, width // vc.patch_size
        return t * gh * gw // (vc.spatial_merge_size**2)
    if mt == "llava_onevision":
        size = config.vision_config.image_size
        n = size // config.vision_config.patch_size
        if modality == "image":
            # One image of the tower's own size: the base tile (n·n tokens) plus one anyres tile (1×1 grid, no
            # unpadding) with a newline token after each of its n rows. Other grids need the real processor.
            if [list(p) for p in config.image_grid_pinpoints] != [[size, size]]:
                raise NotImplementedError("tiny LLaVA-OneVision image inputs need image_grid_pinpoints == "
                                          f"[[{size}, {size}]], got {config.image_grid_pinpoints}")
            return n * n + n * (n + 1)
        return frames * math.ceil(n / 2) ** 2 + 1
    raise ValueError(f"unsupported model_type {mt!r}; supported: {SUPPORTED_FAMILIES}")


def family_models(families) -> dict:
    """Per family: ``(target, close draft, small draft)``: a tiny target, a perturbed copy of it (noise 0.1: partial
    acceptance, rollback, per-row lengths) and the family's small random draft (:func:`tiny_pair`)."""
    out = {}
    for fam in families:
        target, small = tiny_pair(fam)
        out[fam] = (target, perturbed_copy(target, noise=0.1, seed=1), small)
    return out


def make_inputs(
    model_or_config,
    *,
    batch_size: int = 1,
    prompt_lens: Sequence[int] | int | None = None,
    modality: str = "video",
    frames: int = 4,
    height: int = 56,
    width: int = 56,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Model inputs matching a tiny model: left-padded ``input_ids``, ``attention_mask`` and the visual inputs.

    Each row is ``[PAD...] BOS t t VISION_START <visual placeholders> VISION_END t*prompt_len`` with random text
    tokens ``t``; rows differ in ``prompt_lens`` (default ``3, 5, 4, 6, ...``) and in their video/image.
    ``modality`` is ``"video"``, ``"image"`` or ``"text"`` (no visual tokens). LLaVA-OneVision frames and images
    are ``image_size`` square (``height``/``width`` are not used there); its image inputs carry ``image_sizes``.
    Qwen inputs carry ``mm_token_type_ids`` (0 text, 1 image, 2 video) and, for Qwen2.5-VL video,
    ``second_per_grid_ts``: transformers needs both to compute M-RoPE positions. A Qwen3-VL video is laid out as
    transformers' (5.x) processor expands the chat template's ``VISION_START <video> VISION_END``: inside that pair,
    per temporal group, its timestamp text ``<t seconds>`` (frames at 2 fps, :func:`qwen3_timestamps`), then
    ``VISION_START``, the group's placeholders, ``VISION_END``; ``video_grid_thw`` keeps one row per video.
    Float tensors are float32 on ``device`` (default: the model's input device, ``vspec.runtime.devices.input_device``).
    """
    config = getattr(model_or_config, "config", model_or_config)
    if device is None:  # where the model takes its inputs (not .device: a dispatched model's may be meta)
        from .runtime.devices import input_device

        device = input_device(model_or_config) if hasattr(model_or_config, "get_input_embeddings") else "cpu"
    mt = _check_family(config.model_type)
    if modality not in ("video", "image", "text"):
        raise ValueError(f"modality must be 'video', 'image' or 'text', got {modality!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prompt_lens is None:
        prompt_lens = [3 + (2 * i) % 5 for i in range(batch_size)]
    elif isinstance(prompt_lens, int):
        prompt_lens = [prompt_lens] * batch_size
    prompt_lens = list(prompt_lens)
    if len(prompt_lens) != batch_size:
        raise ValueError(f"prompt_lens must have batch_size={batch_size} entries, got {len(prompt_lens)}")

    gen = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    n_vis = 0 if modality == "text" else visual_token_count(config, modality, frames=frames, height=height, width=width)
    placeholder = VIDEO_ID if modality == "video" else IMAGE_ID
    type_id = 2 if modality == "video" else 1

    rows, types = [], []
    for n_text in prompt_lens:
        head = [BOS_ID] + torch.randint(FIRST_TEXT_ID, vocab, (2,), generator=gen).tolist()
        tail = torch.randint(FIRST_TEXT_ID, vocab, (n_text,), generator=gen).tolist()
        if modality == "text":
            ids = head + tail
            tt = [0] * len(ids)
        elif mt == "llava_onevision":
            ids = head + [placeholder] * n_vis + tail
            tt = [0] * len(head) + [type_id] * n_vis + [0] * len(tail)
        elif mt in _QWEN3 and modality == "video":
            body, body_types = _qwen3_video_tokens(config, frames, n_vis)
            ids = head + [VISION_START_ID] + body + [VISION_END_ID] + tail
            tt = [0] * (len(head) + 1) + body_types + [0] * (len(tail) + 1)
        else:
            ids = head + [VISION_START_ID] + [placeholder] * n_vis + [VISION_END_ID] + tail
            tt = [0] * (len(head) + 1) + [type_id] * n_vis + [0] * (len(tail) + 1)
        rows.append(ids)
        types.append(tt)

    width_max = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, width_max), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width_max), dtype=torch.long)
    mm_types = torch.zeros((batch_size, width_max), dtype=torch.long)
    for b, (ids, tt) in enumerate(zip(rows, types)):
        input_ids[b, width_max - len(ids):] = torch.tensor(ids)
        attention_mask[b, width_max - len(ids):] = 1
        mm_types[b, width_max - len(ids):] = torch.tensor(tt)

    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if modality != "text":
        if mt in _QWEN:
            vc = config.vision_config
            t = 1 if modality == "image" else max(1, frames // vc.temporal_patch_size)
            gh, gw = height // vc.patch_size, width // vc.patch_size
            patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            pixels = torch.randn(batch_size * t * gh * gw, patch_dim, generator=gen)
            grid = torch.tensor([[t, gh, gw]] * batch_size, dtype=torch.long)
            if modality == "video":
                out.update(pixel_values_videos=pixels, video_grid_thw=grid)
                if mt == "qwen2_5_vl":
                    out["second_per_grid_ts"] = torch.ones(batch_size)
            else:
                out.update(pixel_values=pixels, image_grid_thw=grid)
            out["mm_token_type_ids"] = mm_types
        elif modality == "video":
            size = config.vision_config.image_size
            out["pixel_values_videos"] = torch.randn(batch_size, frames, 3, size, size, generator=gen)
        else:
            size = config.vision_config.image_size
            out["pixel_values"] = torch.randn(batch_size, 2, 3, size, size, generator=gen)  # base tile + 1 anyres
            out["image_sizes"] = torch.tensor([[size, size]] * batch_size, dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}


def qwen3_timestamps(frames: int, *, fps: float = 2.0, temporal_patch_size: int = 2) -> list[float]:
    """The timestamp (seconds) Qwen3-VL's processor writes before each temporal group of a video of ``frames``
    consecutive frames sampled at ``fps``: the mean time of the group's first and last frame (an incomplete last group
    repeats the last frame)."""
    idx = list(range(frames))
    while len(idx) % temporal_patch_size:
        idx.append(idx[-1])
    secs = [i / fps for i in idx]
    return [(secs[i] + secs[i + temporal_patch_size - 1]) / 2 for i in range(0, len(secs), temporal_patch_size)]


def _qwen3_video_tokens(config, frames: int, n_vis: int) -> tuple[list[int], list[int]]:
    """A Qwen3-VL video's tokens as transformers' processor lays them out: per temporal group, the timestamp text
    ``<t seconds>`` (ids from :data:`QWEN3_TIMESTAMP_IDS`), then ``VISION_START``, the group's placeholders,
    ``VISION_END``; and the matching ``mm_token_type_ids`` (2 on the placeholders only)."""
    stamps = qwen3_timestamps(frames, temporal_patch_size=config.vision_config.temporal_patch_size)
    per_frame = n_vis // len(stamps)
    ids: list[int] = []
    for t in stamps:
        chars = ["<"] + list(f"{t:.1f}") + [" seconds", ">"]
        ids += [QWEN3_TIMESTAMP_IDS[c] for c in chars] + [VISION_START_ID] + [VIDEO_ID] * per_frame + [VISION_END_ID]
    return ids, [2 if i == VIDEO_ID else 0 for i in ids]


def perturbed_copy(model, *, noise: float = 0.05, seed: int = 0):
    """A deep copy of ``model`` whose weight matrices get relative Gaussian noise of scale ``noise``.

    Such a draft agrees with its original on most tokens but not all: tests use it to exercise partial
    acceptance, rollback and rows of one batch accepting different counts.
    """
    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * noise * p.std())
    return clone


def chi_square_test(counts: dict, probs: dict, n: int, *, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Pearson goodness of fit of observed ``counts`` (cell → count) to ``probs`` (cell → probability) over ``n``
    draws: ``(p_value, statistic, degrees_of_freedom)``. Cells expected fewer than ``min_expected`` times are pooled
    into one, as the chi-square approximation requires."""
    stat, pooled_obs, pooled_exp, dof = 0.0, 0, 0.0, -1
    for cell, p in probs.items():
        e, o = n * p, counts.get(cell, 0)
        if e < min_expected:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    p_value = float(torch.special.gammaincc(torch.tensor(max(dof, 1) / 2.0, dtype=torch.float64),
                                            torch.tensor(stat / 2.0, dtype=torch.float64)))
    return p_value, stat, dof


def sample_continuations(dec, inputs: dict, *, rows: int, calls: int, n_tokens: int, generator,
                         on_output=None, **generate_kwargs) -> dict:
    """Counts ``{(t1, ..., tn): k}`` of the first ``n_tokens`` tokens that ``dec.generate`` samples for a batch-1
    ``inputs`` repeated into ``rows`` rows, over ``calls`` calls (EOS disabled, ``do_sample=True``).

    ``generate_kwargs``: the sampling options; ``on_output(out)`` sees each call's output (its stats). The sampling
    tests compare the counts with :func:`target_sequence_probs` through :func:`assert_follows`."""
    batch = repeat_rows(inputs, rows)
    L = inputs["input_ids"].shape[1]
    counts: dict = {}
    for _ in range(calls):
        out = dec.generate(**batch, max_new_tokens=n_tokens, do_sample=True, generator=generator, eos_token_id=10**6,
                           **generate_kwargs)
        for seq in out.sequences[:, L:L + n_tokens].tolist():
            counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
        if on_output is not None:
            on_output(out)
    return counts


def assert_follows(counts: dict, probs: dict, n: int, *, alpha: float = 1e-3, min_dof: int = 3) -> None:
    """Assert that ``counts`` (``n`` draws) lie in the support of ``probs`` and pass :func:`chi_square_test` at
    false-alarm rate ``alpha`` with at least ``min_dof`` degrees of freedom."""
    assert set(counts) <= set(probs), f"sequences outside the target's support: {set(counts) - set(probs)}"
    p_value, stat, dof = chi_square_test(counts, probs, n)  # cells expected < 5 times are pooled
    assert dof >= min_dof, f"only {dof} degrees of freedom"
    assert math.isfinite(stat)
    assert p_value > alpha, f"chi2={stat:.1f} dof={dof} p={p_value:.2e}"


def repeat_rows(inputs: dict, rows: int) -> dict:
    """A batch-1 input dict (from :func:`make_inputs`) repeated into ``rows`` identical rows: every tensor is
    repeated along its first dim (pixel rows, grids and per-video values included)."""
    return {k: v.repeat(rows, *([1] * (v.ndim - 1))) for k, v in inputs.items()}


@torch.no_grad()
def target_sequence_probs(model, inputs: dict, n_tokens: int, *, temperature: float, top_k: int,
                          repetition_penalty: float = 1.0) -> dict:
    """Exact probability of every continuation of ``n_tokens`` tokens that ``model`` can sample from a batch-1,
    unpadded ``inputs`` under ``repetition_penalty`` (transformers' own processor), ``temperature`` and top-k
    warping: ``{(t1, ..., tn): p}`` (the support only).

    The sampling tests compare drawn continuations with it through :func:`chi_square_test`."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
    ids0 = inputs["input_ids"]
    kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}

    def warped(ids):
        if "mm_token_type_ids" in inputs:
            pad = torch.zeros(1, ids.shape[1] - ids0.shape[1], dtype=inputs["mm_token_type_ids"].dtype)
            kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[:, -1].float()
        if penalty is not None:
            logits = penalty(ids, logits)
        logits = logits[0] / temperature
        kth = torch.topk(logits, top_k).values[-1:]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    joint = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for prefix, p in joint.items():
            probs = warped(torch.cat([ids0, torch.tensor([list(prefix)], dtype=torch.long)], dim=1))
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (t,)] = p * float(probs[t])
        joint = nxt
    return joint


# ---- the processor path ------------------------------------------------------------------------------------

#: The tiny models' special ids as Qwen's tokens. EOS is ``<|im_end|>``, the token a Qwen chat turn ends with.
QWEN_SPECIAL_TOKENS = {
    "<|endoftext|>": PAD_ID,
    "<|bos|>": BOS_ID,
    "<|im_end|>": EOS_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "<|image_pad|>": IMAGE_ID,
    "<|video_pad|>": VIDEO_ID,
    "<|im_start|>": 7,
}

# A chat template that renders like Qwen2-VL's: one <|im_start|>role ... <|im_end|> block per message, each video or
# image as <|vision_start|><|video_pad|><|vision_end|> (the processor expands the pad to the video's token count).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "<unk> user assistant system describe the video image what happens in a an this clip frame red green blue "
    "square circle moves left right up down stays still one two three four is are and of to it at on"
).split()


def tiny_qwen_tokenizer(vocab_size: int = 1000):
    """A word-level ``PreTrainedTokenizerFast`` with one token per id of a tiny Qwen model's vocabulary.

    Ids ``0..7`` are :data:`QWEN_SPECIAL_TOKENS`; then ``<unk>`` (id 8), a few English words, and ``w<id>`` for the
    rest, so every id the model can emit decodes to a word. Left padding, and a Qwen-style chat template.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(QWEN_SPECIAL_TOKENS)
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab_size must be at least {len(vocab)}, got {vocab_size}")
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
        chat_template=_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )


def video_processor_available() -> bool:
    """Whether transformers' Qwen2-VL video processor can be built here (it needs a torchvision that imports: the
    CUDA-built torchvision wheels do not import next to a CPU-only torch)."""
    try:
        from transformers import Qwen2VLVideoProcessor

        Qwen2VLVideoProcessor()
    except Exception:  # ImportError without torchvision; RuntimeError from a torchvision built for another torch
        return False
    return True


def tiny_qwen_processor(model_or_config, *, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """transformers' own Qwen2.5-VL / Qwen2-VL processor for a tiny Qwen model (see :func:`tiny_config`).

    The tokenizer is :func:`tiny_qwen_tokenizer` (its ids are the model's ``image_token_id``, ``video_token_id``,
    ``vision_start_token_id`` …); the image and video processors are ``Qwen2VLImageProcessor`` and
    ``Qwen2VLVideoProcessor`` sized like the model's vision tower (patch size, merge size, temporal patch size), with
    frames resized to between ``min_pixels`` and ``max_pixels`` pixels. It saves and loads with ``save_pretrained`` /
    ``AutoProcessor.from_pretrained`` like a real checkpoint's. Raises ``ImportError`` where transformers' video
    processor cannot be built (it needs a working torchvision: :func:`video_processor_available`).
    """
    config = getattr(model_or_config, "config", model_or_config)
    mt = config.model_type
    if mt not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"tiny_qwen_processor builds Qwen2-VL / Qwen2.5-VL processors, not {mt!r}")
    if not video_processor_available():
        raise ImportError("transformers' Qwen2VLVideoProcessor needs torchvision, and no working torchvision is "
                          "installed (install the torchvision release built for your torch)")
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = tiny_qwen_tokenizer(config.get_text_config().vocab_size)
    for name, tid in (("image_token", config.image_token_id), ("video_token", config.video_token_id),
                      ("vision_start_token", config.vision_start_token_id),
                      ("vision_end_token", config.vision_end_token_id)):
        if tok.convert_tokens_to_ids(getattr(tok, name)) != tid:
            raise ValueError(f"the tiny tokenizer's {name} is not the model's id {tid}: build the model with "
                             "vspec.testing.tiny_config's token ids")
    vc = config.vision_config
    sizes = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
                 size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    cls = Qwen2_5_VLProcessor if mt == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
               video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **sizes), chat_template=_CHAT_TEMPLATE)


def write_video(path, frames=None, *, num_frames: int = 8, fps: int = 4, height: int = 56, width: int = 56,
                seed: int = 0, crf: int = 18, threads: int = 0) -> None:
    """Write an H.264 (yuv420p) mp4 with PyAV.

    ``frames``: uint8 ``[T, H, W, 3]`` (numpy or torch), or ``None`` for a clip of ``num_frames`` frames of
    ``height`` × ``width`` (even sizes: yuv420p) at ``fps`` frames per second with a coloured square moving over
    a noisy background. Every written frame decodes back (``av.open(path).decode(video=0)``). ``path``: a file
    name or a writable binary file object (e.g. ``io.BytesIO``). ``crf``: x264's constant rate factor (18: nearly
    transparent; higher is lossier). ``threads``: x264 threads (0: x264 chooses; 1 for byte-identical output
    whatever the machine).
    """
    import av
    import numpy as np

    if frames is None:
        rng = np.random.default_rng(seed)
        frames = rng.integers(60, 100, size=(num_frames, height, width, 3), dtype=np.uint8)
        side = max(2, min(height, width) // 4)
        for t in range(num_frames):
            y = (t * 3) % (height - side)
            x = (t * 5) % (width - side)
            frames[t, y:y + side, x:x + side] = (230, 40, 40)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {tuple(frames.shape)}")
    target = path if hasattr(path, "write") else str(path)
    with av.open(target, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        if threads:
            stream.codec_context.thread_count = threads
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pairwise(*axes: Sequence) -> list[tuple]:
    """A covering subset of the product of ``axes``: every pair of values from any two axes appears together in at
    least one returned case (all-pairs testing). For test grids whose full product repeats work: a bug that needs
    one particular pair of settings still meets that pair, at a fraction of the cases (e.g. 2 × 5 × 2 -> 10, 2 × 2 ×
    3 × 2 -> 6). Deterministic: greedy, each step takes the first case of the product, in order, that covers the
    most pairs not yet covered."""
    axes = [list(a) for a in axes]
    if any(not a for a in axes):
        raise ValueError("pairwise: every axis needs at least one value")
    if len(axes) < 2:
        return [tuple(c) for c in itertools.product(*axes)]

    def pairs(case):
        return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}

    product = list(itertools.product(*axes))
    todo = set().union(*(pairs(c) for c in product))
    chosen = []
    while todo:
        best = max(product, key=lambda c: len(pairs(c) & todo))  # max keeps the first of equals
        chosen.append(best)
        todo -= pairs(best)
    return chosen
