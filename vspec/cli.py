"""``python -m vspec demo | bench | generate``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _progress(i: int, n: int, label: str) -> None:
    width = 24
    done = int(width * i / n)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label:<40}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def _timed(fn, repeats: int):
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def cmd_demo(args) -> int:
    import torch

    from . import SpecConfig, SpecDecoder
    from .testing import make_inputs, perturbed_copy, tiny_pair

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("vspec demo — tiny RANDOM-weight Qwen2.5-VL target (hidden 64, 3 layers) and a draft that is a noisy copy")
    print("of it (relative weight noise 0.1). Trained demo models are not shipped yet (issue 9): acceptance here")
    print("shows the machinery, not what a real draft achieves. Every figure below is measured in this run.\n")
    target, _ = tiny_pair("qwen2_5_vl", seed=args.seed)
    draft = perturbed_copy(target, noise=0.1, seed=args.seed + 1)
    clips = [make_inputs(target, batch_size=1, prompt_lens=[4 + i], frames=8, height=112, width=112, seed=100 + i)
             for i in range(args.clips)]
    n_new = args.max_new_tokens
    runs = [("target.generate (greedy)", "hf", None), ("HF assisted generation", "assisted", None)]
    for prune in ("semantic", "attention", "uniform", "random", "none"):
        ratio = 1.0 if prune == "none" else args.keep_ratio
        runs.append((f"vspec strict, prune={prune} keep={ratio:g}", "vspec",
                     SpecConfig(draft_len=args.draft_len, prune=prune, keep_ratio=ratio)))

    refs = [target.generate(**c, max_new_tokens=n_new, do_sample=False) for c in clips]
    rows = []
    total = len(runs) * len(clips)
    step = 0
    for label, kind, cfg in runs:
        secs, tokens, identical, rounds, row_rounds, emitted = 0.0, 0, 0, 0, 0, 0
        dec = SpecDecoder(target, draft, cfg) if kind == "vspec" else None
        for clip, ref in zip(clips, refs):
            step += 1
            _progress(step, total, label[:40])
            if kind == "hf":
                fn = lambda c=clip: target.generate(**c, max_new_tokens=n_new, do_sample=False)
            elif kind == "assisted":
                fn = lambda c=clip: target.generate(**c, max_new_tokens=n_new, do_sample=False, assistant_model=draft)
            else:
                fn = lambda c=clip, d=dec: d.generate(**c, max_new_tokens=n_new)
            t, out = _timed(fn, args.repeats)
            seq = out if isinstance(out, torch.Tensor) else out.sequences
            secs += t
            tokens += seq.shape[1] - clip["input_ids"].shape[1]
            identical += int(seq.shape == ref.shape and torch.equal(seq, ref))
            if kind == "vspec":
                rounds += out.stats.target_calls
                row_rounds += out.stats.row_rounds
                emitted += out.stats.emitted
        rows.append((label, tokens / secs, rounds, row_rounds, emitted, identical, tokens))
    base = rows[0][1]
    print(f"\n{'method':<42} {'tok/s':>8} {'speedup':>8} {'MAL':>6} {'tgt calls/tok':>14} {'identical':>10}")
    for label, tps, rounds, row_rounds, emitted, identical, tokens in rows:
        mal = f"{emitted / row_rounds:.2f}" if row_rounds else "-"
        calls = (f"{(rounds + len(clips)) / tokens:.3f}" if row_rounds
                 else "1.000" if label.startswith("target") else "-")
        print(f"{label:<42} {tps:>8.1f} {tps / base:>7.2f}x {mal:>6} {calls:>14} {identical:>4}/{len(clips)}")
    print(f"\n{len(clips)} clips, {n_new} new tokens each, draft_len={args.draft_len}, median of {args.repeats} runs, "
          f"CPU, {torch.get_num_threads()} threads. Target calls per token count the prefill.")
    print("On CPU the tiny target costs about what the draft costs, so speedups are not expected here; the")
    print("point is the identical column (lossless) and MAL. GPU end-to-end benchmarks are not built yet (issue 9).")
    return 0 if all(r[5] == len(clips) for r in rows) else 1


def cmd_bench(args) -> int:
    root = Path(__file__).resolve().parent.parent
    bench_dir = root / "bench"
    suites = {"kernels": ["bench_scoring.py", "bench_verify.py", "bench_kv.py"]}
    if args.suite not in suites:
        print(f"vspec bench {args.suite}: not available yet (issue 9 builds the e2e and quality benchmarks); "
              f"available: {', '.join(suites)}", file=sys.stderr)
        return 2
    if not bench_dir.is_dir():
        print(f"vspec bench: the bench/ folder is not next to the package ({bench_dir}); run from a source checkout",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("No CUDA device: each benchmark runs its CPU smoke part only (no GPU timings).")
    rc = 0
    for script in suites[args.suite]:
        path = bench_dir / script
        if not path.exists():
            print(f"missing {path}", file=sys.stderr)
            rc = 1
            continue
        print(f"== {script}", flush=True)
        rc |= subprocess.call([sys.executable, str(path)], cwd=root)
    return rc


def cmd_generate(args) -> int:
    print("vspec generate: loading real checkpoints with their processor and a video file is not implemented yet "
          "(issue 9). Use SpecDecoder or apply_vspec from Python.", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vspec", description="Speculative decoding for Video-LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demo and print a measured comparison table")
    demo.add_argument("--clips", type=int, default=3, help="number of synthetic clips (default 3)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--draft-len", type=int, default=4)
    demo.add_argument("--keep-ratio", type=float, default=0.1)
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per clip; the median is reported")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=cmd_demo)
    bench = sub.add_parser("bench", help="run a benchmark suite (kernels)")
    bench.add_argument("suite", help="kernels")
    bench.set_defaults(fn=cmd_bench)
    gen = sub.add_parser("generate", help="generate from local checkpoints and a video (not implemented yet)")
    gen.add_argument("--target")
    gen.add_argument("--draft")
    gen.add_argument("--video")
    gen.add_argument("--prompt")
    gen.set_defaults(fn=cmd_generate)
    args = parser.parse_args(argv)
    for name in ("clips", "max_new_tokens", "draft_len", "repeats"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "keep_ratio", 0.5) is not None and not 0 < getattr(args, "keep_ratio", 0.5) <= 1:
        parser.error("--keep-ratio must be in (0, 1]")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
