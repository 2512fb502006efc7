"""Fused visual-token scoring: attention mass on visual keys, and per-frame temporal/spatial semantics.

Kernels and launchers only; argument checks live in :mod:`vspec.ops`, the specification in
:mod:`vspec.kernels.reference` (``visual_attention_mass``, ``frame_semantic_scores``).

visual_attention_mass runs in three launches and never materialises ``[Hq, Lq, S]``:

1. ``_mass_lse_partial_kernel``: per (batch, kv head, tile of packed (query head, query row) rows, key split)
   an online max / sum-of-exponentials over the normaliser set (the visual keys, gathered through
   visual_idx, or every causally visible valid key). The query heads sharing one kv head are packed into
   the row dimension (row ``r`` = head ``r // Lq`` of the group, query row ``r % Lq``), so each key block
   is loaded once per group. The key range is split across programs when batch × kv heads gives too few.
2. ``_mass_lse_combine_kernel``: merges the splits into one log2-sum-exp per row (``+inf`` for a row with
   an empty normaliser, so every probability it would produce is exactly 0).
3. ``_mass_accum_kernel``: per (batch, kv head, block of visual keys) the probability
   ``exp2(s - lse)`` summed over every row of the group, written to a per-kv-head partial buffer;
   ``_mass_finalize_kernel`` sums the kv heads in a fixed order, divides by the number of contributing
   (head, row) pairs and adds into ``out``. No atomics: the result is bitwise deterministic.

Extra memory: ``B·Hq·Lq·(2·splits + 1)`` floats for the statistics (splits ≤ 64) and ``B·Hkv·Nv`` floats
for the per-kv-head partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

__all__ = ["visual_attention_mass", "frame_semantic_scores"]

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


# --------------------------------------------------------------------------------------------------
# visual_attention_mass
# --------------------------------------------------------------------------------------------------


@triton.jit
def _qk(p_qr, p_kr, m_r, m_n, stride_qd, stride_kd,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``q·kᵀ`` of BLOCK_M query rows (row pointers p_qr) and BLOCK_N key rows (p_kr): ``[BLOCK_M, BLOCK_N]``
    float32, accumulated over head-dim chunks of BLOCK_DK so that no full ``[rows, D]`` tile lives in registers
    (D = 80 is 5 chunks of 16, not a padded 128). Masked rows and columns load zeros."""
    b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        o_d = d0 + tl.arange(0, BLOCK_DK)
        m_d = o_d < D
        b_q = tl.load(p_qr[:, None] + o_d[None, :] * stride_qd, mask=m_r[:, None] & m_d[None, :],
                      other=0.)  # [BLOCK_M, BLOCK_DK]
        b_k = tl.load(p_kr[:, None] + o_d[None, :] * stride_kd, mask=m_n[:, None] & m_d[None, :],
                      other=0.)  # [BLOCK_N, BLOCK_DK]
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), acc=b_s, input_precision=PRECISION)
    return b_s


