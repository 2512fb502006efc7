"""The real processor path: an mp4 → frames sampled → transformers' own Qwen processor → vspec, equal to
``target.generate(do_sample=False)`` token for token; and ``vspec generate``'s frame sampling.

transformers' ``Qwen2VLVideoProcessor`` needs torchvision. PyPI's torchvision wheels are CUDA builds that do not
import next to the CPU-only torch the README installs (and a torchvision that fails to import breaks transformers'
Qwen imports too). So the processor cases live in ``tests/processor_path_cases.py`` and
:func:`test_processor_path_cases` runs them in a subprocess with the private torchvision that
``.ci/install-torchvision`` puts in ``.ci/.torchvision`` (``.ci/run`` does), made importable by
``tests/_torchvision_cpu/sitecustomize.py``; this process never imports it. Without that folder the cases run with an
installed torchvision that works, or skip naming the command, except under ``CI=true``, where they fail. The
sampling and tokenizer tests here run everywhere.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch

from vspec.cli import _frame_indices, _sample_video
from vspec.testing import QWEN_SPECIAL_TOKENS, tiny_qwen_tokenizer, write_video

ROOT = Path(__file__).resolve().parent.parent
CASES = "tests/processor_path_cases.py"
N_CASES = 12  # processor inputs: 2 families x (b1, b3); chat template: 2; vspec generate: 4 + max-pixels; demo layout
PRIVATE_TORCHVISION = ROOT / ".ci" / ".torchvision"
SHIM = ROOT / "tests" / "_torchvision_cpu"
PREPARE = ".ci/install-torchvision"


# ---- the processor cases, in a subprocess ------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _cases_env():
    """(environment for the cases' subprocess, which torchvision it gets), or (None, None) when there is none."""
    # The cases are their own pytest run, not an xdist worker: pytest-xdist's worker variables would make them act
    # as one (and plugins warn about it after the summary line).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    if (PRIVATE_TORCHVISION / "torchvision").is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(SHIM), str(PRIVATE_TORCHVISION)] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env, f"the private torchvision in {PRIVATE_TORCHVISION.relative_to(ROOT)}"
    # No private copy: an installed torchvision that works will do (probed in a subprocess, as the cases run).
    probe = subprocess.run([sys.executable, "-c", "import sys; from vspec.testing import video_processor_available; "
                            "sys.exit(0 if video_processor_available() else 1)"],
                           cwd=ROOT, env=env, capture_output=True, timeout=600)
    return (env, "the installed torchvision") if probe.returncode == 0 else (None, None)


def test_processor_path_cases():
    """tests/processor_path_cases.py: all of its cases pass, none skipped, in a subprocess."""
    env, which = _cases_env()
    if env is None:
        why = (f"the processor-path cases ({CASES}) need torchvision for transformers' Qwen2VLVideoProcessor, and "
               f"no working one is installed: run {PREPARE} (a CPU-importable copy into .ci/.torchvision)")
        if _in_ci():
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)
    cmd = [sys.executable, "-m", "pytest", CASES, "-q", "-p", "no:cacheprovider", "-rfEs"]
    shown = "python " + " ".join(cmd[1:])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{shown} ran past {e.timeout:.0f}s with {which}:\n{out}", pytrace=False)
    elapsed = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    lines = output.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else ""
    if proc.returncode != 0 or not re.fullmatch(rf"{N_CASES} passed(, \d+ warnings?)? in .*", summary):
        pytest.fail(f"{shown} with {which}: exit {proc.returncode} after {elapsed:.0f}s, want "
                    f"'{N_CASES} passed' and nothing else, got {summary!r}:\n{output}", pytrace=False)
    print(f"{CASES}: {summary} (with {which}; {elapsed:.0f}s with start-up)")


# ---- runs everywhere ---------------------------------------------------------------------------------------


def test_write_video_round_trip(tmp_path):
    frames = torch.randint(0, 256, (6, 56, 56, 3), dtype=torch.uint8)
    frames[:, 10:30, 10:30] = torch.tensor([230, 40, 40], dtype=torch.uint8)
    path = tmp_path / "x.mp4"
    write_video(path, frames.numpy(), fps=3)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert float(s.average_rate) == 3
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 6 and got[0].shape == (56, 56, 3)
    # lossy, but the square survives
    assert abs(int(got[2][20, 20, 0]) - 230) < 20 and abs(int(got[2][20, 20, 1]) - 40) < 20


def test_frame_indices():
    assert _frame_indices(40, 8.0, fps=2, max_frames=None, frames=None, factor=2) == [
        round(i * 39 / 9) for i in range(10)]
    assert len(_frame_indices(40, 8.0, fps=1, max_frames=None, frames=None, factor=2)) == 4  # 5 → even
    assert len(_frame_indices(40, 8.0, fps=2, max_frames=6, frames=None, factor=2)) == 6
    assert len(_frame_indices(40, 8.0, fps=2, max_frames=5, frames=None, factor=2)) == 4
    assert len(_frame_indices(40, 8.0, fps=100, max_frames=None, frames=None, factor=2)) == 40  # never > total
    assert len(_frame_indices(40, 8.0, fps=0.1, max_frames=None, frames=None, factor=2)) == 2  # at least a patch
    assert _frame_indices(40, 8.0, fps=None, max_frames=30, frames=None, factor=2) == [
        round(i * 39 / 29) for i in range(30)]  # fps=None: every frame, up to max_frames
    assert _frame_indices(40, 8.0, fps=None, max_frames=None, frames=7, factor=2) == [
        round(i * 39 / 6) for i in range(7)]  # --frames: exactly, as before


def test_sample_video_reads_only_the_kept_frames(clips):
    path, n, fps = clips[0]
    clip, info = _sample_video(path, fps=2, factor=2)
    assert clip.dtype == torch.uint8 and clip.shape == (10, 3, 56, 56)
    assert info["total"] == n and info["video_fps"] == fps and info["duration"] == pytest.approx(5.0)
    assert info["sampled_fps"] == pytest.approx(2.0) and info["indices"][0] == 0 and info["indices"][-1] == n - 1
    with av.open(str(path)) as c:
        all_frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for k, i in enumerate(info["indices"]):
        assert torch.equal(clip[k].permute(1, 2, 0), torch.from_numpy(all_frames[i]))
    assert _sample_video(path, fps=2, max_frames=4, factor=2)[0].shape[0] == 4
    assert _sample_video(clips[1][0], fps=2, factor=2)[0].shape[0] == 6  # 3 s at 2 fps


def test_tiny_qwen_tokenizer_speaks_the_tiny_ids():
    tok = tiny_qwen_tokenizer(1000)
    assert len(tok) == 1000
    for token, tid in QWEN_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == tid
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                    "text": "describe the video"}]}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>describe the video<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).split() == ["user", "describe", "the", "video",
                                                                                 "assistant"]
    assert tok.decode([500, 8]).split() == ["w500", "<unk>"]


