"""Every kernel variant the ops launch, compiled ahead of time for a GPU target: registers, spills, shared memory.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` lowers a kernel to PTX
and the ptxas bundled with the Triton wheel assembles it; ``ptxas -v`` on that PTX reports registers and
spill bytes, Triton's metadata the shared memory. ``VARIANTS`` is the one list of what is compiled, built from
the launchers' own configuration helpers (``verify.pick_block_v`` / ``tree_config``, ``scoring.mass_config`` /
``frame_config``, ``kv.default_blocks``, ``gated_delta.config``), so the compile test
(tests/kernels/test_compile.py) and the benches (``python -m vspec bench kernels``) see the variants the ops
really launch. ``hot`` marks the variants on the decoding path at the shapes of real models (V ≈ 152k, head
dims 64–256, γ ≤ 31, trees up to ``MAX_TREE_NODES``, Gated DeltaNet states 128×128); these must not spill.

``report()`` compiles in a child process when Triton's interpreter is on (under it ``@triton.jit`` yields
interpreter objects that cannot be compiled). Command line::

    python -m vspec.kernel_report [--arch 90,80] [--family verify,scoring,kv,gated_delta] [--json]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

__all__ = ["Variant", "variants", "ptxas_path", "compile_variant", "report", "format_table",
           "print_compile_figures"]

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# pointer arguments of every kernel, by name ("X" = the op's input dtype)
_POINTERS = {
    # verify.py
    "x_ptr": "X", "q_ptr": "X", "tok_ptr": "i64", "pmax_ptr": "fp32", "pidx_ptr": "i64", "psum_ptr": "fp32",
    "pcnt_ptr": "i32", "ptop2_ptr": "fp32", "ptop3_ptr": "fp32", "len_ptr": "i64", "tgt_ptr": "i64",
    "par_ptr": "i64", "path_ptr": "i64", "next_ptr": "i64", "u_ptr": "fp32", "out_ptr": "i64",
    "msel_ptr": "fp32", "ssel_ptr": "fp32", "asel_ptr": "i64", "pres_ptr": "fp64", "pp_ptr": "fp64",
    "strict_ptr": "u8", "loose_ptr": "i8",
    # scoring.py
    "q": "X", "k": "X", "vidx": "i64", "amask": "i32", "m_part": "fp32", "l_part": "fp32", "lse": "fp32",
    "part": "fp32", "inv_count": "fp32", "out": "fp32", "x": "X", "temporal": "fp32", "spatial": "fp32",
    # kv.py
    "kv": "X", "src_idx": "i64", "dst_start": "i64",
    # gated_delta.py (q, k as in scoring.py; g is float32 in the model, beta has the activations' dtype)
    "v": "X", "g": "fp32", "beta": "X", "state": "fp32", "o": "X", "new_state": "fp32", "accept_len": "i64",
}
_FLOATS = {"inv_temp", "log_ratio", "gate", "qk_scale", "eps", "scale"}
# integer arguments that are 1 at every launch (unit last-dim strides): Triton specialises them to constexpr 1
_ONES = {"stride_tr", "stride_tn", "stride_pn", "stride_sr", "stride_qd", "stride_kd", "stride_vn", "stride_as",
         "stride_on", "stride_xc", "stride_d", "stride_ik", "stride_vd", "stride_sv", "stride_od", "stride_nv"}


@dataclass(frozen=True)
class Variant:
    """One compiled configuration of one kernel."""

    family: str  # "verify" | "scoring" | "kv": the module under vspec.kernels
    kernel: str  # the @triton.jit function's name in that module
    label: str  # what distinguishes this variant, e.g. "bf16 BLOCK_V=4096 rank+top3"
    constexprs: dict = field(hash=False)
    dtype: str = "fp32"  # the op's input dtype (pointer type of "X" arguments)
    num_warps: int = 4
    hot: bool = True
    pointers: dict = field(default_factory=dict, hash=False)  # per-variant pointer dtype overrides


def _v(family, kernel, label, constexprs, *, dtype="fp32", num_warps=4, hot=True, pointers=None) -> Variant:
    cons = dict(constexprs)
    num_warps = cons.pop("num_warps", num_warps)
    return Variant(family, kernel, label, cons, dtype, num_warps, hot, dict(pointers or {}))


ALL_FAMILIES = ("verify", "scoring", "kv", "gated_delta")


def variants(families=ALL_FAMILIES) -> list[Variant]:
    """The variants the ops launch, per family (imports the kernel modules: needs triton). The extra family
    ``"probe"`` is a deliberately spilling variant, the compile test's negative control."""
    out: list[Variant] = []
    if "verify" in families:
        out += _verify_variants()
    if "scoring" in families:
        out += _scoring_variants()
    if "kv" in families:
        out += _kv_variants()
    if "gated_delta" in families:
        out += _gated_delta_variants()
    if "probe" in families:
        # negative control of the compile test: a 16k-lane block at 4 warps must show spills
        out.append(_v("verify", "_block_stats_kernel", "probe: BLOCK_V=16384 at 4 warps (must spill)",
                      dict(BLOCK_V=16384, WITH_SUMEXP=True, WITH_RANK=True, WITH_TOP3=True), dtype="bf16",
                      hot=False))
    return out


