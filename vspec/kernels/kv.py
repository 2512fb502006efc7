"""KV-cache compaction: ``compact_kv_`` moves kept rows of a ``[..., B, H, S, D]`` cache forward, in place.

Argument checks live in :func:`vspec.ops.compact_kv_`; the specification is
:func:`vspec.kernels.reference.compact_kv_`.

Race freedom
------------
One program owns one ``(lead, b, h, D-block)`` column and walks ALL ``j`` of row ``b`` in ascending order, in
chunks of ``BLOCK_K`` rows: load the chunk's source rows, barrier, store them to ``dst + j``. Different
programs touch disjoint memory (different lead/b/h/D-block), so the only hazards are inside one program:

* a store to ``dst + j`` clobbers a source ``src[j']`` only if ``src[j'] == dst + j``; since
  ``src[j'] >= dst + j'`` this needs ``j' <= j``, i.e. a row of the same or an EARLIER chunk. Earlier
  chunks' loads precede this chunk's barrier in program order; the same chunk's loads precede it too, and
  ``tl.debug_barrier()`` (``bar.sync``) makes every thread of the program finish its loads before any thread
  stores. So no source is overwritten before it is read (no write-after-read hazard).
* a load of ``src[j']`` for a later chunk reads a position ``>= dst + j' > dst + j`` for every ``j`` already
  stored, so a load never sees one of this call's own writes (no read-after-write dependence either). This
  also makes it safe for the compiler to prefetch the next chunk's loads early.

Rows with ``src == dst + j`` (already in place) and ``src == -1`` (slot left untouched) are masked out, so a
mostly-kept prefix costs nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["compact_kv_"]


@triton.jit(do_not_specialize=["dst_scalar"])
def _compact_kv_kernel(
    kv,
    src_idx,
    dst_start,
    dst_scalar,
    B,
    H,
    S,
    K,
    D,
    n_lead_inner,
    stride_lo,
    stride_li,
    stride_b,
    stride_h,
    stride_s,
    stride_d,
    stride_ib,
    stride_ik,
    DST_IS_TENSOR: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_lbh = tl.program_id(0).to(tl.int64)
    i_dblk = tl.program_id(1).to(tl.int64)
    i_h = i_lbh % H
    i_b = (i_lbh // H) % B
    i_lead = i_lbh // (H * B)
    i_lo = i_lead // n_lead_inner
    i_li = i_lead % n_lead_inner

    if DST_IS_TENSOR:
        b_dst = tl.load(dst_start + i_b).to(tl.int64)
    else:
        b_dst = dst_scalar.to(tl.int64)

    p_col = kv + i_lo * stride_lo + i_li * stride_li + i_b * stride_b + i_h * stride_h
    o_d = i_dblk * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    m_d = o_d < D

    # Sequential over j (see the module docstring): this ordering is what makes the in-place move race-free.
    for j0 in range(0, K, BLOCK_K):
        o_k = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        p_src_idx = src_idx + i_b * stride_ib + o_k * stride_ik
        b_src = tl.load(p_src_idx, mask=m_k, other=-1).to(tl.int64)  # [BLOCK_K]
        o_dst = b_dst + o_k
        # In-range guards cost nothing and keep unchecked bad indices from writing outside the cache.
        m_row = (b_src >= 0) & (b_src < S) & (o_dst >= 0) & (o_dst < S) & (b_src != o_dst)
        m_kv = m_row[:, None] & m_d[None, :]
        p_src = p_col + b_src[:, None] * stride_s + o_d[None, :] * stride_d
        b_kv = tl.load(p_src, mask=m_kv)  # [BLOCK_K, BLOCK_D]
        # Every thread's loads of this chunk complete before any thread overwrites a row of it.
        tl.debug_barrier()
        p_dst = p_col + o_dst[:, None] * stride_s + o_d[None, :] * stride_d
        tl.store(p_dst, b_kv, mask=m_kv)


def default_blocks(D: int, K: int) -> tuple[int, int]:
    """Default ``(BLOCK_K, BLOCK_D)`` of the launcher (also enumerated by :mod:`vspec.kernel_report`)."""
    block_d = min(triton.next_power_of_2(D), 64)
    return max(1, min(triton.next_power_of_2(K), 4096 // block_d)), block_d


def _lead_groups(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """Merge the leading dims into as few ``(size, stride)`` groups their strides allow (size-1 dropped)."""
    groups: list[tuple[int, int]] = []
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    return groups


def compact_kv_(kv: torch.Tensor, src_idx: torch.Tensor, dst_start: int | torch.Tensor, *,
                block_k: int | None = None, block_d: int | None = None) -> None:
    """Launch the compaction over every leading index of ``kv``: one launch when the leading dims merge into
    at most two stride groups, as for a ``[L, 2, B, H, S, D]`` storage or any slice of it.

    kv ``[..., B, H, S, D]`` (any strides), src_idx ``[B, K]`` integer, dst_start ``int`` or ``[B]`` integer.
    Arguments are assumed validated by :func:`vspec.ops.compact_kv_`.
    """
    *lead, B, H, S, D = kv.shape
    K = src_idx.shape[1]
    if kv.numel() == 0 or K == 0:
        return
    *lead_strides, stride_b, stride_h, stride_s, stride_d = kv.stride()
    if src_idx.dtype != torch.int64:
        src_idx = src_idx.to(torch.int64)
    if isinstance(dst_start, torch.Tensor):
        dst_t, dst_scalar, dst_is_tensor = dst_start.to(torch.int64).contiguous(), 0, True
    else:
        dst_t, dst_scalar, dst_is_tensor = src_idx, int(dst_start), False

    # Each program has one chunk (BLOCK_K x BLOCK_D) of loads in flight at a time, so bytes in flight =
    # programs x chunk: split D to double the programs of small caches (7B: L*2*B*Hkv = 224 columns) and keep
    # ~4k elements per chunk (32 per thread at 4 warps; 8k spilled registers on sm_90, see vspec.kernel_report).
    # Unmeasured on a GPU yet: bench/bench_kv.py sweeps it.
    default_k, default_d = default_blocks(D, K)
    block_d = default_d if block_d is None else block_d
    if block_k is None:
        block_k = max(1, min(triton.next_power_of_2(K), 4096 // block_d))
    for name, v in (("block_k", block_k), ("block_d", block_d)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a positive power of two, got {v}")

    groups = _lead_groups(tuple(lead), tuple(lead_strides))
    # More than two non-mergeable leading groups (an unusual view): loop over the outer ones on the host.
    outer, inner = groups[:-2], groups[-2:]
    while len(inner) < 2:
        inner.insert(0, (1, 0))
    (n_lo, stride_lo), (n_li, stride_li) = inner
    outer_sizes = [g[0] for g in outer]
    n_outer = 1
    for size in outer_sizes:
        n_outer *= size
    grid = (n_lo * n_li * B * H, triton.cdiv(D, block_d))
    for i_outer in range(n_outer):
        offset, rem = 0, i_outer
        for size, stride in reversed(outer):
            offset += (rem % size) * stride
            rem //= size
        base = kv.as_strided((n_lo, n_li, B, H, S, D),
                             (stride_lo, stride_li, stride_b, stride_h, stride_s, stride_d),
                             kv.storage_offset() + offset)
        _compact_kv_kernel[grid](
            base, src_idx, dst_t, dst_scalar,
            B, H, S, K, D, n_li,
            stride_lo, stride_li, stride_b, stride_h, stride_s, stride_d,
            src_idx.stride(0), src_idx.stride(1),
            DST_IS_TENSOR=dst_is_tensor, BLOCK_K=block_k, BLOCK_D=block_d,
        )
