"""Benchmark of the scoring ops: fused Triton kernels vs torch eager vs torch.compile of the reference.

GPU (CUDA): for Qwen2.5-VL-7B (28 layers, Hq 28, Hkv 4, D 128) and 32B (64 layers, Hq 40, Hkv 8, D 128) with
64 text queries and ~16k visual keys, the attention mass summed over ALL layers (one call per layer into
one ``out``) is timed with ``triton.testing.do_bench`` (median) for

* ``vspec``: :func:`vspec.kernels.scoring.visual_attention_mass` (two-pass, never materialises attention),
* ``eager``: what ``output_attentions=True`` does: repeat the kv heads, ``q @ kᵀ`` in the model dtype,
  float32 softmax over ``[B, Hq, Lq, S]``, gather the visual columns,
* ``compile``: ``torch.compile`` of :func:`vspec.kernels.reference.visual_attention_mass`,

plus frame_semantic_scores on a ``[1, 16384, C]`` feature map. Each provider is checked against the float32
reference first; a provider that fails is reported as FAIL with no time ratio, and the script exits 1 when
vspec fails. Peak extra memory is ``torch.cuda.max_memory_allocated`` above the inputs. Rows are appended to
``bench/results/scoring.csv`` with GPU name, torch/triton/vspec versions and the git SHA.

Before any timing it prints the compile figures of every scoring kernel variant (registers, spills, shared
memory; :mod:`vspec.kernel_report`, no GPU needed) and the analytic bytes per frame_semantic_scores call.
Without CUDA it says so and runs a tiny correctness + timing smoke of the reference only (a few seconds);
nothing is recorded.

    python bench/bench_scoring.py [--models 7b,32b] [--normalize visual,all] [--nv 16384] [--lq 64]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspec import __version__ as vspec_version  # noqa: E402
from vspec.kernels import reference  # noqa: E402

MODELS = {
    "7b": dict(name="Qwen2.5-VL-7B", layers=28, Hq=28, Hkv=4, D=128, C=3584),
    "32b": dict(name="Qwen2.5-VL-32B", layers=64, Hq=40, Hkv=8, D=128, C=5120),
}
PREFIX = 32  # system-prompt tokens before the video
FRAME_GRID = (16, 32, 32)  # 16k visual tokens
# vspec/compile vs the float32 reference on the same bf16 inputs: both accumulate in float32
MASS_TOL = dict(rtol=2e-3, atol=1e-7)
FRAME_TOL = dict(rtol=1e-3, atol=1e-5)


def eager_mass(q, k, visual_idx, *, scale=None, normalize="visual", out=None):
    """Materialising baseline (HF eager attention with output_attentions): no padding, no attention_mask."""
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k_rep = k.repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S, D]
    s = torch.matmul(q, k_rep.transpose(-1, -2)).float() * scale  # [B, Hq, Lq, S]
    causal = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - Lq, S, device=q.device)[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    idx = visual_idx.clamp_min(0)[:, None, None, :].expand(B, Hq, Lq, -1)
    if normalize == "all":
        p = torch.softmax(s, -1).gather(-1, idx)
    else:
        p = torch.softmax(s.gather(-1, idx), -1)
    res = p.mean((1, 2)) * (visual_idx >= 0)
    return res if out is None else out.add_(res)


def git_sha() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _check(got, want, tol) -> tuple[bool, float]:
    err = (got.float() - want.float()).abs().max().item()
    try:
        torch.testing.assert_close(got.float(), want.float(), **tol)
        return True, err
    except AssertionError:
        return False, err


def frame_rows_read_before(grid, window: int) -> int:
    """Feature rows the frame kernel loaded per batch row before issue 21 (commit 8da94f0): per token its own
    row for the norm, then the centre and the partner again for every pair (temporal partner and each
    in-frame neighbour)."""
    T, H, W = grid
    r = window // 2
    per_frame = 0
    for h in range(H):
        n_h = min(H, h + r + 1) - max(0, h - r)
        for w in range(W):
            n_w = min(W, w + r + 1) - max(0, w - r)
            per_frame += 1 + 2 * (n_h * n_w - 1)
    return T * per_frame + (2 * T * H * W if T > 1 else 0)


def print_frame_traffic(grid=FRAME_GRID, window: int = 3) -> None:
    """Analytic bytes per frame_semantic_scores call (B = 1, bf16) for each model's C, before and now."""
    try:
        from vspec.kernels.scoring import frame_rows_read
    except ImportError:
        return
    N = grid[0] * grid[1] * grid[2]
    for model in MODELS.values():
        row_bytes = model["C"] * 2
        before, now = frame_rows_read_before(grid, window), frame_rows_read(grid, window)
        print(f"frame_semantic_scores {model['name']} T{grid[0]} H{grid[1]} W{grid[2]} C{model['C']} bf16 "
              f"window {window}: x is {N * row_bytes / 2**20:.0f} MiB; loads {before / N:.1f} rows/token = "
              f"{before * row_bytes / 2**20:.0f} MiB/call before, {now / N:.1f} rows/token = "
              f"{now * row_bytes / 2**20:.0f} MiB/call now (analytic; caches may absorb part of it)")


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