def _verify_variants() -> list[Variant]:
    import triton

    from .kernels import MAX_TREE_NODES
    from .kernels import verify as kv

    out = []
    V = 151_936  # Qwen2/2.5-VL vocabulary
    BLOCK_V = kv.pick_block_v(V, None)
    NB = triton.cdiv(V, BLOCK_V)
    BLOCK_NB = triton.next_power_of_2(NB)
    flags = {"greedy": (False, False, False), "sumexp": (True, False, False), "rank+top3": (False, True, True)}
    for dt, names in (("bf16", ("greedy", "sumexp", "rank+top3")), ("fp32", ("rank+top3",))):
        for name in names:
            s, r, t = flags[name]
            out.append(_v("verify", "_block_stats_kernel", f"{dt} V={V} BLOCK_V={BLOCK_V} {name}",
                          dict(BLOCK_V=BLOCK_V, WITH_SUMEXP=s, WITH_RANK=r, WITH_TOP3=t), dtype=dt,
                          num_warps=kv.warps_for(BLOCK_V)))
    big_v = 262_208  # Gemma-3's vocabulary: V > 64 · 4096 doubles the default BLOCK_V
    bv = kv.pick_block_v(big_v, None)
    out.append(_v("verify", "_block_stats_kernel", f"bf16 V={big_v} BLOCK_V={bv} rank+top3",
                  dict(BLOCK_V=bv, WITH_SUMEXP=False, WITH_RANK=True, WITH_TOP3=True), dtype="bf16",
                  num_warps=kv.warps_for(bv)))
    for R in (7, 32):  # γ + 1: the default draft_len 6, and up to 32
        cfg = kv.rows_config(R, NB)
        tag = f"BLOCK_R={cfg['BLOCK_R']} BLOCK_NB={cfg['BLOCK_NB']}"
        out.append(_v("verify", "_greedy_chain_kernel", tag, cfg))
        out.append(_v("verify", "_sampling_accept_kernel", f"bf16 {tag}", cfg, dtype="bf16"))
        out.append(_v("verify", "_loose_accept_kernel", f"bf16 {tag} rank+gate",
                      dict(WITH_RANK=True, WITH_GATE=True, **cfg), dtype="bf16"))
    n = 16
    while n <= MAX_TREE_NODES:
        cfg = kv.tree_config(n, NB)
        out.append(_v("verify", "_greedy_tree_kernel", f"N<={n} BLOCK_NB={cfg['BLOCK_NB']} parents i64", cfg))
        n *= 4 if n < 64 else 2
    cfg = kv.tree_config(64, NB)
    out.append(_v("verify", "_greedy_tree_kernel", f"N<=64 BLOCK_NB={cfg['BLOCK_NB']} parents i32", cfg,
                  pointers={"par_ptr": "i32"}))
    out.append(_v("verify", "_draw_mass_kernel", f"bf16 BLOCK_V={BLOCK_V}", dict(BLOCK_V=BLOCK_V), dtype="bf16",
                  num_warps=kv.warps_for(BLOCK_V)))
    out.append(_v("verify", "_draw_kernel", f"bf16 BLOCK_V={BLOCK_V} BLOCK_NB={BLOCK_NB}",
                  dict(BLOCK_V=BLOCK_V, BLOCK_NB=BLOCK_NB), dtype="bf16", num_warps=kv.warps_for(BLOCK_V)))
    return out


