"""Microbenchmark of the verification kernels (vspec/kernels/verify.py).

    python bench/bench_verify.py                 # full grid on the current GPU, CSV under bench/results/
    python bench/bench_verify.py --quick         # one shape per op
    python bench/bench_verify.py --ops greedy,tree --no-compile

Providers: ``vspec`` (the Triton launchers, called without the host-side argument checks of ``vspec.ops``),
``eager`` (the PyTorch reference, kernels/reference.py) and ``compile`` (``torch.compile`` of the reference).
Times are ``triton.testing.do_bench`` medians. GB/s counts the bytes an op must read at least once (all
logits; for sampling also one row of logits and draft probabilities per batch row for the draw) and is
compared with the card's device-to-device copy bandwidth measured by this script (read + write bytes of a
1 GiB copy). Each shape is checked for exact agreement with the reference before it is timed; a shape that
disagrees is recorded with ``correct=False`` and no speedup.

Before any timing it prints the compile figures of every verify kernel variant (registers, spills, shared
memory; :mod:`vspec.kernel_report`, no GPU needed). Without CUDA the script says so and runs a CPU smoke of the
reference ops only (a few seconds).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspec import __version__ as vspec_version  # noqa: E402
from vspec.kernels import reference as ref  # noqa: E402
from vspec.testing_trees import TreeBuffers, topk_tree  # noqa: E402

VOCABS = (151_936, 152_064)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCHES = (1, 4, 16)
ROWS = (5, 9, 17)  # γ + 1
TREES = {25: topk_tree([4, 2, 2]), 64: topk_tree([4, 3, 2, 2])}  # 29 and 89 nodes, cut to 25 and 64


def _tree(n: int) -> tuple[int, ...]:
    parents = TREES[n]
    if len(parents) < n:
        raise ValueError(f"tree template for {n} nodes has only {len(parents)}")
    return parents[:n]  # a prefix of a BFS-ordered tree is still a tree


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_bandwidth_gbps() -> float:
    import triton.testing

    n = (1 << 30) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def make_case(op: str, B: int, R: int, V: int, dtype: torch.dtype, parents=None):
    """Inputs, the vspec launcher call, the reference call and the minimum bytes read."""
    from vspec.kernels import verify as kern

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(B, R, V, device="cuda", generator=g) * 3).to(dtype)
    elt = x.element_size()
    am = x.float().argmax(-1)
    nbytes = B * R * V * elt
    if op == "greedy":
        d = am[:, :R - 1].clone()
        d[:, (R - 1) // 2] += 1  # reject half-way
        d.clamp_(0, V - 1)
        return (lambda: kern.verify_greedy(x, d)), (lambda: ref.verify_greedy(x, d)), nbytes
    if op == "tree":
        par = torch.tensor(parents, device="cuda")
        width = int(TreeBuffers.from_parents(parents).max_depth) + 1
        tok = am.gather(1, par.clamp_min(0).expand(B, R)).clone()
        tok[:, R // 2:] += 1
        tok.clamp_(0, V - 1)
        return ((lambda: kern.verify_tree_greedy(x, tok, par, width=width)),
                (lambda: ref.verify_tree_greedy(x, tok, par)), nbytes)
    if op == "sampling":
        q = torch.softmax(x[:, :R - 1].float() + torch.randn(B, R - 1, V, device="cuda", generator=g), -1)
        q = q.to(dtype)
        d = torch.multinomial(q.float().reshape(-1, V), 1, generator=g).reshape(B, R - 1)
        u = ref.sampling_uniforms(B, R - 1, seed=1, device="cuda")
        nbytes += B * V * (elt + q.element_size())
        return ((lambda: kern.verify_sampling(x, q, d, uniforms=u)),
                (lambda: ref.verify_sampling(x, q, d, uniforms=u)), nbytes)
    if op == "loose":
        from vspec.ops import LOOSE_RULE_DEFAULTS as rule

        d = x[:, :R - 1].float().topk(2, -1).indices[..., 1]
        strict = torch.zeros(B, R - 1, dtype=torch.bool, device="cuda")
        strict[:, ::3] = True
        return ((lambda: kern.verify_loose(x, d, strict, **rule)),
                (lambda: ref.verify_loose(x, d, strict, **rule)), nbytes)
    raise ValueError(f"unknown op {op!r}")


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_gpu(args) -> None:
    import triton
    import triton.testing

    gpu = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbps()
    print(f"{gpu}: device-to-device copy {copy_bw:.0f} GB/s | torch {torch.__version__} | triton "
          f"{triton.__version__} | vspec {vspec_version} | {git_sha()}")
    shapes = []
    for op in args.ops:
        for V in (VOCABS[:1] if args.quick else VOCABS):
            for dname in (("bf16",) if args.quick else DTYPES):
                for B in ((4,) if args.quick else BATCHES):
                    if op == "tree":
                        for n in ((25,) if args.quick else TREES):
                            shapes.append((op, B, n, V, dname, _tree(n)))
                    else:
                        for R in ((9,) if args.quick else ROWS):
                            shapes.append((op, B, R, V, dname, None))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with out.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["utc", "gpu", "torch", "triton", "vspec", "git_sha", "op", "provider", "dtype", "V", "B",
                        "rows", "ms_median", "gbps", "frac_copy_bw", "speedup_vs_eager", "correct",
                        "peak_extra_mb", "copy_bw_gbps"])
        for op, B, R, V, dname, parents in shapes:
            kern_fn, ref_fn, nbytes = make_case(op, B, R, V, DTYPES[dname], parents)
            correct = _same(kern_fn(), ref_fn())
            providers = {"vspec": kern_fn, "eager": ref_fn}
            if not args.no_compile:
                providers["compile"] = torch.compile(ref_fn, dynamic=False)
            times, peaks = {}, {}
            for name, fn in providers.items():
                try:
                    fn()  # compile / warm up outside the timed region
                    times[name] = triton.testing.do_bench(fn, return_mode="median")
                    peaks[name] = peak_extra_mb(fn)
                except Exception as exc:  # a provider failing (e.g. compile) must not hide the others
                    print(f"  {op} {name} failed: {type(exc).__name__}: {exc}")
            line = [f"{op:8s} {dname} V={V} B={B:2d} rows={R:2d}"]
            for name, ms in times.items():
                gbps = nbytes / (ms * 1e-3) / 1e9
                speed = times["eager"] / ms if (correct and "eager" in times) else float("nan")
                w.writerow([stamp, gpu, torch.__version__, triton.__version__, vspec_version, git_sha(), op, name,
                            dname, V, B, R, f"{ms:.5f}", f"{gbps:.1f}", f"{gbps / copy_bw:.3f}",
                            f"{speed:.2f}", correct, f"{peaks[name]:.1f}", f"{copy_bw:.0f}"])
                line.append(f"{name} {ms * 1e3:8.1f}us {gbps:6.0f}GB/s ({gbps / copy_bw:4.0%})")
            if not correct:
                line.append("MISMATCH vs reference: no speedup reported")
            print(" | ".join(line))
    print(f"rows appended to {out}")


def run_cpu_smoke() -> None:
    print("no CUDA device: the Triton kernels are not benchmarked; CPU smoke of the reference ops only")
    t0 = time.perf_counter()
    V, B, R = 151_936, 1, 5
    x = torch.randn(B, R, V)
    d = x.argmax(-1)[:, :R - 1]
    q = torch.softmax(torch.randn(B, R - 1, V), -1)
    strict = torch.zeros(B, R - 1, dtype=torch.bool)
    parents = _tree(25)
    xt = torch.randn(B, 25, V)
    for name, fn in [
        ("verify_greedy", lambda: ref.verify_greedy(x, d)),
        ("verify_sampling", lambda: ref.verify_sampling(x, q, d, seed=0)),
        ("verify_loose", lambda: ref.verify_loose(x, d, strict)),
        ("verify_tree_greedy", lambda: ref.verify_tree_greedy(xt, torch.zeros(B, 25, dtype=torch.long),
                                                              torch.tensor(parents))),
    ]:
        fn()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        print(f"  reference {name:20s} V={V} B={B}: {(time.perf_counter() - t) / 3 * 1e3:7.2f} ms")
    print(f"smoke done in {time.perf_counter() - t0:.1f}s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="greedy,tree,sampling,loose", type=lambda s: s.split(","))
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify.csv"))
    args = p.parse_args(argv)
    from vspec.kernel_report import print_compile_figures
    from vspec.kernels import interpreting

    print_compile_figures(["verify"])
    if not torch.cuda.is_available() or interpreting():
        run_cpu_smoke()
        return
    run_gpu(args)


if __name__ == "__main__":
    main()
