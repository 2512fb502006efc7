"""Keep-set policy: which visual tokens the draft model sees.

Pure PyTorch (never imports triton). The scores come from :func:`vspec.ops.visual_attention_mass` (summed
over the chosen layers with ``out=``) and :func:`vspec.ops.frame_semantic_scores`; this module turns them
into per-row sorted index sets. It takes plain keywords so it does not depend on ``PruneConfig``.

Methods (docs/design.md and the papers: HIPPO, SpecVLM):

* ``"semantic"`` (HIPPO): every signal is min-max normalised (``score_norm="frame"``: within each frame of
  each row, as HIPPO describes; ``"global"``: over each row's visual tokens, so a frame the target barely
  looks at does not get its noise stretched to [0, 1]), the normalised signals are fused with ``weights``
  (attention mass, temporal novelty, spatial complexity), each frame first gets its ``per_frame_floor`` best
  tokens, the rest of the budget goes to the global top of the fused score.
* ``"attention"`` (SpecVLM): the smallest top set of tokens holding ``mass_fraction`` (40%) of the row's
  attention mass, capped at K, the remaining slots spread evenly over the positions not in that set.
* ``"uniform"``: K evenly spaced tokens. ``"random"``: K tokens drawn with ``generator``.
  ``"none"``: every token.

Ties always break towards the lower index, so every method but ``"random"`` is deterministic.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "METHODS",
    "DEFAULT_WEIGHTS",
    "DEFAULT_PER_FRAME_FLOOR",
    "DEFAULT_SCORE_NORM",
    "SCORE_NORMS",
    "DEFAULT_MASS_FRACTION",
    "keep_count",
    "frame_ids_from_grid",
    "select_keep",
    "pad_keep",
]

METHODS = ("semantic", "attention", "uniform", "random", "none")
SCORE_NORMS = ("frame", "global")
# The semantic fusion's defaults: (attention mass, temporal novelty, spatial complexity) weights, the per-frame
# floor and the normalisation, chosen by `python -m vspec bench quality --split val --sweep` on validation clips of
# the demo task (README, "Quality"; bench/results/quality_val_cpu/sweep.csv). PruneConfig uses these same values.
DEFAULT_WEIGHTS = (1.0, 0.25, 0.0)
DEFAULT_PER_FRAME_FLOOR = 0
DEFAULT_SCORE_NORM = "global"
# SpecVLM's rule: the smallest top set holding 40% of the attention mass.
DEFAULT_MASS_FRACTION = 0.4


def keep_count(n: int, keep) -> int:
    """Tokens kept out of ``n``: ``keep`` is a ratio in (0, 1] (``K = max(1, round(ratio * n))``, halves
    rounding up) or an int count ``>= 1`` (capped at n). 0 when ``n == 0``."""
    _check_keep(keep)
    if n <= 0:
        return 0
    if isinstance(keep, numbers.Integral):
        return min(int(keep), n)
    return min(n, max(1, math.floor(float(keep) * n + 0.5)))


def frame_ids_from_grid(grid, *, device=None) -> torch.Tensor:
    """Frame index of every token of a (T, H, W) raster-ordered grid: ``[T*H*W]`` int64."""
    T, H, W = (int(g) for g in grid)
    return torch.arange(T, device=device).repeat_interleave(H * W)


def pad_keep(keep: Sequence[torch.Tensor], fill: int = -1) -> torch.Tensor:
    """Stack per-row index sets into ``[B, Kmax]`` int64, padded with ``fill``."""
    width = max((len(k) for k in keep), default=0)
    device = keep[0].device if len(keep) else None
    out = torch.full((len(keep), width), fill, dtype=torch.long, device=device)
    for b, k in enumerate(keep):
        out[b, :len(k)] = k
    return out


def select_keep(visual, *, method: str, keep=0.1, attention=None, temporal=None, spatial=None, frame_ids=None,
                weights=DEFAULT_WEIGHTS, per_frame_floor: int = DEFAULT_PER_FRAME_FLOOR,
                mass_fraction: float = DEFAULT_MASS_FRACTION, generator: torch.Generator | None = None,
                padded: bool = False, score_norm: str = DEFAULT_SCORE_NORM):
    """Choose the visual tokens to keep in every batch row.

    visual: which columns of the ``[B, Nmax]`` score layout are real visual tokens, as
      * a ``[B, Nmax]`` bool mask (True = real token; e.g. ``visual_idx >= 0``), or
      * per-row counts (a sequence of ints or a ``[B]`` integer tensor: row b's tokens are columns
        ``0 .. n_b - 1``), or
      * one int n (every row has n tokens; B comes from the first score given, else 1).
    method: one of ``"semantic"``, ``"attention"``, ``"uniform"``, ``"random"``, ``"none"``.
    keep: ratio in (0, 1] or int count >= 1 (see :func:`keep_count`); ignored by ``"none"``.
    attention, temporal, spatial: ``[B, Nmax]`` float scores (attention mass, e.g. summed over layers;
      temporal novelty and spatial complexity from ``frame_semantic_scores``). ``"attention"`` needs
      ``attention``; ``"semantic"`` fuses whichever are given with a nonzero weight.
    frame_ids: ``[B, Nmax]`` or ``[Nmax]`` integer frame of each column (``"semantic"`` only; default: one
      frame). :func:`frame_ids_from_grid` builds it from a (T, H, W) grid.
    weights: ``(w_attention, w_temporal, w_spatial)``, non-negative; default ``DEFAULT_WEIGHTS``.
    per_frame_floor: ``"semantic"``: tokens every frame keeps (its best ones) before the global top-K;
      lowered to ``K // n_frames`` when the budget cannot give every frame that many. Default
      ``DEFAULT_PER_FRAME_FLOOR``.
    score_norm: ``"semantic"``: min-max normalise each signal per ``"frame"`` or over the row (``"global"``)
      before fusing. Default ``DEFAULT_SCORE_NORM``.
    mass_fraction: ``"attention"``: share of the attention mass the top set must hold (SpecVLM: 0.4).
    generator: ``"random"``: a CPU ``torch.Generator`` for reproducible draws.
    padded: return a ``[B, Kmax]`` int64 tensor padded with -1 instead of a list.

    Returns a list of B int64 tensors of sorted, unique column indices (``len == K_b``, all columns for
    ``"none"``), on the device of the inputs. Computed on the CPU (one host round trip per call).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_keep(keep)
    signals = {"attention": attention, "temporal": temporal, "spatial": spatial}
    given = [t for t in signals.values() if t is not None]
    mask, device = _visual_mask(visual, given)
    B, nmax = mask.shape
    for name, t in signals.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a [B, Nmax] floating-point tensor, got {got}")
        if t.shape[0] != B or t.shape[1] < nmax:
            raise ValueError(f"{name} must be [B, Nmax] = [{B}, >={nmax}], got {tuple(t.shape)}")
        signals[name] = t.detach().to("cpu", torch.float64)[:, :nmax]
        if not torch.isfinite(signals[name][mask]).all():
            raise ValueError(f"{name} must be finite on the visual tokens")
    if method == "attention" and signals["attention"] is None:
        raise ValueError("method 'attention' needs the attention scores, got attention=None")

    if method == "semantic":
        w = _check_weights(weights)
        fused_signals = [(wi, signals[n]) for wi, n in zip(w, signals) if wi > 0 and signals[n] is not None]
        if not fused_signals:
            raise ValueError(f"method 'semantic' needs at least one score with a nonzero weight, got weights "
                             f"{w} and scores {[n for n, t in signals.items() if t is not None]}")
        if isinstance(per_frame_floor, bool) or not isinstance(per_frame_floor, numbers.Integral) \
                or per_frame_floor < 0:
            raise ValueError(f"per_frame_floor must be an int >= 0, got {per_frame_floor!r}")
        if not isinstance(score_norm, str) or score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}")
        frames = _frame_ids(frame_ids, B, nmax)
    if method == "attention" and not (isinstance(mass_fraction, numbers.Real) and 0 < mass_fraction <= 1):
        raise ValueError(f"mass_fraction must be in (0, 1], got {mass_fraction!r}")
    if method == "random" and generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    result = []
    for b in range(B):
        cols = torch.nonzero(mask[b]).reshape(-1)  # [n] visual columns of row b, ascending
        n = cols.numel()
        k = keep_count(n, keep)
        if method == "none" or k == n:
            sel = torch.arange(n)
        elif method == "uniform":
            sel = _evenly(n, k)
        elif method == "random":
            sel = torch.randperm(n, generator=generator)[:k]
        elif method == "attention":
            sel = _attention_select(signals["attention"][b, cols], k, float(mass_fraction))
        else:
            norm_frames = frames[b, cols] if score_norm == "frame" else torch.zeros_like(frames[b, cols])
            fused = sum(wi * _per_frame_minmax(t[b, cols], norm_frames) for wi, t in fused_signals)
            sel = _semantic_select(fused, frames[b, cols], k, int(per_frame_floor))
        result.append(cols[sel.sort().values].to(device))
    return pad_keep(result) if padded else result