def _scoring_variants() -> list[Variant]:
    from .kernels import scoring as ks

    out = []
    n_rows = 64  # 64 text query rows (or G·Lq): the largest row tile
    cases = [(torch.bfloat16, 64), (torch.bfloat16, 80), (torch.bfloat16, 128), (torch.bfloat16, 256),
             (torch.float16, 128), (torch.float32, 80), (torch.float32, 128), (torch.float32, 256)]
    for dtype, D in cases:
        dt = _DT[dtype]
        for kernel, cfg, extra in zip(("_mass_lse_partial_kernel", "_mass_accum_kernel"),
                                      ks.mass_config(dtype, n_rows, D, interpret=False),
                                      (dict(GATHER=True, HAS_MASK=True), dict(HAS_MASK=True))):
            prec = f" {cfg['PRECISION']}" if dtype == torch.float32 else ""
            out.append(_v("scoring", kernel, f"{dt} D={D} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} "
                          f"BLOCK_DK={cfg['BLOCK_DK']}{prec}", dict(D=D, **extra, **cfg), dtype=dt))
    out.append(_v("scoring", "_mass_lse_combine_kernel", "BLOCK_R=1024", dict(BLOCK_R=1024)))
    out.append(_v("scoring", "_mass_finalize_kernel", "BLOCK_N=1024", dict(BLOCK_N=1024)))
    for dtype, C, window in ((torch.bfloat16, 3584, 3), (torch.float32, 3584, 3), (torch.bfloat16, 3584, 5)):
        cfg = ks.frame_config(C, window)
        out.append(_v("scoring", "_frame_scores_kernel",
                      f"{_DT[dtype]} window={window} BLOCK_T={cfg['BLOCK_T']} BLOCK_K={cfg['BLOCK_K']} "
                      f"BLOCK_C={cfg['BLOCK_C']}", cfg, dtype=_DT[dtype]))
    return out


def _kv_variants() -> list[Variant]:
    from .kernels import kv as kk

    out = []
    for dtype, D, K in ((torch.bfloat16, 128, 16384), (torch.float32, 128, 16384), (torch.bfloat16, 80, 16384)):
        bk, bd = kk.default_blocks(D, K)
        out.append(_v("kv", "_compact_kv_kernel", f"{_DT[dtype]} D={D} BLOCK_K={bk} BLOCK_D={bd} dst tensor",
                      dict(DST_IS_TENSOR=True, BLOCK_K=bk, BLOCK_D=bd), dtype=_DT[dtype]))
    return out


def _gated_delta_variants() -> list[Variant]:
    from .kernels import gated_delta as kg

    out = []
    D = 128  # Qwen3.5 0.8B / 9B / 27B: linear_key_head_dim = linear_value_head_dim = 128; T = γ+1 is runtime
    cfg = kg.config(D, D)
    tag = f"Dk=Dv={D} BLOCK_K={cfg['BLOCK_K']} BLOCK_V={cfg['BLOCK_V']}"
    for dt in ("bf16", "fp32"):
        for commit in (False, True):
            out.append(_v("gated_delta", "_gated_delta_kernel", f"{dt} {tag} {'commit' if commit else 'verify'} l2norm",
                          dict(USE_L2NORM=True, COMMIT=commit, **cfg), dtype=dt))
    out.append(_v("gated_delta", "_gated_delta_kernel", f"bf16 {tag} verify no-l2norm",
                  dict(USE_L2NORM=False, COMMIT=False, **cfg), dtype="bf16"))
    return out


# --------------------------------------------------------------------------------------------------
# compiling
# --------------------------------------------------------------------------------------------------


