"""Pure-PyTorch reference of every vspec op: the specification.

Readable, vectorised PyTorch computing in float32/float64 internally. Tests compare the Triton kernels with
these functions; benchmarks use them as the eager provider. Argument checks live in :mod:`vspec.ops`.
"""

from __future__ import annotations

import torch

# ---- kv ----


def compact_kv_(kv: torch.Tensor, src_idx: torch.Tensor, dst_start: int | torch.Tensor) -> None:
    """In place: for every batch row ``b`` and every ``j`` with ``src_idx[b, j] >= 0``, row
    ``src_idx[b, j]`` of ``kv[..., b, :, :, :]`` moves to ``dst_start[b] + j`` (all leading dims at once).

    kv ``[..., B, H, S, D]``; src_idx ``[B, K]`` integer, ascending among its valid entries, ``-1`` = slot
    ``dst_start[b] + j`` left untouched; dst_start ``int`` or ``[B]``. Requires
    ``src_idx[b, j] >= dst_start[b] + j``. Sources are read from a copy taken before any write, so this is
    the semantics the in-place kernel must reproduce. Every other row is left as it was.
    """
    B = kv.shape[-4]
    if isinstance(dst_start, torch.Tensor):
        dst = [int(v) for v in dst_start.reshape(-1).tolist()]
    else:
        dst = [int(dst_start)] * B
    src = src_idx.to(device=kv.device, dtype=torch.int64)
    for b in range(B):
        keep = src[b] >= 0
        rows = src[b][keep]
        if rows.numel() == 0:
            continue
        slots = dst[b] + torch.nonzero(keep).reshape(-1)
        kv_b = kv.select(-4, b)  # [..., H, S, D]
        moved = kv_b.index_select(-2, rows).clone()
        kv_b.index_copy_(-2, slots, moved)


# ---- scoring ----


