"""Fused verification kernels: greedy chain, greedy tree, lossless speculative sampling, loose (LVSpec).

Few rows carry a huge vocabulary (B·(γ+1) may be 5 rows of V = 152k logits), so every op splits the
vocabulary across programs:

* pass A, ``_block_stats_kernel``, grid ``(B·R, cdiv(V, BLOCK_V))``: the ONLY full read of the logits.
  Each program reduces one ``BLOCK_V`` slice of one row to partials: max, argmax (lowest index on ties),
  and, per flag, the sum of ``exp(x/T − blockmax/T)`` (sampling), the number of entries that outrank the
  draft token (loose top-k) and the 2nd/3rd largest values (loose entropy gate).
* pass B, one small program per batch row: reduces the partials of its R rows and runs the acceptance logic
  vectorised over the γ positions (chain, sampling, loose; the loose shift/window rules use ``[R, R]`` masks)
  or over the N tree nodes (acceptance and depth by pointer jumping, ceil(log2 N) rounds of ``tl.gather``,
  then a walk up the parents for the path). The partials are read in ``[rows, BLOCK_NB]`` chunks of at most
  ``_PASS_B_TILE`` lanes. Argmax follows ``torch.argmax``, NaN included (NaN is the max, first NaN wins).
  Draft-token logits and probabilities are gathered with single-element loads.
* sampling only, after pass B knows which row draws (the first rejected position, or γ for the bonus):
  pass C, ``_draw_mass_kernel``, grid ``(B, cdiv(V, BLOCK_V))``, reads that one row of logits and draft
  probabilities again and writes per-block float64 masses of ``max(0, p − q)`` and of ``p``; pass D,
  ``_draw_kernel``, one program per batch row, prefix-sums the block masses to find the block holding the
  inverse-CDF threshold, then scans that single block (float64 ``tl.cumsum``) to find the token.
  So sampling reads the logits ``1 + 1/(γ+1)`` times in total.

Sampling precision is shared with the reference: p in float32, acceptance ``u·q < p`` in float32, draw
weights and running sums in float64, so kernel and reference pick the same tokens from the same uniforms
except at float32 rounding ties. Launchers expect arguments already checked by :mod:`vspec.ops`; outputs are
int64. Not wrapped in ``torch.library.custom_op``: verification results feed host-side control flow.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import MAX_TREE_NODES

__all__ = ["verify_greedy", "verify_tree_greedy", "verify_sampling", "verify_loose"]


def _new(shape, dtype, device) -> torch.Tensor:
    # Single allocation point for outputs and scratch, so tests can poison every buffer the kernels fill.
    return torch.empty(shape, dtype=dtype, device=device)


#: Most vocabulary blocks per row: the default ``BLOCK_V`` grows with V to stay under it, and an explicit
#: ``block_v`` that would exceed it is refused (the draw kernel holds one row's block masses in registers).
MAX_BLOCKS = 64
#: Pass-B programs read the block partials of their rows in ``[rows, BLOCK_NB]`` chunks of at most this many
#: lanes (4 per thread at 4 warps): wider tiles spilled registers at 32 rows (γ = 31) or 64 tree nodes.
_PASS_B_TILE = 512


def pick_block_v(V: int, block_v: int | None) -> int:
    if block_v is None:
        return max(min(triton.next_power_of_2(V), 4096), triton.next_power_of_2(triton.cdiv(V, MAX_BLOCKS)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    if triton.cdiv(V, block_v) > MAX_BLOCKS:
        least = triton.next_power_of_2(triton.cdiv(V, MAX_BLOCKS))
        raise ValueError(f"block_v={block_v} splits V={V} into {triton.cdiv(V, block_v)} blocks; at most "
                         f"{MAX_BLOCKS} are allowed (use block_v >= {least})")
    return block_v


def _nb_chunk(rows: int, NB: int) -> int:
    """``BLOCK_NB`` of a pass-B program over ``rows`` rows (a power of two): blocks per chunk."""
    return max(1, min(triton.next_power_of_2(NB), _PASS_B_TILE // rows))


def rows_config(R: int, NB: int) -> dict:
    """Constexprs of the chain / sampling / loose pass-B kernels for R = γ+1 rows."""
    BLOCK_R = triton.next_power_of_2(R)
    return dict(BLOCK_R=BLOCK_R, BLOCK_NB=_nb_chunk(BLOCK_R, NB))


def tree_config(N: int, NB: int) -> dict:
    """Constexprs and warps of ``_greedy_tree_kernel`` for N nodes and NB vocabulary blocks."""
    BLOCK_N = triton.next_power_of_2(N)
    return dict(BLOCK_N=BLOCK_N, BLOCK_NB=_nb_chunk(BLOCK_N, NB), num_warps=8 if BLOCK_N >= 256 else 4)


def warps_for(block: int) -> int:
    return 16 if block >= 16384 else 8 if block >= 4096 else 4


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _block_stats_kernel(
    x_ptr, tok_ptr,
    pmax_ptr, pidx_ptr, psum_ptr, pcnt_ptr, ptop2_ptr, ptop3_ptr,
    R, V, NB, gamma, inv_temp,
    stride_xb, stride_xr, stride_tb, stride_tr,
    BLOCK_V: tl.constexpr, WITH_SUMEXP: tl.constexpr, WITH_RANK: tl.constexpr, WITH_TOP3: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)  # flattened (batch, row)
    i_v = tl.program_id(1).to(tl.int64)  # vocabulary block
    i_b = i_m // R
    i_r = i_m % R
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    m_v = o_v < V
    p_x = x_ptr + i_b * stride_xb + i_r * stride_xr
    b_x = tl.load(p_x + o_v, mask=m_v, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
    # torch.argmax semantics: NaN is the maximum and the first NaN wins. tl.max skips NaN on a GPU but not in
    # the interpreter, so NaN never reaches a max: it is found on its own and overrides the block's result,
    # and the block max becomes NaN so that pass B sees it.
    m_nan = m_v & (b_x != b_x)
    i_nan = tl.min(tl.where(m_nan, o_v, V), axis=0)
    b_x = tl.where(m_nan, float("-inf"), b_x)
    b_max = tl.max(b_x, axis=0)
    b_idx = tl.min(tl.where(m_v & (b_x == b_max), o_v, V), axis=0)
    b_idx = tl.where(i_nan < V, i_nan, b_idx)
    b_max = tl.where(i_nan < V, float("nan"), b_max)
    o_p = i_m * NB + i_v
    tl.store(pmax_ptr + o_p, b_max)
    tl.store(pidx_ptr + o_p, b_idx)
    if WITH_SUMEXP:
        # exp relative to the block max; pass B rescales to the row max. An all -inf block sums to 0.
        b_ref = tl.where(b_max == float("-inf"), 0.0, b_max * inv_temp)
        b_e = tl.where(m_v, tl.exp(b_x * inv_temp - b_ref), 0.0)  # [BLOCK_V]
        tl.store(psum_ptr + o_p, tl.sum(b_e, axis=0))
    if WITH_RANK:
        # rank of the draft token = entries that beat it (larger, or equal with a lower index)
        m_t = i_r < gamma
        b_t = tl.load(tok_ptr + i_b * stride_tb + i_r * stride_tr, mask=m_t, other=0)
        m_in = m_t & (b_t >= 0) & (b_t < V)
        b_xt = tl.load(p_x + b_t, mask=m_in, other=float("inf")).to(tl.float32)
        b_beat = m_v & ((b_x > b_xt) | ((b_x == b_xt) & (o_v < b_t)))  # [BLOCK_V]
        tl.store(pcnt_ptr + o_p, tl.sum(b_beat.to(tl.int32), axis=0))
    if WITH_TOP3:
        # drop one occurrence of the max, then of the runner-up: values of the block's top 3
        b_x2 = tl.where(o_v == b_idx, float("-inf"), b_x)  # [BLOCK_V]
        b_max2 = tl.max(b_x2, axis=0)
        b_idx2 = tl.min(tl.where(m_v & (b_x2 == b_max2), o_v, V), axis=0)
        b_x3 = tl.where(o_v == b_idx2, float("-inf"), b_x2)  # [BLOCK_V]
        tl.store(ptop2_ptr + o_p, b_max2)
        tl.store(ptop3_ptr + o_p, tl.max(b_x3, axis=0))


@triton.jit
def _rows_argmax(pmax_ptr, pidx_ptr, o_row, m_row, NB, V, BLOCK_NB: tl.constexpr):
    """Row max and argmax from the pass-A partials of rows ``o_row``: ``[BLOCK_R]`` each, like torch.argmax
    (ties → lowest index; a row holding NaN has max NaN and argmax its first NaN). Reads the partials in
    chunks of ``BLOCK_NB`` blocks; masked rows give ``(-inf, V)``."""
    o_row = o_row.to(tl.int64)
    b_max = tl.zeros_like(o_row).to(tl.float32) + float("-inf")
    b_arg = tl.zeros_like(o_row) + V
    b_nan = tl.zeros_like(o_row) + V
    for c0 in range(0, NB, BLOCK_NB):
        o_nb = c0 + tl.arange(0, BLOCK_NB)
        m_p = m_row[:, None] & (o_nb[None, :] < NB)
        o_p = o_row[:, None] * NB + o_nb[None, :]
        b_pm = tl.load(pmax_ptr + o_p, mask=m_p, other=float("-inf"))  # [BLOCK_R, BLOCK_NB]
        b_pi = tl.load(pidx_ptr + o_p, mask=m_p, other=0).to(tl.int64)  # [BLOCK_R, BLOCK_NB]
        m_nan = m_p & (b_pm != b_pm)
        b_nan = tl.minimum(b_nan, tl.min(tl.where(m_nan, b_pi, V), axis=1))
        b_pm = tl.where(m_nan, float("-inf"), b_pm)
        b_cmax = tl.max(b_pm, axis=1)
        # blocks are in vocabulary order, so the lowest index among tied block maxima is the global one, and
        # a later chunk wins only with a strictly larger max
        b_carg = tl.min(tl.where(m_p & (b_pm == b_cmax[:, None]), b_pi, V), axis=1)
        m_new = (b_cmax > b_max) | (b_arg >= V)
        b_arg = tl.where(m_new, b_carg, b_arg)
        b_max = tl.maximum(b_max, b_cmax)
    m_nan_row = b_nan < V
    return tl.where(m_nan_row, float("nan"), b_max), tl.where(m_nan_row, b_nan, b_arg)


@triton.jit
def _greedy_chain_kernel(
    pmax_ptr, pidx_ptr, tok_ptr, len_ptr, tgt_ptr,
    R, NB, V, gamma,
    stride_tb, stride_tr, stride_ob,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = o_r < R
    m_d = o_r < gamma
    _, b_arg = _rows_argmax(pmax_ptr, pidx_ptr, i_b * R + o_r, m_r, NB, V, BLOCK_NB)
    b_d = tl.load(tok_ptr + i_b * stride_tb + o_r * stride_tr, mask=m_d, other=-1)  # [BLOCK_R]
    b_len = tl.min(tl.where(m_d & (b_d != b_arg), o_r, gamma), axis=0)
    tl.store(tgt_ptr + i_b * stride_ob + o_r, b_arg, mask=m_r)
    tl.store(len_ptr + i_b, b_len)


@triton.jit
def _greedy_tree_kernel(
    pmax_ptr, pidx_ptr, tok_ptr, par_ptr, len_ptr, path_ptr, next_ptr,
    N, NB, V, W, n_rounds,
    stride_tb, stride_tn, stride_pb, stride_pn, stride_ob,
    BLOCK_N: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < N
    p_par = par_ptr + i_b * stride_pb
    b_par = tl.load(p_par + o_n * stride_pn, mask=m_n, other=0)  # [BLOCK_N]
    b_par = tl.where(o_n == 0, 0, b_par)  # the root points at itself
    b_tok = tl.load(tok_ptr + i_b * stride_tb + o_n * stride_tn, mask=m_n, other=-1)  # [BLOCK_N]
    _, b_arg = _rows_argmax(pmax_ptr, pidx_ptr, i_b * N + o_n, m_n, NB, V, BLOCK_NB)
    # every gather index lies in [0, BLOCK_N): parents are < i, padding lanes point at the root
    b_par = b_par.to(tl.int32)
    b_arg_par = tl.gather(b_arg, b_par, axis=0)  # [BLOCK_N] argmax at each node's parent
    # pointer jumping: invariant b_ok[i] = all nodes from i up to (excluding) b_anc[i] match their parent's
    # argmax, b_dep[i] = edges from i to b_anc[i]; after ceil(log2 N) rounds every b_anc is the root.
    # tl.gather keeps this O(N) per round (a one-hot [N, N] gather spilled registers from 64 nodes on).
    b_ok = ((o_n == 0) | (b_tok == b_arg_par)).to(tl.int32)
    b_dep = tl.where(o_n == 0, 0, 1).to(tl.int32)
    b_anc = b_par
    for _ in range(n_rounds):
        b_ok = b_ok & tl.gather(b_ok, b_anc, axis=0)
        b_dep = b_dep + tl.gather(b_dep, b_anc, axis=0)
        b_anc = tl.gather(b_anc, b_anc, axis=0)
    m_acc = m_n & (b_ok > 0)
    b_best_dep = tl.max(tl.where(m_acc, b_dep, -1), axis=0).to(tl.int64)
    i_best = tl.min(tl.where(m_acc & (b_dep == b_best_dep), o_n, BLOCK_N), axis=0)
    # walk the path up from the best node with scalar loads of parents
    p_path = path_ptr + i_b * stride_ob
    i_cur = i_best
    for k in range(0, W):
        i_d = b_best_dep - k
        tl.store(p_path + i_d, i_cur, mask=i_d >= 0)
        # parents may be int32 (a direct launcher call): keep the loop-carried node index int64
        i_cur = tl.load(p_par + i_cur * stride_pn, mask=i_d > 0, other=0).to(tl.int64)
    tl.store(p_path + o_n, tl.full([BLOCK_N], -1, tl.int64), mask=(o_n > b_best_dep) & (o_n < W))
    tl.store(len_ptr + i_b, b_best_dep)
    tl.store(next_ptr + i_b + o_n * 0, b_arg, mask=o_n == i_best)  # one lane writes


@triton.jit
def _sampling_accept_kernel(
    x_ptr, q_ptr, tok_ptr, u_ptr, pmax_ptr, pidx_ptr, psum_ptr,
    len_ptr, out_ptr, msel_ptr, ssel_ptr, asel_ptr,
    R, NB, V, gamma, inv_temp,
    stride_xb, stride_xr, stride_qb, stride_qr, stride_tb, stride_tr, stride_ub, stride_ob,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = o_r < R
    m_d = o_r < gamma
    b_rmax, b_arg = _rows_argmax(pmax_ptr, pidx_ptr, i_b * R + o_r, m_r, NB, V, BLOCK_NB)
    # a row whose max is not finite (a NaN, a +inf, or all -inf) is a point mass on its torch.argmax
    m_pt = m_r & ~((b_rmax > float("-inf")) & (b_rmax < float("inf")))  # NaN compares False
    b_mref = tl.where(m_pt, 0.0, b_rmax * inv_temp)  # [BLOCK_R] row max of x/T (T > 0 keeps the order)
    b_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, NB, BLOCK_NB):
        o_nb = c0 + tl.arange(0, BLOCK_NB)
        m_p = m_r[:, None] & (o_nb[None, :] < NB)
        o_p = (i_b * R + o_r)[:, None] * NB + o_nb[None, :]
        b_pm = tl.load(pmax_ptr + o_p, mask=m_p, other=float("-inf")) * inv_temp  # [BLOCK_R, BLOCK_NB]
        b_ps = tl.load(psum_ptr + o_p, mask=m_p, other=0.0)  # [BLOCK_R, BLOCK_NB]
        b_s += tl.sum(tl.where(m_p, b_ps * tl.exp(b_pm - b_mref[:, None]), 0.0), axis=1)
    b_s = tl.where(m_r & ~m_pt, b_s, 1.0)  # [BLOCK_R] row sum of exp(x/T - max)
    b_d = tl.load(tok_ptr + i_b * stride_tb + o_r * stride_tr, mask=m_d, other=0)  # [BLOCK_R]
    m_in = m_d & (b_d >= 0) & (b_d < V)
    b_xt = tl.load(x_ptr + i_b * stride_xb + o_r * stride_xr + b_d, mask=m_in, other=float("-inf"))
    b_qt = tl.load(q_ptr + i_b * stride_qb + o_r * stride_qr + b_d, mask=m_in, other=0.0).to(tl.float32)
    b_pt = tl.exp(b_xt.to(tl.float32) * inv_temp - b_mref) / b_s  # [BLOCK_R] p(draft token)
    b_pt = tl.where(m_pt, tl.where(b_d == b_arg, 1.0, 0.0), b_pt)
    b_u = tl.load(u_ptr + i_b * stride_ub + o_r, mask=m_d, other=0.0)  # [BLOCK_R]
    # accept iff u < p/q, written u·q < p: a token the draft gave q = 0 is accepted iff p > 0
    b_rej = m_d & ~(b_u * b_qt < b_pt)
    b_len = tl.min(tl.where(b_rej, o_r, gamma), axis=0)
    # position b_len is written by the draw kernel
    b_out = tl.where(o_r < b_len, b_d, -1)
    tl.store(out_ptr + i_b * stride_ob + o_r, b_out, mask=m_r & (o_r != b_len))
    tl.store(len_ptr + i_b, b_len)
    # row max and normaliser of the drawing row, for the draw kernels: one lane writes each
    tl.store(msel_ptr + i_b + o_r * 0, b_mref, mask=o_r == b_len)
    tl.store(ssel_ptr + i_b + o_r * 0, b_s, mask=o_r == b_len)
    tl.store(asel_ptr + i_b + o_r * 0, tl.where(m_pt, b_arg, -1), mask=o_r == b_len)


@triton.jit
def _draw_weights(x_ptr, q_ptr, i_b, i_r, o_v, m_v, b_m, b_s, gamma, inv_temp,
                  stride_xb, stride_xr, stride_qb, stride_qr):
    """float64 ``p`` and ``max(0, p − q)`` of row ``i_r`` on ``o_v``; q = 0 on the bonus row (i_r == γ)."""
    b_x = tl.load(x_ptr + i_b * stride_xb + i_r * stride_xr + o_v, mask=m_v, other=float("-inf"))
    m_q = m_v & ((o_v * 0 + i_r) < gamma)  # broadcast explicitly: a scalar & block mask trips the interpreter
    b_q = tl.load(q_ptr + i_b * stride_qb + i_r * stride_qr + o_v, mask=m_q, other=0.0)
    b_p = tl.exp(b_x.to(tl.float32) * inv_temp - b_m) / b_s
    b_p64 = b_p.to(tl.float64)
    b_r64 = tl.maximum(b_p64 - b_q.to(tl.float32).to(tl.float64), 0.0)
    return b_p64, b_r64


@triton.jit
def _draw_mass_kernel(
    x_ptr, q_ptr, len_ptr, msel_ptr, ssel_ptr, pres_ptr, pp_ptr,
    V, NB, gamma, inv_temp,
    stride_xb, stride_xr, stride_qb, stride_qr,
    BLOCK_V: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    i_r = tl.load(len_ptr + i_b)  # the row that draws
    b_m = tl.load(msel_ptr + i_b)
    b_s = tl.load(ssel_ptr + i_b)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    m_v = o_v < V
    b_p, b_r = _draw_weights(x_ptr, q_ptr, i_b, i_r, o_v, m_v, b_m, b_s, gamma, inv_temp,
                             stride_xb, stride_xr, stride_qb, stride_qr)  # [BLOCK_V] float64 each
    tl.store(pres_ptr + i_b * NB + i_v, tl.sum(b_r, axis=0))
    tl.store(pp_ptr + i_b * NB + i_v, tl.sum(b_p, axis=0))


@triton.jit
def _draw_kernel(
    x_ptr, q_ptr, u_ptr, len_ptr, msel_ptr, ssel_ptr, asel_ptr, pres_ptr, pp_ptr, out_ptr,
    V, NB, gamma, inv_temp,
    stride_xb, stride_xr, stride_qb, stride_qr, stride_ub, stride_ob,
    BLOCK_V: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_r = tl.load(len_ptr + i_b)
    b_m = tl.load(msel_ptr + i_b)
    b_s = tl.load(ssel_ptr + i_b)
    o_nb = tl.arange(0, BLOCK_NB).to(tl.int64)
    m_nb = o_nb < NB
    b_wr = tl.load(pres_ptr + i_b * NB + o_nb, mask=m_nb, other=0.0)  # [BLOCK_NB] float64
    b_wp = tl.load(pp_ptr + i_b * NB + o_nb, mask=m_nb, other=0.0)  # [BLOCK_NB] float64
    # residual mass 0 means p <= q everywhere, i.e. p == q: draw from p (see ops.verify_sampling)
    use_p = tl.sum(b_wr, axis=0) <= 0.0
    b_w = tl.where(use_p, b_wp, b_wr)
    b_thr = tl.load(u_ptr + i_b * stride_ub + gamma).to(tl.float64) * tl.sum(b_w, axis=0)
    # pass D.1: the block whose inclusive prefix first exceeds the threshold
    b_cum = tl.cumsum(b_w, axis=0)
    i_blk = tl.min(tl.where(m_nb & (b_cum > b_thr), o_nb, NB), axis=0)
    i_blk_last = tl.max(tl.where(m_nb & (b_w > 0.0), o_nb, 0), axis=0)
    i_blk = tl.where(i_blk < NB, i_blk, i_blk_last)  # threshold at the total by rounding
    b_thr_in = tl.maximum(b_thr - tl.sum(tl.where(o_nb < i_blk, b_w, 0.0), axis=0), 0.0)
    # pass D.2: inverse CDF inside that block
    o_v = i_blk * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    m_v = o_v < V
    b_p, b_r = _draw_weights(x_ptr, q_ptr, i_b, i_r, o_v, m_v, b_m, b_s, gamma, inv_temp,
                             stride_xb, stride_xr, stride_qb, stride_qr)  # [BLOCK_V] float64 each
    b_wv = tl.where(use_p, b_p, b_r)
    b_c = tl.cumsum(b_wv, axis=0)
    i_tok = tl.min(tl.where(m_v & (b_c > b_thr_in), o_v, V), axis=0)
    i_tok_last = tl.max(tl.where(m_v & (b_wv > 0.0), o_v, 0), axis=0)
    i_tok = tl.where(i_tok < V, i_tok, i_tok_last)
    i_pt = tl.load(asel_ptr + i_b)  # >= 0: the drawing row is a point mass there (its weights are NaN)
    tl.store(out_ptr + i_b * stride_ob + i_r, tl.where(i_pt >= 0, i_pt, i_tok))


@triton.jit
def _chunk_top3(pmax_ptr, ptop2_ptr, ptop3_ptr, o_p, m_p, o_nb, NB):
    """Per row, the 3 largest of the blocks' top-3 values in one ``[BLOCK_R, BLOCK_NB]`` chunk: drop the
    leading value of the block holding the max (lowest block on ties) twice, shifting that block's list up."""
    b_t1 = tl.load(pmax_ptr + o_p, mask=m_p, other=float("-inf"))  # [BLOCK_R, BLOCK_NB]
    b_t2 = tl.load(ptop2_ptr + o_p, mask=m_p, other=float("-inf"))  # [BLOCK_R, BLOCK_NB]
    b_t3 = tl.load(ptop3_ptr + o_p, mask=m_p, other=float("-inf"))  # [BLOCK_R, BLOCK_NB]
    b_c1 = tl.max(b_t1, axis=1)
    i_sel = tl.min(tl.where(m_p & (b_t1 == b_c1[:, None]), o_nb[None, :], NB), axis=1)
    m_sel = o_nb[None, :] == i_sel[:, None]
    b_t1 = tl.where(m_sel, b_t2, b_t1)
    b_t2 = tl.where(m_sel, b_t3, b_t2)
    b_c2 = tl.max(b_t1, axis=1)
    i_sel = tl.min(tl.where(m_p & (b_t1 == b_c2[:, None]), o_nb[None, :], NB), axis=1)
    b_t1 = tl.where(o_nb[None, :] == i_sel[:, None], b_t2, b_t1)
    return b_c1, b_c2, tl.max(b_t1, axis=1)