def _gpu_name(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def ptxas_path(cc: int = 90) -> str | None:
    """The ptxas Triton would use for compute capability ``cc``, or None when it is missing / not runnable."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(cc).path
    except Exception:  # no NVIDIA backend, or Triton could not locate a ptxas
        return None
    if not path or not os.path.exists(path):
        return None
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def _signature(fn, v: Variant) -> tuple[dict, dict, dict]:
    sig, cons, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
            cons[name] = v.constexprs[name]
        elif name in _ONES:
            sig[name] = "constexpr"
            cons[name] = 1
        elif name in v.pointers or name in _POINTERS:
            t = v.pointers.get(name, _POINTERS.get(name))
            sig[name] = "*" + (v.dtype if t == "X" else t)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = set(v.constexprs) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{v.kernel}: constexprs {sorted(missing)} are not arguments of the kernel")
    return sig, cons, attrs


def compile_variant(v: Variant, cc: int = 90) -> dict:
    """Compile one variant for ``sm_<cc>`` (90 → sm_90a); returns its figures as a dict.

    Keys: family, kernel, label, hot, arch, num_warps, regs, spill_stores, spill_loads (bytes per thread),
    shared (bytes, Triton's static allocation), error (None, or the compiler's message), seconds (compile time).
    """
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(family=v.family, kernel=v.kernel, label=v.label, hot=v.hot, arch=_gpu_name(cc),
               num_warps=v.num_warps, regs=None, spill_stores=None, spill_loads=None, shared=None, error=None,
               seconds=None)
    t0 = time.perf_counter()
    fn = getattr(importlib.import_module(f"vspec.kernels.{v.family}"), v.kernel)
    try:
        sig, cons, attrs = _signature(fn, v)
        compiled = triton.compile(ASTSource(fn, sig, constexprs=cons, attrs=attrs),
                                  target=GPUTarget("cuda", cc, 32), options=dict(num_warps=v.num_warps))
    except Exception as exc:  # a compile error is a finding, reported per variant
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
        return row
    row["shared"] = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        done = subprocess.run([ptxas_path(cc), "-v", f"--gpu-name={_gpu_name(cc)}", ptx, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = done.stdout + done.stderr
    m_regs = re.search(r"Used (\d+) registers", log)
    m_sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if done.returncode != 0 or not m_regs or not m_sp:
        row["error"] = f"ptxas -v: {log.strip()[-2000:]}"
        return row
    row["regs"] = int(m_regs.group(1))
    row["spill_stores"], row["spill_loads"] = int(m_sp.group(1)), int(m_sp.group(2))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def report(archs=(90,), families=ALL_FAMILIES, *, sm80_subset: bool = True) -> list[dict]:
    """Compile every variant for each ``sm_<cc>`` in ``archs``; a list of :func:`compile_variant` rows.

    Needs ptxas (``ptxas_path``). Runs in a child process with the interpreter off when it is on here.
    With ``sm80_subset``, architectures after the first compile one variant per kernel (the first listed).
    """
    from .kernels import interpreting

    archs, families = tuple(int(a) for a in archs), tuple(families)
    if interpreting():
        # the child imports this very checkout of vspec, whatever the working directory
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, TRITON_INTERPRET="0",
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "vspec.kernel_report", "--json", "--arch", ",".join(map(str, archs)),
               "--family", ",".join(families)] + ([] if sm80_subset else ["--all-archs-full"])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"compile report child failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    vs = variants(families)
    for n, cc in enumerate(archs):
        seen = set()
        for v in vs:
            if n > 0 and sm80_subset:
                if v.kernel in seen:
                    continue
                seen.add(v.kernel)
            rows.append(compile_variant(v, cc))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width table (one line per variant)."""
    head = f"{'arch':8s} {'kernel':26s} {'variant':52s} {'warps':>5s} {'regs':>5s} {'spill':>6s} {'smem':>7s}"
    lines = [head]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['arch']:8s} {r['kernel']:26s} {r['label'][:52]:52s} COMPILE ERROR: "
                         f"{r['error'].splitlines()[0][:120]}")
            continue
        lines.append(f"{r['arch']:8s} {r['kernel']:26s} {r['label'][:52]:52s} {r['num_warps']:5d} {r['regs']:5d} "
                     f"{r['spill_stores']:6d} {r['shared']:7d}")
    return "\n".join(lines)


def print_compile_figures(families, *, file=None) -> None:
    """Print the compile table of ``families`` for the current GPU's architecture (sm_90 without CUDA): what the
    benches show beside their timings. Says why and returns when triton or ptxas is missing."""
    file = file or sys.stdout
    cc = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cc = 10 * major + minor
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile figures: triton is not importable here", file=file)
        return
    if ptxas_path(cc) is None:
        print(f"compile figures: no ptxas for sm_{cc} (it ships with the triton wheel)", file=file)
        return
    rows = report((cc,), tuple(families))
    print(f"compile figures ({', '.join(families)}; triton.compile for {_gpu_name(cc)}, ptxas -v; regs and "
          f"spill bytes per thread, static shared memory in bytes):", file=file)
    print(format_table(rows), file=file, flush=True)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90", help="comma list of compute capabilities, e.g. 90,80")
    p.add_argument("--family", default=",".join(ALL_FAMILIES))
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.add_argument("--all-archs-full", action="store_true", help="every variant on every arch")
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    if ptxas_path(archs[0]) is None:
        print("ptxas not found (it ships with the triton wheel): no compile figures", file=sys.stderr)
        return 2
    rows = report(archs, tuple(args.family.split(",")), sm80_subset=not args.all_archs_full)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