def _scoring_masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of ``s`` over its last dim restricted to ``mask``; a row with no True entry is all zeros."""
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)  # masked entries: exp(-inf) = 0
    z = e.sum(-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def visual_attention_mass(q, k, visual_idx, *, scale=None, normalize="visual", attention_mask=None, out=None):
    """Attention probability mass on each visual key, averaged over query heads and query rows.

    q ``[B, Hq, Lq, D]``: queries of the LAST Lq key positions; query row i sits at key position
    ``p_i = S - Lq + i`` and sees key j iff ``j <= p_i`` and ``attention_mask[b, j] != 0``.
    k ``[B, Hkv, S, D]``; query head h reads kv head ``h // (Hq // Hkv)``. scale defaults to ``D ** -0.5``.
    visual_idx ``[B, Nv]`` integer key positions, ``-1`` = padding. An entry is live iff its position is
    ``>= 0`` and not masked by attention_mask; dead entries score exactly 0 and are in no normaliser.
    Positions in a row should be distinct: a repeated position is a separate entry (and counts twice in the
    ``"visual"`` normaliser).
    normalize: ``"visual"`` softmax over the live visual entries the row sees; ``"all"`` over every key
    the row sees.

    Padded query rows: a query row whose own position is masked (``attention_mask[b, p_i] == 0``, e.g. right
    padding) contributes nothing and is not counted: ``result[b] = sum over heads and valid rows of the
    probabilities / (Hq * n_valid_rows[b])``, and 0 when no row of b is valid. A valid row whose normaliser is
    empty (``"visual"`` with no visible live visual key) contributes 0 but is counted in the mean.

    Returns ``[B, Nv]`` float32 (computed in float32); with ``out`` the result is added into it, ``out`` is
    returned. Materialises one ``[Hq/Hkv, Lq, S]`` score block per (batch row, kv head) at a time.
    """
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    Nv = visual_idx.shape[1]
    dev = q.device
    scale = D ** -0.5 if scale is None else float(scale)
    if attention_mask is None:
        key_valid = torch.ones(B, S, dtype=torch.bool, device=dev)
    else:
        key_valid = attention_mask != 0
    row_valid = key_valid[:, S - Lq:]  # [B, Lq]
    q_pos = torch.arange(S - Lq, S, device=dev)
    causal = torch.arange(S, device=dev)[None, :] <= q_pos[:, None]  # [Lq, S]
    vidx = visual_idx.long()
    pos = vidx.clamp_min(0)  # [B, Nv]
    live = (vidx >= 0) & key_valid.gather(1, pos)  # [B, Nv]

    result = torch.zeros(B, Nv, dtype=torch.float32, device=dev)
    for b in range(B):
        sees = causal & key_valid[b][None, :] & row_valid[b][:, None]  # [Lq, S]
        sees_vis = sees[:, pos[b]] & live[b][None, :]  # [Lq, Nv]
        for h in range(Hkv):
            qg = q[b, h * G:(h + 1) * G].float()  # [G, Lq, D]
            kh = k[b, h].float()  # [S, D]
            if normalize == "all":
                p = _scoring_masked_softmax(qg @ kh.T * scale, sees)  # [G, Lq, S]
                p_vis = p[..., pos[b]] * sees_vis  # [G, Lq, Nv]
            else:
                p_vis = _scoring_masked_softmax(qg @ kh[pos[b]].T * scale, sees_vis)  # [G, Lq, Nv]
            result[b] += p_vis.sum((0, 1))
    count = (row_valid.sum(1) * Hq).to(torch.float32)  # [B]
    result = result / count.clamp_min(1.0)[:, None]
    if out is None:
        return result
    return out.add_(result)


def frame_semantic_scores(x, grid, *, window=3, eps=1e-8):
    """Temporal novelty and spatial complexity of visual features (float32 inside).

    x ``[B, N, C]`` in (t, h, w) raster order, grid ``(T, H, W)`` with ``T*H*W == N``, window odd.
    ``cos(a, b) = a·b / (max(|a|, eps) · max(|b|, eps))`` (a zero vector has cosine 0 with everything).
    temporal = ``1 - cos(x[t,h,w], x[t-1,h,w])``; at t = 0 the partner is t = 1; all 0 when T == 1.
    spatial = population variance of ``cos(x[t,h,w], x[t,h',w'])`` over the window × window neighbourhood
    centred on (h, w), clipped to the frame, centre excluded; 0 where there is no neighbour.
    Returns ``(temporal, spatial)``, each ``[B, N]`` float32.
    """
    B, N, C = x.shape
    T, H, W = (int(g) for g in grid)
    xf = x.float()
    xn = (xf / xf.norm(dim=-1, keepdim=True).clamp_min(eps)).reshape(B, T, H, W, C)
    if T > 1:
        partner = torch.cat([xn[:, 1:2], xn[:, :-1]], dim=1)  # t=0 pairs with t=1, t>0 with t-1
        temporal = 1.0 - (xn * partner).sum(-1)
    else:
        temporal = torch.zeros(B, T, H, W, dtype=torch.float32, device=x.device)

    r = int(window) // 2
    padded = torch.nn.functional.pad(xn, (0, 0, r, r, r, r))  # zero frame border on W and H
    inside = torch.nn.functional.pad(torch.ones(H, W, device=x.device), (r, r, r, r))
    cos, mask = [], []
    for dh in range(2 * r + 1):
        for dw in range(2 * r + 1):
            if dh == r and dw == r:
                continue
            cos.append((xn * padded[:, :, dh:dh + H, dw:dw + W]).sum(-1))  # [B, T, H, W]
            mask.append(inside[dh:dh + H, dw:dw + W])  # [H, W]
    if cos:
        c = torch.stack(cos, -1)  # [B, T, H, W, window²-1]
        m = torch.stack(mask, -1)  # [H, W, window²-1]
        cnt = m.sum(-1).clamp_min(1.0)
        mean = (c * m).sum(-1) / cnt
        spatial = ((c - mean[..., None]).square() * m).sum(-1) / cnt
    else:
        spatial = torch.zeros(B, T, H, W, dtype=torch.float32, device=x.device)
    return temporal.reshape(B, N), spatial.reshape(B, N)


# ---- verification ----
# Specification of vspec.ops.verify_*; the Triton kernels in kernels/verify.py must match these exactly on
# token ids and lengths. verify_sampling shares its random numbers with the kernel through `uniforms`.


def sampling_uniforms(batch: int, gamma: int, *, generator=None, seed=None, device=None) -> torch.Tensor:
    """The random numbers of one speculative-sampling round: ``[batch, gamma + 1]`` float32 in [0, 1).

    Column i < γ decides the acceptance of draft token i; column γ drives the one inverse-CDF draw (the
    residual draw at the first rejection, or the bonus draw). ``seed`` draws them on a fresh CPU generator
    (same tokens on every device); ``generator`` draws on that generator's device; neither uses the global
    RNG of ``device``. The result is moved to ``device``.
    """
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if generator is not None:
        u = torch.rand(batch, gamma + 1, generator=generator, device=generator.device, dtype=torch.float32)
        return u.to(device) if device is not None else u
    return torch.rand(batch, gamma + 1, device=device, dtype=torch.float32)


def sampling_target_probs(target_logits, temperature=1.0):
    """``(p, point, arg)``: the target distribution of :func:`verify_sampling` and how it was formed.

    p ``[..., V]`` float32 = ``softmax(logits.float() · (1/T))`` with the float32 factor 1/T; a row whose
    max is not finite (NaN, +inf, or all −inf; ``point`` True) is one-hot on ``arg = logits.float().argmax``.
    """
    x = target_logits.float()
    inv_temp = torch.tensor(1.0 / float(temperature), dtype=torch.float32, device=x.device)
    p = torch.softmax(x * inv_temp, dim=-1)
    point = ~torch.isfinite(x.amax(-1))  # amax propagates NaN
    arg = x.argmax(-1)
    p = torch.where(point[..., None], torch.nn.functional.one_hot(arg, x.shape[-1]).to(p.dtype), p)
    return p, point, arg


def verify_greedy(logits, draft_tokens):
    """``(accept_len [B], target_tokens [B, γ+1])``; argmax ties resolve to the lowest index."""
    target = logits.float().argmax(-1)  # torch.argmax returns the first maximal index
    gamma = draft_tokens.shape[1]
    match = draft_tokens.long() == target[:, :gamma]
    accept_len = match.long().cumprod(1).sum(1)
    return accept_len, target


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node of a (checked) parents tensor ``[N]`` or ``[B, N]``; the root has depth 0."""
    par = parents.long()
    depth = torch.zeros_like(par)
    for i in range(1, par.shape[-1]):
        depth[..., i] = depth.gather(-1, par[..., i:i + 1]).squeeze(-1) + 1
    return depth


