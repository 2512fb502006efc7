"""Both models decode on preallocated storage: after the prefill no forward, rollback or compaction reallocates a
model's KV storage or validity mask (only rows leaving the batch do), and the output stays exact."""

import pytest
import torch

from vspec import SpecConfig, SpecDecoder, TreeConfig
from vspec.runtime.cache import SpecCache
from vspec.runtime.state import ModelState
from vspec.testing import make_inputs, perturbed_copy, tiny_model


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2_5_vl", role="target", seed=0)
    return target, perturbed_copy(target, noise=0.1, seed=1)


def _watch(monkeypatch):
    """Record, per ModelState, the storage and mask addresses seen at every forward after the prefill, split into
    epochs at each ``select_rows`` (the one place a state may reallocate)."""
    seen: dict[int, list[list[tuple]]] = {}
    states: dict[int, ModelState] = {}

    def addresses(state):
        c = state.cache
        return tuple(st.data_ptr() for st in c.storages) + (c.valid.data_ptr(),)

    def wrap(name):
        orig = getattr(ModelState, name)

        def wrapped(self, *args, **kwargs):
            was_static = self.static
            out = orig(self, *args, **kwargs)
            states[id(self)] = self
            if was_static:
                seen.setdefault(id(self), [[]])[-1].append(addresses(self))
            return out

        monkeypatch.setattr(ModelState, name, wrapped)

    for name in ("forward", "forward_tree"):
        wrap(name)
    orig_select = ModelState.select_rows

    def select_rows(self, rows):
        orig_select(self, rows)
        seen.setdefault(id(self), [[]]).append([])

    monkeypatch.setattr(ModelState, "select_rows", select_rows)
    return seen, states


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
def test_storage_is_allocated_once(pair, monkeypatch, mode, batch):
    target, close = pair
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5][:batch], seed=11)
    ref = target.generate(**inputs, do_sample=False, max_new_tokens=30)
    seen, states = _watch(monkeypatch)
    tree = TreeConfig(width=2, depth=3) if mode == "tree" else None
    cfg = SpecConfig(draft_len=4, prune="none", compact_holes=3, tree=tree)
    out = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=30)
    assert torch.equal(out.sequences, ref)
    if batch > 1 or mode == "tree":  # (batch 1 chain: rejected slots trail and are cut, no holes to compact)
        assert out.stats.compactions > 0  # in-place compaction is exercised
    assert len(states) == 2  # target and draft
    for key, state in states.items():
        assert isinstance(state.cache, SpecCache) and state.cache.reallocations == 0
        epochs = [e for e in seen[key] if e]
        assert sum(len(e) for e in epochs) >= 3  # several decode forwards were watched
        for epoch in epochs:
            assert len(set(epoch)) == 1, "a forward reallocated the storage"


def test_a_short_reserve_grows_and_stays_exact(pair):
    """Should the reserve be too small, the storage grows (counted), never corrupts."""
    target, close = pair
    inputs = make_inputs(target, batch_size=2, prompt_lens=[3, 6], seed=4)
    ref = target.generate(**inputs, do_sample=False, max_new_tokens=20)
    states = []
    orig = ModelState.__init__

    def small(self, model, adapter, *, reserve=256):
        orig(self, model, adapter, reserve=2)
        states.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelState, "__init__", small)
        out = SpecDecoder(target, close, SpecConfig(draft_len=3, prune="none")).generate(**inputs, max_new_tokens=20)
    assert torch.equal(out.sequences, ref)
    assert states and all(s.cache.reallocations > 0 for s in states)


@pytest.fixture(scope="module")
def captured(pair):
    """One decoder per mode on the fixed-shape path, compiled by dynamo with the ``eager`` backend (the capture is
    checked, inductor's code generation is torch's and costs minutes on a CPU); shared so each shape traces once."""
    target, close = pair
    kw = dict(draft_len=4, prune="none", compact_holes=3, compile={"backend": "eager", "fullgraph": True})
    return {"chain": SpecDecoder(target, close, SpecConfig(**kw)),
            "tree": SpecDecoder(target, close, SpecConfig(tree=TreeConfig(width=2, depth=3), **kw)),
            "parallel": SpecDecoder(target, close, SpecConfig(parallel=True, **kw))}


@pytest.mark.parametrize("mode", ["chain", "tree", "parallel"])
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
def test_compiled_fixed_shape_path_is_lossless(pair, captured, mode, batch):
    target, _ = pair
    inputs = make_inputs(target, batch_size=batch, prompt_lens=[3, 7, 5][:batch], seed=21 + batch)
    ref = target.generate(**inputs, do_sample=False, max_new_tokens=24)
    out = captured[mode].generate(**inputs, max_new_tokens=24)
    assert torch.equal(out.sequences, ref)
    assert 1.0 < out.stats.mean_accepted_length


def test_fixed_shape_forwards_do_not_depend_on_the_length(pair, captured, monkeypatch):
    """Every decode forward on the compiled path sees a mask over all S_max slots: shapes vary with (batch, new
    tokens) only, so one graph per shape serves the whole call."""
    target, _ = pair
    shapes = set()
    orig = ModelState._fixed_call

    def spy(self, new_valid, tree_mask, **kwargs):
        shapes.add((self.cache.max_length, tuple(new_valid.shape)))
        return orig(self, new_valid, tree_mask, **kwargs)

    monkeypatch.setattr(ModelState, "_fixed_call", spy)
    inputs = make_inputs(target, batch_size=1, prompt_lens=[5], seed=3)
    captured["chain"].generate(**inputs, max_new_tokens=24)
    # target: [1, γ+1]; draft: [1, 1] steps and [1, 2] catch-up feeds — at one S_max each
    assert {s for _, s in shapes} <= {(1, 5), (1, 1), (1, 2)} and len(shapes) <= 3 + 3


def test_compile_setting_is_checked():
    with pytest.raises(TypeError, match="compile"):
        SpecConfig(compile=3)
    with pytest.raises(ValueError, match="loose"):
        SpecConfig(compile=True, verify="loose")
