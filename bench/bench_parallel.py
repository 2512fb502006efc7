"""Serial vs parallel speculative decoding (SpecConfig(parallel=True)) on the same inputs.

    python bench/bench_parallel.py                   # CUDA: 7B-shaped target + ~1B-shaped draft, random weights, bf16
    python bench/bench_parallel.py --quick           # CUDA: fewer configurations
    python bench/bench_parallel.py --cpu             # tiny models on the CPU (machinery check, not a speedup)

For every configuration the same inputs run through ``target.generate`` (greedy), the serial ``SpecDecoder`` and
the parallel one in each mode (``post``, ``pre``, ``pearl``; fixed γ and, on CUDA, ``adaptive_draft_len``). Rows:
tokens/s (median of ``--repeats`` timed runs after one warm-up run on CUDA, the clock stopping after a device
sync; the minimum on the CPU, single-threaded), speedup
over the serial decoder, MAL (tokens per target forward), target calls per token, the parallel schedule's round
kinds and kept/discarded speculative drafts, and per round: decode wall time, and on CUDA the draft's GPU time,
the target forwards' GPU time and the draft time that ran while a target forward ran (CUDA events, from
``SpecStats.draft_ms / verify_ms / overlap_ms``). ``identical`` = fraction of batch rows whose tokens equal the
serial decoder's (``identical_generate``: ``target.generate``'s); a configuration that is not fully identical is
recorded with no speedup (in bf16 on a GPU a near-tie can flip a token, docs/design.md: the rate is the figure there).

CUDA models are built from configs with random weights (nothing is downloaded): a Qwen2.5-VL-7B-shaped target
(hidden 3584, 28 layers, 28/4 heads, vocabulary 152064, its 32-layer vision tower) and a ~1B-shaped draft of the same
family (hidden 1536, 20 layers, 12/2 heads). Random weights make the two disagree on almost every token, so MAL is
about 1 and speculation is almost always discarded: the CUDA rows measure the schedule's costs and the overlap,
not the speedup a trained pair would get. ``--draft copy`` uses a copy of the target as the draft instead (every
draft token accepted, every speculation kept; the draft then costs as much as the target).

The CPU rows (tiny random models, a perturbed copy of the target as draft) check that the machinery runs and what
it counts; on a CPU the parallel schedule runs its steps one after another, so its tokens/s are NOT speedups.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspec import SpecConfig, SpecDecoder  # noqa: E402
from vspec import __version__ as vspec_version  # noqa: E402
from vspec.testing import make_inputs, perturbed_copy, tiny_pair  # noqa: E402

FIELDS = ["utc", "device", "torch", "transformers", "vspec", "git_sha", "models", "dtype", "batch", "visual_tokens",
          "max_new_tokens", "method", "mode", "draft_len", "draft_len_used", "prune", "keep_ratio", "tokens_per_s",
          "speedup_vs_serial", "identical", "identical_generate", "mal", "rounds", "target_calls_per_token",
          "pre_verify_rounds", "post_verify_rounds", "spec_kept", "spec_discarded", "ms_per_round",
          "draft_gpu_ms_per_round", "verify_gpu_ms_per_round", "overlap_ms_per_round", "overlap_fraction"]


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def qwen_config(hidden, layers, heads, kv_heads, intermediate, vocab=152_064):
    """A Qwen2.5-VL config of the given text shape with the 7B model's vision tower (no download)."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden // heads
    half = head_dim // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # 16/24/24 for head_dim 128
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=hidden, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=5, video_token_id=6,
                            vision_start_token_id=3, vision_end_token_id=4)


def build_cuda_pair(draft_kind: str):
    from transformers import Qwen2_5_VLForConditionalGeneration as Cls

    torch.manual_seed(0)
    with torch.device("cuda"):
        target = Cls._from_config(qwen_config(3584, 28, 28, 4, 18944), dtype=torch.bfloat16,
                                  attn_implementation="sdpa").eval()
        if draft_kind == "copy":
            draft = copy.deepcopy(target)
        else:
            draft = Cls._from_config(qwen_config(1536, 20, 12, 2, 8960), dtype=torch.bfloat16,
                                     attn_implementation="sdpa").eval()
    for m in (target, draft):
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = 0, 2
    return target, draft