def verify_tree_greedy(logits, tree_tokens, parents, width=None):
    """``(accept_len [B], path [B, max_depth + 1], next_token [B])``; see ``vspec.ops.verify_tree_greedy``.

    ``width`` (max depth + 1), when the caller knows it, saves the host sync that computes it.
    """
    B, N, _ = logits.shape
    target = logits.float().argmax(-1)  # [B, N]
    par = parents.long().to(logits.device).expand(B, N)
    depth = tree_depths(par)
    rows = torch.arange(B, device=logits.device)
    accepted = torch.zeros(B, N, dtype=torch.bool, device=logits.device)
    accepted[:, 0] = True
    for i in range(1, N):
        p = par[:, i]
        accepted[:, i] = accepted[rows, p] & (tree_tokens[:, i].long() == target[rows, p])
    key = torch.where(accepted, depth, -1)
    best_depth = key.max(1).values
    best = (key == best_depth[:, None]).long().argmax(1)  # lowest node index among the deepest
    if width is None:
        width = int(depth.max()) + 1
    path = torch.full((B, width), -1, dtype=torch.long, device=logits.device)
    node = best.clone()
    for d in range(width - 1, -1, -1):
        on = best_depth >= d
        path[on, d] = node[on]
        node = torch.where(on, par[rows, node].clamp_min(0), node)
    return best_depth, path, target[rows, best]


def verify_sampling(target_logits, draft_probs, draft_tokens, *, temperature=1.0, generator=None, seed=None,
                    uniforms=None):
    """Lossless speculative sampling; see :func:`vspec.ops.verify_sampling`.

    Precision (shared with the kernel): p = softmax(logits·(1/T)) in float32; accept iff u·q < p in float32;
    the draw weights ``max(0, p − q)`` (or p) and their running sums in float64; token = the first index whose
    running sum exceeds ``u_draw · total``. A row of logits whose max is not finite (it holds a NaN or a +inf,
    or is all −inf) is a point mass on its ``torch.argmax`` (first NaN, else first +inf, else index 0): p is
    one-hot there, and a draw at that row returns the argmax.
    """
    B, R, V = target_logits.shape
    gamma = R - 1
    dev = target_logits.device
    if uniforms is None:
        uniforms = sampling_uniforms(B, gamma, generator=generator, seed=seed, device=dev)
    p, point, arg = sampling_target_probs(target_logits, temperature)  # [B, γ+1, V], [B, γ+1] x 2
    q = draft_probs.float()
    d = draft_tokens.long()
    rows = torch.arange(B, device=dev)
    if gamma > 0:
        pt = p[:, :gamma].gather(-1, d[..., None]).squeeze(-1)  # [B, γ]
        qt = q.gather(-1, d[..., None]).squeeze(-1)
        accept = uniforms[:, :gamma] * qt < pt
        accept_len = accept.long().cumprod(1).sum(1)
        q_sel = q[rows, accept_len.clamp_max(gamma - 1)] * (accept_len < gamma)[:, None]
    else:
        accept_len = torch.zeros(B, dtype=torch.long, device=dev)
        q_sel = torch.zeros(B, V, device=dev)
    p_sel = p[rows, accept_len].double()  # [B, V]
    w = (p_sel - q_sel.double()).clamp_min(0.0)
    w = torch.where((w.sum(1) <= 0)[:, None], p_sel, w)  # zero residual only when p == q: draw from p
    cdf = w.cumsum(1)
    thr = uniforms[:, gamma].double() * w.sum(1)
    above = cdf > thr[:, None]
    last_positive = V - 1 - (w > 0).flip(1).long().argmax(1)
    drawn = torch.where(above.any(1), above.long().argmax(1), last_positive)
    drawn = torch.where(point[rows, accept_len], arg[rows, accept_len], drawn)
    pos = torch.arange(R, device=dev)
    tokens = torch.full((B, R), -1, dtype=torch.long, device=dev)
    if gamma > 0:
        keep = pos[None, :gamma] < accept_len[:, None]
        tokens[:, :gamma] = torch.where(keep, d, -1)
    tokens[rows, accept_len] = drawn
    return accept_len, tokens


