"""The tiny-model factory: models run generate with video input, batch 1 and batch 3 with different lengths."""

import math

import pytest
import torch

import vspec
from vspec.testing import (
    EOS_ID,
    PAD_ID,
    SUPPORTED_FAMILIES,
    VIDEO_ID,
    make_inputs,
    pairwise,
    perturbed_copy,
    tiny_config,
    tiny_pair,
    visual_token_count,
)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_tiny_pair_generates_with_video(family):
    target, draft = tiny_pair(family)
    assert target.get_output_embeddings().weight.shape[0] == draft.get_output_embeddings().weight.shape[0]
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    for batch, lens in ((1, [4]), (3, [3, 7, 5])):
        inputs = make_inputs(target, batch_size=batch, prompt_lens=lens)
        n_vis = visual_token_count(target.config, frames=4)
        assert ((inputs["input_ids"] == VIDEO_ID).sum(dim=1) == n_vis).all()
        pads = (inputs["input_ids"] == PAD_ID).sum(dim=1)
        assert pads.tolist() == [max(lens) - n for n in lens]  # left padding, rows of different lengths
        assert torch.equal(inputs["attention_mask"].bool(), inputs["input_ids"] != PAD_ID)
        for model in (target, draft):
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=EOS_ID)
            assert out.shape[0] == batch and out.shape[1] >= inputs["input_ids"].shape[1] + 1


def test_factory_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, _ = tiny_pair("qwen2_5_vl", seed=3)
    after = torch.rand(1)
    b, _ = tiny_pair("qwen2_5_vl", seed=3)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_perturbed_copy_differs_but_shares_shapes():
    target, _ = tiny_pair("llava_onevision")
    close = perturbed_copy(target, noise=0.1)
    diffs = [not torch.equal(p, q) for p, q in zip(target.parameters(), close.parameters()) if p.ndim >= 2]
    assert all(diffs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="model_type must be one of"):
        tiny_config("gpt2")
    with pytest.raises(ValueError, match="role"):
        tiny_config("qwen2_5_vl", role="oracle")
    target, _ = tiny_pair("qwen2_vl")
    with pytest.raises(ValueError, match="prompt_lens"):
        make_inputs(target, batch_size=2, prompt_lens=[3])
    with pytest.raises(ValueError, match="modality"):
        make_inputs(target, modality="audio")


def test_ops_lists_the_contract():
    for name in ("visual_attention_mass", "frame_semantic_scores", "verify_greedy", "verify_tree_greedy",
                 "verify_sampling", "verify_loose", "compact_kv_"):
        assert callable(getattr(vspec.ops, name)), name
        assert name in vspec.ops.__all__


@pytest.mark.parametrize("sizes", [(2, 5, 2), (2, 4, 3), (2, 2, 3, 2), (3, 3, 3, 3), (1, 4)])
def test_pairwise_covers_every_pair(sizes):
    import itertools

    axes = [[f"{k}{v}" for v in range(n)] for k, n in zip("abcd", sizes)]
    cases = pairwise(*axes)
    assert len(set(cases)) == len(cases) and all(c in set(itertools.product(*axes)) for c in cases)
    for i, j in itertools.combinations(range(len(axes)), 2):
        assert {(c[i], c[j]) for c in cases} == set(itertools.product(axes[i], axes[j]))
    if len(sizes) > 2:
        assert len(cases) < math.prod(sizes)
    with pytest.raises(ValueError, match="at least one value"):
        pairwise([1, 2], [])
