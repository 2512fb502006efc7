"""Tree drafting (``SpecConfig(tree=TreeConfig(...))``) is lossless, and the decode loop syncs once per round.

Most tests run the ops on the reference backend: the tree-verification kernel under Triton's CPU interpreter
costs ~0.7 s a round, and tests/kernels/test_verify.py proves it equal to the reference node for node.
``test_tree_rounds_through_the_triton_kernel`` and the host-sync test run the kernel path the GPU runs.
"""

import copy
import os
import sys

import pytest
import torch

import vspec
from vspec import LooseConfig, SpecConfig, SpecDecoder, TreeConfig, ops
from vspec.kernels import reference as ref_ops
from vspec.runtime import steps
from vspec.runtime.models import get_adapter
from vspec.runtime.state import ModelState
from vspec.runtime.trees import TreeLevels, tree_from_choices
from vspec.testing import make_inputs, perturbed_copy, tiny_model
from vspec.testing_trees import TreeBuffers

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
# Static tree holding the greedy chain (0,), (0,0), (0,0,0) plus side branches.
CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0))
SHAPES = {
    "w2d3": TreeConfig(width=2, depth=3),
    "w3d4": TreeConfig(width=3, depth=4),
    "static8": TreeConfig(choices=CHOICES),
}


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("VSPEC_BACKEND", "reference")


def _generate_ref(target, inputs, **kw):
    return target.generate(**inputs, do_sample=False, **kw)


