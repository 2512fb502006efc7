"""Benchmark the Gated DeltaNet verify step (``gated_delta_verify``) and its rollback (``gated_delta_commit``).

One Qwen3.5 linear-attention layer's verify round: T = γ+1 tokens per row from a float32 recurrent state
``[B, Hv, 128, 128]``; bf16 q/k/v/beta, float32 g (as the layer computes them). Head layouts (Hk, Hv): 0.8b
(16, 16), 9b (16, 32), 27b (16, 48).

Phases and providers:

* ``verify``: ``vspec`` (the Triton kernel), ``torch_eager`` (the reference loop), ``torch_compile``
  (torch.compile of the reference).
* ``commit``: the same three, replaying each row's accepted prefix (accept lengths spread over [0, γ]).
* ``round`` (verify + rollback): ``vspec`` (verify, then commit in place: the two-phase design vspec chose)
  against ``torch_all_states`` (the other design: the verify keeps the state after every token,
  ``[B, T, Hv, Dk, Dv]``, and the commit copies the selected one back).

Every provider is first checked against the reference (float32 tolerance on states, bf16 on outputs); a provider
that fails is reported as FAILED and never timed. GB/s counts the bytes the phase must move (state read, state
write for commit, inputs and outputs once), set against the device copy bandwidth of the same run. Results go to
``bench/results/gated_delta.csv`` (GPU name, versions, git SHA). Without CUDA: compile figures and a tiny
correctness smoke through Triton's interpreter.

    python bench/bench_gated_delta.py [--shapes 0.8b,9b,27b] [--batch 1,8] [--tokens 7,17]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_kv import copy_bandwidth_gbps, env_info  # noqa: E402  (one copy of the run's environment and bandwidth)

from vspec.kernels import reference as ref  # noqa: E402

SHAPES = {"0.8b": dict(Hk=16, Hv=16), "9b": dict(Hk=16, Hv=32), "27b": dict(Hk=16, Hv=48)}
D = 128


def make_case(B, T, Hk, Hv, Dk=D, Dv=D, *, device="cuda", dtype=torch.bfloat16, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, Dk, generator=g_)
    k = torch.randn(B, T, Hk, Dk, generator=g_)
    v = torch.randn(B, T, Hv, Dv, generator=g_)
    g = -torch.nn.functional.softplus(torch.randn(B, T, Hv, generator=g_))
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=g_))
    state = torch.randn(B, Hv, Dk, Dv, generator=g_) * 0.5
    accept_len = torch.arange(B) % T
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return (*cast, g.to(device), beta.to(device=device, dtype=dtype), state.to(device)), accept_len.to(device)


def moved_bytes(phase, args) -> int:
    q, k, v, g, beta, state = args
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    ins = nbytes(k) + nbytes(v) + nbytes(g) + nbytes(beta)
    if phase == "verify":
        return nbytes(state) + ins + nbytes(q) + nbytes(v)  # o has v's size and dtype
    if phase == "commit":
        return 2 * nbytes(state) + ins
    if phase == "round":  # the two-phase design: verify + commit
        return moved_bytes("verify", args) + moved_bytes("commit", args)
    raise ValueError(phase)


# ---- providers --------------------------------------------------------------------------------


def _all_states_round(q, k, v, g, beta, state, accept_len, states):
    """Design (a): keep every per-token state in ``states [B, T, Hv, Dk, Dv]``, then copy the accepted one back."""
    B, T = q.shape[:2]
    o = torch.empty(B, T, v.shape[2], v.shape[3], dtype=q.dtype, device=q.device)
    s = state
    for t in range(T):
        one = [x[:, t:t + 1] for x in (q, k, v, g, beta)]
        o[:, t:t + 1] = ref.gated_delta_verify(*one, s)
        s = ref.gated_delta_commit(*one, s, torch.zeros(B, dtype=torch.long, device=q.device))
        states[:, t] = s
    state.copy_(states[torch.arange(B, device=q.device), accept_len])
    return o


def providers(phase: str, cuda: bool):
    from vspec.kernels import gated_delta as kg

    if phase == "verify":
        out = {"vspec": kg.gated_delta_verify, "torch_eager": ref.gated_delta_verify}
        if cuda:
            out["torch_compile"] = torch.compile(ref.gated_delta_verify, dynamic=False)
        return out
    if phase == "commit":
        out = {"vspec": kg.gated_delta_commit, "torch_eager": ref.gated_delta_commit}
        if cuda:
            out["torch_compile"] = torch.compile(ref.gated_delta_commit, dynamic=False)
        return out

    def vspec_round(q, k, v, g, beta, state, accept_len, states=None):
        o = kg.gated_delta_verify(q, k, v, g, beta, state)
        kg.gated_delta_commit(q, k, v, g, beta, state, accept_len, out=state)
        return o

    def torch_all_states(q, k, v, g, beta, state, accept_len, states=None):
        return _all_states_round(q, k, v, g, beta, state, accept_len, states)

    return {"vspec": vspec_round, "torch_all_states": torch_all_states}


def call(phase, fn, args, accept_len, states=None):
    """Run one provider on fresh copies where it writes; returns what to compare (o, or the new state)."""
    if phase == "verify":
        return fn(*args)
    if phase == "commit":
        return fn(*args, accept_len)
    st = args[5].clone()
    o = fn(*args[:5], st, accept_len, states)
    return o, st


def timed_call(phase, fn, args, accept_len, states):
    """What do_bench times: one call; rounds commit in place into one working state (no clone is timed)."""
    if phase == "round":
        work = args[5].clone()
        return lambda: fn(*args[:5], work, accept_len, states)
    return lambda: call(phase, fn, args, accept_len, states)


def check(phase, got, want) -> bool:
    try:
        if phase == "verify":
            torch.testing.assert_close(got, want)  # bf16 output: torch's bf16 tolerance
        elif phase == "commit":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    except AssertionError:
        return False
    return True


def reference_result(phase, args, accept_len):
    if phase == "verify":
        return ref.gated_delta_verify(*args)
    if phase == "commit":
        return ref.gated_delta_commit(*args, accept_len)
    return ref.gated_delta_verify(*args), ref.gated_delta_commit(*args, accept_len)


# ---- measurement ------------------------------------------------------------------------------


def run_gpu(shapes, batches, tokens, out_csv: Path):
    from triton.testing import do_bench

    info = env_info()
    copy_bw = copy_bandwidth_gbps()
    print(f"{info['gpu']}  torch {info['torch']}  triton {info['triton']}  git {info['git_sha']}")
    print(f"device-to-device copy bandwidth: {copy_bw:.0f} GB/s")
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for shape in shapes:
        for B in batches:
            for T in tokens:
                args, accept_len = make_case(B, T, **SHAPES[shape])
                states = torch.empty(B, T, *args[5].shape[1:], device="cuda")
                for phase in ("verify", "commit", "round"):
                    want = reference_result(phase, args, accept_len)
                    nbytes = moved_bytes(phase, args)
                    results = {}
                    for name, fn in providers(phase, cuda=True).items():
                        if not check(phase, call(phase, fn, args, accept_len, states), want):
                            results[name] = None
                            continue
                        results[name] = do_bench(timed_call(phase, fn, args, accept_len, states), warmup=25,
                                                 rep=200, return_mode="median")
                    timed = [ms for ms in results.values() if ms is not None]
                    best = min(timed) if timed else float("nan")
                    print(f"\n{shape} B={B} T={T} {phase}: {nbytes / 1e6:.1f} MB to move")
                    for name, ms in results.items():
                        if ms is None:
                            print(f"  {name:18s} FAILED correctness check: not timed")
                            row = dict(status="FAILED", ms="", gbps="", pct_copy_bw="", ratio_to_best="")
                        else:
                            gbps = nbytes / ms / 1e6
                            print(f"  {name:18s} {ms * 1e3:9.1f} us  {gbps:8.0f} GB/s  "
                                  f"{100 * gbps / copy_bw:5.1f}% of copy  x{ms / best:.2f} of best")
                            row = dict(status="ok", ms=f"{ms:.5f}", gbps=f"{gbps:.1f}",
                                       pct_copy_bw=f"{100 * gbps / copy_bw:.1f}", ratio_to_best=f"{ms / best:.3f}")
                        rows.append(dict(time=stamp, **info, shape=shape, B=B, T=T, phase=phase, dtype="bfloat16",
                                         moved_bytes=nbytes, copy_gbps=f"{copy_bw:.1f}", provider=name, **row))
                del args, states
                torch.cuda.empty_cache()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new = not out_csv.exists()
    with out_csv.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {out_csv}")


def run_cpu_smoke():
    """Tiny shapes through the interpreter: correctness of every provider, no timings."""
    t0 = time.perf_counter()
    ok = True
    args, accept_len = make_case(3, 5, Hk=1, Hv=3, Dk=16, Dv=32, device="cpu")
    states = torch.empty(3, 5, *args[5].shape[1:])
    for phase in ("verify", "commit", "round"):
        want = reference_result(phase, args, accept_len)
        for name, fn in providers(phase, cuda=False).items():
            passed = check(phase, call(phase, fn, args, accept_len, states), want)
            ok &= passed
            print(f"  {phase:7s} {name:18s} {'ok' if passed else 'FAILED'}")
    print(f"CPU smoke done in {time.perf_counter() - t0:.1f} s")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="0.8b,9b,27b")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--tokens", default="7,17", help="T = γ+1 verify tokens per row")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gated_delta.csv")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; known: {sorted(SHAPES)}")
    batches = [int(b) for b in args.batch.split(",") if b]
    tokens = [int(t) for t in args.tokens.split(",") if t]
    from vspec.kernel_report import print_compile_figures

    print_compile_figures(["gated_delta"])
    if not torch.cuda.is_available():
        print("no CUDA device: no timings; running a tiny CPU correctness smoke through Triton's interpreter")
        return 0 if run_cpu_smoke() else 1
    run_gpu(shapes, batches, tokens, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
