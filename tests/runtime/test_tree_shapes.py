"""Tree shapes on hand-made trees: TreeBuffers and its helpers (vspec/testing_trees.py), tree_from_choices
(vspec/runtime/trees.py)."""

import dataclasses

import pytest
import torch

from vspec.kernels import reference as ref
from vspec.runtime.trees import tree_from_choices
from vspec.testing_trees import TreeBuffers, chain_tree, topk_tree, validate_parents


def test_chain_tree():
    assert chain_tree(0) == (-1,)
    assert chain_tree(3) == (-1, 0, 1, 2)
    tb = TreeBuffers.from_parents(chain_tree(3))
    assert tb.num_nodes == 4 and tb.max_depth == 3
    assert tb.depth.tolist() == [0, 1, 2, 3] and tb.position_offsets.tolist() == [0, 1, 2, 3]
    assert torch.equal(tb.attn_mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert tb.retrieve_paths.tolist() == [[0, 1, 2, 3]]
    assert tb.children == ((1,), (2,), (3,), ())
    assert tb.leaves == (3,)
    assert tb.sibling_rank.tolist() == [0, 0, 0, 0]


def test_topk_tree():
    parents = topk_tree([2, 2])
    assert parents == (-1, 0, 0, 1, 1, 2, 2)
    assert len(topk_tree([3, 2, 1])) == 1 + 3 + 6 + 6
    tb = TreeBuffers.from_parents(parents)
    assert tb.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert tb.retrieve_paths.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]]
    assert tb.sibling_rank.tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert tb.children == ((1, 2), (3, 4), (5, 6), (), (), (), ())
    assert tb.nodes_at_depth(1) == (1, 2) and tb.nodes_at_depth(2) == (3, 4, 5, 6)
    want_mask = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tb.attn_mask, want_mask)


def test_irregular_tree():
    #   0 ─ 1 ─ 3 ─ 5
    #   └── 2 ─ 4
    #       └── 6
    tb = TreeBuffers.from_parents(torch.tensor([-1, 0, 0, 1, 2, 3, 2]))
    assert tb.parents == (-1, 0, 0, 1, 2, 3, 2)
    assert tb.parents_tensor.dtype == torch.long and tb.parents_tensor.tolist() == list(tb.parents)
    assert tb.depth.tolist() == [0, 1, 1, 2, 2, 3, 2]
    assert tb.max_depth == 3
    assert tb.leaves == (4, 5, 6)
    assert tb.retrieve_paths.tolist() == [[0, 2, 4, -1], [0, 1, 3, 5], [0, 2, 6, -1]]
    assert tb.children == ((1, 2), (3,), (4, 6), (5,), (), (), ())
    assert tb.sibling_rank.tolist() == [0, 0, 1, 0, 0, 0, 1]
    # the attention mask row of a node is exactly its root path
    for row, leaf in enumerate(tb.leaves):
        path = [n for n in tb.retrieve_paths[row].tolist() if n >= 0]
        assert tb.attn_mask[leaf].nonzero()[:, 0].tolist() == sorted(path)
    assert torch.equal(tb.attn_mask.sum(1) - 1, tb.depth)


def test_tree_from_choices():
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert tree_from_choices(choices) == (-1, 0, 0, 1, 1, 2, 3)
    assert tree_from_choices(list(reversed(choices))) == tree_from_choices(choices)  # order-free
    with pytest.raises(ValueError, match="parent"):
        tree_from_choices([(0, 0)])
    with pytest.raises(ValueError, match="negative"):
        tree_from_choices([(-1,)])


@pytest.mark.parametrize(
    "parents,exc,needle",
    [
        pytest.param([], ValueError, "empty", id="empty"),
        pytest.param([0, 0], ValueError, "parents\\[0\\]", id="root"),
        pytest.param([-1, 0, 2], ValueError, "parents\\[2\\]", id="self-parent"),
        pytest.param([-1, 0, 3, 1], ValueError, "parents\\[2\\]", id="forward"),
        pytest.param([-1, -1], ValueError, "parents\\[1\\]", id="second-root"),
        pytest.param([-1, 0.0], TypeError, "parents\\[1\\]", id="float-item"),
        pytest.param(torch.tensor([-1.0, 0.0]), TypeError, "integers", id="float-tensor"),
        pytest.param(torch.tensor([[-1, 0]]), ValueError, "1-D", id="2d-tensor"),
        pytest.param("abc", TypeError, "sequence", id="string"),
    ],
)
def test_validate_parents_errors(parents, exc, needle):
    with pytest.raises(exc, match=needle):
        validate_parents(parents)
    with pytest.raises(exc, match=needle):
        TreeBuffers.from_parents(parents)


def test_helpers_reject_bad_shapes():
    with pytest.raises(ValueError, match="gamma"):
        chain_tree(-1)
    with pytest.raises(ValueError, match="branching\\[1\\]"):
        topk_tree([2, 0])
    with pytest.raises(TypeError, match="branching"):
        topk_tree(3)


def test_frozen_and_to():
    tb = TreeBuffers.from_parents(topk_tree([2]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        tb.depth = torch.zeros(3)
    moved = tb.to("cpu")
    assert moved.parents == tb.parents and torch.equal(moved.attn_mask, tb.attn_mask)


def test_verified_path_is_a_retrieve_prefix():
    tb = TreeBuffers.from_parents(topk_tree([2, 2, 1]))
    B, N, V = 6, tb.num_nodes, 20
    logits = torch.randn(B, N, V)
    am = logits.argmax(-1)
    tokens = am.gather(1, tb.parents_tensor.clamp_min(0).expand(B, N)).clone()
    tokens[torch.rand(B, N) < 0.3] = 0
    acc, path, _ = ref.verify_tree_greedy(logits, tokens, tb.parents_tensor)
    assert path.shape[1] == tb.max_depth + 1
    for b in range(B):
        a = int(acc[b])
        assert path[b, a] >= 0 and tb.depth[path[b, a]] == a
        prefixes = [r[:a + 1].tolist() for r in tb.retrieve_paths]
        assert path[b, :a + 1].tolist() in prefixes