def _assert_same(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(out, ref), f"\nvspec:\n{out}\nreference:\n{ref}"


def _check_stats(st, depth):
    assert st.target_calls == st.rounds
    assert sum(st.accept_histogram) == st.row_rounds
    assert len(st.accept_histogram) == depth + 1
    assert 1.0 <= st.mean_accepted_length <= depth + 1


# ---------------------------------------------------------------------------------------------------------
# the mechanism: a 4-D tree mask through stock HF models
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tree_forward_equals_decoding_each_path(family, impl):
    """ModelState.forward_tree (4-D additive mask, explicit positions root + depth) gives, at every node, the
    logits of decoding that node's root path as a chain on the same cache; rows have different prompt lengths
    (left padding = holes before the tree)."""
    model = tiny_model(family, attn_implementation=impl)
    adapter = get_adapter(model)
    inputs = make_inputs(model, batch_size=2, prompt_lens=[3, 6], seed=1)
    ids, am = inputs.pop("input_ids"), inputs.pop("attention_mask")
    prompt = adapter.prompt(ids, am, inputs)
    state = ModelState(model, adapter)
    with torch.no_grad():
        state.forward(input_ids=ids, positions=prompt.positions, new_valid=am.bool(), logits_to_keep=1,
                      **prompt.model_kwargs)
    cache0, valid0 = copy.deepcopy(state.cache), state.valid.clone()
    parents = (-1, 0, 0, 1, 2, 3, 2)  # irregular: leaves 4, 5, 6 at depths 2, 3, 2
    tb = TreeBuffers.from_parents(parents)
    B, N = 2, len(parents)
    tokens = torch.randint(8, 1000, (B, N), generator=torch.Generator().manual_seed(3))
    pos = (prompt.next_pos - 1)[:, None] + tb.depth[None]
    with torch.no_grad():
        tree_logits = state.forward_tree(input_ids=tokens, positions=adapter.decode_positions(pos),
                                         tree_mask=tb.attn_mask.expand(B, N, N))
    assert state.valid.shape[1] == valid0.shape[1] + N
    for leaf in (4, 5, 6):
        path = []
        j = leaf
        while j >= 0:
            path.insert(0, j)
            j = parents[j]
        chain = ModelState(model, adapter)
        chain.cache, chain.valid = copy.deepcopy(cache0), valid0.clone()
        with torch.no_grad():
            logits = chain.forward(input_ids=tokens[:, path], positions=adapter.decode_positions(pos[:, path]),
                                   new_valid=torch.ones(B, len(path), dtype=torch.bool))
        torch.testing.assert_close(tree_logits[:, path], logits, atol=2e-5, rtol=0)


def test_tree_levels():
    dyn = TreeLevels.dynamic(2, 3)
    assert dyn.depth.tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert dyn.bounds == ((0, 1), (1, 3), (3, 5), (5, 7)) and dyn.num_nodes == 7 and dyn.num_drafted == 4
    st = TreeLevels.static(tree_from_choices(CHOICES))
    assert st.depth.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert st.bounds == ((0, 1), (1, 4), (4, 7), (7, 9)) and st.num_drafted == 6
    assert [p.tolist() for p in st.parent_local] == [[0, 0, 0], [0, 0, 1], [0, 1]]
    assert [r.tolist() for r in st.rank] == [[0, 1, 2], [0, 1, 0], [0, 0]]
    assert st.top_k == (3, 2, 1)
    with pytest.raises(ValueError, match="level by level"):
        TreeLevels.static((-1, 0, 1, 0))
    with pytest.raises(ValueError, match="width"):
        TreeLevels.dynamic(0, 2)


def test_verify_tree_greedy_with_known_width_skips_the_check_only():
    """``width=`` (the runtime's no-sync path) gives the checked path's result for per-row parents."""
    g = torch.Generator().manual_seed(0)
    B, w, D, V = 5, 2, 3, 50
    N = 1 + w * D
    parents = torch.full((B, N), -1)
    for i in range(1, N):
        lvl = (i - 1) // w
        lo = 0 if lvl == 0 else 1 + (lvl - 1) * w
        hi = 1 if lvl == 0 else lo + w
        parents[:, i] = torch.randint(lo, hi, (B,), generator=g)
    logits = torch.randn(B, N, V, generator=g)
    am = logits.argmax(-1)
    tokens = am.gather(1, parents.clamp_min(0))
    tokens[torch.rand(B, N, generator=g) < 0.3] = 7
    want = ops.verify_tree_greedy(logits, tokens, parents)
    for got in (ops.verify_tree_greedy(logits, tokens, parents, width=D + 1, check_ids=False),
                ref_ops.verify_tree_greedy(logits, tokens, parents, width=D + 1)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="width"):
        ops.verify_tree_greedy(logits, tokens, parents, width=0)
    with pytest.raises(ValueError, match="parents"):
        ops.verify_tree_greedy(logits, tokens, parents[:, :-1], width=D + 1)


# ---------------------------------------------------------------------------------------------------------
# lossless
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch", [1, 4], ids=["b1", "b4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tree_greedy_equals_generate(models, family, batch, shape, reference_backend):
    """Pruned draft (semantic, 25%), rows of different prompt lengths, 22 new tokens (not a multiple of the
    depth + 1), dynamic and static trees."""
    target, close = models[family]
    tree = SHAPES[shape]
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5, 4][:batch], seed=batch)
    ref = _generate_ref(target, inputs, max_new_tokens=22)
    cfg = SpecConfig(prune="semantic", keep_ratio=0.25, tree=tree)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=22)
    _assert_same(out.sequences, ref)
    st = out.stats
    _check_stats(st, tree.depth)
    assert st.kept_visual_tokens < st.total_visual_tokens
    # the prefill, then one forward per level a round (the first feeds the committed tokens)
    assert st.draft_calls == 1 + tree.depth * st.rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_width_one_tree_is_the_chain(models, family, reference_backend):
    target, close = models[family]
    inputs = make_inputs(target, batch_size=4, prompt_lens=[3, 7, 5, 4], seed=4)
    chain = SpecDecoder(target, close, SpecConfig(draft_len=4, prune="none")).generate(**inputs, max_new_tokens=23)
    tree = SpecDecoder(target, close, SpecConfig(prune="none", tree=TreeConfig(width=1, depth=4)))
    out = tree.generate(**inputs, max_new_tokens=23)
    _assert_same(out.sequences, chain.sequences)
    for key in ("rounds", "row_rounds", "emitted", "target_calls", "draft_calls", "accept_histogram"):
        assert getattr(out.stats, key) == getattr(chain.stats, key), key


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_inside_the_tree_stops_each_row_like_generate(models, family, reference_backend):
    target, close = models[family]
    inputs = make_inputs(target, batch_size=4, prompt_lens=[3, 7, 5, 4], seed=3)
    free = _generate_ref(target, inputs, max_new_tokens=20)
    L = inputs["input_ids"].shape[1]
    eos = int(free[0, L + 6])  # a token row 0 produces mid-way: rows stop at different rounds, inside accepted paths
    ref = _generate_ref(target, inputs, max_new_tokens=20, eos_token_id=eos)
    dec = SpecDecoder(target, close, SpecConfig(prune="none", tree=TreeConfig(width=3, depth=4)))
    out = dec.generate(**inputs, max_new_tokens=20, eos_token_id=eos)
    _assert_same(out.sequences, ref)
    assert ref.shape[1] < free.shape[1] or (ref[:, L:] == eos).any()


