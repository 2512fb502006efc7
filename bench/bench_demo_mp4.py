"""The shipped demo pair on held-out clips as real video files, through the real CLI.

    python bench/bench_demo_mp4.py                 # 20 test clips, CSV to bench/results/demo_mp4_cpu.csv

Each clip is written to an H.264 (yuv420p) mp4 with ``vspec.demo.write_clip`` and captioned by
``python -m vspec generate --target weights/target --draft weights/draft --video clip.mp4 --prompt "describe the
video :"`` in a subprocess (the command a user runs); its streamed text is scored with ``vspec.demo.score``. The same
clips in memory are captioned by ``target.generate``. Prints both mean anchor scores and the CLI's closing stats
line of the first clip; writes one CSV row per clip.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspec.demo import DEFAULT_PROMPT, clip_seed, load_pair, make_clip, make_inputs, score, write_clip  # noqa: E402
from vspec.demo.models import WEIGHTS_DIR  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--start", type=int, default=0, help="first test-split clip index")
    p.add_argument("--crf", type=int, default=18, help="x264 CRF of the written files (default 18)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo_mp4_cpu.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    target, _, tok = load_pair()
    clips = [make_clip(clip_seed("test", args.start + i)) for i in range(args.clips)]
    inputs = make_inputs(clips, tok)
    seq = target.generate(**inputs, max_new_tokens=48, do_sample=False)
    mem = tok.batch_decode(seq[:, inputs["input_ids"].shape[1]:])
    rows, stats = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (frames, meta) in enumerate(clips):
            path = Path(tmp) / f"clip{i}.mp4"
            write_clip(path, frames, crf=args.crf)
            res = subprocess.run(
                [sys.executable, "-m", "vspec", "generate", "--target", str(WEIGHTS_DIR / "target"), "--draft",
                 str(WEIGHTS_DIR / "draft"), "--video", str(path), "--prompt", DEFAULT_PROMPT, "--device", "cpu"],
                capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            lines = res.stdout.strip().splitlines()
            text, stats = " ".join(lines[:-1]), stats or lines[-1]
            rows.append({"clip": args.start + i, "score_in_memory": round(score(mem[i], meta), 4),
                         "score_mp4_cli": round(score(text, meta), 4), "same_text": text.split() == mem[i].split(),
                         "mp4_bytes": path.stat().st_size})
    n = len(rows)
    s_mem = sum(r["score_in_memory"] for r in rows) / n
    s_mp4 = sum(r["score_mp4_cli"] for r in rows) / n
    same = sum(r["same_text"] for r in rows)
    print(f"{n} test clips: anchor score in memory (target.generate) {s_mem:.4f}, through mp4 and `vspec generate` "
          f"{s_mp4:.4f} ({100 * (s_mp4 - s_mem):+.1f} points); same caption {same}/{n}")
    print(f"first clip's stats line: {stats}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