# --------------------------------------------------------------------------------------------------
# selection rules, on one row's n visual tokens (positions 0 .. n-1)
# --------------------------------------------------------------------------------------------------


def _evenly(n: int, k: int) -> torch.Tensor:
    """k distinct positions spread evenly over 0 .. n-1 (the centres of k equal bins)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * (n / k)).floor().long().clamp_max(n - 1)


def _attention_select(a: torch.Tensor, k: int, fraction: float) -> torch.Tensor:
    mass = a.clamp_min(0.0)
    order = torch.sort(mass, descending=True, stable=True).indices  # ties: lower index first
    total = mass.sum()
    if total > 0:
        cum = mass[order].cumsum(0)
        top = min(int((cum < fraction * total).sum()) + 1, k)
    else:
        top = 0
    chosen = order[:top]
    rest = torch.ones(a.numel(), dtype=torch.bool)
    rest[chosen] = False
    rest = torch.nonzero(rest).reshape(-1)
    return torch.cat([chosen, rest[_evenly(rest.numel(), k - top)]])


def _per_frame_minmax(v: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Min-max normalise v to [0, 1] within each frame; a constant frame maps to 0."""
    nf = int(frames.max()) + 1
    lo = torch.full((nf,), math.inf, dtype=v.dtype).scatter_reduce(0, frames, v, "amin")
    hi = torch.full((nf,), -math.inf, dtype=v.dtype).scatter_reduce(0, frames, v, "amax")
    span = (hi - lo)[frames]
    return torch.where(span > 0, (v - lo[frames]) / torch.where(span > 0, span, 1.0), 0.0)