@pytest.mark.parametrize("tree", [TreeConfig(width=2, depth=3), TreeConfig(choices=CHOICES)], ids=["dynamic", "static"])
def test_identical_draft_accepts_the_full_depth(models, tree, reference_backend):
    """A draft equal to the target gives MAL = depth + 1 exactly: the tree always holds the draft's greedy path
    (dynamic trees reserve slot 0 of every level for it; CHOICES contains (0,), (0, 0), (0, 0, 0))."""
    target, _ = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[4, 6])
    rounds, depth = 3, tree.depth
    dec = SpecDecoder(target, copy.deepcopy(target), SpecConfig(prune="none", tree=tree))
    out = dec.generate(**inputs, max_new_tokens=1 + rounds * (depth + 1), eos_token_id=10**6)
    st = out.stats
    assert st.rounds == rounds and st.target_calls == rounds
    assert st.mean_accepted_length == depth + 1
    assert st.accept_histogram[depth] == 2 * rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_tree_accepts_at_least_the_chain(models, family, reference_backend):
    """MAL(tree) >= MAL(chain) at equal depth, over several prompts.

    This must hold: a dynamic tree contains the chain the chain draft proposes from the same committed prefix, so
    each round accepts at least as much (a(p) >= c(p) at committed length p); and for greedy chains
    p + c(p) + 1 is non-decreasing in p (a chain accepting k tokens from p accepts >= k − 1 from p + 1), so after
    every round the tree run has committed at least as many tokens as the chain run and needs no more rounds.
    (Up to float noise between the two runs' draft forwards flipping an argmax at a near-tie.)"""
    target, close = models[family]
    mal_chain, mal_tree = [], []
    for seed in (11, 12):
        inputs = make_inputs(target, batch_size=4, prompt_lens=[3, 7, 5, 4], seed=seed)
        chain = SpecDecoder(target, close, SpecConfig(draft_len=4, prune="none")).generate(**inputs,
                                                                                           max_new_tokens=24)
        tree = SpecDecoder(target, close, SpecConfig(prune="none", tree=TreeConfig(width=3, depth=4))).generate(
            **inputs, max_new_tokens=24)
        _assert_same(tree.sequences, chain.sequences)
        assert tree.stats.emitted == chain.stats.emitted
        assert tree.stats.row_rounds <= chain.stats.row_rounds, (tree.stats, chain.stats)
        mal_chain.append(chain.stats.mean_accepted_length)
        mal_tree.append(tree.stats.mean_accepted_length)
    assert all(t >= c for t, c in zip(mal_tree, mal_chain)), (mal_tree, mal_chain)
    assert sum(mal_tree) > sum(mal_chain)  # the side branches do get used on the close draft


def test_llava_onevision_image_inputs_are_lossless(models, reference_backend):
    target, close = models["llava_onevision"]
    inputs = make_inputs(target, batch_size=2, prompt_lens=[5, 3], modality="image")
    assert inputs["pixel_values"].shape[:2] == (2, 2) and "image_sizes" in inputs
    ref = _generate_ref(target, inputs, max_new_tokens=15)
    for tree in (None, TreeConfig(width=2, depth=3)):
        dec = SpecDecoder(target, close, SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.2, tree=tree))
        out = dec.generate(**inputs, max_new_tokens=15)
        _assert_same(out.sequences, ref)
        assert 0 < out.stats.kept_visual_tokens < out.stats.total_visual_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_target_with_semantic_capture_is_lossless(family, reference_backend):
    """Eager attention: the prefill's q/k capture goes through the ``vspec_eager`` wrapper, the tree forwards get
    the 4-D additive mask that eager attention adds to its scores."""
    target = tiny_model(family, attn_implementation="eager")
    close = perturbed_copy(target, noise=0.1, seed=1)
    inputs = make_inputs(target, batch_size=3, prompt_lens=[4, 6, 3], frames=8)
    ref = _generate_ref(target, inputs, max_new_tokens=16)
    for tree in (None, TreeConfig(width=2, depth=3)):
        dec = SpecDecoder(target, close, SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.25, tree=tree))
        out = dec.generate(**inputs, max_new_tokens=16)
        _assert_same(out.sequences, ref)
        assert out.stats.kept_visual_tokens < out.stats.total_visual_tokens
    assert target.config.get_text_config()._attn_implementation == "eager"  # capture restored it


