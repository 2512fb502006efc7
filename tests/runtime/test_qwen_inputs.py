"""Qwen inputs with and without ``mm_token_type_ids``: vspec gives what ``target.generate`` gives for each.

transformers' ``generate`` computes M-RoPE only when ``mm_token_type_ids`` is passed; hand-built inputs without it
get 1-D text positions for every token (the visual ones too). vspec follows it and warns.
"""

import warnings

import pytest
import torch

from vspec import SpecConfig, SpecDecoder, apply_vspec
from vspec.runtime.models.qwen_vl import MISSING_TYPES_WARNING
from vspec.testing import make_inputs, pairwise, tiny_pair

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
N_NEW = 12


@pytest.fixture(scope="module")
def pairs():
    return {fam: tiny_pair(fam) for fam in FAMILIES}


def _inputs(target, modality, batch):
    inputs = make_inputs(target, batch_size=batch, modality=modality, seed=batch, prompt_lens=[4, 7, 3][:batch])
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    return inputs, without


# every pair of settings meets in some case (vspec.testing.pairwise), not the full product
@pytest.mark.parametrize("family,modality,batch", pairwise(FAMILIES, ["video", "image"], [1, 3]))
def test_without_types_vspec_follows_generate_and_warns(pairs, family, modality, batch):
    target, draft = pairs[family]
    with_types, without = _inputs(target, modality, batch)
    ref_with = target.generate(**with_types, max_new_tokens=N_NEW, do_sample=False)
    ref_without = target.generate(**without, max_new_tokens=N_NEW, do_sample=False)
    # the fact this pins down: generate's positions differ without the types (1-D instead of M-RoPE)
    assert not torch.equal(ref_with, ref_without)

    dec = SpecDecoder(target, draft, SpecConfig(draft_len=3, prune="semantic", keep_ratio=0.25))
    with pytest.warns(UserWarning, match="no `mm_token_type_ids`"):
        out = dec.generate(**without, max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, ref_without)
    with pytest.warns(UserWarning, match="no `mm_token_type_ids`"), apply_vspec(target, draft, SpecConfig()):
        patched = target.generate(**without, max_new_tokens=N_NEW, do_sample=False)
    assert torch.equal(patched, ref_without)

    # with the types: M-RoPE, and no warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(dec.generate(**with_types, max_new_tokens=N_NEW).sequences, ref_with)
    assert not [w for w in seen if "mm_token_type_ids" in str(w.message)]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_is_the_same_with_or_without_types(pairs, family):
    target, draft = pairs[family]
    inputs = make_inputs(target, batch_size=3, modality="text", prompt_lens=[4, 7, 3])
    zeros = dict(inputs, mm_token_type_ids=torch.zeros_like(inputs["input_ids"]))
    ref = target.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    assert torch.equal(target.generate(**zeros, max_new_tokens=N_NEW, do_sample=False), ref)
    dec = SpecDecoder(target, draft, SpecConfig(draft_len=3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for kw in (inputs, zeros):
            assert torch.equal(dec.generate(**kw, max_new_tokens=N_NEW).sequences, ref)
    assert not [w for w in seen if "mm_token_type_ids" in str(w.message)]


def test_warning_says_what_to_pass():
    assert "mm_token_type_ids" in MISSING_TYPES_WARNING
    assert "0 text, 1 image placeholder, 2 video" in MISSING_TYPES_WARNING
    assert "return_mm_token_type_ids" in MISSING_TYPES_WARNING


def test_qwen_processors_return_the_types_by_default():
    """What the warning tells users: the Qwen processors add mm_token_type_ids unless told not to."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_5_vl import processing_qwen2_5_vl
    from transformers.models.qwen2_vl import processing_qwen2_vl

    def default(processor, module, kwargs_name):
        if hasattr(processor, "return_mm_token_type_ids"):  # transformers 5.24: a class attribute
            return processor.return_mm_token_type_ids
        # transformers 5.17: a default of the processor's text kwargs
        return getattr(module, kwargs_name)._defaults["text_kwargs"].get("return_mm_token_type_ids", False)

    assert default(Qwen2_5_VLProcessor, processing_qwen2_5_vl, "Qwen2_5_VLProcessorKwargs") is True
    assert default(Qwen2VLProcessor, processing_qwen2_vl, "Qwen2VLProcessorKwargs") is True
