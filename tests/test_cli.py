"""The CLI: --help everywhere, argument errors, and a short demo run whose outputs are all identical."""

import csv
import subprocess
import sys

import pytest

from vspec.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vspec", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [[], ["demo"], ["bench"], ["generate"]], ids=["top", "demo", "bench", "generate"])
def test_help(args):
    res = _run(*args, "--help")
    assert res.returncode == 0 and "usage" in res.stdout


def test_bad_arguments_fail_clearly():
    res = _run("demo", "--keep-ratio", "0")
    assert res.returncode == 2 and "--keep-ratio must be in (0, 1]" in res.stderr
    res = _run("bench", "nonsense")
    assert res.returncode == 2 and "unknown suite" in res.stderr
    res = _run("bench", "quality")
    assert res.returncode == 2 and "--out" in res.stderr


def test_bench_quality_quick_writes_its_files(tmp_path, capsys):
    rc = main(["bench", "quality", "--out", str(tmp_path), "--quick", "--sweep", "--split", "val", "--clips", "2",
               "--max-new-tokens", "8", "--draft-len", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"quality.csv", "detectors.csv", "quality.png", "sweep.csv"}
    assert "held-out val clips: 2" in out and "fusion sweep at keep 0.1 (val clips)" in out
    with open(tmp_path / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    strict = [r for r in rows if r["section"] == "pruning"]
    assert any(r["prune"] == "oracle" for r in strict)
    assert strict and all(r["identical"] == r["clips"] == "2" for r in strict)  # strict is lossless
    with open(tmp_path / "sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert [(r["w_temporal"], r["split"], r["identical"]) for r in sweep] == [("0.0", "val", "2"), ("0.5", "val", "2")]


def test_bench_quality_divergent_chooses_on_val_and_reads_mp4(tmp_path, capsys):
    rc = main(["bench", "quality", "--out", str(tmp_path), "--quick", "--no-pruning", "--setting", "divergent",
               "--clips", "2", "--max-new-tokens", "8", "--draft-len", "3", "--choose-on-val", "2"])
    assert rc == 0 and "setting divergent; held-out test clips: 2" in capsys.readouterr().out
    with open(tmp_path / "val" / "quality.csv") as f:
        val = list(csv.DictReader(f))
    with open(tmp_path / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "detectors.csv") as f:
        detectors = list(csv.DictReader(f))
    assert {r["detector"] for r in detectors} == {"hidden", "attention", "grounded", "attribution"}
    assert all(r["setting"] == "divergent" and r["split"] == "test" for r in detectors)
    # the test run tries one threshold per detector and filler rule (grounded and attribution: the default and the
    # wide rule), one the validation run tried with the same rule
    def key(r):
        return r["detector"], r["top_k"], r["threshold"]
    tried = {key(r) for r in val if r["verify"] == "loose" and " th=" in r["label"]}
    chosen = [r for r in rows if r["verify"] == "loose" and " th=" in r["label"]]
    assert len(chosen) == 6 and all(key(r) in tried for r in chosen)
    for det in ("grounded", "attribution"):
        assert {r["top_k"] for r in chosen if r["detector"] == det} == {"3", "5"}
    mp4 = [r for r in rows if r["section"] == "mp4"]
    assert [r["label"] for r in mp4][0] == "target.generate (mp4)" and len(mp4) == 3
    assert all(r["identical"] == r["clips"] == "2" for r in mp4)  # strict is lossless on clips read from mp4 too


def test_demo_runs_and_is_lossless(capsys):
    rc = main(["demo", "--clips", "1", "--max-new-tokens", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0  # the demo exits 1 when a strict method's output differs from target.generate's
    assert "vspec strict, prune=semantic" in out and "HF assisted generation" in out and "LOOSE" in out
    strict_rows = [line for line in out.splitlines() if line.startswith(("vspec strict", "vspec parallel"))]
    assert len(strict_rows) >= 5 and all(" 1/1 " in line for line in strict_rows)


# ---- vspec generate -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """An (untrained) demo-architecture pair saved like local checkpoints, with a word tokenizer and an mp4."""
    import av
    import numpy as np

    from vspec.cli import WORD_TOKENIZER_FILE
    from vspec.demo.models import new_draft, new_target
    from vspec.demo.tokenizer import WordTokenizer

    root = tmp_path_factory.mktemp("ckpt")
    target = new_target(seed=0).eval()
    draft = new_draft(target, seed=1).eval()
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    WordTokenizer.for_task().save(root / "target" / WORD_TOKENIZER_FILE)
    video = root / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 112
        stream.pix_fmt = "yuv420p"
        for i in range(10):
            img = np.full((112, 112, 3), 128, dtype=np.uint8)
            img[10 + 8 * i:30 + 8 * i, 20:40] = (240, 20, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return root, target


def test_generate_streams_text_and_stats(saved_pair):
    root, target = saved_pair
    res = _run("generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--video",
               str(root / "clip.mp4"), "--prompt", "describe the video :", "--max-new-tokens", "12", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("[") and "MAL" in lines[-1] and "visual tokens kept 6/64" in lines[-1]
    assert "video: 8 of 10 frames (fixed by the model), 112x112 px]" in lines[-1]
    # the streamed text is what target.generate says for the same inputs (strict verification is lossless)
    from vspec.cli import _read_video
    from vspec.demo.models import make_inputs
    from vspec.demo.tokenizer import WordTokenizer

    tok = WordTokenizer.for_task()
    inputs = make_inputs([_read_video(root / "clip.mp4", 8, 112)], tok)
    ref = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    want = tok.decode(ref[0, inputs["input_ids"].shape[1]:].tolist())
    assert " ".join(lines[:-1]).split() == want.split()


def test_generate_fails_clearly_on_bad_paths(saved_pair, tmp_path):
    root, _ = saved_pair
    res = _run("generate", "--target", str(tmp_path), "--draft", str(root / "draft"), "--video", "x.mp4",
               "--prompt", "p")
    assert res.returncode == 2 and "not a model folder" in res.stderr
    res = _run("generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--video",
               str(tmp_path / "missing.mp4"), "--prompt", "p")
    assert res.returncode == 2 and "no such file" in res.stderr
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    res = _run("generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--video", str(bad),
               "--prompt", "p")
    assert res.returncode != 0 and "cannot decode" in res.stderr


def test_generate_sampling_options_do_not_apply_to_a_word_tokenizer_model(saved_pair, capsys):
    root, _ = saved_pair
    rc = main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--video",
               str(root / "clip.mp4"), "--prompt", "describe the video :", "--max-new-tokens", "2", "--device", "cpu",
               "--fps", "1", "--max-frames", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "--fps, --max-frames ignored" in captured.err and "takes 8 frames of 112x112" in captured.err
    assert "video: 8 of 10 frames" in captured.out.strip().splitlines()[-1]


def test_generate_rejects_bad_sampling_options():
    res = _run("generate", "--target", "t", "--draft", "d", "--video", "v", "--prompt", "p", "--fps", "0")
    assert res.returncode == 2 and "--fps must be > 0" in res.stderr
    res = _run("generate", "--target", "t", "--draft", "d", "--video", "v", "--prompt", "p", "--fps", "1",
               "--frames", "4")
    assert res.returncode == 2 and "--frames and --fps are alternatives" in res.stderr
    res = _run("generate", "--target", "t", "--draft", "d", "--video", "v", "--prompt", "p", "--max-frames", "0")
    assert res.returncode == 2 and "--max-frames must be >= 1" in res.stderr


def test_generate_checks_the_draft_folders_tokenizer(tmp_path):
    """`vspec generate` refuses a draft folder whose tokenizer differs from the target's (a padded logit count is
    only padding when the tokenizers agree); a folder without a tokenizer, or with the same one, passes."""
    from vspec.cli import _check_draft_tokenizer
    from vspec.testing import tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer(1000)
    assert _check_draft_tokenizer(tmp_path, tok) is None  # no tokenizer files there
    tok.save_pretrained(tmp_path / "same")
    assert _check_draft_tokenizer(tmp_path / "same", tok) is None
    tiny_qwen_tokenizer(900).save_pretrained(tmp_path / "other")
    err = _check_draft_tokenizer(tmp_path / "other", tok)
    assert err is not None and "900 against 1000 tokens" in err