def verify_loose(logits, draft_tokens, strict_mask, *, top_k=3, min_prob_ratio=0.3, shift=1, entropy_gate=0.3,
                 window=1, return_loose=False):
    """Loose verification (LVSpec-style); rule and defaults are documented in ``vspec.ops.verify_loose``."""
    import math

    B, R, V = logits.shape
    gamma = R - 1
    dev = logits.device
    x = logits.float()
    target = x.argmax(-1)  # [B, γ+1]; NaN is the max (first NaN wins), like the kernels
    vmax = x.amax(-1)  # propagates NaN
    d = draft_tokens.long()
    xs = x[:, :gamma]  # [B, γ, V]
    exact = d == target[:, :gamma]
    xt = xs.gather(-1, d[..., None]).squeeze(-1)  # [B, γ]
    log_ratio = math.log(min_prob_ratio) if min_prob_ratio > 0 else float("-inf")
    ok = (xt - vmax[:, :gamma]) >= torch.tensor(log_ratio, dtype=torch.float32, device=dev)
    if top_k > 1:
        vocab = torch.arange(V, device=dev)
        beats = (xs > xt[..., None]) | ((xs == xt[..., None]) & (vocab < d[..., None]))
        ok &= beats.sum(-1) < top_k
    else:
        ok &= exact
    pos = torch.arange(gamma, device=dev)
    shifted = torch.zeros_like(exact)
    for s in range(1, min(int(shift), gamma + 1) + 1):
        for j in (pos + s, pos - s):
            valid = (j >= 0) & (j <= gamma)
            tj = target.gather(1, j.clamp(0, gamma).expand(B, gamma))
            shifted |= valid & (d == tj)
    # a position whose max is not finite (NaN, +inf, all -inf) has no usable distribution: exact match only
    loose = ~strict_mask & (ok | shifted) & torch.isfinite(vmax[:, :gamma])
    if entropy_gate > 0:
        top = xs.topk(min(3, V), dim=-1).values
        if V < 3:
            top = torch.cat([top, top.new_full((B, gamma, 3 - V), float("-inf"))], -1)
        e = torch.exp(top - top[..., :1])
        qn = e / e.sum(-1, keepdim=True)
        h = -torch.where(qn > 0, qn * torch.log(qn), torch.zeros_like(qn)).sum(-1)
        loose &= ~(h * (1.0 / math.log(3.0)) < entropy_gate)
    if window > 1:
        for k in range(1, int(window)):
            j = pos + k
            ok_k = (j < gamma) & exact.gather(1, j.clamp_max(max(gamma - 1, 0)).expand(B, gamma))
            loose &= ok_k
    loose &= ~exact
    accept_len = (exact | loose).long().cumprod(1).sum(1)
    rows = torch.arange(B, device=dev)
    tokens = torch.full((B, R), -1, dtype=torch.long, device=dev)
    tokens[:, :gamma] = torch.where(pos[None] < accept_len[:, None], d, -1)
    tokens[rows, accept_len] = target[rows, accept_len]
    if return_loose:
        return accept_len, tokens, loose & (pos[None] < accept_len[:, None])
    return accept_len, tokens