@triton.jit
def _loose_accept_kernel(
    x_ptr, tok_ptr, strict_ptr, pmax_ptr, pidx_ptr, pcnt_ptr, ptop2_ptr, ptop3_ptr,
    len_ptr, out_ptr, loose_ptr,
    R, NB, V, gamma, top_k, log_ratio, shift, window, gate,
    stride_xb, stride_xr, stride_tb, stride_tr, stride_sb, stride_sr, stride_ob, stride_lb,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr, WITH_RANK: tl.constexpr, WITH_GATE: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = o_r < R
    m_d = o_r < gamma
    b_max, b_arg = _rows_argmax(pmax_ptr, pidx_ptr, i_b * R + o_r, m_r, NB, V, BLOCK_NB)
    # a position whose max is not finite (NaN, +inf, all -inf) has no usable distribution: exact match only
    m_fin = (b_max > float("-inf")) & (b_max < float("inf"))  # NaN compares False
    b_max = tl.where(m_fin, b_max, 0.0)  # keep -inf - -inf and NaN out of the arithmetic
    b_d = tl.load(tok_ptr + i_b * stride_tb + o_r * stride_tr, mask=m_d, other=-1)  # [BLOCK_R]
    b_strict = tl.load(strict_ptr + i_b * stride_sb + o_r * stride_sr, mask=m_d, other=1)  # [BLOCK_R]
    b_exact = m_d & (b_d == b_arg)
    m_in = m_d & (b_d >= 0) & (b_d < V)
    b_xt = tl.load(x_ptr + i_b * stride_xb + o_r * stride_xr + b_d, mask=m_in, other=0.0)
    # rule 1: the draft token ranks in the target's top-k AND p(draft) >= min_prob_ratio · p(argmax)
    b_ok = (b_xt.to(tl.float32) - b_max) >= log_ratio
    if WITH_RANK:
        b_rank = tl.zeros([BLOCK_R], dtype=tl.int32)
        for c0 in range(0, NB, BLOCK_NB):
            o_nb = c0 + tl.arange(0, BLOCK_NB)
            m_p = m_r[:, None] & (o_nb[None, :] < NB)
            o_p = (i_b * R + o_r)[:, None] * NB + o_nb[None, :]
            b_rank += tl.sum(tl.load(pcnt_ptr + o_p, mask=m_p, other=0), axis=1)  # [BLOCK_R]
        b_ok = b_ok & (b_rank < top_k)
    else:
        b_ok = b_ok & b_exact
    # rule 2: position shift, the target's argmax at j = i ± 1..shift equals draft[i]
    b_dist = o_r[None, :] - o_r[:, None]  # [BLOCK_R(i), BLOCK_R(j)]: j − i
    m_sh = (b_dist != 0) & (b_dist <= shift) & (b_dist >= -shift) & m_r[None, :]
    b_sh = tl.max(tl.where(m_sh & (b_d[:, None] == b_arg[None, :]), 1, 0), axis=1) > 0
    b_loose = m_in & m_fin & (b_strict == 0) & (b_ok | b_sh)
    if WITH_GATE:
        # FLy: a confident target (normalised entropy of its top 3 < gate) forces the exact match
        # the row's 2nd and 3rd largest values: top 3 of each chunk's block top-3s, merged into a running
        # top 3 (c_k = max over i + j = k of min(a_i, b_j), a_0 = b_0 = +inf); the row max is known
        b_v1 = tl.zeros([BLOCK_R], dtype=tl.float32) + float("-inf")
        b_v2 = tl.zeros([BLOCK_R], dtype=tl.float32) + float("-inf")
        b_v3 = tl.zeros([BLOCK_R], dtype=tl.float32) + float("-inf")
        for c0 in range(0, NB, BLOCK_NB):
            o_nb = c0 + tl.arange(0, BLOCK_NB)
            m_p = m_r[:, None] & (o_nb[None, :] < NB)
            o_p = (i_b * R + o_r)[:, None] * NB + o_nb[None, :]
            b_c1, b_c2, b_c3 = _chunk_top3(pmax_ptr, ptop2_ptr, ptop3_ptr, o_p, m_p, o_nb, NB)
            b_n1 = tl.maximum(b_v1, b_c1)
            b_n2 = tl.maximum(tl.maximum(b_v2, b_c2), tl.minimum(b_v1, b_c1))
            b_n3 = tl.maximum(tl.maximum(b_v3, b_c3),
                              tl.maximum(tl.minimum(b_v2, b_c1), tl.minimum(b_v1, b_c2)))
            b_v1, b_v2, b_v3 = b_n1, b_n2, b_n3
        b_v2 = tl.where(m_fin, b_v2, float("-inf"))  # non-finite rows: keep NaN out (they are exact-only)
        b_v3 = tl.where(m_fin, b_v3, float("-inf"))
        b_e2 = tl.exp(b_v2 - b_max)
        b_e3 = tl.exp(b_v3 - b_max)
        b_z = 1.0 + b_e2 + b_e3
        b_q1 = 1.0 / b_z
        b_q2 = b_e2 / b_z
        b_q3 = b_e3 / b_z
        b_h = -b_q1 * tl.log(b_q1)
        b_h -= b_q2 * tl.log(tl.where(b_q2 > 0.0, b_q2, 1.0))  # 0 · log 0 = 0
        b_h -= b_q3 * tl.log(tl.where(b_q3 > 0.0, b_q3, 1.0))
        b_loose = b_loose & ~(b_h * 0.9102392266268373 < gate)  # 1 / ln 3
    # rule 3 (FLy window): a loose acceptance needs exact matches at i+1 .. i+window−1, all inside the draft
    m_w = (b_dist > 0) & (b_dist < window)
    b_miss = tl.sum(tl.where(m_w & ~b_exact[None, :], 1, 0), axis=1)
    b_loose = b_loose & (b_miss == 0) & ~b_exact
    b_len = tl.min(tl.where(m_d & ~(b_exact | b_loose), o_r, gamma), axis=0)
    b_out = tl.where(o_r < b_len, b_d, tl.where(o_r == b_len, b_arg, -1))
    tl.store(out_ptr + i_b * stride_ob + o_r, b_out, mask=m_r)
    tl.store(len_ptr + i_b, b_len)
    tl.store(loose_ptr + i_b * stride_lb + o_r, (b_loose & (o_r < b_len)).to(tl.int8), mask=m_d)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


def _stats(x, tok, *, inv_temp=1.0, sumexp=False, rank=False, top3=False, block_v=None):
    """Pass A over ``x [B, R, V]``; returns the partial buffers (unused ones are 1-element dummies)."""
    B, R, V = x.shape
    BLOCK_V = pick_block_v(V, block_v)
    NB = triton.cdiv(V, BLOCK_V)
    dev = x.device
    pmax = _new((B * R, NB), torch.float32, dev)
    pidx = _new((B * R, NB), torch.int64, dev)
    psum = _new((B * R, NB) if sumexp else (1,), torch.float32, dev)
    pcnt = _new((B * R, NB) if rank else (1,), torch.int32, dev)
    ptop2 = _new((B * R, NB) if top3 else (1,), torch.float32, dev)
    ptop3 = _new((B * R, NB) if top3 else (1,), torch.float32, dev)
    gamma = tok.shape[1]
    _block_stats_kernel[(B * R, NB)](
        x, tok, pmax, pidx, psum, pcnt, ptop2, ptop3,
        R, V, NB, gamma, float(inv_temp),
        x.stride(0), x.stride(1), tok.stride(0), tok.stride(1),
        BLOCK_V=BLOCK_V, WITH_SUMEXP=sumexp, WITH_RANK=rank, WITH_TOP3=top3,
        num_warps=warps_for(BLOCK_V),
    )
    return BLOCK_V, NB, pmax, pidx, psum, pcnt, ptop2, ptop3


def verify_greedy(logits, draft_tokens, *, block_v=None):
    """Greedy chain verification (see ``vspec.ops.verify_greedy``): ``(accept_len, target_tokens)``."""
    B, R, V = logits.shape
    dev = logits.device
    accept_len = _new((B,), torch.int64, dev)
    target = _new((B, R), torch.int64, dev)
    if B == 0:
        return accept_len, target
    x = _lastdim_contiguous(logits)
    _, NB, pmax, pidx, *_ = _stats(x, draft_tokens, block_v=block_v)
    _greedy_chain_kernel[(B,)](
        pmax, pidx, draft_tokens, accept_len, target,
        R, NB, V, R - 1,
        draft_tokens.stride(0), draft_tokens.stride(1), target.stride(0),
        **rows_config(R, NB),
    )
    return accept_len, target


def verify_tree_greedy(logits, tree_tokens, parents, *, width, block_v=None):
    """Greedy tree verification; ``width`` = max tree depth + 1 (computed by :mod:`vspec.ops`).

    Returns ``(accept_len [B], path [B, width], next_token [B])``.
    """
    B, N, V = logits.shape
    dev = logits.device
    accept_len = _new((B,), torch.int64, dev)
    path = _new((B, width), torch.int64, dev)
    next_token = _new((B,), torch.int64, dev)
    if B == 0:
        return accept_len, path, next_token
    x = _lastdim_contiguous(logits)
    if N > MAX_TREE_NODES:
        raise ValueError(f"verify_tree_greedy runs trees of at most {MAX_TREE_NODES} nodes, got N={N}")
    _, NB, pmax, pidx, *_ = _stats(x, tree_tokens, block_v=block_v)
    stride_pb = parents.stride(0) if parents.ndim == 2 else 0
    _greedy_tree_kernel[(B,)](
        pmax, pidx, tree_tokens, parents, accept_len, path, next_token,
        N, NB, V, width, max(N - 1, 1).bit_length(),
        tree_tokens.stride(0), tree_tokens.stride(1), stride_pb, parents.stride(-1), path.stride(0),
        **tree_config(N, NB),
    )
    return accept_len, path, next_token


def verify_sampling(target_logits, draft_probs, draft_tokens, *, uniforms, temperature=1.0, block_v=None):
    """Lossless speculative sampling; see :func:`vspec.ops.verify_sampling`.

    ``uniforms`` ``[B, γ+1]`` float32 in [0, 1): column i < γ decides acceptance of draft token i, column γ
    drives the single inverse-CDF draw. Returns ``(accept_len [B], tokens [B, γ+1])``.
    """
    B, R, V = target_logits.shape
    gamma = R - 1
    dev = target_logits.device
    accept_len = _new((B,), torch.int64, dev)
    tokens = _new((B, R), torch.int64, dev)
    if B == 0:
        return accept_len, tokens
    x = _lastdim_contiguous(target_logits)
    q = _lastdim_contiguous(draft_probs) if gamma > 0 else x  # never read when γ == 0
    u = uniforms if uniforms.stride(-1) == 1 else uniforms.contiguous()
    inv_temp = 1.0 / float(temperature)
    BLOCK_V, NB, pmax, pidx, psum, *_ = _stats(x, draft_tokens, inv_temp=inv_temp, sumexp=True, block_v=block_v)
    msel = _new((B,), torch.float32, dev)
    ssel = _new((B,), torch.float32, dev)
    asel = _new((B,), torch.int64, dev)
    _sampling_accept_kernel[(B,)](
        x, q, draft_tokens, u, pmax, pidx, psum, accept_len, tokens, msel, ssel, asel,
        R, NB, V, gamma, inv_temp,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), draft_tokens.stride(0), draft_tokens.stride(1),
        u.stride(0), tokens.stride(0),
        **rows_config(R, NB),
    )
    pres = _new((B, NB), torch.float64, dev)
    pp = _new((B, NB), torch.float64, dev)
    _draw_mass_kernel[(B, NB)](
        x, q, accept_len, msel, ssel, pres, pp,
        V, NB, gamma, inv_temp,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        BLOCK_V=BLOCK_V, num_warps=warps_for(BLOCK_V),
    )
    _draw_kernel[(B,)](
        x, q, u, accept_len, msel, ssel, asel, pres, pp, tokens,
        V, NB, gamma, inv_temp,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), u.stride(0), tokens.stride(0),
        BLOCK_V=BLOCK_V, BLOCK_NB=triton.next_power_of_2(NB), num_warps=warps_for(BLOCK_V),
    )
    return accept_len, tokens