def _semantic_select(score: torch.Tensor, frames: torch.Tensor, k: int, floor: int) -> torch.Tensor:
    n = score.numel()
    n_frames = int(torch.unique(frames).numel())
    floor = min(floor, k // n_frames)
    order = torch.sort(score, descending=True, stable=True).indices  # global rank, ties: lower index
    picked = torch.zeros(n, dtype=torch.bool)
    if floor > 0:
        by_frame = order[torch.sort(frames[order], stable=True).indices]  # frame-major, best first in each
        f_sorted = frames[by_frame]
        first = torch.searchsorted(f_sorted, f_sorted, right=False)  # start of each token's frame run
        rank = torch.arange(n) - first
        picked[by_frame[rank < floor]] = True
    remaining = order[~picked[order]]
    return torch.cat([torch.nonzero(picked).reshape(-1), remaining[:k - int(picked.sum())]])


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a ratio in (0, 1] or an int count >= 1, got {type(keep).__name__}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep as a count must be >= 1, got {keep}")
    elif not (0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep as a ratio must be in (0, 1], got {keep}")


def _check_weights(weights) -> tuple[float, float, float]:
    try:
        w = tuple(float(x) for x in weights)
    except TypeError:
        raise TypeError(f"weights must be (w_attention, w_temporal, w_spatial), got {weights!r}") from None
    if len(w) != 3 or any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be 3 finite non-negative numbers, got {weights!r}")
    return w


def _visual_mask(visual, given: list[torch.Tensor]) -> tuple[torch.Tensor, torch.device]:
    """[B, Nmax] bool CPU mask of the visual columns, and the device results go to."""
    device = given[0].device if given else torch.device("cpu")
    if isinstance(visual, torch.Tensor) and visual.dtype == torch.bool:
        if visual.ndim != 2:
            raise ValueError(f"visual as a mask must be [B, Nmax] bool, got {tuple(visual.shape)}")
        return visual.detach().cpu(), visual.device
    if isinstance(visual, bool):
        raise TypeError("visual must be a [B, Nmax] bool mask, per-row counts or an int, got bool")
    if isinstance(visual, numbers.Integral):
        counts = torch.full((given[0].shape[0] if given else 1,), int(visual), dtype=torch.long)
    elif isinstance(visual, torch.Tensor):
        if visual.ndim != 1 or visual.is_floating_point() or visual.is_complex():
            raise TypeError(f"visual as counts must be a [B] integer tensor, got {visual.dtype} "
                            f"{tuple(visual.shape)}")
        counts, device = visual.detach().cpu().long(), visual.device
    elif isinstance(visual, Sequence) and all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                              for c in visual):
        counts = torch.tensor([int(c) for c in visual], dtype=torch.long).reshape(-1)
    else:
        raise TypeError(f"visual must be a [B, Nmax] bool mask, per-row counts or an int, got {visual!r}")
    if (counts < 0).any():
        raise ValueError(f"visual counts must be >= 0, got {counts.tolist()}")
    nmax = int(counts.max()) if counts.numel() else 0
    return torch.arange(nmax)[None, :] < counts[:, None], device


def _frame_ids(frame_ids, B: int, nmax: int) -> torch.Tensor:
    if frame_ids is None:
        return torch.zeros(B, nmax, dtype=torch.long)
    if not isinstance(frame_ids, torch.Tensor) or frame_ids.is_floating_point() \
            or frame_ids.dtype == torch.bool:
        got = frame_ids.dtype if isinstance(frame_ids, torch.Tensor) else type(frame_ids).__name__
        raise TypeError(f"frame_ids must be an integer tensor, got {got}")
    f = frame_ids.detach().cpu().long()
    if f.ndim == 1:
        f = f.expand(B, -1)
    if f.ndim != 2 or f.shape[0] != B or f.shape[1] < nmax:
        raise ValueError(f"frame_ids must be [Nmax] or [B, Nmax] with B={B}, Nmax>={nmax}, "
                         f"got {tuple(frame_ids.shape)}")
    if (f < 0).any():
        raise ValueError("frame_ids must be >= 0")
    return f[:, :nmax]
