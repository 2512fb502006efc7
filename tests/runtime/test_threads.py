"""Concurrent generate calls on one patched model: each thread gets its own output (per-call state)."""

import threading

import pytest
import torch

from vspec import LooseConfig, SpecConfig, apply_vspec
from vspec.testing import make_inputs

CONFIGS = {
    "semantic": SpecConfig(draft_len=3, keep_ratio=0.25),
    "loose_hidden": SpecConfig(draft_len=3, keep_ratio=0.25, verify="loose", loose=LooseConfig(detector="hidden")),
    "loose_attention": SpecConfig(draft_len=3, keep_ratio=0.25, verify="loose",
                                  loose=LooseConfig(detector="attention", attention_layers=(0, -1))),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_threads_on_one_patched_model(models, name, monkeypatch):
    """Plain ``generate`` on one model from two threads is safe; so must the patched one be (per-call state, hooks
    that act only in their own thread, one attention switch per model). The ops run on the reference backend:
    Triton's CPU interpreter patches ``triton.language`` globally while it runs a kernel, so two threads cannot
    interpret kernels at once (compiled kernels on a GPU have no such limit)."""
    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    target, close = models["qwen2_5_vl"]
    jobs = [make_inputs(target, batch_size=b, prompt_lens=[3, 7, 5][:b], seed=s) for b, s in ((1, 1), (3, 2))]
    with apply_vspec(target, close, CONFIGS[name]):
        alone = [target.generate(**inp, max_new_tokens=16, do_sample=False) for inp in jobs]
        results, errors = {}, []

        def run(i, rounds):
            try:
                for r in range(rounds):
                    results[i, r] = target.generate(**jobs[i], max_new_tokens=16, do_sample=False)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(i, 4)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for (i, _), out in results.items():
        assert torch.equal(out, alone[i]), (i, out, alone[i])
    assert len(results) == 8