def _measure(fn):
    import triton

    fn()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak


def bench_mass_gpu(model: dict, normalize: str, nv: int, lq: int, providers: list[str]) -> list[dict]:
    from vspec.kernels import scoring

    dev, dt = torch.device("cuda"), torch.bfloat16
    L, Hq, Hkv, D = model["layers"], model["Hq"], model["Hkv"], model["D"]
    S = PREFIX + nv + lq
    qs = [torch.randn(1, Hq, lq, D, device=dev, dtype=dt) for _ in range(L)]
    ks = [torch.randn(1, Hkv, S, D, device=dev, dtype=dt) for _ in range(L)]
    vidx = torch.arange(PREFIX, PREFIX + nv, device=dev)[None, :]
    impls = {"vspec": scoring.visual_attention_mass, "eager": eager_mass}
    if "compile" in providers:
        impls["compile"] = torch.compile(reference.visual_attention_mass, dynamic=False)

    # correctness on layer 0 against the float32 reference
    want = reference.visual_attention_mass(qs[0], ks[0], vidx, normalize=normalize)
    rows = []
    for prov in providers:
        impl = impls[prov]
        got = impl(qs[0], ks[0], vidx, normalize=normalize)
        ok, err = _check(got, want, MASS_TOL)
        if prov == "eager":
            # the baseline rounds q·k to bf16 like HF eager attention: its error is recorded, not gated
            ok = True

        def all_layers(impl=impl):
            out = torch.zeros(1, nv, device=dev)
            for q, k in zip(qs, ks):
                impl(q, k, vidx, normalize=normalize, out=out)
            return out

        ms, peak = _measure(all_layers)
        n_keys = nv if normalize == "visual" else S
        # pass 1 over the normaliser keys, pass 2 over the visual keys
        flops = L * 2 * Hq * lq * D * (n_keys + nv)
        rows.append(dict(op="visual_attention_mass", model=model["name"], normalize=normalize,
                         shape=f"L{L} B1 Hq{Hq} Hkv{Hkv} Lq{lq} S{S} D{D} Nv{nv} bf16", provider=prov,
                         ms=ms, ms_per_layer=ms / L, tflops=flops / ms / 1e9, gbps="",
                         peak_extra_mib=peak / 2**20, max_abs_err=err, correct=ok))
    return rows


def bench_frame_gpu(model: dict, providers: list[str]) -> list[dict]:
    from vspec.kernels import scoring

    dev, dt = torch.device("cuda"), torch.bfloat16
    T, H, W = FRAME_GRID
    x = torch.randn(1, T * H * W, model["C"], device=dev, dtype=dt)
    impls = {"vspec": scoring.frame_semantic_scores, "eager": reference.frame_semantic_scores}
    if "compile" in providers:
        impls["compile"] = torch.compile(reference.frame_semantic_scores, dynamic=False)
    want = reference.frame_semantic_scores(x, FRAME_GRID)
    rows = []
    for prov in providers:
        impl = impls[prov]
        got = impl(x, FRAME_GRID)
        checks = [_check(g, w, FRAME_TOL) for g, w in zip(got, want)]
        ok, err = all(c[0] for c in checks), max(c[1] for c in checks)
        ms, peak = _measure(lambda impl=impl: impl(x, FRAME_GRID))
        rows.append(dict(op="frame_semantic_scores", model=model["name"], normalize="",
                         shape=f"B1 T{T} H{H} W{W} C{model['C']} window3 bf16", provider=prov, ms=ms,
                         ms_per_layer="", tflops="", gbps=x.numel() * x.element_size() / ms / 1e6,
                         peak_extra_mib=peak / 2**20, max_abs_err=err, correct=ok))
    return rows


