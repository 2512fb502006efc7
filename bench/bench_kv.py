"""Benchmark ``compact_kv_`` on full-model KV-cache shapes.

Scenarios (bf16, B = 1, one ``[L, 2, B, Hkv, S, D]`` storage like :class:`vspec.runtime.cache.SpecCache`):

* ``prune90``: a 16k-slot cache keeps a random 10% of its rows (the draft's visual-token pruning after a
  full prefill), compacted to the front.
* ``tree6``: after a 16k prefix, a 16-node speculative tree was appended; the accepted 6-node path is moved
  right behind the prefix (latency-bound: a few rows per layer).

Shapes: 7B (L=28, Hkv=4, D=128) and 32B (L=64, Hkv=8, D=128).

Providers: ``vspec`` (the Triton kernel, one launch for all layers; plus a small block-size sweep),
``torch_all_layers`` (the eager reference: one index_select + index_copy_ over the whole storage),
``torch_per_layer`` (a loop of index_select + index_copy_ per layer and k/v: what a HF DynamicCache user
writes), ``torch_compile`` (torch.compile of the reference's gather/scatter core). Every provider is first
checked against the reference result; a provider that fails is reported as FAILED and never timed. The
peak memory a provider allocates beyond the cache itself is reported too (``extra_mb``).

GB/s counts the bytes that have to move: rows whose slot changes, read once and written once. It is set
against the device-to-device copy bandwidth measured in the same run (``copy_`` of a 1 GiB buffer).
Results go to ``bench/results/kv.csv`` (one row per provider and case, with GPU name, versions, git SHA).

Before any timing it prints the compile figures of the kernel variants (registers, spills, shared memory per
thread/block, from :mod:`vspec.kernel_report`; no GPU needed). Without CUDA the script says so and runs a tiny
correctness smoke through Triton's CPU interpreter.

    python bench/bench_kv.py [--shapes 7b,32b] [--scenarios prune90,tree6] [--no-sweep]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vspec.kernels import reference as ref  # noqa: E402

SHAPES = {"7b": dict(L=28, H=4, D=128), "32b": dict(L=64, H=8, D=128)}
PREFIX = 16384
TREE_NODES = 16
TREE_PATH = (0, 1, 3, 6, 10, 15)  # node offsets of the accepted path (node 0: the root)
SWEEP = [(32, 128), (64, 128), (32, 64), (64, 64), (256, 64), (256, 32)]  # (block_k, block_d)


def make_case(scenario: str, L: int, H: int, D: int, *, S_prefix: int = PREFIX, device="cuda",
              dtype=torch.bfloat16, seed: int = 0):
    """(storage [L, 2, 1, H, S, D], src_idx [1, K], dst_start int) for a scenario."""
    g = torch.Generator().manual_seed(seed)
    if scenario == "prune90":
        S = S_prefix
        k = max(1, S // 10)
        src = torch.randperm(S, generator=g)[:k].sort().values
        dst = 0
    elif scenario == "tree6":
        S = S_prefix + TREE_NODES
        src = S_prefix + torch.tensor(TREE_PATH)
        dst = S_prefix
    else:
        raise ValueError(f"scenario must be 'prune90' or 'tree6', got {scenario!r}")
    storage = torch.randn(L, 2, 1, H, S, D, generator=g).to(device=device, dtype=dtype)
    return storage, src.reshape(1, -1).to(device), dst


def moved_bytes(storage: torch.Tensor, src_idx: torch.Tensor, dst: int) -> int:
    L, two, B, H, S, D = storage.shape
    j = torch.arange(src_idx.shape[1], device=src_idx.device)
    moved = int(((src_idx >= 0) & (src_idx != dst + j)).sum())
    return 2 * moved * L * two * H * D * storage.element_size()  # read + write


# ---- providers --------------------------------------------------------------------------------


def provider_vspec(block_k=None, block_d=None):
    from vspec.kernels.kv import compact_kv_

    return lambda kv, src, dst: compact_kv_(kv, src, dst, block_k=block_k, block_d=block_d)


def provider_torch_all_layers():
    return ref.compact_kv_


def provider_torch_per_layer():
    def run(kv, src, dst):
        rows = src[0]
        slots = dst + torch.arange(rows.numel(), device=rows.device)
        for layer in range(kv.shape[0]):
            for t in range(2):
                x = kv[layer, t, 0]  # [H, S, D]
                x.index_copy_(1, slots, x.index_select(1, rows))

    return run


def provider_torch_compile():
    def core(kv, rows, slots):
        kv.index_copy_(-2, slots, kv.index_select(-2, rows))

    compiled = torch.compile(core, dynamic=False)

    def run(kv, src, dst):
        rows = src[0]
        slots = dst + torch.arange(rows.numel(), device=rows.device)
        compiled(kv.select(2, 0), rows, slots)

    return run


def providers(sweep: bool, cuda: bool):
    out = {"vspec": provider_vspec()}
    if sweep:
        for bk, bd in SWEEP:
            out[f"vspec[k{bk},d{bd}]"] = provider_vspec(bk, bd)
    out["torch_all_layers"] = provider_torch_all_layers()
    out["torch_per_layer"] = provider_torch_per_layer()
    if cuda:  # inductor's CPU path would spend the smoke test's time budget compiling C++
        out["torch_compile"] = provider_torch_compile()
    return out


# ---- measurement ------------------------------------------------------------------------------


def copy_bandwidth_gbps() -> float:
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * n / ms / 1e6


def peak_extra_bytes(fn) -> int:
    """Peak memory allocated by one call of ``fn`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check(fn, storage, src, dst, want) -> bool:
    got = storage.clone()
    fn(got, src, dst)
    return torch.equal(got, want)


def env_info() -> dict:
    import triton

    try:
        git = dict(cwd=ROOT, capture_output=True, text=True, check=True)
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], **git).stdout
        sha += "-dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    try:
        from importlib.metadata import version

        vspec_version = version("vspec")
    except Exception:  # not installed: running from the checkout
        vspec_version = "checkout"
    return dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, triton=triton.__version__, vspec=vspec_version, git_sha=sha)


def run_gpu(shapes, scenarios, sweep: bool, out_csv: Path):
    from triton.testing import do_bench

    info = env_info()
    copy_bw = copy_bandwidth_gbps()
    print(f"{info['gpu']}  torch {info['torch']}  triton {info['triton']}  git {info['git_sha']}")
    print(f"device-to-device copy bandwidth: {copy_bw:.0f} GB/s")
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for shape in shapes:
        for scenario in scenarios:
            storage, src, dst = make_case(scenario, **SHAPES[shape])
            want = storage.clone()
            ref.compact_kv_(want, src, dst)
            nbytes = moved_bytes(storage, src, dst)
            results, extra_mb = {}, {}
            for name, fn in providers(sweep, cuda=True).items():
                if not check(fn, storage, src, dst, want):
                    results[name] = None
                    continue
                work = storage.clone()
                bench_fn = lambda fn=fn, work=work, src=src, dst=dst: fn(work, src, dst)
                extra_mb[name] = peak_extra_bytes(bench_fn) / 2**20
                results[name] = do_bench(bench_fn, warmup=25, rep=200, return_mode="median")
                del work
            best = min(ms for ms in results.values() if ms is not None)
            print(f"\n{shape} {scenario}: storage {tuple(storage.shape)} bf16, K={src.shape[1]}, "
                  f"{nbytes / 1e6:.1f} MB to move")
            for name, ms in results.items():
                if ms is None:
                    print(f"  {name:22s} FAILED correctness check: not timed")
                    row = dict(status="FAILED", ms="", gbps="", pct_copy_bw="", ratio_to_best="", extra_mb="")
                else:
                    gbps = nbytes / ms / 1e6
                    print(f"  {name:22s} {ms * 1e3:9.1f} us  {gbps:8.0f} GB/s  "
                          f"{100 * gbps / copy_bw:5.1f}% of copy  x{ms / best:.2f} of best  "
                          f"+{extra_mb[name]:.0f} MiB")
                    row = dict(status="ok", ms=f"{ms:.5f}", gbps=f"{gbps:.1f}",
                               pct_copy_bw=f"{100 * gbps / copy_bw:.1f}", ratio_to_best=f"{ms / best:.3f}",
                               extra_mb=f"{extra_mb[name]:.1f}")
                rows.append(dict(time=stamp, **info, shape=shape, scenario=scenario,
                                 storage="x".join(map(str, storage.shape)), dtype="bfloat16", K=src.shape[1],
                                 moved_bytes=nbytes, copy_gbps=f"{copy_bw:.1f}", provider=name, **row))
            del storage, want
            torch.cuda.empty_cache()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new = not out_csv.exists()
    with out_csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {out_csv}")


def run_cpu_smoke(scenarios):
    """Tiny shapes through the interpreter: correctness of every provider, no timings."""
    t0 = time.perf_counter()
    ok = True
    for scenario in scenarios:
        storage, src, dst = make_case(scenario, L=2, H=2, D=16, S_prefix=64, device="cpu")
        want = storage.clone()
        ref.compact_kv_(want, src, dst)
        for name, fn in providers(sweep=True, cuda=False).items():
            passed = check(fn, storage, src, dst, want)
            ok &= passed
            print(f"  {scenario:8s} {name:18s} {'ok' if passed else 'FAILED'}")
    print(f"CPU smoke done in {time.perf_counter() - t0:.1f} s")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="7b,32b")
    p.add_argument("--scenarios", default="prune90,tree6")
    p.add_argument("--no-sweep", action="store_true", help="time only the default kernel configuration")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv.csv")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; known: {sorted(SHAPES)}")
    from vspec.kernel_report import print_compile_figures

    print_compile_figures(["kv"])
    if not torch.cuda.is_available():
        print("no CUDA device: no timings; running a tiny CPU correctness smoke through Triton's interpreter")
        return 0 if run_cpu_smoke(scenarios) else 1
    run_gpu(shapes, scenarios, not args.no_sweep, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
