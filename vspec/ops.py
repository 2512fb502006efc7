"""Public fused ops of vspec: argument checks, then dispatch to Triton or to the PyTorch reference.

Dispatch rule (DESIGN.md, Dispatch): the Triton kernel runs when any tensor argument is on CUDA, or when
``TRITON_INTERPRET=1`` is set (Triton's CPU interpreter, used by the tests); otherwise the reference in
:mod:`vspec.kernels.reference` runs. ``VSPEC_BACKEND=reference|triton`` forces one backend.

Every op raises ``ValueError``/``TypeError`` naming the bad argument, with the shape/dtype that came.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "visual_attention_mass",
    "frame_semantic_scores",
    "verify_greedy",
    "verify_tree_greedy",
    "verify_sampling",
    "verify_loose",
    "compact_kv_",
    "backend_for",
]

_BACKENDS = ("reference", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(*tensors: torch.Tensor | None) -> str:
    """The backend an op called with ``tensors`` runs on: ``"triton"`` or ``"reference"``."""
    forced = os.environ.get("VSPEC_BACKEND", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"VSPEC_BACKEND must be one of {_BACKENDS}, got {forced!r}")
        if forced == "triton" and not _triton_available():
            raise RuntimeError("VSPEC_BACKEND=triton but triton is not importable on this platform")
        return forced
    if not _triton_available():
        return "reference"
    if any(t is not None and t.is_cuda for t in tensors):
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


# --------------------------------------------------------------------------------------------------
# argument checks shared by every op
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, floating: bool | None = None,
                  integer: bool | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.ndim not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not items:
        return
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; all tensors must share a device")


# --------------------------------------------------------------------------------------------------
# scoring (kernels/scoring.py)
# --------------------------------------------------------------------------------------------------


def visual_attention_mass(q, k, visual_idx, *, scale=None, normalize="visual", attention_mask=None, out=None):
    """Attention probability mass on each visual key, averaged over heads and query rows.

    q: ``[B, Hq, Lq, D]`` post-RoPE queries of the LAST Lq positions of the key sequence (causal).
    k: ``[B, Hkv, S, D]`` post-RoPE keys, ``Hq % Hkv == 0``.
    visual_idx: ``[B, Nv]`` int64 key positions of the visual tokens, ``-1`` = padding (score 0).
    attention_mask: optional ``[B, S]`` (1 = valid key, HF convention).
    normalize: ``"visual"`` softmax over the valid visual keys only; ``"all"`` over every causally visible
    valid key. scale defaults to ``D ** -0.5``.
    Returns ``[B, Nv]`` float32; with ``out`` the result is added into ``out`` and ``out`` is returned.
    Never materialises ``[Hq, Lq, S]``.
    """
    raise NotImplementedError("visual_attention_mass: fused visual-token scoring (issue 3) is not implemented yet")


def frame_semantic_scores(x, grid, *, window=3):
    """Temporal novelty and spatial complexity of visual features.

    x: ``[B, N, C]`` features in (t, h, w) raster order, ``N = T*H*W``; grid = ``(T, H, W)``.
    Returns ``(temporal, spatial)``, each ``[B, N]`` float32 (see DESIGN.md, Op contract).
    """
    raise NotImplementedError("frame_semantic_scores: fused visual-token scoring (issue 3) is not implemented yet")


# --------------------------------------------------------------------------------------------------
# verification (kernels/verify.py)
# --------------------------------------------------------------------------------------------------


def verify_greedy(logits, draft_tokens):
    """Greedy chain verification. logits ``[B, γ+1, V]``, draft_tokens ``[B, γ]``.

    Returns ``(accept_len Long[B], target_tokens Long[B, γ+1])``; target_tokens is the argmax (ties → lowest
    index), accept_len the length of the leading run where ``draft_tokens == target_tokens[:, :γ]``.
    """
    raise NotImplementedError("verify_greedy: fused verification kernels (issue 4) are not implemented yet")


def verify_tree_greedy(logits, tree_tokens, parents):
    """Greedy tree verification (DESIGN.md). Returns ``(accept_len[B], path[B, depth+1], next_token[B])``."""
    raise NotImplementedError("verify_tree_greedy: fused verification kernels (issue 4) are not implemented yet")


def verify_sampling(target_logits, draft_probs, draft_tokens, *, temperature=1.0, generator=None):
    """Lossless speculative sampling. Returns ``(accept_len[B], tokens[B, γ+1])`` (rest −1)."""
    raise NotImplementedError("verify_sampling: fused verification kernels (issue 4) are not implemented yet")


def verify_loose(logits, draft_tokens, strict_mask, **rule):
    """Loose verification (LVSpec): strict positions need the exact greedy match, others a tolerance rule."""
    raise NotImplementedError("verify_loose: fused verification kernels (issue 4) are not implemented yet")


# --------------------------------------------------------------------------------------------------
# KV-cache compaction (kernels/kv.py)
# --------------------------------------------------------------------------------------------------


def compact_kv_(kv, src_idx, dst_start):
    """In place: row ``src_idx[b, j]`` of ``kv[..., b, :, :, :]`` moves to ``dst_start[b] + j`` (−1 = skip)."""
    raise NotImplementedError("compact_kv_: KV-cache compaction kernel (issue 5) is not implemented yet")