def test_tree_rounds_through_the_triton_kernel(models):
    """The kernel path the GPU takes (Triton's interpreter on CPU), with cache compaction in between."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5], seed=5)
    ref = _generate_ref(target, inputs, max_new_tokens=13)
    cfg = SpecConfig(prune="attention", keep_ratio=0.3, compact_holes=4, tree=TreeConfig(width=2, depth=3))
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=13)
    _assert_same(out.sequences, ref)
    assert out.stats.compactions > 0


# ---------------------------------------------------------------------------------------------------------
# one host sync per round
# ---------------------------------------------------------------------------------------------------------
_SYNC_METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.mark.parametrize("mode", ["chain_greedy", "chain_sampling", "tree", "loose_hidden", "loose_attention",
                                  "loose_grounded", "loose_attribution"])
def test_one_host_sync_per_round(models, monkeypatch, mode):
    """Counts the host reads of tensor values (``tolist``, ``item``, ``bool``/``int``/``float``/``index``
    conversions, ``cpu``, ``numpy``) made from vspec's own files during each decode round (from the draft step to
    the end of ``end_round``; the prefill and the loop's entry and exit are not rounds). Each round must make
    exactly one: ``end_round``'s read. transformers' own internal reads are not vspec's to count; syncs hidden
    inside C++ ops (boolean-mask indexing, nonzero) are not seen by this test.
    Rows finish at different rounds (EOS) and compaction runs (compact_holes=1) to cover those branches; the loose
    modes cover the anchor detectors (attention calls visual_attention_mass per draft token and layer, grounded
    computes per-head score blocks and a vocabulary softmax, attribution adds the visual values through o_proj,
    two norms and a top-k of the logits)."""
    vspec_dir = os.path.dirname(vspec.__file__) + os.sep
    skip = os.path.join(vspec_dir, "kernels", "reference.py")  # the GPU never runs the reference ops
    log = []
    for name in _SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, _orig=orig, _name=name, **kwargs):
            frame = sys._getframe(1)
            file = frame.f_code.co_filename
            if file.startswith(vspec_dir) and file != skip:
                log.append(("sync", f"{_name} at {os.path.relpath(file, vspec_dir)}:{frame.f_lineno}"))
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def marked(meth, tag, after=False):
        orig = getattr(steps.RoundSteps, meth)

        def f(self, *args, **kwargs):
            if not after:
                log.append((tag,))
            out = orig(self, *args, **kwargs)
            if after:
                log.append((tag,))
            return out

        monkeypatch.setattr(steps.RoundSteps, meth, f)

    marked("draft_chain", "start")
    marked("draft_tree", "start")
    marked("end_round", "end", after=True)

    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=3, prompt_lens=[3, 7, 5], seed=5)
    free = _generate_ref(target, inputs, max_new_tokens=14)
    eos = int(free[1, inputs["input_ids"].shape[1] + 5])
    tree = TreeConfig(width=2, depth=3) if mode == "tree" else None
    loose = {}
    if mode.startswith("loose_"):
        loose = dict(verify="loose", loose=LooseConfig(detector=mode[len("loose_"):]))
    cfg = SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.3, compact_holes=1, tree=tree, **loose)
    kw = dict(do_sample=True, temperature=0.8, top_k=5) if mode == "chain_sampling" else {}
    log.clear()
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=14, eos_token_id=eos, **kw)
    assert out.stats.compactions > 0

    rounds, current = [], None
    for event in log:
        if event[0] == "start":
            assert current is None, "a round started inside a round"
            current = []
        elif event[0] == "end":
            rounds.append(current)
            current = None
        elif current is not None:
            current.append(event[1])
    assert len(rounds) == out.stats.rounds >= 3
    for i, syncs in enumerate(rounds):
        assert len(syncs) == 1 and syncs[0].startswith("tolist at runtime/steps.py"), (i, syncs)


# ---------------------------------------------------------------------------------------------------------
# configuration and errors
# ---------------------------------------------------------------------------------------------------------
def test_tree_config_validation():
    assert TreeConfig() == TreeConfig(width=3, depth=5)
    assert TreeConfig(width=2, depth=3).num_nodes == 7
    t = TreeConfig(choices=[(1,), (0,), (0, 0)])
    assert t.choices == ((0,), (1,), (0, 0)) and t.depth == 2 and t.width == 2 and t.num_nodes == 4
    for bad, needle in ((dict(width=0), "width"), (dict(depth=0), "depth"), (dict(width=1.5), "width"),
                        (dict(choices=[(0, 0)]), "no parent"), (dict(choices=[(0,), (2,)]), "sibling"),
                        (dict(choices=[]), "at least one"), (dict(choices=[(0,)], depth=1), "either")):
        with pytest.raises(ValueError, match=needle):
            TreeConfig(**bad)
    with pytest.raises(TypeError, match="TreeConfig"):
        SpecConfig(tree=(2, 3))
    with pytest.raises(ValueError, match="strict"):
        SpecConfig(tree=TreeConfig(), verify="loose")


def test_tree_refuses_sampling_and_unsupported_attention(models, monkeypatch):
    target, close = models["qwen2_5_vl"]
    inputs = make_inputs(target, batch_size=1)
    dec = SpecDecoder(target, close, SpecConfig(tree=TreeConfig(width=2, depth=2)))
    with pytest.raises(ValueError, match="greedy"):
        dec.generate(**inputs, max_new_tokens=4, do_sample=True, temperature=0.8)
    from vspec.runtime import capture

    monkeypatch.setattr(capture, "text_attn_implementation", lambda model: "flash_attention_2")
    with pytest.raises(ValueError, match="4-D mask"):
        dec.generate(**inputs, max_new_tokens=4)
