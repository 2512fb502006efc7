"""Gated DeltaNet verify step (Qwen3.5's linear-attention layers): ``gated_delta_verify`` / ``gated_delta_commit``.

Argument checks live in :mod:`vspec.ops`; the specification is :func:`vspec.kernels.reference.gated_delta_verify`
and :func:`vspec.kernels.reference.gated_delta_commit`.

One kernel serves both phases. A program owns one ``(row b, value head h, Dv block)`` column of the recurrent
state: the ``[BLOCK_K, BLOCK_V]`` block ``S[b, h, :, v0:v0+BLOCK_V]`` (all of Dk) stays in registers in float32
while the program walks the row's tokens in order (T = γ+1 ≤ 17 in practice; T is a runtime value). Per token
it loads q/k of the key head ``h // (Hv // Hk)`` (the whole Dk: the l2-norm needs it), the value slice, g and
beta, and applies, in float32::

    S = S · exp(g);  kv_mem = kᵀS;  delta = (v − kv_mem) · beta;  S = S + k ⊗ delta;  o = qᵀS

with q, k l2-normalised (``rsqrt(Σx² + 1e-6)``, transformers' ``l2norm``) when ``USE_L2NORM`` and q scaled.

* verify (``COMMIT=False``): all T tokens, writes ``o`` only; the state is read, never written.
* commit (``COMMIT=True``): the first ``accept_len[b] + 1`` tokens of row b (clamped to ``[1, T]`` so a bad
  length cannot address memory outside the inputs), writes only the final state block. The output state may
  alias the input state (an in-place commit): each program reads its own block completely before it writes
  the same block, and no other program touches it.

Block sizes: ``BLOCK_K = next_power_of_2(Dk)`` (the l2-norm needs all of k in one program),
``BLOCK_V = min(next_power_of_2(Dv), 4096 // BLOCK_K)``: at Dk = Dv = 128 that is a 128×32 state block, 32
float32 registers per thread at 4 warps, and ``4·B·Hv`` programs (192 per row at Hv = 48), see
:mod:`vspec.kernel_report` for the compiled figures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gated_delta_verify", "gated_delta_commit"]

_STATE_ELEMS = 4096  # fp32 state elements per program: 32 per thread at 4 warps


def _new(shape, dtype, device) -> torch.Tensor:
    # Single allocation point for outputs, so tests can poison every buffer the kernel fills.
    return torch.empty(shape, dtype=dtype, device=device)


def config(Dk: int, Dv: int, block_v: int | None = None) -> dict:
    """Constexprs ``BLOCK_K``, ``BLOCK_V`` of ``_gated_delta_kernel`` (also enumerated by vspec.kernel_report)."""
    block_k = triton.next_power_of_2(Dk)
    if block_v is None:
        block_v = max(1, min(triton.next_power_of_2(Dv), _STATE_ELEMS // block_k))
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two, got {block_v}")
    return dict(BLOCK_K=block_k, BLOCK_V=block_v)


@triton.jit
def _gated_delta_kernel(
    q,
    k,
    v,
    g,
    beta,
    state,
    o,
    new_state,
    accept_len,
    T,
    Hv,
    Dk,
    Dv,
    n_rep,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gt,
    stride_gh,
    stride_bb,
    stride_bt,
    stride_bh,
    stride_sb,
    stride_sh,
    stride_sk,
    stride_sv,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_nb,
    stride_nh,
    stride_nk,
    stride_nv,
    USE_L2NORM: tl.constexpr,
    COMMIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_vb = tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hv
    i_h = i_bh % Hv
    i_hk = i_h // n_rep  # GQA: each key head serves n_rep consecutive value heads

    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    o_v = i_vb * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    m_k = o_k < Dk
    m_v = o_v < Dv
    m_s = m_k[:, None] & m_v[None, :]

    p_s = state + i_b * stride_sb + i_h * stride_sh + o_k[:, None] * stride_sk + o_v[None, :] * stride_sv
    b_s = tl.load(p_s, mask=m_s, other=0.).to(tl.float32)  # [BLOCK_K, BLOCK_V]

    if COMMIT:
        n_tok = tl.load(accept_len + i_b).to(tl.int32) + 1
        n_tok = tl.minimum(tl.maximum(n_tok, 1), T)
    else:
        n_tok = T

    p_q = q + i_b * stride_qb + i_hk * stride_qh + o_k * stride_qd
    p_k = k + i_b * stride_kb + i_hk * stride_kh + o_k * stride_kd
    p_v = v + i_b * stride_vb + i_h * stride_vh + o_v * stride_vd
    p_g = g + i_b * stride_gb + i_h * stride_gh
    p_beta = beta + i_b * stride_bb + i_h * stride_bh
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_v * stride_od
    for _ in range(0, n_tok):
        b_k = tl.load(p_k, mask=m_k, other=0.).to(tl.float32)  # [BLOCK_K]
        b_v = tl.load(p_v, mask=m_v, other=0.).to(tl.float32)  # [BLOCK_V]
        b_g = tl.load(p_g).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)
        if USE_L2NORM:
            b_k = b_k * (1.0 / tl.sqrt(tl.sum(b_k * b_k, axis=0) + 1e-6))
        b_s = b_s * tl.exp(b_g)
        b_kv = tl.sum(b_s * b_k[:, None], axis=0)  # [BLOCK_V]
        b_delta = (b_v - b_kv) * b_beta
        b_s = b_s + b_k[:, None] * b_delta[None, :]
        if not COMMIT:
            b_q = tl.load(p_q, mask=m_k, other=0.).to(tl.float32)  # [BLOCK_K]
            if USE_L2NORM:
                b_q = b_q * (1.0 / tl.sqrt(tl.sum(b_q * b_q, axis=0) + 1e-6))
            b_q = b_q * scale
            b_o = tl.sum(b_s * b_q[:, None], axis=0)  # [BLOCK_V]
            tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)
        # advancing 64-bit pointers keeps every offset in int64 without a loop-carried index
        p_q += stride_qt
        p_k += stride_kt
        p_v += stride_vt
        p_g += stride_gt
        p_beta += stride_bt
        p_o += stride_ot

    if COMMIT:
        p_n = new_state + i_b * stride_nb + i_h * stride_nh + o_k[:, None] * stride_nk + o_v[None, :] * stride_nv
        tl.store(p_n, b_s, mask=m_s)


def _launch(q, k, v, g, beta, state, o, new_state, accept_len, *, scale, use_qk_l2norm, commit, block_v):
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    cfg = config(Dk, Dv, block_v)
    scale = Dk ** -0.5 if scale is None else scale
    grid = (B * Hv, triton.cdiv(Dv, cfg["BLOCK_V"]))
    o_t = o if o is not None else v  # unused pointer in commit mode
    n_t = new_state if new_state is not None else state  # unused pointer in verify mode
    a_t = accept_len if accept_len is not None else state
    _gated_delta_kernel[grid](
        q, k, v, g, beta, state, o_t, n_t, a_t,
        T, Hv, Dk, Dv, Hv // Hk, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(), *state.stride(),
        *o_t.stride(), *n_t.stride(),
        USE_L2NORM=bool(use_qk_l2norm), COMMIT=commit, **cfg,
    )


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def gated_delta_verify(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=True, block_v=None):
    """Outputs ``o [B, T, Hv, Dv]`` (dtype of q) of the gated delta rule over all T tokens from ``state``.
    Arguments are assumed validated by :func:`vspec.ops.gated_delta_verify`; ``state`` is not modified."""
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    B, T, _, _ = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    o = _new((B, T, Hv, Dv), q.dtype, q.device)
    if o.numel() == 0:
        return o
    _launch(q, k, v, g, beta, state, o, None, None, scale=scale, use_qk_l2norm=use_qk_l2norm, commit=False,
            block_v=block_v)
    return o


def gated_delta_commit(q, k, v, g, beta, state, accept_len, *, scale=None, use_qk_l2norm=True, out=None,
                       block_v=None):
    """The state after the first ``accept_len[b] + 1`` tokens of each row, float32 ``[B, Hv, Dk, Dv]``, written
    into ``out`` when given (``out`` may be ``state`` itself). Arguments are assumed validated by
    :func:`vspec.ops.gated_delta_commit`."""
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    if out is None:
        out = _new(tuple(state.shape), torch.float32, state.device)
    if out.numel() == 0:
        return out
    if accept_len.dtype != torch.int64:
        accept_len = accept_len.to(torch.int64)
    accept_len = accept_len.contiguous()
    _launch(q, k, v, g, beta, state, None, out, accept_len, scale=scale, use_qk_l2norm=use_qk_l2norm,
            commit=True, block_v=block_v)
    return out