def run_gpu(args) -> int:
    import triton

    providers = [p for p in args.providers.split(",") if p]
    rows = []
    for key in args.models.split(","):
        model = MODELS[key]
        for normalize in args.normalize.split(","):
            rows += bench_mass_gpu(model, normalize, args.nv, args.lq, providers)
            torch.cuda.empty_cache()
        rows += bench_frame_gpu(model, providers)
        torch.cuda.empty_cache()

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                vspec=vspec_version, git_sha=git_sha())
    failed = False
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["model"], r["normalize"]), []).append(r)
    for group in groups.values():
        good = [r for r in group if r["correct"]]
        best = min((r["ms"] for r in good), default=None)
        for r in group:
            r["ratio_to_best"] = r["ms"] / best if r["correct"] and best else ""
            failed |= r["provider"] == "vspec" and not r["correct"]
    print(f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | vspec {meta['vspec']} "
          f"| {meta['git_sha']}")
    for r in rows:
        status = "ok" if r["correct"] else "FAIL (no speedup reported)"
        ratio = f"{r['ratio_to_best']:.2f}x best" if r["ratio_to_best"] != "" else "-"
        print(f"{r['op']:22s} {r['model']:15s} {r['normalize']:6s} {r['provider']:8s} {r['ms']:9.3f} ms  "
              f"{r['peak_extra_mib']:9.1f} MiB  err {r['max_abs_err']:.2e}  {ratio:12s} {status}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(meta) + ["op", "model", "normalize", "shape", "provider", "ms", "ms_per_layer", "tflops",
                           "gbps", "peak_extra_mib", "max_abs_err", "correct", "ratio_to_best"]
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    print(f"wrote {len(rows)} rows to {out}")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# CPU smoke
# --------------------------------------------------------------------------------------------------


def _time_cpu(fn, reps: int = 11) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_cpu_smoke() -> int:
    print("no CUDA device: the Triton kernels are not benchmarked and nothing is recorded; running a tiny "
          "correctness + timing smoke of the reference only")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny shapes: thread start-up and contention would dominate the timing
    L, Hq, Hkv, Lq, D, nv = 2, 4, 2, 8, 32, 200
    S = PREFIX + nv + Lq
    qs = [torch.randn(1, Hq, Lq, D) for _ in range(L)]
    ks = [torch.randn(1, Hkv, S, D) for _ in range(L)]
    vidx = torch.arange(PREFIX, PREFIX + nv)[None, :]
    ok = True
    for normalize in ("visual", "all"):
        def all_layers(impl, normalize=normalize):
            out = torch.zeros(1, nv)
            for q, k in zip(qs, ks):
                impl(q, k, vidx, normalize=normalize, out=out)
            return out

        good, err = _check(all_layers(reference.visual_attention_mass), all_layers(eager_mass),
                           dict(rtol=1e-4, atol=1e-7))
        ok &= good
        ms = _time_cpu(lambda normalize=normalize: all_layers(reference.visual_attention_mass))
        print(f"visual_attention_mass  reference  normalize={normalize:6s} L{L} Hq{Hq} Hkv{Hkv} Lq{Lq} S{S} "
              f"D{D} Nv{nv}: {ms:.2f} ms, max |ref - eager| {err:.1e} {'ok' if good else 'FAIL'}")
    T, H, W = 4, 6, 6
    x = torch.randn(1, T * H * W, 64)
    temporal, spatial = reference.frame_semantic_scores(x, (T, H, W))
    good = bool(torch.isfinite(temporal).all() and torch.isfinite(spatial).all() and (spatial >= 0).all())
    ok &= good
    ms = _time_cpu(lambda: reference.frame_semantic_scores(x, (T, H, W)))
    print(f"frame_semantic_scores  reference  T{T} H{H} W{W} C64: {ms:.2f} ms {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="7b,32b", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--normalize", default="visual,all")
    p.add_argument("--nv", type=int, default=16384, help="visual keys")
    p.add_argument("--lq", type=int, default=64, help="text query rows")
    p.add_argument("--providers", default="vspec,eager,compile")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring.csv"))
    args = p.parse_args(argv)
    from vspec.kernel_report import print_compile_figures

    print_compile_figures(["scoring"])
    print_frame_traffic()
    if not torch.cuda.is_available():
        return run_cpu_smoke()
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
