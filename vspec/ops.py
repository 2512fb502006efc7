"""Public fused ops of vspec: argument checks, then dispatch to Triton or to the PyTorch reference.

Dispatch rule (docs/design.md, Op contract): the Triton kernel runs when any tensor argument is on CUDA, or when
Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, or any value the installed Triton reads as true; used
by the tests); otherwise the reference in
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
    "gated_delta_verify",
    "gated_delta_commit",
    "causal_conv_state_commit",
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
    from .kernels import interpreting

    if interpreting():
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


def visual_attention_mass(q, k, visual_idx, *, scale=None, normalize="visual", attention_mask=None, out=None,
                          check_indices=True):
    """Attention probability mass on each visual key, averaged over heads and query rows.

    q: ``[B, Hq, Lq, D]`` post-RoPE queries of the LAST Lq positions of the key sequence (causal): query row i
    sits at key position ``S - Lq + i`` and sees the keys at or before it. float32, bfloat16 or float16.
    k: ``[B, Hkv, S, D]`` post-RoPE keys, same dtype as q, ``Hq % Hkv == 0`` (head h reads kv head
    ``h // (Hq // Hkv)``).
    visual_idx: ``[B, Nv]`` integer key positions of the visual tokens in ``[-1, S)``, ``-1`` = padding
    (score 0). Positions within a row should be distinct.
    attention_mask: optional ``[B, S]`` (nonzero = valid key, HF convention). Masked visual keys score 0.
    A query row whose own position is masked contributes nothing and is not counted in the mean; a row
    with an empty normaliser (``"visual"`` and no visible valid visual key) contributes 0 and is counted.
    normalize: ``"visual"`` softmax over the valid visual keys only; ``"all"`` over every causally visible
    valid key. scale defaults to ``D ** -0.5``.
    Returns ``[B, Nv]`` float32; with ``out`` (``[B, Nv]`` float32) the result is added into ``out`` and
    ``out`` is returned. Never materialises ``[Hq, Lq, S]``. Nv == 0 gives ``[B, 0]`` (or ``out`` unchanged).
    check_indices: verify that ``visual_idx`` lies in ``[-1, S)`` (one device-to-host read). Callers that build
    the indices themselves and call this in a loop (vspec's runtime) pass False; an index out of range is then
    undefined behaviour.
    """
    import math
    import numbers

    _check_tensor("q", q, ndim=4, floating=True)
    _check_tensor("k", k, ndim=4, floating=True)
    _check_tensor("visual_idx", visual_idx, ndim=2, integer=True)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    B, Hq, Lq, D = q.shape
    _, Hkv, S, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, Hkv, S, D] with B={B} and D={D} from q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)}")
    if D == 0:
        raise ValueError(f"q must have a head dim D >= 1, got q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads must be a multiple of k heads (Hq % Hkv == 0), got Hq={Hq} from q "
                         f"{tuple(q.shape)} and Hkv={Hkv} from k {tuple(k.shape)}")
    if not 1 <= Lq <= S:
        raise ValueError(f"q must hold 1 <= Lq <= S query rows (the last Lq of the S key positions), got "
                         f"q {tuple(q.shape)} with S={S} from k {tuple(k.shape)}")
    if visual_idx.shape[0] != B:
        raise ValueError(f"visual_idx must be [B, Nv] with B={B}, got {tuple(visual_idx.shape)}")
    Nv = visual_idx.shape[1]
    if not isinstance(normalize, str) or normalize not in ("visual", "all"):
        raise ValueError(f"normalize must be 'visual' or 'all', got {normalize!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if attention_mask is not None:
        _check_tensor("attention_mask", attention_mask, ndim=2)
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must be [B, S] = {(B, S)}, got {tuple(attention_mask.shape)}")
    if out is not None:
        _check_tensor("out", out, ndim=2)
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if tuple(out.shape) != (B, Nv):
            raise ValueError(f"out must be [B, Nv] = {(B, Nv)}, got {tuple(out.shape)}")
    _check_same_device(q=q, k=k, visual_idx=visual_idx, attention_mask=attention_mask, out=out)
    if check_indices and visual_idx.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(visual_idx))
        if lo < -1 or hi >= S:
            raise ValueError(f"visual_idx values must lie in [-1, S={S}), got min {lo} and max {hi}")
    if B == 0 or Nv == 0:
        return out if out is not None else torch.zeros(B, Nv, dtype=torch.float32, device=q.device)

    if backend_for(q, k, visual_idx, attention_mask, out) == "triton":
        from .kernels import scoring as impl
    else:
        from .kernels import reference as impl
    return impl.visual_attention_mass(q, k, visual_idx, scale=scale, normalize=normalize,
                                      attention_mask=attention_mask, out=out)


def frame_semantic_scores(x, grid, *, window=3):
    """Temporal novelty and spatial complexity of visual features.

    x: ``[B, N, C]`` float features in (t, h, w) raster order, ``N = T*H*W``; grid = ``(T, H, W)`` positive
    ints (Python ints, numpy ints or 0-dim integer tensors); window: odd positive int.
    temporal = ``1 - cos(x[t,h,w], x[t-1,h,w])`` (partner t = 1 at t = 0; 0 when T == 1); spatial =
    population variance of the cosine to the in-frame window × window neighbours, centre excluded (0 with
    no neighbour). A zero feature vector has cosine 0 with every vector.
    Returns ``(temporal, spatial)``, each ``[B, N]`` float32 (see docs/design.md, Op contract).
    """
    import operator

    _check_tensor("x", x, ndim=3, floating=True)
    B, N, C = x.shape
    if C == 0:
        raise ValueError(f"x must have C >= 1 feature channels, got {tuple(x.shape)}")
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__") or len(grid) != 3:
        raise TypeError(f"grid must be a (T, H, W) sequence of 3 ints, got {grid!r}")
    try:
        if any(isinstance(g, bool) for g in grid):
            raise TypeError
        T, H, W = (operator.index(g) for g in grid)
    except TypeError:
        raise TypeError(f"grid must be a (T, H, W) sequence of 3 ints, got {grid!r}") from None
    if min(T, H, W) < 1:
        raise ValueError(f"grid entries must be positive, got (T, H, W) = {(T, H, W)}")
    if T * H * W != N:
        raise ValueError(f"grid (T, H, W) = {(T, H, W)} has T*H*W = {T * H * W} tokens but x "
                         f"{tuple(x.shape)} has N = {N}")
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an odd positive int, got {type(window).__name__} {window!r}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive int, got {window}")

    if backend_for(x) == "triton":
        from .kernels import scoring as impl
    else:
        from .kernels import reference as impl
    return impl.frame_semantic_scores(x, (T, H, W), window=window)


# --------------------------------------------------------------------------------------------------
# verification (kernels/verify.py)
# --------------------------------------------------------------------------------------------------


_VERIFY_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Defaults of ``verify_loose``'s rule keywords (see its docstring). Zero tolerance: ``top_k=1, shift=0``.
LOOSE_RULE_DEFAULTS = {"top_k": 3, "min_prob_ratio": 0.3, "shift": 1, "entropy_gate": 0.3, "window": 1}


def _verify_impl(*tensors):
    if backend_for(*tensors) == "triton":
        from .kernels import verify as impl
    else:
        from .kernels import reference as impl
    return impl


def _verify_check_float(name: str, t, layout: str) -> None:
    _check_tensor(name, t, ndim=3, floating=True)
    if t.dtype not in _VERIFY_FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise ValueError(f"{name} must be {layout} with at least one row and V >= 1, got {tuple(t.shape)}")


def _verify_check_drafts(name: str, t, logits_name: str, logits) -> None:
    _check_tensor(name, t, ndim=2, integer=True)
    B, R, _ = logits.shape
    if tuple(t.shape) != (B, R - 1):
        raise ValueError(f"{name} must be [B, γ] = {(B, R - 1)} to match {logits_name} [B, γ+1, V] = "
                         f"{tuple(logits.shape)}, got {tuple(t.shape)}")


def _verify_check_ids(V: int, **ids) -> None:
    # every data-dependent check of a call shares one host sync
    items = [(n, t) for n, t in ids.items() if t.numel() > 0]
    if not items:
        return
    bad = torch.stack([((t < 0) | (t >= V)).any() for _, t in items]).tolist()
    for (name, t), b in zip(items, bad):
        if b:
            raise ValueError(f"{name} holds token ids outside [0, {V}): "
                             f"min {int(t.min())}, max {int(t.max())}")


def _verify_parents(parents, B: int, N: int, device) -> tuple[torch.Tensor, int]:
    """Checked parents on ``device`` (int64, ``[N]`` or ``[B, N]``) and the path width = max depth + 1."""
    from .kernels.reference import tree_depths

    if isinstance(parents, (list, tuple)):
        parents = torch.tensor(parents, dtype=torch.long)
    _check_tensor("parents", parents, ndim=(1, 2), integer=True)
    if parents.shape[-1] != N or (parents.ndim == 2 and parents.shape[0] != B):
        raise ValueError(f"parents must be [N] = [{N}] or [B, N] = [{B}, {N}], got {tuple(parents.shape)}")
    host = parents.detach().to("cpu", torch.long)
    rows = host.reshape(-1, N)
    bad_root = rows[:, 0] != -1
    if bool(bad_root.any()):
        got = rows[bad_root, 0][0].item()
        raise ValueError(f"parents[..., 0] must be -1 (node 0 is the root), got {got}")
    node = torch.arange(N)
    bad = (rows[:, 1:] < 0) | (rows[:, 1:] >= node[1:])
    if bool(bad.any()):
        r, i = bad.nonzero()[0].tolist()
        raise ValueError(f"parents must satisfy 0 <= parents[i] < i for i > 0; node {i + 1} has parent "
                         f"{rows[r, i + 1].item()} (parents shape {tuple(parents.shape)})")
    width = int(tree_depths(host).max()) + 1
    return parents.to(device=device, dtype=torch.long), width


def verify_greedy(logits, draft_tokens, *, check_ids=True):
    """Greedy chain verification. logits ``[B, γ+1, V]`` (float32/bfloat16/float16), draft_tokens ``[B, γ]``.

    Returns ``(accept_len Long[B], target_tokens Long[B, γ+1])``; target_tokens is the argmax (ties → lowest
    index), accept_len the length of the leading run where ``draft_tokens == target_tokens[:, :γ]``.
    ``check_ids=False`` skips the token-range check (its host sync); out-of-range ids then never match.
    NaN logits follow ``torch.argmax``: NaN is the maximum and the first NaN wins, so a row holding NaN still
    yields an id in ``[0, V)``.
    """
    _verify_check_float("logits", logits, "[B, γ+1, V]")
    _verify_check_drafts("draft_tokens", draft_tokens, "logits", logits)
    _check_same_device(logits=logits, draft_tokens=draft_tokens)
    if check_ids:
        _verify_check_ids(logits.shape[-1], draft_tokens=draft_tokens)
    return _verify_impl(logits, draft_tokens).verify_greedy(logits, draft_tokens)


def verify_tree_greedy(logits, tree_tokens, parents, *, check_ids=True, width=None):
    """Greedy tree verification.

    logits ``[B, N, V]`` target logits at every node (node 0 = root = last committed token); tree_tokens
    ``[B, N]``; parents ``[N]`` or ``[B, N]`` (tensor, or a list for ``[N]``) with ``parents[0] = −1`` and
    ``0 <= parents[i] < i``. Node i > 0 is accepted iff ``tree_tokens[i] == argmax(logits[parents[i]])``
    and its parent is accepted. Returns ``(accept_len Long[B], path Long[B, W], next_token Long[B])`` where
    ``W = max depth + 1`` over all nodes (and all rows when parents is ``[B, N]``); path lists the node
    indices root → deepest accepted node (ties: lowest node index), padded with −1; accept_len is that
    node's depth and next_token the argmax of its logits. Checking parents costs one host sync (the output
    width needs it anyway). ``width`` (= max depth + 1, an int) skips that check and its sync: for callers that
    build parents themselves (the runtime's tree rounds); parents must then be a valid tree of at most that
    depth on the logits' device. ``check_ids=False`` skips the token-range check (its host sync).
    At most ``vspec.kernels.MAX_TREE_NODES`` (256) nodes, on every backend (``ValueError`` beyond).
    NaN logits count as the maximum (``torch.argmax``: the first NaN wins), on every backend.
    """
    _verify_check_float("logits", logits, "[B, N, V]")
    B, N, V = logits.shape
    _check_tensor("tree_tokens", tree_tokens, ndim=2, integer=True)
    if tuple(tree_tokens.shape) != (B, N):
        raise ValueError(f"tree_tokens must be [B, N] = {(B, N)} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(tree_tokens.shape)}")
    _check_same_device(logits=logits, tree_tokens=tree_tokens)
    from .kernels import MAX_TREE_NODES

    if N > MAX_TREE_NODES:
        raise ValueError(f"logits holds a tree of N={N} nodes; verify_tree_greedy supports at most "
                         f"{MAX_TREE_NODES} (vspec.kernels.MAX_TREE_NODES), got logits {tuple(logits.shape)}")
    if width is None:
        parents, width = _verify_parents(parents, B, N, logits.device)
    else:
        _check_tensor("parents", parents, ndim=(1, 2), integer=True)
        if parents.shape[-1] != N or (parents.ndim == 2 and parents.shape[0] != B):
            raise ValueError(f"parents must be [N] = [{N}] or [B, N] = [{B}, {N}], got {tuple(parents.shape)}")
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= N:
            raise ValueError(f"width must be an int in [1, N={N}] (max tree depth + 1), got {width!r}")
        _check_same_device(logits=logits, parents=parents)
        parents = parents.long()
    if check_ids:
        _verify_check_ids(V, tree_tokens=tree_tokens)
    if backend_for(logits, tree_tokens) == "triton":
        from .kernels import verify as impl

        return impl.verify_tree_greedy(logits, tree_tokens, parents, width=width)
    from .kernels import reference as impl

    return impl.verify_tree_greedy(logits, tree_tokens, parents, width=width)


def verify_sampling(target_logits, draft_probs, draft_tokens, *, temperature=1.0, generator=None, seed=None,
                    check_ids=True):
    """Lossless speculative sampling (Leviathan et al. / Chen et al.).

    target_logits ``[B, γ+1, V]``, draft_probs ``[B, γ, V]`` the draft's distribution at each drafted
    position (used as given, not renormalised), draft_tokens ``[B, γ]`` drawn from it. With
    ``p = softmax(target_logits / temperature)`` (computed in the kernel), draft token i is accepted iff
    ``u_i · q_i(t) < p_i(t)``, i.e. with probability ``min(1, p/q)``; a token the draft gave ``q = 0`` (it
    could not have drawn it) is accepted iff ``p > 0``. At the first rejection a token is drawn from
    ``norm(max(0, p − q))``; if all γ are accepted a bonus token is drawn from p at position γ. If the
    residual mass is 0 (p <= q everywhere, so p == q) the draw falls back to p: in exact arithmetic a
    rejection is then impossible, so this only turns float rounding noise into a draw from the target,
    which stays lossless.

    Randomness: ``γ+1`` float32 uniforms per row drawn on the host side with torch
    (:func:`vspec.kernels.reference.sampling_uniforms`) from ``generator``, or from a fresh CPU generator
    seeded with ``seed``, or from the global RNG; the kernel draws by inverse CDF from them, so kernel and
    reference give the same tokens for the same generator state (up to float rounding ties, see
    kernels/reference.py: float32 probabilities, float64 running sums).
    Returns ``(accept_len Long[B], tokens Long[B, γ+1])``: ``tokens[:, :accept_len]`` the accepted draft
    tokens, ``tokens[:, accept_len]`` the drawn token, the rest −1.
    Non-finite logits: a row whose max is not finite (it holds a NaN or a +inf, or is all −inf) is taken as a
    point mass on its ``torch.argmax`` (NaN is the max, the first NaN wins): p is one-hot there, so a draw at
    that row returns the argmax. Every emitted id lies in ``[0, V)``. draft_probs must not hold NaN.
    Kernel and reference agree exactly on the CPU; on a GPU exp and division are approximate, so a decision
    whose margin is within ~1e-5 relative (``u·q`` vs ``p``, or the draw threshold vs a CDF step) may differ.
    """
    import math

    _verify_check_float("target_logits", target_logits, "[B, γ+1, V]")
    _verify_check_drafts("draft_tokens", draft_tokens, "target_logits", target_logits)
    B, R, V = target_logits.shape
    _check_tensor("draft_probs", draft_probs, ndim=3, floating=True)
    if draft_probs.dtype not in _VERIFY_FLOAT_DTYPES:
        raise TypeError(f"draft_probs must be float32, bfloat16 or float16, got {draft_probs.dtype}")
    if tuple(draft_probs.shape) != (B, R - 1, V):
        raise ValueError(f"draft_probs must be [B, γ, V] = {(B, R - 1, V)} to match target_logits "
                         f"{tuple(target_logits.shape)}, got {tuple(draft_probs.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of generator and seed")
    _check_same_device(target_logits=target_logits, draft_probs=draft_probs, draft_tokens=draft_tokens)
    if check_ids:
        _verify_check_ids(V, draft_tokens=draft_tokens)
    from .kernels.reference import sampling_uniforms

    u = sampling_uniforms(B, R - 1, generator=generator, seed=seed, device=target_logits.device)
    impl = _verify_impl(target_logits, draft_probs, draft_tokens)
    return impl.verify_sampling(target_logits, draft_probs, draft_tokens, uniforms=u, temperature=temperature)


def _verify_loose_rule(rule: dict) -> dict:
    import math

    unknown = sorted(set(rule) - set(LOOSE_RULE_DEFAULTS))
    if unknown:
        raise TypeError(f"verify_loose got unknown rule keyword(s) {unknown}; "
                        f"known: {sorted(LOOSE_RULE_DEFAULTS)}")
    r = {**LOOSE_RULE_DEFAULTS, **rule}
    for name, lo in (("top_k", 1), ("shift", 0), ("window", 1)):
        v = r[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    for name, hi in (("min_prob_ratio", 1.0), ("entropy_gate", math.inf)):
        v = r[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if not (0.0 <= v <= hi) or math.isnan(v):
            raise ValueError(f"{name} must be in [0, {hi}], got {v}")
    return r


def verify_loose(logits, draft_tokens, strict_mask, *, return_loose=False, check_ids=True, **rule):
    """Loose verification (LVSpec): strict positions need the exact greedy match, others a tolerance rule.

    logits ``[B, γ+1, V]``, draft_tokens ``[B, γ]``, strict_mask ``[B, γ]`` bool (True = anchor, exact match
    required). A non-strict draft token ``d = draft_tokens[b, i]`` that differs from the argmax is accepted
    loosely iff (``(A and B) or C``) and D and E:

    * A ``top_k`` (default 3): d ranks among the target's top_k at i (ties ranked by lower index);
    * B ``min_prob_ratio`` (default 0.3): ``p(d) >= min_prob_ratio · p(argmax)`` at i (softmax at T = 1;
      0 = off);
    * C ``shift`` (default 1): d equals the target's argmax at a neighbouring position i ± 1..shift (0 = off);
      it salvages a token the target wanted one step earlier/later;
    * D ``entropy_gate`` (default 0.3, FLy): the normalised entropy of the target's top-3 probabilities at i
      is NOT below the gate; a confident target forces the exact match (0 = off);
    * E ``window`` (default 1 = off, FLy): positions i+1 .. i+window−1 exist in the draft and match exactly.

    accept_len is the leading run of exact-or-loose acceptances; ``tokens[:, :accept_len]`` are the accepted
    draft tokens, ``tokens[:, accept_len]`` the target's argmax there (correction or bonus, conditioned on the
    accepted prefix, so the row is committable as is), the rest −1. Zero tolerance is ``top_k=1, shift=0``
    (any values of the others): the result then equals :func:`verify_greedy`, as it does with strict_mask all
    True; accept_len is never below verify_greedy's. ``return_loose=True`` appends a ``[B, γ]`` bool mask of
    the positions accepted loosely. A position whose logits have no finite max (NaN, +inf, all −inf) needs the
    exact match (its argmax follows ``torch.argmax``: NaN is the max, first NaN wins). The entropy gate uses
    exp/log, approximate on a GPU: a position within ~1e-5 of the gate may be decided either way there.
    """
    r = _verify_loose_rule(rule)
    _verify_check_float("logits", logits, "[B, γ+1, V]")
    _verify_check_drafts("draft_tokens", draft_tokens, "logits", logits)
    _check_tensor("strict_mask", strict_mask, ndim=2)
    if strict_mask.dtype != torch.bool:
        raise TypeError(f"strict_mask must be a bool tensor, got {strict_mask.dtype}")
    if tuple(strict_mask.shape) != tuple(draft_tokens.shape):
        raise ValueError(f"strict_mask must be [B, γ] = {tuple(draft_tokens.shape)} like draft_tokens, "
                         f"got {tuple(strict_mask.shape)}")
    _check_same_device(logits=logits, draft_tokens=draft_tokens, strict_mask=strict_mask)
    if check_ids:
        _verify_check_ids(logits.shape[-1], draft_tokens=draft_tokens)
    impl = _verify_impl(logits, draft_tokens, strict_mask)
    return impl.verify_loose(logits, draft_tokens, strict_mask, return_loose=return_loose, **r)


# --------------------------------------------------------------------------------------------------
# KV-cache compaction (kernels/kv.py)
# --------------------------------------------------------------------------------------------------


def compact_kv_(kv, src_idx, dst_start, *, check=None):
    """In place: row ``src_idx[b, j]`` of ``kv[..., b, :, :, :]`` moves to ``dst_start[b] + j``. Returns None.

    kv: ``[..., B, H, S, D]`` floating point, any strides (no broadcast/expanded dims); every leading index
    (e.g. layers × {k, v}) is compacted by the same call, in one kernel launch.
    src_idx: ``[B, K]`` integer, strictly ascending among its valid entries; ``-1`` may appear anywhere and
    means "slot ``dst_start[b] + j`` is left untouched" (rows with fewer kept entries pad with trailing −1).
    dst_start: ``int`` or ``[B]`` integer tensor on kv's device, ``0 <= dst_start <= S``.
    Requires ``0 <= src_idx[b, j] < S`` and ``src_idx[b, j] >= dst_start[b] + j`` for valid entries: rows only
    move towards the front, which is what makes the in-place kernel race-free. Rows not written keep their
    contents. check: run the O(B·K) value checks above (one host sync); default: ``VSPEC_DEBUG=1``.
    """
    _check_tensor("kv", kv, floating=True)
    if kv.ndim < 4:
        raise ValueError(f"kv must be [..., B, H, S, D] (at least 4 dims), got shape {tuple(kv.shape)}")
    for dim, (size, stride) in enumerate(zip(kv.shape, kv.stride())):
        if size > 1 and stride == 0:
            raise ValueError(f"kv must not be a broadcast view (dim {dim} has size {size} and stride 0): "
                             f"compacting it in place would write the same memory twice")
    B, S = kv.shape[-4], kv.shape[-2]
    _check_tensor("src_idx", src_idx, ndim=2, integer=True)
    if src_idx.shape[0] != B:
        raise ValueError(f"src_idx must be [B, K] with B == kv.shape[-4] == {B}, "
                         f"got shape {tuple(src_idx.shape)}")
    if isinstance(dst_start, torch.Tensor):
        _check_tensor("dst_start", dst_start, integer=True)
        if dst_start.ndim > 1 or (dst_start.ndim == 1 and dst_start.shape[0] != B):
            raise ValueError(f"dst_start must be an int or a [B] tensor with B == {B}, got shape "
                             f"{tuple(dst_start.shape)}")
        if dst_start.ndim == 0:
            dst_start = dst_start.reshape(1).expand(B)
    elif isinstance(dst_start, int) and not isinstance(dst_start, bool):
        if not 0 <= dst_start <= S:
            raise ValueError(f"dst_start must be in [0, S={S}], got {dst_start}")
    else:
        raise TypeError(f"dst_start must be an int or an integer tensor, got {type(dst_start).__name__}")
    _check_same_device(kv=kv, src_idx=src_idx, dst_start=dst_start)

    if check is None:
        check = os.environ.get("VSPEC_DEBUG", "") == "1"
    if check:
        _check_compact_kv_values(src_idx, dst_start, S)

    if backend_for(kv, src_idx) == "triton":
        from vspec.kernels.kv import compact_kv_ as impl
    else:
        from vspec.kernels.reference import compact_kv_ as impl
    impl(kv, src_idx, dst_start)


def _check_compact_kv_values(src_idx: torch.Tensor, dst_start, S: int) -> None:
    src = src_idx.to(torch.int64)
    B, K = src.shape
    dst = dst_start.to(torch.int64).reshape(-1, 1) if isinstance(dst_start, torch.Tensor) else dst_start
    if isinstance(dst, torch.Tensor) and bool(((dst < 0) | (dst > S)).any()):
        raise ValueError(f"dst_start must be in [0, S={S}], got {dst.reshape(-1).tolist()}")
    valid = src >= 0
    if bool((src < -1).any()):
        raise ValueError(f"src_idx entries must be -1 (skip) or in [0, S={S}), got min {int(src.min())}")
    if bool((valid & (src >= S)).any()):
        raise ValueError(f"src_idx entries must be in [0, S={S}), got max {int(src.max())}")
    j = torch.arange(K, device=src.device)
    bad = valid & (src < dst + j)
    if bool(bad.any()):
        b, jj = (int(v) for v in torch.nonzero(bad)[0])
        d = int(dst[b, 0]) if isinstance(dst, torch.Tensor) else dst
        raise ValueError(f"src_idx must satisfy src_idx[b, j] >= dst_start[b] + j (rows only move forward), "
                         f"got src_idx[{b}, {jj}] = {int(src[b, jj])} < {d} + {jj}")
    # Strictly ascending among valid entries: compare each valid entry with the running max of earlier ones.
    prev = torch.where(valid, src, torch.full_like(src, -1)).cummax(dim=1).values
    prev = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], dim=1)
    bad = valid & (src <= prev)
    if bool(bad.any()):
        b, jj = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"src_idx must be strictly ascending among its valid (>= 0) entries, got row {b}: "
                         f"{src[b].tolist()} (entry {jj})")


# --------------------------------------------------------------------------------------------------
# Gated DeltaNet verify step and rollback (kernels/gated_delta.py)
# --------------------------------------------------------------------------------------------------

_GDN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gdn_check(q, k, v, g, beta, state, scale, use_qk_l2norm):
    """Checks shared by gated_delta_verify / gated_delta_commit; returns (B, T, Hk, Dk, Hv, Dv)."""
    import math
    import numbers

    for name, t in (("q", q), ("k", k), ("v", v), ("state", state)):
        _check_tensor(name, t, ndim=4, floating=True)
    for name, t in (("g", g), ("beta", beta)):
        _check_tensor(name, t, ndim=3, floating=True)
    if q.dtype not in _GDN_DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    for name, t in (("g", g), ("beta", beta)):
        if t.dtype not in _GDN_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32 (the recurrent state is kept in float32), got {state.dtype}")
    B, T, Hk, Dk = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must be [B, T, Hk, Dk] = {tuple(q.shape)} like q, got {tuple(k.shape)}")
    if T < 1 or Hk < 1 or Dk < 1:
        raise ValueError(f"q must be [B, T, Hk, Dk] with T, Hk, Dk >= 1, got {tuple(q.shape)}")
    if v.shape[0] != B or v.shape[1] != T:
        raise ValueError(f"v must be [B, T, Hv, Dv] with B={B}, T={T} from q {tuple(q.shape)}, got {tuple(v.shape)}")
    Hv, Dv = v.shape[2], v.shape[3]
    if Hv < 1 or Dv < 1 or Hv % Hk != 0:
        raise ValueError(f"v heads must be a positive multiple of the q/k heads (Hv % Hk == 0), got Hv={Hv} from v "
                         f"{tuple(v.shape)} and Hk={Hk} from q {tuple(q.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}, got {tuple(t.shape)}")
    if tuple(state.shape) != (B, Hv, Dk, Dv):
        raise ValueError(f"state must be [B, Hv, Dk, Dv] = {(B, Hv, Dk, Dv)}, got {tuple(state.shape)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(use_qk_l2norm, bool):
        raise TypeError(f"use_qk_l2norm must be a bool, got {type(use_qk_l2norm).__name__}")
    return B, T, Hk, Dk, Hv, Dv


def _gdn_check_accept_len(accept_len, B: int, T: int, check) -> None:
    _check_tensor("accept_len", accept_len, ndim=1, integer=True)
    if accept_len.shape[0] != B:
        raise ValueError(f"accept_len must be [B] = [{B}], got {tuple(accept_len.shape)}")
    if check is None:
        check = os.environ.get("VSPEC_DEBUG", "") == "1"
    if check and accept_len.numel() > 0:
        lo, hi = (int(x) for x in torch.aminmax(accept_len))
        if lo < 0 or hi >= T:
            raise ValueError(f"accept_len values must lie in [0, T={T}) (accepted draft tokens of T = γ+1 verify "
                             f"tokens), got min {lo} and max {hi}")


def gated_delta_verify(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=True):
    """Verify step of a Gated DeltaNet layer (Qwen3.5 ``linear_attention``): outputs of the T = γ+1 verify tokens.

    Phase 1 of a two-phase API; phase 2 is :func:`gated_delta_commit`. Per row b and value head h, from the
    recurrent state ``S = state[b, h]`` (``[Dk, Dv]``), for t = 0 .. T−1, in float32::

        q_t, k_t = l2norm(q[b, t, h // (Hv // Hk)]), l2norm(k[b, t, h // (Hv // Hk)])   # if use_qk_l2norm
        S = S · exp(g[b, t, h])
        delta = (v[b, t, h] − k_tᵀ S) · beta[b, t, h]
        S = S + k_t ⊗ delta
        o[b, t, h] = (q_t · scale)ᵀ S

    exactly transformers' ``torch_recurrent_gated_delta_rule`` (qwen3_5): ``l2norm(x) = x · rsqrt(Σx² + 1e-6)``
    over Dk, then q divided by ``sqrt(Dk)`` (``scale=None``) or multiplied by ``scale``; GQA-style heads
    (``repeat_interleave``: value head h reads q/k head ``h // (Hv // Hk)``).

    q, k: ``[B, T, Hk, Dk]`` float32/bfloat16/float16 (any strides; the layer's split views are fine).
    v: ``[B, T, Hv, Dv]`` same dtype, ``Hv % Hk == 0``. g (log-decay, ≤ 0 in the model) and beta: ``[B, T, Hv]``
    float32/bfloat16/float16. state: ``[B, Hv, Dk, Dv]`` float32, NOT modified.
    Returns o ``[B, T, Hv, Dv]`` in q's dtype.

    Rollback design: the verify writes no state at all. After acceptance, :func:`gated_delta_commit` replays the
    first ``accept_len[b] + 1`` tokens of each row from the same ``state`` (keep q, k, v, g, beta of the verify:
    ~150 KB per row and layer at 27B, bf16, T = 7) and writes only that one state, in place if wanted.
    Bytes per round and row at Qwen3.5-27B (48 GDN layers, Hv = 48, Dk = Dv = 128: 3 MiB of float32 state per
    layer): verify reads 3 MiB, commit reads 3 and writes 3 MiB: 9 MiB per layer, 432 MiB per round,
    independent of γ, and no extra buffer. Storing the state after every token instead (``[B, T, Hv, Dk, Dv]``)
    writes T·3 MiB per layer and copies one back: 30 MiB per layer at T = 7 (1.41 GiB per round, 1 GiB of
    buffer), 60 MiB at T = 17 (2.81 GiB per round): 3.3× to 6.7× the traffic. The replay's compute
    (≤ 4·T·Dk·Dv·Hv FMAs) is negligible against that.
    """
    _gdn_check(q, k, v, g, beta, state, scale, use_qk_l2norm)
    _check_same_device(q=q, k=k, v=v, g=g, beta=beta, state=state)
    if backend_for(q, k, v, g, beta, state) == "triton":
        from .kernels import gated_delta as impl
    else:
        from .kernels import reference as impl
    return impl.gated_delta_verify(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)


def gated_delta_commit(q, k, v, g, beta, state, accept_len, *, scale=None, use_qk_l2norm=True, out=None,
                       check=None):
    """Phase 2 of :func:`gated_delta_verify`: the recurrent state after each row's accepted prefix.

    Same q, k, v, g, beta, state, scale and use_qk_l2norm as the verify call, plus accept_len ``[B]`` integer in
    ``[0, T)``: the number of accepted draft tokens of row b. Returns float32 ``[B, Hv, Dk, Dv]``, the state after
    the first ``accept_len[b] + 1`` verify tokens (the last committed token and the accepted drafts), i.e. what
    the recurrence over only those tokens yields; equal (to float32 rounding) to running the verify tokens one
    by one. ``out``: float32 ``[B, Hv, Dk, Dv]`` to write into, may be ``state`` itself (in-place commit: each
    program reads its state block completely before overwriting it). check: verify ``0 <= accept_len < T``
    (one host sync); default ``VSPEC_DEBUG=1``. Unchecked, the kernel clamps the length to ``[1, T]`` tokens.
    """
    B, T, _, _, _, _ = _gdn_check(q, k, v, g, beta, state, scale, use_qk_l2norm)
    _gdn_check_accept_len(accept_len, B, T, check)
    if out is not None:
        _check_tensor("out", out, ndim=4)
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if tuple(out.shape) != tuple(state.shape):
            raise ValueError(f"out must be [B, Hv, Dk, Dv] = {tuple(state.shape)} like state, got {tuple(out.shape)}")
    _check_same_device(q=q, k=k, v=v, g=g, beta=beta, state=state, accept_len=accept_len, out=out)
    if backend_for(q, k, v, g, beta, state, accept_len, out) == "triton":
        from .kernels import gated_delta as impl
    else:
        from .kernels import reference as impl
    return impl.gated_delta_commit(q, k, v, g, beta, state, accept_len, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                   out=out)


def causal_conv_state_commit(conv_state, x, accept_len, *, out=None, check=None):
    """Rollback of a Gated DeltaNet layer's short causal-conv window to each row's accepted prefix.

    conv_state ``[B, C, W]``: the last W conv inputs before the verify step (transformers' layout: W =
    ``linear_conv_kernel_dim`` columns, oldest first); x ``[B, C, T]``: the T verify tokens' pre-conv inputs
    (``mixed_qkv`` transposed, as the layer feeds its conv); accept_len ``[B]`` integer in ``[0, T)``.
    Returns ``[B, C, W]`` (conv_state's dtype): the last W columns of ``cat(conv_state, x[b, :, :accept_len[b]+1])``
    per row; into ``out`` when given (may be ``conv_state``). Pure torch on every backend (one gather of
    B·C·W elements: no kernel needed). check: verify the accept_len range (one host sync); default
    ``VSPEC_DEBUG=1``.
    """
    _check_tensor("conv_state", conv_state, ndim=3, floating=True)
    _check_tensor("x", x, ndim=3, floating=True)
    B, C, W = conv_state.shape
    if x.shape[0] != B or x.shape[1] != C or x.shape[2] < 1:
        raise ValueError(f"x must be [B, C, T] with B={B}, C={C} from conv_state {tuple(conv_state.shape)} and "
                         f"T >= 1, got {tuple(x.shape)}")
    if W < 1:
        raise ValueError(f"conv_state must hold W >= 1 columns, got {tuple(conv_state.shape)}")
    _gdn_check_accept_len(accept_len, B, x.shape[2], check)
    if out is not None:
        _check_tensor("out", out, ndim=3)
        if out.dtype != conv_state.dtype or tuple(out.shape) != tuple(conv_state.shape):
            raise ValueError(f"out must be {conv_state.dtype} {tuple(conv_state.shape)} like conv_state, got "
                             f"{out.dtype} {tuple(out.shape)}")
    _check_same_device(conv_state=conv_state, x=x, accept_len=accept_len, out=out)
    from .kernels import reference

    return reference.causal_conv_state_commit(conv_state, x, accept_len, out=out)
