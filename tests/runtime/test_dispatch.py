"""A target dispatched by accelerate (``device_map``: 32B/72B targets sharded over GPUs) stays lossless.

No GPU here: the target is dispatched on the CPU with a MIXED map — decoder layers 1.. (and Qwen's vision tower)
on "disk"; the embeddings, layer 0, the norm and ``lm_head`` (and LLaVA-OneVision's vision tower) on "cpu". That
installs the hooks a multi-GPU map installs: ``AlignDevicesHook`` on every mapped module, weights loaded from the
offload folder for each forward, the top-level hook returning outputs to the inputs' device. With Qwen's vision
tower on disk the model's first parameter is on ``meta``, so ``model.device`` is no guide (vspec used to check
inputs against it). The draft stays a plain model. What this cannot show: tensors on several CUDA devices
(per-layer KV caches and q/k, a draft on its own GPU); those code paths run here with one device.

The ops run on the reference backend (placement is under test here; tests/kernels/ cover the kernels), which
keeps each test at a few seconds instead of the Triton interpreter's tens.
"""

import copy

import pytest
import torch

from vspec import LooseConfig, SpecConfig, SpecDecoder, TreeConfig, apply_vspec
from vspec.runtime.devices import input_device
from vspec.testing import make_inputs, perturbed_copy, tiny_pair

accelerate = pytest.importorskip("accelerate")
# LLaVA-OneVision's map names the parameter model.image_newline (accelerate needs it covered, and warns)
pytestmark = pytest.mark.filterwarnings("ignore:The following device_map keys do not match")

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
PROMPTS = {1: [5], 3: [3, 7, 5]}
NEW = 14
PRUNE = dict(prune="semantic", keep_ratio=0.25)  # semantic: the score capture runs through the hooks
SCHEDULES = {
    "chain": dict(draft_len=3),
    "tree": dict(tree=TreeConfig(width=2, depth=3)),
    "parallel": dict(draft_len=3, parallel=True),
}