def verify_loose(logits, draft_tokens, strict_mask, *, top_k, min_prob_ratio, shift, entropy_gate, window,
                 return_loose=False, block_v=None):
    """Loose verification; see :func:`vspec.ops.verify_loose` for the rule. Arguments are pre-validated."""
    B, R, V = logits.shape
    gamma = R - 1
    dev = logits.device
    accept_len = _new((B,), torch.int64, dev)
    tokens = _new((B, R), torch.int64, dev)
    loose = _new((B, gamma), torch.bool, dev)
    if B > 0:
        x = _lastdim_contiguous(logits)
        with_rank = top_k > 1
        with_gate = entropy_gate > 0
        _, NB, pmax, pidx, _, pcnt, ptop2, ptop3 = _stats(x, draft_tokens, rank=with_rank, top3=with_gate,
                                                          block_v=block_v)
        strict = strict_mask.view(torch.uint8) if strict_mask.dtype == torch.bool else strict_mask
        log_ratio = math.log(min_prob_ratio) if min_prob_ratio > 0 else float("-inf")
        loose_u8 = loose.view(torch.int8)
        _loose_accept_kernel[(B,)](
            x, draft_tokens, strict, pmax, pidx, pcnt, ptop2, ptop3,
            accept_len, tokens, loose_u8,
            R, NB, V, gamma, int(min(top_k, V + 1)), log_ratio, int(shift), int(window), float(entropy_gate),
            x.stride(0), x.stride(1), draft_tokens.stride(0), draft_tokens.stride(1),
            strict.stride(0) if gamma else 0, strict.stride(1) if gamma else 0,
            tokens.stride(0), loose_u8.stride(0) if gamma else 0,
            **rows_config(R, NB),
            WITH_RANK=with_rank, WITH_GATE=with_gate,
        )
    if return_loose:
        return accept_len, tokens, loose
    return accept_len, tokens