def run_one(fn, device, repeats: int):
    """(seconds, last output) of ``fn()`` after one warm-up call: the median of ``repeats`` timed calls on CUDA, the
    minimum on the CPU (a shared CPU's contention only ever adds time)."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return (statistics.median(times) if torch.device(device).type == "cuda" else min(times)), out


def bench(target, draft, inputs, configs, *, max_new_tokens, repeats, device, models, dtype, writer):
    B = inputs["input_ids"].shape[0]
    L = inputs["input_ids"].shape[1]
    n_vis = int(((inputs["input_ids"] == 5) | (inputs["input_ids"] == 6)).sum()) // B
    common = dict(utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  transformers=__import__("transformers").__version__, vspec=vspec_version, git_sha=git_sha(),
                  models=models, dtype=dtype, batch=B, visual_tokens=n_vis, max_new_tokens=max_new_tokens)
    eos = 10**9  # never produced: every run decodes max_new_tokens tokens, so runs are comparable

    sec, ref = run_one(lambda: target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                               eos_token_id=eos), device, repeats)
    new = (ref.shape[1] - L) * B
    rows = [dict(common, method="target.generate", mode="", tokens_per_s=new / sec)]
    serial_tokens = serial_tps = None
    for label, cfg in configs:  # each γ group starts with its serial decoder
        dec = SpecDecoder(target, draft, cfg)
        sec, out = run_one(lambda d=dec: d.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos),
                           device, repeats)
        seq = out.sequences
        st = out.stats
        tps = (seq.shape[1] - L) * B / sec
        if not cfg.parallel:
            serial_tokens, serial_tps = seq, tps
        same = _identical(seq, serial_tokens)
        r = max(st.rounds, 1)
        rows.append(dict(common, method=label, mode=cfg.parallel_mode if cfg.parallel else "serial",
                         draft_len=cfg.draft_len, draft_len_used=st.draft_len_used or cfg.draft_len, prune=cfg.prune,
                         keep_ratio=cfg.keep_ratio, tokens_per_s=tps,
                         speedup_vs_serial=(tps / serial_tps) if same == 1.0 else float("nan"), identical=same,
                         identical_generate=_identical(seq, ref),
                         mal=st.mean_accepted_length, rounds=st.rounds,
                         target_calls_per_token=st.target_calls_per_token,
                         pre_verify_rounds=st.pre_verify_rounds, post_verify_rounds=st.post_verify_rounds,
                         spec_kept=st.spec_drafts_kept, spec_discarded=st.spec_drafts_discarded,
                         ms_per_round=1e3 * st.decode_seconds / r, draft_gpu_ms_per_round=st.draft_ms / r,
                         verify_gpu_ms_per_round=st.verify_ms / r, overlap_ms_per_round=st.overlap_ms / r,
                         overlap_fraction=st.overlap_fraction))
    for row in rows:
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
        print(f"  {row['method']:<34} {row['tokens_per_s']:9.1f} tok/s"
              + (f"  x{row['speedup_vs_serial']:.2f} vs serial  MAL {row['mal']:.2f}  identical {row['identical']:.2f}"
                 f"  pre/post rounds {row['pre_verify_rounds']}/{row['post_verify_rounds']}"
                 f"  kept/discarded {row['spec_kept']}/{row['spec_discarded']}  {row['ms_per_round']:.1f} ms/round"
                 + (f"  draft {row['draft_gpu_ms_per_round']:.1f} / verify {row['verify_gpu_ms_per_round']:.1f}"
                    f" / overlap {row['overlap_ms_per_round']:.1f} GPU ms/round ({row['overlap_fraction']:.0%})"
                    if device == "cuda" and row["mode"] not in ("", "serial") else "")
                 if "mal" in row else ""))


def _identical(a, b) -> float:
    """Fraction of batch rows of ``a`` equal to ``b``'s (0 where the lengths differ)."""
    return (a == b).all(dim=1).float().mean().item() if a.shape == b.shape else 0.0