def mixed_map(model) -> dict:
    """Decoder layers 1.. on disk; embeddings, layer 0, norm and lm_head on the CPU; Qwen's vision tower on disk,
    LLaVA-OneVision's on the CPU (its SigLIP head is an ``nn.MultiheadAttention``, which reads its weights without
    calling its submodules: accelerate cannot offload it, plain ``generate`` fails too)."""
    if hasattr(model.model, "visual"):
        dmap = {"model.visual": "disk"}
    else:
        dmap = {name: "cpu" for name in ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")}
    lm = "model.language_model"
    n = model.config.get_text_config().num_hidden_layers
    dmap.update({f"{lm}.embed_tokens": "cpu", f"{lm}.layers.0": "cpu"})
    dmap.update({f"{lm}.layers.{i}": "disk" for i in range(1, n)})
    dmap.update({f"{lm}.norm": "cpu", f"{lm}.rotary_emb": "cpu", "lm_head": "cpu"})
    return dmap


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per family: (plain target, dispatched copy, close draft, small draft)."""
    out = {}
    for fam in FAMILIES:
        target, small = tiny_pair(fam)
        folder = tmp_path_factory.mktemp(f"offload_{fam}")
        dispatched = accelerate.dispatch_model(copy.deepcopy(target), device_map=mixed_map(target),
                                               offload_dir=str(folder))
        out[fam] = (target, dispatched, perturbed_copy(target, noise=0.1, seed=1), small)
    return out


_REFS = {}


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("VSPEC_BACKEND", "reference")


def reference(target, family, batch):
    """The plain, undispatched target's greedy output (computed once per family and batch)."""
    key = (family, batch)
    if key not in _REFS:
        inputs = make_inputs(target, batch_size=batch, prompt_lens=PROMPTS[batch], seed=batch, frames=8)
        _REFS[key] = (inputs, target.generate(**inputs, max_new_tokens=NEW, do_sample=False))
    return _REFS[key]


def _same(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.equal(out, ref), f"\nvspec:\n{out}\nreference:\n{ref}"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_dispatch_installs_offload_hooks(pairs, family):
    target, dispatched, _, _ = pairs[family]
    layer = dispatched.model.language_model.layers[1].self_attn.q_proj
    assert layer._hf_hook.offload and layer.weight.device.type == "meta"  # loaded from disk per forward
    if family == "qwen2_5_vl":
        assert dispatched.device.type == "meta"  # the vision tower's first parameter (LLaVA's is image_newline)
    assert input_device(dispatched) == torch.device("cpu") == input_device(target)
    inputs, ref = reference(target, family, 3)
    _same(dispatched.generate(**inputs, max_new_tokens=NEW, do_sample=False), ref)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dispatched_target_equals_generate(pairs, family, batch, schedule):
    target, dispatched, close, _ = pairs[family]
    inputs, ref = reference(target, family, batch)
    cfg = SpecConfig(**PRUNE, **SCHEDULES[schedule])
    out = SpecDecoder(dispatched, close, cfg).generate(**inputs, max_new_tokens=NEW, do_sample=False)
    _same(out.sequences, ref)
    st = out.stats
    assert 0 < st.kept_visual_tokens < st.total_visual_tokens
    # the same keep-set and the same acceptance as with the plain target: the capture saw the same q/k
    plain = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=NEW, do_sample=False).stats
    assert (st.kept_visual_tokens, st.accept_histogram, st.rounds) == (
        plain.kept_visual_tokens, plain.accept_histogram, plain.rounds)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_vspec_on_a_dispatched_target(pairs, family):
    target, dispatched, _, small = pairs[family]
    inputs, ref = reference(target, family, 3)
    with apply_vspec(dispatched, small, SpecConfig(draft_len=3, parallel=True, **PRUNE)) as handle:
        _same(dispatched.generate(**inputs, max_new_tokens=NEW, do_sample=False), ref)
        assert handle.last_stats.rounds > 0
    _same(dispatched.generate(**inputs, max_new_tokens=NEW, do_sample=False), ref)  # undone: HF's generate again


@pytest.mark.parametrize("detector", ["hidden", "attention"])
def test_loose_verification_reads_a_dispatched_target_like_a_plain_one(pairs, detector):
    """The anchor detectors read a decoder layer's output / q-k through the hooks: same decisions, same output."""
    target, dispatched, close, _ = pairs["qwen2_5_vl"]
    inputs, _ = reference(target, "qwen2_5_vl", 3)
    cfg = SpecConfig(draft_len=3, verify="loose", loose=LooseConfig(detector=detector, threshold=0.3), **PRUNE)
    plain = SpecDecoder(target, close, cfg).generate(**inputs, max_new_tokens=NEW)
    out = SpecDecoder(dispatched, close, cfg).generate(**inputs, max_new_tokens=NEW)
    _same(out.sequences, plain.sequences)
    assert (out.stats.loose_accepted, out.stats.accept_histogram) == (
        plain.stats.loose_accepted, plain.stats.accept_histogram)


def test_compaction_and_finished_rows_over_a_dispatched_cache(pairs):
    """compact_ and select_rows walk the per-layer cache (grouped by device on a sharded target)."""
    target, dispatched, close, _ = pairs["qwen2_5_vl"]
    inputs, free = reference(target, "qwen2_5_vl", 3)
    L = inputs["input_ids"].shape[1]
    eos = int(free[0, L + 5])  # row 0 ends mid-way: rows leave the batch at different rounds
    ref = target.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    for schedule in ("chain", "tree"):
        cfg = SpecConfig(compact_holes=1, **PRUNE, **SCHEDULES[schedule])
        out = SpecDecoder(dispatched, close, cfg).generate(**inputs, max_new_tokens=NEW, eos_token_id=eos)
        _same(out.sequences, ref)
        assert out.stats.compactions > 0


def test_a_dispatched_draft_scores_its_own_prefill(pairs, tmp_path):
    """prune_source='draft': the capture and the input-embeddings hook run on a dispatched draft too."""
    target, _, close, _ = pairs["llava_onevision"]
    inputs, ref = reference(target, "llava_onevision", 3)
    draft = accelerate.dispatch_model(copy.deepcopy(close), device_map=mixed_map(close), offload_dir=str(tmp_path))
    cfg = SpecConfig(draft_len=3, prune_source="draft", **PRUNE)
    out = SpecDecoder(target, draft, cfg).generate(**inputs, max_new_tokens=NEW, do_sample=False)
    _same(out.sequences, ref)
    assert out.stats.kept_visual_tokens < out.stats.total_visual_tokens


@pytest.mark.parametrize("schedule", ["chain", "tree"])
def test_serial_schedules_with_the_cross_device_draft_state(pairs, schedule, monkeypatch):
    """A draft on another device than the target gets ``BridgedDraftState`` in the serial schedules (tensors sent
    to the draft's device, logits and extents fetched back). One device here, so the state is forced: the
    copies are no-ops, the bookkeeping around them is what runs."""
    from vspec.runtime import schedules
    from vspec.runtime.draft_side import BridgedDraftState, DraftSide

    made = []

    def bridged(model, adapter, main_device, **kw):
        made.append(BridgedDraftState(model, adapter, DraftSide(main_device, main_device, streams=False), **kw))
        return made[-1]

    monkeypatch.setattr(schedules, "draft_state", bridged)
    target, dispatched, close, _ = pairs["llava_onevision"]
    inputs, ref = reference(target, "llava_onevision", 3)
    cfg = SpecConfig(compact_holes=2, **PRUNE, **SCHEDULES[schedule])
    out = SpecDecoder(dispatched, close, cfg).generate(**inputs, max_new_tokens=NEW)
    _same(out.sequences, ref)
    assert made and made[0].calls == out.stats.draft_calls > 0


def test_from_pretrained_with_a_device_map(pairs, tmp_path):
    """The loading path users take: ``from_pretrained(..., device_map=..., offload_folder=...)``."""
    target = pairs["qwen2_5_vl"][0]
    close = pairs["qwen2_5_vl"][2]
    target.save_pretrained(tmp_path / "target")
    loaded = type(target).from_pretrained(tmp_path / "target", device_map=mixed_map(target),
                                          offload_folder=str(tmp_path / "offload"), dtype=torch.float32)
    assert loaded.hf_device_map["lm_head"] == "cpu" and loaded.device.type == "meta"
    inputs, ref = reference(target, "qwen2_5_vl", 3)
    out = SpecDecoder(loaded, close, SpecConfig(draft_len=3, **PRUNE)).generate(**inputs, max_new_tokens=NEW)
    _same(out.sequences, ref)


def test_inputs_on_the_wrong_device_name_the_right_one(pairs):
    target, dispatched, close, _ = pairs["qwen2_5_vl"]
    inputs, _ = reference(target, "qwen2_5_vl", 1)
    bad = {k: v.to("meta") for k, v in inputs.items()}
    with pytest.raises(ValueError, match="target takes its inputs on cpu"):
        SpecDecoder(dispatched, close).generate(**bad, max_new_tokens=3)
