"""Token-tree layouts of the runtime's tree drafting (pure torch, never imports triton).

A tree of N nodes is a parents list: node 0 is the root (the last committed token), ``parents[0] == -1`` and
``0 <= parents[i] < i`` for every other node. :func:`tree_from_choices` turns Medusa / EAGLE-style choice paths
into one; :class:`TreeLevels` is the level-by-level layout the runtime drafts and verifies (one draft forward per
level). Tree shapes for tests and benchmarks (``TreeBuffers``, ``topk_tree``) live in :mod:`vspec.testing_trees`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TreeLevels", "tree_from_choices"]


def tree_from_choices(choices: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Parents of a sparse tree given as choice paths (Medusa/EAGLE style).

    Each choice is the tuple of sibling ranks from the root, e.g. ``(0,)`` = best first token, ``(0, 1)`` = its
    second-best child. Every prefix of a choice must itself be a choice. Nodes are ordered by (depth, path), so
    sibling ranks follow the path order and ``parents[i] < i``.
    """
    paths = sorted({tuple(int(c) for c in ch) for ch in choices}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents = [-1]
    for p in paths:
        if not p:
            continue
        if any(c < 0 for c in p):
            raise ValueError(f"choice {p} holds a negative rank")
        if p[:-1] not in index:
            raise ValueError(f"choice {p} has no parent choice {p[:-1]}")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
    return tuple(parents)


@dataclass(frozen=True, eq=False)
class TreeLevels:
    """Level-by-level layout of a draft tree whose nodes are numbered level by level (depth 0, then 1, ...), as
    the runtime drafts it: one draft forward per level.

    Fields (N nodes, D = depth):

    * ``depth``: ``[N]`` int64 depth of each node (the same for every batch row and round).
    * ``bounds``: tuple of D + 1 ``(lo, hi)`` pairs: the nodes of depth d are ``lo .. hi-1``.
    * ``width``: nodes per level of a *dynamic* tree (chosen per row and round), ``None`` for a static tree.
    * ``parent_local``, ``rank``: for a static tree, per depth d >= 1 a ``[n_d]`` int64 tensor: each node's parent
      as an index into level d − 1, and its sibling rank (node carries the parent's ``rank``-th best draft token).
      Empty tuples for a dynamic tree.
    * ``top_k``: for a static tree, per depth d >= 1 the host int ``max(rank) + 1`` (how many of each parent's
      best tokens to rank); empty for a dynamic tree.
    """

    depth: torch.Tensor
    bounds: tuple[tuple[int, int], ...]
    width: int | None
    parent_local: tuple[torch.Tensor, ...]
    rank: tuple[torch.Tensor, ...]
    top_k: tuple[int, ...] = ()

    @property
    def num_nodes(self) -> int:
        return self.bounds[-1][1]

    @property
    def max_depth(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_drafted(self) -> int:
        """Nodes of depth 1 .. D−1: the ones the draft forwards (the deepest level is proposed, never fed)."""
        return self.bounds[-1][0] - 1

    @classmethod
    def dynamic(cls, width: int, depth: int, device: torch.device | str | None = None) -> TreeLevels:
        """``depth`` levels of ``width`` nodes below the root: N = 1 + width·depth."""
        for name, v in (("width", width), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        bounds = ((0, 1),) + tuple((1 + d * width, 1 + (d + 1) * width) for d in range(depth))
        d = torch.arange(1 + width * depth, device=device)
        return cls(depth=torch.where(d == 0, 0, (d - 1) // width + 1), bounds=bounds, width=width, parent_local=(),
                   rank=())

    @classmethod
    def static(cls, parents, device: torch.device | str | None = None) -> TreeLevels:
        """From a parents list whose nodes are numbered level by level (:func:`tree_from_choices`); raises
        ``ValueError`` otherwise. Node i's rank is its position among its parent's children (lower index first)."""
        par = [int(p) for p in parents]
        if not par or par[0] != -1 or any(not 0 <= p < i for i, p in enumerate(par[1:], start=1)):
            raise ValueError(f"parents must describe a tree (parents[0] == -1, 0 <= parents[i] < i), got {par}")
        n = len(par)
        depth, sibling_rank, n_children = [0] * n, [0] * n, [0] * n
        for i in range(1, n):
            depth[i] = depth[par[i]] + 1
            sibling_rank[i] = n_children[par[i]]
            n_children[par[i]] += 1
        if any(b < a for a, b in zip(depth, depth[1:])):
            raise ValueError(f"tree nodes must be numbered level by level (depths non-decreasing), got depths {depth}")
        bounds = []
        for d in range(depth[-1] + 1):
            nodes = [i for i in range(n) if depth[i] == d]
            bounds.append((nodes[0], nodes[-1] + 1))
        par_local, rank, top_k = [], [], []
        for d in range(1, len(bounds)):
            lo, hi = bounds[d]
            plo = bounds[d - 1][0]
            par_local.append(torch.tensor([par[i] - plo for i in range(lo, hi)], dtype=torch.long, device=device))
            rank.append(torch.tensor(sibling_rank[lo:hi], dtype=torch.long, device=device))
            top_k.append(max(sibling_rank[lo:hi]) + 1)
        return cls(depth=torch.tensor(depth, dtype=torch.long, device=device), bounds=tuple(bounds), width=None,
                   parent_local=tuple(par_local), rank=tuple(rank), top_k=tuple(top_k))