@triton.jit
def _mass_lse_partial_kernel(
    q, k, vidx, amask, m_part, l_part,
    S, Lq, G, Hkv, n_rows, n_keys, n_splits, blocks_per_split, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vn,
    stride_ab, stride_as,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    GATHER: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv

    # packed rows: head i_hk * G + o_r // Lq of the group, query row o_r % Lq at key position S - Lq + row
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_r = o_r < n_rows
    o_g = o_r // Lq
    o_i = o_r % Lq
    o_qpos = S - Lq + o_i
    if HAS_MASK:
        b_rv = tl.load(amask + i_b * stride_ab + o_qpos * stride_as, mask=m_r, other=0)  # [BLOCK_M]
        m_r = m_r & (b_rv != 0)
    p_qr = q + i_b * stride_qb + (i_hk * G + o_g) * stride_qh + o_i * stride_ql  # [BLOCK_M] row pointers

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_blocks = tl.cdiv(n_keys, BLOCK_N)
    blk_lo = i_s * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, n_blocks)
    for i_n in range(blk_lo, blk_hi):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_keys
        if GATHER:
            o_kpos = tl.load(vidx + i_b * stride_vb + o_n * stride_vn, mask=m_n, other=-1).to(tl.int64)
            m_n = m_n & (o_kpos >= 0)
        else:
            o_kpos = o_n
        if HAS_MASK:
            b_kv = tl.load(amask + i_b * stride_ab + o_kpos * stride_as, mask=m_n, other=0)  # [BLOCK_N]
            m_n = m_n & (b_kv != 0)
        p_kr = k + i_b * stride_kb + i_hk * stride_kh + o_kpos * stride_ks  # [BLOCK_N] row pointers
        b_s = _qk(p_qr, p_kr, m_r, m_n, stride_qd, stride_kd,
                  D, BLOCK_M, BLOCK_N, BLOCK_DK, PRECISION, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        m_s = m_r[:, None] & m_n[None, :] & (o_kpos[None, :] <= o_qpos[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # a row that has seen no key yet keeps max -inf: shift by 0 instead so exp2 gives 0, never NaN
        b_shift = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_l = b_l * tl.exp2(b_m - b_shift) + tl.sum(tl.exp2(b_s - b_shift[:, None]), 1)
        b_m = b_m_new

    o_out = (i_bh * n_splits + i_s) * n_rows + o_r
    tl.store(m_part + o_out, b_m, mask=o_r < n_rows)
    tl.store(l_part + o_out, b_l, mask=o_r < n_rows)


@triton.jit
def _mass_lse_combine_kernel(m_part, l_part, lse, n_rows, n_splits, BLOCK_R: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_r = tl.program_id(1).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    m_r = o_r < n_rows
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i_s in range(0, n_splits):
        o_p = (i_bh * n_splits + i_s) * n_rows + o_r
        b_ms = tl.load(m_part + o_p, mask=m_r, other=float("-inf"))  # [BLOCK_R]
        b_ls = tl.load(l_part + o_p, mask=m_r, other=0.)  # [BLOCK_R]
        b_m_new = tl.maximum(b_m, b_ms)
        b_shift = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_l = b_l * tl.exp2(b_m - b_shift) + b_ls * tl.exp2(b_ms - b_shift)
        b_m = b_m_new
    # empty normaliser (or a masked query row): lse = +inf makes every exp2(s - lse) exactly 0
    b_lse = tl.where(b_l > 0., b_m + tl.log2(tl.maximum(b_l, 1e-30)), float("inf"))
    tl.store(lse + i_bh * n_rows + o_r, b_lse, mask=m_r)


@triton.jit
def _mass_accum_kernel(
    q, k, vidx, amask, lse, part,
    S, Lq, G, Hkv, n_rows, Nv, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vn,
    stride_ab, stride_as,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < Nv
    o_kpos = tl.load(vidx + i_b * stride_vb + o_n * stride_vn, mask=m_n, other=-1).to(tl.int64)  # [BLOCK_N]
    m_n = m_n & (o_kpos >= 0)
    if HAS_MASK:
        b_kv = tl.load(amask + i_b * stride_ab + o_kpos * stride_as, mask=m_n, other=0)  # [BLOCK_N]
        m_n = m_n & (b_kv != 0)
    p_kr = k + i_b * stride_kb + i_hk * stride_kh + o_kpos * stride_ks  # [BLOCK_N] row pointers

    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i_m in range(0, tl.cdiv(n_rows, BLOCK_M)):
        o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        m_r = o_r < n_rows
        o_g = o_r // Lq
        o_i = o_r % Lq
        o_qpos = S - Lq + o_i
        p_qr = q + i_b * stride_qb + (i_hk * G + o_g) * stride_qh + o_i * stride_ql  # [BLOCK_M] row pointers
        b_lse = tl.load(lse + i_bh * n_rows + o_r, mask=m_r, other=float("inf"))  # [BLOCK_M]
        b_s = _qk(p_qr, p_kr, m_r, m_n, stride_qd, stride_kd,
                  D, BLOCK_M, BLOCK_N, BLOCK_DK, PRECISION, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        m_s = m_r[:, None] & m_n[None, :] & (o_kpos[None, :] <= o_qpos[:, None])
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_acc += tl.sum(b_p, 0)
    tl.store(part + i_bh * Nv + o_n, b_acc, mask=o_n < Nv)


@triton.jit
def _mass_finalize_kernel(part, inv_count, out, Hkv, Nv, stride_ob, stride_on, BLOCK_N: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < Nv
    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i_hk in range(0, Hkv):
        b_acc += tl.load(part + (i_b * Hkv + i_hk) * Nv + o_n, mask=m_n, other=0.)  # [BLOCK_N]
    b_inv = tl.load(inv_count + i_b)
    p_o = out + i_b * stride_ob + o_n * stride_on
    b_o = tl.load(p_o, mask=m_n, other=0.)  # [BLOCK_N]
    tl.store(p_o, b_o + b_acc * b_inv, mask=m_n)


#: ``tl.dot`` input precision of float32 scores: three TF32 tensor-core products (hi·hi + hi·lo + lo·hi) give
#: ~float32 accuracy (plain tf32 moves the scores by ~1e-3 relative, "ieee" runs on the CUDA cores and spills
#: registers from head_dim 128 on). The interpreter ignores it and multiplies exactly in float32.
FP32_PRECISION = "tf32x3"


def mass_config(dtype: torch.dtype, n_rows: int, D: int, interpret: bool) -> tuple[dict, dict]:
    """Constexprs and warps of ``(_mass_lse_partial_kernel, _mass_accum_kernel)`` for ``n_rows`` packed query
    rows and head dim D. Shared by the launcher and :mod:`vspec.kernel_report` (the compile test).

    Measured by the compile test on sm_90 (no GPU timing yet): with head-dim chunks of 32 (16 when D is not a
    multiple of 32, e.g. 80) a ``64 × 32`` score tile in pass 1 and ``32 × 64`` in pass 2 stay free of
    register spills for D = 64 … 256 in bf16, fp16 and fp32 (tf32x3); full-D tiles spilled from D = 80 on.
    """
    # Triton's CPU interpreter multiplies bfloat16 dot operands as raw integers: there (and only there) the
    # tiles are widened to float32 before the dot. On a GPU bf16/fp16 run on the tensor cores natively.
    upcast = dtype == torch.bfloat16 and interpret
    precision = FP32_PRECISION if dtype == torch.float32 or upcast else "tf32"
    common = dict(BLOCK_DK=32 if D % 32 == 0 else 16, PRECISION=precision, UPCAST=upcast, num_warps=4)
    rows = max(16, triton.next_power_of_2(n_rows))
    return dict(BLOCK_M=min(64, rows), BLOCK_N=32, **common), dict(BLOCK_M=min(32, rows), BLOCK_N=64, **common)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def visual_attention_mass(q, k, visual_idx, *, scale=None, normalize="visual", attention_mask=None, out=None,
                          num_splits=None):
    """Triton launcher of :func:`vspec.ops.visual_attention_mass` (arguments already checked there).

    q ``[B, Hq, Lq, D]``, k ``[B, Hkv, S, D]`` (same float dtype), visual_idx ``[B, Nv]`` integer,
    attention_mask ``[B, S]`` or None, out ``[B, Nv]`` float32 or None. Returns ``[B, Nv]`` float32.
    num_splits: how many programs share the key range of one row tile in the first pass; default picks it
    from the SM count so that at least ~2 programs per SM run (1 off CUDA).
    """
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Nv = visual_idx.shape[1]
    G = Hq // Hkv
    dev = q.device
    if out is None:
        out = torch.zeros(B, Nv, device=dev, dtype=torch.float32)
    if B == 0 or Nv == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if visual_idx.dtype != torch.int64:
        visual_idx = visual_idx.to(torch.int64)
    scale = D ** -0.5 if scale is None else float(scale)
    qk_scale = scale * _LOG2E
    has_mask = attention_mask is not None
    if has_mask:
        amask = (attention_mask != 0).to(torch.int32)
        n_valid_rows = amask[:, S - Lq:].sum(1)
    else:
        amask = visual_idx  # never read: HAS_MASK=False compiles the loads away
        n_valid_rows = torch.full((B,), Lq, device=dev, dtype=torch.int64)
    # each valid query row of each query head contributes one probability distribution
    count = (n_valid_rows * Hq).to(torch.float32)
    inv_count = torch.where(count > 0, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))

    n_rows = G * Lq
    cfg_lse, cfg_acc = mass_config(q.dtype, n_rows, D, interpreting())
    BLOCK_M, BLOCK_N = cfg_lse["BLOCK_M"], cfg_lse["BLOCK_N"]
    gather = normalize == "visual"
    n_keys = Nv if gather else S
    n_blocks = triton.cdiv(n_keys, BLOCK_N)
    row_tiles = triton.cdiv(n_rows, BLOCK_M)
    if num_splits is None:
        num_splits = triton.cdiv(_target_programs(dev), B * Hkv * row_tiles)
    num_splits = max(1, min(int(num_splits), n_blocks, _MAX_SPLITS))
    blocks_per_split = triton.cdiv(n_blocks, num_splits)
    num_splits = triton.cdiv(n_blocks, blocks_per_split)

    m_part = torch.empty(B * Hkv, num_splits, n_rows, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    lse = torch.empty(B * Hkv, n_rows, device=dev, dtype=torch.float32)
    part = torch.empty(B * Hkv, Nv, device=dev, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *visual_idx.stride(), *amask.stride())

    _mass_lse_partial_kernel[(B * Hkv, row_tiles, num_splits)](
        q, k, visual_idx, amask, m_part, l_part,
        S, Lq, G, Hkv, n_rows, n_keys, num_splits, blocks_per_split, qk_scale, *strides,
        D=D, GATHER=gather, HAS_MASK=has_mask, **cfg_lse,
    )
    BLOCK_R = min(1024, triton.next_power_of_2(n_rows))
    _mass_lse_combine_kernel[(B * Hkv, triton.cdiv(n_rows, BLOCK_R))](
        m_part, l_part, lse, n_rows, num_splits, BLOCK_R=BLOCK_R,
    )
    _mass_accum_kernel[(B * Hkv, triton.cdiv(Nv, cfg_acc["BLOCK_N"]))](
        q, k, visual_idx, amask, lse, part,
        S, Lq, G, Hkv, n_rows, Nv, qk_scale, *strides,
        D=D, HAS_MASK=has_mask, **cfg_acc,
    )
    BLOCK_F = min(1024, triton.next_power_of_2(Nv))
    _mass_finalize_kernel[(B, triton.cdiv(Nv, BLOCK_F))](
        part, inv_count, out, Hkv, Nv, out.stride(0), out.stride(1), BLOCK_N=BLOCK_F,
    )
    return out


# --------------------------------------------------------------------------------------------------
# frame_semantic_scores
# --------------------------------------------------------------------------------------------------


@triton.jit
def _frame_scores_kernel(
    x, temporal, spatial,
    N, C, T, H, W, eps,
    stride_xb, stride_xn, stride_xc,
    stride_tb, stride_tn, stride_sb, stride_sn,
    WINDOW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per BLOCK_T tokens. Partner slots: slot 0 is the temporal partner, slot 1 + i·WINDOW + j the
    window cell (i − R, j − R) (the centre cell is masked). Slots run in chunks of BLOCK_K; inside a chunk every
    feature chunk of the centre rows is loaded once and dotted with all partner rows of the chunk, which are
    loaded once each, together with their squared norms: a row is read once per neighbourhood."""
    i_b = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    R: tl.constexpr = WINDOW // 2
    N_SLOTS: tl.constexpr = WINDOW * WINDOW + 1
    o_n = i_n * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    m_n = o_n < N
    HW = H * W
    o_t = o_n // HW
    o_h = (o_n // W) % H
    o_w = o_n % W
    p_x = x + i_b * stride_xb
    o_pt = tl.where(o_t == 0, 1, o_t - 1)  # temporal partner: the previous frame, the next one at t == 0
    m_pt = m_n & (o_pt < T)  # none when T == 1

    b_tcos = tl.zeros([BLOCK_T], dtype=tl.float32)
    # spatial cosines: count, mean and M2 merged chunk by chunk (Chan et al.), so any window fits
    b_cnt = tl.zeros([BLOCK_T], dtype=tl.float32)
    b_mean = tl.zeros([BLOCK_T], dtype=tl.float32)
    b_m2 = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s0 in range(0, N_SLOTS, BLOCK_K):
        o_s = s0 + tl.arange(0, BLOCK_K)
        o_cell = tl.maximum(o_s - 1, 0)
        o_dh = o_cell // WINDOW - R
        o_dw = o_cell % WINDOW - R
        m_cell = (o_s >= 1) & (o_s < N_SLOTS) & ((o_dh != 0) | (o_dw != 0))  # [BLOCK_K]
        o_hh = o_h[:, None] + o_dh[None, :]  # [BLOCK_T, BLOCK_K]
        o_ww = o_w[:, None] + o_dw[None, :]
        m_sp = m_n[:, None] & m_cell[None, :] & (o_hh >= 0) & (o_hh < H) & (o_ww >= 0) & (o_ww < W)
        m_tp = m_pt[:, None] & (o_s == 0)[None, :]
        o_p = tl.where((o_s == 0)[None, :], (o_pt * HW + o_h * W + o_w)[:, None], o_t[:, None] * HW + o_hh * W + o_ww)
        m_p = m_sp | m_tp  # [BLOCK_T, BLOCK_K]
        b_ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        b_dot = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        b_pp = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_c[None, :] * stride_xc,
                          mask=m_n[:, None] & m_c[None, :], other=0.).to(tl.float32)  # [BLOCK_T, BLOCK_C]
            b_y = tl.load(p_x + o_p[:, :, None] * stride_xn + o_c[None, None, :] * stride_xc,
                          mask=m_p[:, :, None] & m_c[None, None, :],
                          other=0.).to(tl.float32)  # [BLOCK_T, BLOCK_K, BLOCK_C]
            b_ss += tl.sum(b_x * b_x, 1)
            b_dot += tl.sum(b_x[:, None, :] * b_y, 2)
            b_pp += tl.sum(b_y * b_y, 2)
        b_inv = 1. / tl.maximum(tl.sqrt(b_ss), eps)
        b_cos = tl.where(m_p, b_dot * b_inv[:, None] / tl.maximum(tl.sqrt(b_pp), eps), 0.)  # [BLOCK_T, BLOCK_K]
        b_tcos += tl.sum(tl.where(m_tp, b_cos, 0.), 1)
        b_n = tl.sum(m_sp.to(tl.float32), 1)
        b_cmean = tl.sum(tl.where(m_sp, b_cos, 0.), 1) / tl.maximum(b_n, 1.)
        b_dev = tl.where(m_sp, b_cos - b_cmean[:, None], 0.)
        b_cm2 = tl.sum(b_dev * b_dev, 1)
        b_tot = tl.maximum(b_cnt + b_n, 1.)
        b_delta = b_cmean - b_mean
        b_m2 += b_cm2 + b_delta * b_delta * (b_cnt * b_n / b_tot)
        b_mean += b_delta * (b_n / b_tot)
        b_cnt += b_n
    tl.store(temporal + i_b * stride_tb + o_n * stride_tn, tl.where(m_pt, 1. - b_tcos, 0.), mask=m_n)
    b_spatial = tl.where(b_cnt > 0, tl.maximum(b_m2, 0.) / tl.maximum(b_cnt, 1.), 0.)
    tl.store(spatial + i_b * stride_sb + o_n * stride_sn, b_spatial, mask=m_n)


def frame_config(C: int, window: int) -> dict:
    """Constexprs of ``_frame_scores_kernel``: a ``[BLOCK_T, BLOCK_K, BLOCK_C]`` partner tile of ~4k lanes."""
    BLOCK_K = min(triton.next_power_of_2(window * window + 1), 32)
    BLOCK_C = min(64, max(16, triton.next_power_of_2(C)))
    return dict(WINDOW=window, BLOCK_T=max(1, 4096 // (BLOCK_K * BLOCK_C)), BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C)


def frame_rows_read(grid, window: int) -> int:
    """Feature rows ``_frame_scores_kernel`` loads per batch row (analytic; masked loads read nothing): per
    token, its own row once per slot chunk, plus each existing partner once."""
    T, H, W = (int(g) for g in grid)
    r = window // 2
    chunks = -(-(window * window + 1) // frame_config(1, window)["BLOCK_K"])
    per_frame = 0
    for h in range(H):
        n_h = min(H, h + r + 1) - max(0, h - r)
        for w in range(W):
            n_w = min(W, w + r + 1) - max(0, w - r)
            per_frame += chunks + n_h * n_w - 1
    return T * per_frame + (T * H * W if T > 1 else 0)


def frame_semantic_scores(x, grid, *, window=3, eps=1e-8):
    """Triton launcher of :func:`vspec.ops.frame_semantic_scores` (arguments already checked there).

    x ``[B, N, C]`` float, grid ``(T, H, W)`` with ``T*H*W == N``, odd window.
    Returns ``(temporal, spatial)``, each ``[B, N]`` float32. A zero feature vector has cosine 0 with every
    other vector (norms clamp at eps).
    """
    B, N, C = x.shape
    T, H, W = (int(g) for g in grid)
    temporal = torch.empty(B, N, device=x.device, dtype=torch.float32)
    spatial = torch.empty(B, N, device=x.device, dtype=torch.float32)
    if B == 0 or N == 0:
        return temporal, spatial
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = frame_config(C, int(window))
    _frame_scores_kernel[(B, triton.cdiv(N, cfg["BLOCK_T"]))](
        x, temporal, spatial,
        N, C, T, H, W, float(eps),
        *x.stride(), *temporal.stride(), *spatial.stride(),
        **cfg,
    )
    return temporal, spatial
