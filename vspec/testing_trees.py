"""Tree shapes for tests and benchmarks: :class:`TreeBuffers` (every tensor one static tree shape implies, as named
fields of a frozen dataclass rather than EAGLE's 8-tuple) and the shape helpers :func:`chain_tree`,
:func:`topk_tree`, :func:`validate_parents`. The runtime does not use them: it drafts with
:class:`vspec.runtime.trees.TreeLevels`.

    >>> tb = TreeBuffers.from_parents(topk_tree([2, 2]))
    >>> tb.num_nodes, tb.max_depth, tuple(tb.retrieve_paths.shape)
    (7, 2, (4, 3))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TreeBuffers", "chain_tree", "topk_tree", "validate_parents"]


def validate_parents(parents) -> tuple[int, ...]:
    """``parents`` (sequence of ints or a 1-D integer tensor) as a tuple, after checking it is a tree.

    Raises ``TypeError`` for a non-integer input and ``ValueError`` naming the first bad node otherwise.
    """
    if isinstance(parents, torch.Tensor):
        if parents.ndim != 1:
            raise ValueError(f"parents must be 1-D, got shape {tuple(parents.shape)}")
        if parents.is_floating_point() or parents.is_complex() or parents.dtype == torch.bool:
            raise TypeError(f"parents must hold integers, got {parents.dtype}")
        parents = parents.tolist()
    if isinstance(parents, (str, bytes)) or not isinstance(parents, Sequence):
        raise TypeError(f"parents must be a sequence of ints or a 1-D tensor, got {type(parents).__name__}")
    out = []
    for i, p in enumerate(parents):
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"parents[{i}] must be an int, got {type(p).__name__}")
        out.append(int(p))
    if not out:
        raise ValueError("parents must hold at least the root, got an empty sequence")
    if out[0] != -1:
        raise ValueError(f"parents[0] must be -1 (node 0 is the root), got {out[0]}")
    for i, p in enumerate(out[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] must satisfy 0 <= parents[i] < i, got {p}")
    return tuple(out)


@dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Everything derived from one tree shape; build with :meth:`from_parents`.

    Fields (N nodes, L leaves, D = max depth):

    * ``parents``: tuple of N ints, ``parents[0] == -1``.
    * ``parents_tensor``: ``[N]`` int64, for :func:`vspec.ops.verify_tree_greedy`.
    * ``depth``: ``[N]`` int64, root = 0.
    * ``attn_mask``: ``[N, N]`` bool, ``attn_mask[i, j]`` iff j is i or an ancestor of i (tree attention:
      a node sees its own root path only).
    * ``position_offsets``: ``[N]`` int64, position of node i relative to the root (= depth).
    * ``retrieve_paths``: ``[L, D + 1]`` int64, node indices root → leaf for every leaf (in node order),
      padded with −1.
    * ``children``: tuple of N tuples, the children of each node in increasing index.
    * ``sibling_rank``: ``[N]`` int64, the position of node i among its parent's children (0 for the root):
      in a full top-k tree (:func:`topk_tree`) node i carries the ``sibling_rank[i]``-th best draft token at
      its parent.
    """

    parents: tuple[int, ...]
    parents_tensor: torch.Tensor
    depth: torch.Tensor
    attn_mask: torch.Tensor
    position_offsets: torch.Tensor
    retrieve_paths: torch.Tensor
    children: tuple[tuple[int, ...], ...]
    sibling_rank: torch.Tensor

    @classmethod
    def from_parents(cls, parents, device: torch.device | str | None = None) -> TreeBuffers:
        par = validate_parents(parents)
        n = len(par)
        depth = [0] * n
        kids: list[list[int]] = [[] for _ in range(n)]
        rank = [0] * n
        for i in range(1, n):
            depth[i] = depth[par[i]] + 1
            rank[i] = len(kids[par[i]])
            kids[par[i]].append(i)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = par[j]
        leaves = [i for i in range(n) if not kids[i]]
        width = max(depth) + 1
        paths = torch.full((len(leaves), width), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            j = leaf
            while j >= 0:
                paths[row, depth[j]] = j
                j = par[j]
        depth_t = torch.tensor(depth, dtype=torch.long)
        return cls(
            parents=par,
            parents_tensor=torch.tensor(par, dtype=torch.long, device=device),
            depth=depth_t.to(device),
            attn_mask=mask.to(device),
            position_offsets=depth_t.clone().to(device),
            retrieve_paths=paths.to(device),
            children=tuple(tuple(k) for k in kids),
            sibling_rank=torch.tensor(rank, dtype=torch.long, device=device),
        )

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return self.retrieve_paths.shape[1] - 1

    @property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.children) if not k)

    def nodes_at_depth(self, d: int) -> tuple[int, ...]:
        """Node indices at depth ``d`` (the nodes drafted in step d of a level-by-level expansion)."""
        return tuple(i for i, di in enumerate(self.depth.tolist()) if di == d)

    def to(self, device: torch.device | str) -> TreeBuffers:
        """The same buffers on ``device``."""
        return TreeBuffers(
            parents=self.parents,
            parents_tensor=self.parents_tensor.to(device),
            depth=self.depth.to(device),
            attn_mask=self.attn_mask.to(device),
            position_offsets=self.position_offsets.to(device),
            retrieve_paths=self.retrieve_paths.to(device),
            children=self.children,
            sibling_rank=self.sibling_rank.to(device),
        )


def chain_tree(gamma: int) -> tuple[int, ...]:
    """Parents of a chain of γ draft tokens below the root: ``(-1, 0, 1, ..., γ-1)``, N = γ + 1."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 0:
        raise ValueError(f"gamma must be an int >= 0, got {gamma!r}")
    return (-1, *range(gamma))


def topk_tree(branching: Sequence[int]) -> tuple[int, ...]:
    """Parents of a full top-k expansion: every node at depth d has ``branching[d]`` children.

    Nodes are numbered level by level (breadth first), children of one parent consecutively in rank order, so
    ``N = 1 + b0 + b0·b1 + ...``. ``topk_tree([3, 2, 1])`` has 1 + 3 + 6 + 6 = 16 nodes.
    """
    if isinstance(branching, (str, bytes)) or not isinstance(branching, Sequence):
        raise TypeError(f"branching must be a sequence of ints, got {type(branching).__name__}")
    for d, b in enumerate(branching):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"branching[{d}] must be an int >= 1, got {b!r}")
    parents = [-1]
    level = [0]
    for b in branching:
        nxt = []
        for p in level:
            for _ in range(b):
                nxt.append(len(parents))
                parents.append(p)
        level = nxt
    return tuple(parents)
