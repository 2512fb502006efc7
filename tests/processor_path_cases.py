"""The processor-path cases: an mp4 → frames sampled → transformers' own Qwen processor → vspec / ``apply_vspec`` /
``vspec generate``, equal to unpatched ``target.generate(do_sample=False)`` token for token.

Not collected by ``pytest tests``: ``tests/test_processor_path.py::test_processor_path_cases`` runs this file in a
subprocess whose ``PYTHONPATH`` holds the private torchvision that ``.ci/install-torchvision`` prepares and its
import shim (``tests/_torchvision_cpu``), so the main test process never imports that torchvision. Every case must
run here: no case skips, and a missing video processor is a collection error.
"""

import pytest
import torch

from vspec import SpecConfig, SpecDecoder, apply_vspec
from vspec.cli import _sample_video, main
from vspec.testing import tiny_pair, tiny_qwen_processor, video_processor_available, write_video

if not video_processor_available():
    raise ImportError("transformers' Qwen2VLVideoProcessor cannot be built: run these cases through "
                      "tests/test_processor_path.py (after .ci/install-torchvision), not directly")

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
PROMPTS = ["describe the video", "what happens in this clip", "the square moves"]
N_NEW = 10



@pytest.fixture(scope="module")
def setups():
    out = {}
    for fam in FAMILIES:
        target, draft = tiny_pair(fam)
        out[fam] = (target, draft, tiny_qwen_processor(target))
    return out


def _processor_inputs(processor, clips, rows):
    """What a user does: frames at 2 fps, the chat template, one processor call (the sampled frame rate goes in the
    video metadata)."""
    from transformers.video_utils import VideoMetadata

    texts, videos, metas = [], [], []
    for b in range(rows):
        path = clips[b][0]
        clip, info = _sample_video(path, fps=2, factor=2)
        msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPTS[b]}]}]
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
        videos.append(clip)
        metas.append(VideoMetadata(total_num_frames=clip.shape[0], fps=info["sampled_fps"]))
    return dict(processor(text=texts, videos=videos, video_metadata=metas, do_sample_frames=False, padding=True,
                          return_tensors="pt"))


@pytest.mark.parametrize("rows", [1, 3], ids=["b1", "b3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_processor_inputs_are_lossless(setups, clips, family, rows):
    target, draft, processor = setups[family]
    inputs = _processor_inputs(processor, clips, rows)
    assert "mm_token_type_ids" in inputs  # the processor returns it by default
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == target.config.video_token_id)
    assert inputs["video_grid_thw"].tolist()[0] == [5, 4, 4]  # 10 frames of 56x56
    if family == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == [1.0] * rows  # temporal patch 2 / 2 fps
    ref = target.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    out = SpecDecoder(target, draft, SpecConfig(draft_len=3, keep_ratio=0.25)).generate(**inputs,
                                                                                       max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, ref)
    with apply_vspec(target, draft, SpecConfig(draft_len=4, prune="attention", keep_ratio=0.5)):
        assert torch.equal(target.generate(**inputs, max_new_tokens=N_NEW, do_sample=False), ref)
    if rows == 1:  # the processor's output without its mm_token_type_ids: generate's 1-D positions, and a warning
        without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        ref_1d = target.generate(**without, max_new_tokens=N_NEW, do_sample=False)
        with pytest.warns(UserWarning, match="mm_token_type_ids"):
            assert torch.equal(SpecDecoder(target, draft).generate(**without, max_new_tokens=N_NEW).sequences, ref_1d)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_chat_template_inputs_are_lossless(setups, clips, family):
    target, draft, processor = setups[family]
    clip, info = _sample_video(clips[2][0], fps=2, factor=2)
    msgs = [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": PROMPTS[0]}]}]
    inputs = dict(processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                                add_generation_prompt=True, do_sample_frames=False))
    assert "mm_token_type_ids" in inputs
    ref = target.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    out = SpecDecoder(target, draft, SpecConfig(draft_len=3, keep_ratio=0.25)).generate(**inputs,
                                                                                       max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, ref)


@pytest.fixture(scope="module")
def saved(setups, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target, draft, processor = setups["qwen2_5_vl"]
    target.save_pretrained(root / "target")
    processor.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    return root


@pytest.mark.parametrize("options, frames", [([], 10), (["--max-frames", "6"], 6), (["--fps", "1"], 4),
                                             (["--frames", "3"], 3)], ids=["default", "max6", "fps1", "frames3"])
def test_cli_generate_through_the_saved_processor(setups, saved, clips, capsys, options, frames):
    target, _, _ = setups["qwen2_5_vl"]
    path, n, _ = clips[0]
    rc = main(["generate", "--target", str(saved / "target"), "--draft", str(saved / "draft"), "--video", str(path),
               "--prompt", PROMPTS[1], "--max-new-tokens", str(N_NEW), "--device", "cpu", *options])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    stats = out[-1]
    assert f"video: {frames} of {n} frames" in stats and "56x56 px" in stats, stats
    # the streamed text is what target.generate says on the processor's inputs for the same frames
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(saved / "target")
    fps = None if "--frames" in options else float(options[1]) if "--fps" in options else 2.0
    max_frames = int(options[1]) if "--max-frames" in options else None
    clip, info = _sample_video(path, fps=fps, max_frames=max_frames, frames=3 if "--frames" in options else None,
                               factor=2)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPTS[1]}]}]
    inputs = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True)], videos=[clip],
                       video_metadata=[VideoMetadata(total_num_frames=clip.shape[0], fps=info["sampled_fps"])],
                       do_sample_frames=False, return_tensors="pt")
    ref = target.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    want = processor.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert " ".join(out[:-1]).split() == want.split()


def test_cli_max_pixels_caps_the_frames(saved, clips, capsys, tmp_path):
    big = tmp_path / "big.mp4"
    write_video(big, num_frames=8, fps=4, height=112, width=168)
    rc = main(["generate", "--target", str(saved / "target"), "--draft", str(saved / "draft"), "--video", str(big),
               "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--device", "cpu", "--max-pixels", str(56 * 84)])
    stats = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0 and "video: 4 of 8 frames" in stats and "84x56 px" in stats, stats


def test_demo_pixel_layout_matches_transformers_processor():
    """The demo's own patching (vspec.demo.video_patches) lays pixels out exactly as transformers' Qwen2-VL video
    processor does (moved here from tests/demo/test_demo_task.py: the processor needs torchvision)."""
    from transformers import Qwen2VLVideoProcessor

    from vspec.demo import clip_seed, make_clip, video_patches

    frames, _ = make_clip(clip_seed("test", 1))
    proc = Qwen2VLVideoProcessor()
    out = proc(videos=[frames], do_resize=False, do_rescale=False, return_tensors="pt", cap_pixels_per_frame=False)
    assert out["video_grid_thw"].tolist() == [[4, 8, 8]]
    torch.testing.assert_close(out["pixel_values_videos"], video_patches(frames), atol=1e-5, rtol=1e-5)