def configs_for(gammas, modes, prune, keep_ratio, adaptive):
    out = []
    for g in gammas:
        base = dict(draft_len=g, prune=prune, keep_ratio=keep_ratio)
        out.append((f"serial γ={g}", SpecConfig(**base)))
        for mode in modes:
            out.append((f"parallel {mode} γ={g}", SpecConfig(**base, parallel=True, parallel_mode=mode)))
            if adaptive:
                out.append((f"parallel {mode} adaptive≤{g}",
                            SpecConfig(**base, parallel=True, parallel_mode=mode, adaptive_draft_len=True)))
    return out


def run_cuda(args, writer) -> None:
    target, draft = build_cuda_pair(args.draft)
    models = f"qwen2_5_vl 7B-shape + {'copy' if args.draft == 'copy' else '1B-shape'} draft, random weights"
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | vspec {vspec_version} | {git_sha()} | "
          f"{models}")
    gammas = (4,) if args.quick else (3, 5, 8)
    modes = ("post", "pearl") if args.quick else ("post", "pre", "pearl")
    for batch in ((1,) if args.quick else (1, 4)):
        inputs = make_inputs(target, batch_size=batch, prompt_lens=[24, 40, 31, 17][:batch], frames=16, height=336,
                             width=336, device="cuda")
        inputs = {k: (v.to(torch.bfloat16) if k.startswith("pixel_values") else v) for k, v in inputs.items()}
        for prune, ratio in (("uniform", 0.1), ("semantic", 0.1)):
            print(f"batch {batch}, prune={prune} keep={ratio}:")
            bench(target, draft, inputs, configs_for(gammas, modes, prune, ratio, adaptive=True),
                  max_new_tokens=args.max_new_tokens, repeats=args.repeats, device="cuda", models=models,
                  dtype="bf16", writer=writer)


def run_cpu(args, writer) -> None:
    torch.manual_seed(0)
    print("CPU: tiny random models; the parallel schedule runs sequentially here — machinery check, not a speedup")
    torch.set_num_threads(1)  # tiny models: one thread is as fast and far less sensitive to other processes
    for family in ("qwen2_5_vl", "llava_onevision"):
        target, _ = tiny_pair(family)
        draft = perturbed_copy(target, noise=0.1, seed=1)
        for batch in (1, 4):
            inputs = make_inputs(target, batch_size=batch, prompt_lens=[5, 9, 7, 4][:batch], frames=8)
            for prune, ratio in (("none", 1.0), ("uniform", 0.25)):
                print(f"{family}, batch {batch}, prune={prune} keep={ratio}:")
                configs = configs_for((2, 4), ("post", "pre", "pearl"), prune, ratio, adaptive=False)
                bench(target, draft, inputs, configs, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                      device="cpu", models=f"{family} tiny (perturbed-copy draft)", dtype="fp32", writer=writer)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny models on the CPU even when CUDA is present")
    p.add_argument("--quick", action="store_true", help="CUDA: batch 1, γ=4, modes post and pearl")
    p.add_argument("--draft", choices=("1b", "copy"), default="1b", help="CUDA draft: ~1B-shaped, or the target")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 on CUDA, 40 on the CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV (appended); default bench/results/parallel_<cuda|cpu_tiny>.csv")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if cuda else 40
    out = Path(args.out or ROOT / "bench" / "results" / f"parallel_{'cuda' if cuda else 'cpu_tiny'}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, restval="")
        if new:
            writer.writeheader()
        (run_cuda if cuda else run_cpu)(args, writer)
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