# ---- gated delta rule (Qwen3.5 linear-attention layers) ----
# Specification of vspec.ops.gated_delta_verify / gated_delta_commit / causal_conv_state_commit. Written from
# the recurrence, in the order of operations of transformers' torch_recurrent_gated_delta_rule (qwen3_5): the
# q/k heads are repeated (repeat_interleave) to the value heads, everything goes to float32, q and k are
# l2-normalised with rsqrt(Σx² + 1e-6), q is divided by sqrt(Dk) (or multiplied by an explicit scale), and per
# token: S = S·exp(g); kv_mem = kᵀS; delta = (v − kv_mem)·beta; S = S + k ⊗ delta; o = qᵀS.


def _gated_delta_run(q, k, v, g, beta, state, n_tok, scale, use_qk_l2norm):
    """``(o [B, T, Hv, Dv] float32, S [B, Hv, Dk, Dv] float32)``; row b's state stops after ``n_tok[b]`` tokens
    (all T when ``n_tok`` is None). o is computed for every token (from the running state)."""
    B, T, Hk, Dk = q.shape
    Hv = v.shape[2]
    if Hv != Hk:
        q = q.repeat_interleave(Hv // Hk, dim=2)
        k = k.repeat_interleave(Hv // Hk, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))  # [B, Hv, T, ...]
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(dim=-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(dim=-1, keepdim=True) + 1e-6)
    q = q / (Dk ** 0.5) if scale is None else q * float(scale)
    S = state.to(torch.float32)
    o = torch.zeros_like(v)
    for t in range(T):
        q_t, k_t, v_t = q[:, :, t], k[:, :, t], v[:, :, t]
        S_t = S * g[:, :, t].exp()[..., None, None]
        kv_mem = (S_t * k_t.unsqueeze(-1)).sum(dim=-2)
        delta = (v_t - kv_mem) * beta[:, :, t].unsqueeze(-1)
        S_t = S_t + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        o[:, :, t] = (S_t * q_t.unsqueeze(-1)).sum(dim=-2)
        S = S_t if n_tok is None else torch.where((t < n_tok).reshape(B, 1, 1, 1), S_t, S)
    return o.transpose(1, 2), S


def gated_delta_verify(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=True):
    """Outputs of the gated delta rule over all T tokens of every row, from ``state`` (not modified).

    q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]`` (``Hv % Hk == 0``; value head h reads key head
    ``h // (Hv // Hk)``); g (log-decay) and beta ``[B, T, Hv]``; state ``[B, Hv, Dk, Dv]`` float32.
    Returns o ``[B, T, Hv, Dv]`` in q's dtype (computed in float32).
    """
    o, _ = _gated_delta_run(q, k, v, g, beta, state, None, scale, use_qk_l2norm)
    return o.to(q.dtype)


def gated_delta_commit(q, k, v, g, beta, state, accept_len, *, scale=None, use_qk_l2norm=True, out=None):
    """The state after the first ``accept_len[b] + 1`` of the T tokens of row b: float32 ``[B, Hv, Dk, Dv]``.

    Same arguments as :func:`gated_delta_verify` plus accept_len ``[B]`` integer in ``[0, T)``. Written into
    ``out`` (float32 ``[B, Hv, Dk, Dv]``, may be ``state`` itself) when given, and returned.
    """
    n_tok = accept_len.to(device=state.device, dtype=torch.int64) + 1
    _, S = _gated_delta_run(q, k, v, g, beta, state, n_tok, scale, use_qk_l2norm)
    if out is None:
        return S
    out.copy_(S)
    return out


def causal_conv_state_commit(conv_state, x, accept_len, *, out=None):
    """The causal-conv window after the first ``accept_len[b] + 1`` of the T new inputs of row b.

    conv_state ``[B, C, W]``: the last W inputs before the verify step (transformers keeps W =
    ``linear_conv_kernel_dim`` columns, oldest first); x ``[B, C, T]``: the T new (pre-conv) inputs, in the
    layout the layer feeds its conv (``mixed_qkv.transpose(1, 2)``); accept_len ``[B]`` integer in ``[0, T)``.
    Returns ``[B, C, W]`` in conv_state's dtype: the last W columns of ``cat(conv_state, x[:, :, :a+1])`` per row
    (into ``out`` when given; ``out`` may be ``conv_state``).
    """
    B, C, W = conv_state.shape
    full = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)  # [B, C, W + T]
    start = accept_len.to(device=conv_state.device, dtype=torch.int64) + 1  # first kept column of `full`
    idx = (start[:, None] + torch.arange(W, device=conv_state.device)[None, :])  # [B, W]
    window = full.gather(-1, idx[:, None, :].expand(B, C, W))
    if out is None:
        return window
    out.copy_(window)
    return out
