"""End-to-end benchmark: vspec's SpecDecoder against ``target.generate`` and HF assisted generation.

    python bench/bench_e2e.py                         # CUDA if present (CSV: bench/results/e2e_gpu.csv), else the
                                                      # CPU machinery check (printed; CSV only with --out)
    OMP_NUM_THREADS=1 python bench/bench_e2e.py --cpu --threads 1 --out bench/results/e2e_cpu_tiny.csv
    python bench/bench_e2e.py --frames 64 --size 448 --max-new-tokens 256   # CUDA: a longer video

Same inputs, same process, greedy decoding: ``target.generate`` (the baseline), HF assisted generation
(``generate(assistant_model=draft)``, batch 1 only: HF refuses more) and vspec in chain and tree mode with a few
prune methods. Reported per method: tokens/s (new tokens of all rows / median wall time of ``--repeats`` runs
after a warm-up), speedup over generate and over assisted, MAL, whether the output equals generate's. On CPU
(float32) a vspec row whose output differs from generate's gets no speedup (it would be a bug); on CUDA (bf16) the
share of rows equal to generate's is reported instead (bf16 near-ties, docs/design.md).

Per-round time components of each vspec configuration (``component`` rows): draft step, target verify forward,
verification op, bookkeeping (the rest of the round: masks, commit, the round's host sync, trimming,
compaction), measured by wrapping SpecDecoder's step methods from the outside (CUDA events on a GPU,
``perf_counter`` on the CPU), plus the target's plain decode step (from generate). ``expected`` rows combine
them into an EXPECTED speedup of the decode phase at an ASSUMED (or the measured) MAL:
``MAL × t_target_step / t_round``; they are labelled as such and are not measurements of a speedup.

* CPU (no CUDA, or ``--cpu``): tiny random models from :mod:`vspec.testing`, target + a perturbed copy (noise
  0.1) as the close draft. Label ``cpu-tiny``: a machinery check (every path runs, outputs are exact, the CSV is
  written); on a CPU the tiny draft costs as much as the tiny target, so the figures are not speed claims.
* CUDA: a 7B-shaped Qwen2.5-VL target (hidden 3584, 28 layers, 28/4 heads, MLP 18944, vocab 152064, the 32-layer
  vision tower) and a ~0.6B-shaped draft (hidden 896, 24 layers, 14/2 heads, MLP 4864, an 8-layer vision tower),
  both bf16 with RANDOM weights built from configs (no download). Random weights make the draft's acceptance
  meaningless (MAL ≈ 1), so the measured speedups are an overhead bound; the ``expected`` rows give the speedup
  at assumed MALs (``--assume-mal``). ``--sync-debug`` also counts the CUDA synchronisations per round (all
  sources, transformers' included) with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from vspec import SpecConfig, SpecDecoder, TreeConfig, ops  # noqa: E402
from vspec import __version__ as vspec_version  # noqa: E402
from vspec.runtime import steps  # noqa: E402
from vspec.runtime.state import ModelState  # noqa: E402
from vspec.testing import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    PAD_ID,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_inputs,
    perturbed_copy,
    tiny_pair,
)

NO_EOS = 10**6  # an id no model produces: every row generates exactly max_new_tokens
TREE = TreeConfig(width=3, depth=4)
# name -> SpecConfig keyword arguments (keep ratio applies to the pruned configurations only)
CONFIGS = {
    "chain-g4-none": dict(draft_len=4, prune="none"),
    "chain-g4-semantic": dict(draft_len=4, prune="semantic"),
    "chain-g4-attention": dict(draft_len=4, prune="attention"),
    "tree-w3d4-none": dict(prune="none", tree=TREE),
    "tree-w3d4-semantic": dict(prune="semantic", tree=TREE),
}
FIELDS = ["utc", "label", "device", "torch", "transformers", "triton", "vspec", "git_sha", "threads", "family",
          "dtype", "batch", "prompt_tokens", "visual_tokens", "max_new_tokens", "method", "mode",
          "draft_len_or_depth", "tree_nodes", "prune", "keep_ratio", "seconds", "tokens_per_s",
          "speedup_vs_generate", "speedup_vs_assisted", "mal", "target_calls", "equal_rows", "draft_ms",
          "target_fwd_ms", "verify_ms", "bookkeeping_ms", "round_ms", "target_step_ms", "syncs_per_round", "note"]


def git_sha() -> str:
    """Short SHA of HEAD, with ``-dirty`` when the working tree has uncommitted changes."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True)
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------
def qwen25vl_config(*, hidden, layers, heads, kv_heads, mlp, vision_depth, vision_hidden, vision_mlp, vision_heads,
                    vocab=152_064, tie=False):
    """A Qwen2.5-VL config of the given shape; special ids are vspec.testing's, so make_inputs fits it."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden // heads
    half = head_dim // 2  # M-RoPE sections (t, h, w) sum to head_dim / 2; (16, 24, 24) for head_dim 128
    hw = 3 * half // 8
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128_000,
                rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": [half - 2 * hw, hw, hw]})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_mlp, num_heads=vision_heads,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[i for i in range(vision_depth) if i % 8 == 7] or [vision_depth - 1],
                  out_hidden_size=hidden, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                            vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
                            tie_word_embeddings=tie)


def random_model(config, *, dtype, device, seed):
    """A model of ``config`` with transformers' default random init, built directly on ``device``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.eval()


def cuda_models():
    target = random_model(qwen25vl_config(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18_944, vision_depth=32,
                                          vision_hidden=1280, vision_mlp=3420, vision_heads=16),
                          dtype=torch.bfloat16, device="cuda", seed=0)
    draft = random_model(qwen25vl_config(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vision_depth=8,
                                         vision_hidden=640, vision_mlp=1710, vision_heads=8, tie=True),
                         dtype=torch.bfloat16, device="cuda", seed=1)
    return target, draft


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------
class Stamp:
    """A point in time: a recorded CUDA event on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, cuda: bool):
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.event, self.t = None, time.perf_counter()

    def ms_until(self, other: Stamp) -> float:
        if self.event is not None:
            return self.event.elapsed_time(other.event)
        return (other.t - self.t) * 1e3


@dataclass
class RoundTimes:
    draft_ms: float
    target_fwd_ms: float
    verify_ms: float
    bookkeeping_ms: float
    round_ms: float


@contextlib.contextmanager
def round_clock(dec: SpecDecoder, cuda: bool, rounds: list):
    """Wraps the round steps (``RoundSteps``, from outside: the library has no timers) and appends one dict of stamps
    per decode round to ``rounds``: start/draft_end, target forward start/end, verify start/end, end."""
    saved = []
    current: dict = {}

    def patch(owner, name, before=None, after=None, when=None):
        orig = getattr(owner, name)

        def wrapped(*args, **kwargs):
            active = when is None or when(args)
            if active and before:
                before()
            out = orig(*args, **kwargs)
            if active and after:
                after()
            return out

        saved.append((owner, name, orig))
        setattr(owner, name, wrapped)

    def start():
        current.clear()
        current["start"] = Stamp(cuda)

    def stamp(key):
        return lambda: current.__setitem__(key, Stamp(cuda))

    def end():
        current["end"] = Stamp(cuda)
        rounds.append(dict(current))

    is_target = lambda args: args[0].model is dec.target  # noqa: E731
    try:
        for name in ("draft_chain", "draft_tree"):
            patch(steps.RoundSteps, name, start, stamp("draft_end"))
        patch(steps.RoundSteps, "target_forward", stamp("tgt_start"), stamp("tgt_end"))
        patch(ModelState, "forward_tree", stamp("tgt_start"), stamp("tgt_end"), when=is_target)
        for name in ("verify_greedy", "verify_tree_greedy", "verify_sampling", "verify_loose"):
            patch(ops, name, stamp("ver_start"), stamp("ver_end"))
        patch(steps.RoundSteps, "end_round", None, end)
        yield
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def summarize_rounds(rounds: list) -> RoundTimes:
    if not rounds:
        return RoundTimes(*(float("nan"),) * 5)
    parts = {k: [] for k in ("draft", "tgt", "ver", "total")}
    for r in rounds:
        parts["draft"].append(r["start"].ms_until(r["draft_end"]))
        parts["tgt"].append(r["tgt_start"].ms_until(r["tgt_end"]))
        parts["ver"].append(r["ver_start"].ms_until(r["ver_end"]))
        parts["total"].append(r["start"].ms_until(r["end"]))
    m = {k: statistics.fmean(v) for k, v in parts.items()}
    return RoundTimes(m["draft"], m["tgt"], m["ver"], m["total"] - m["draft"] - m["tgt"] - m["ver"], m["total"])


def timed(fn, cuda: bool, repeats: int):
    """``(median seconds, last output)`` over ``repeats`` runs after one warm-up run."""
    out = fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def count_syncs_per_round(dec: SpecDecoder, inputs, max_new_tokens: int) -> float:
    """Mean CUDA synchronisations per decode round (draft step to the end of ``end_round``; every source,
    transformers' included), from torch's sync debug mode."""
    marks: list = []
    caught: list = []
    saved = []

    def patch(owner, name, before):
        orig = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if before:
                marks.append(("start", len(caught)))
            out = orig(*args, **kwargs)
            if not before:
                marks.append(("end", len(caught)))
            return out

        saved.append((owner, name, orig))
        setattr(owner, name, wrapped)

    try:
        patch(steps.RoundSteps, "draft_chain", True)
        patch(steps.RoundSteps, "draft_tree", True)
        patch(steps.RoundSteps, "end_round", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                dec.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=NO_EOS, pad_token_id=PAD_ID)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)
    is_sync = [("synchroniz" in str(w.message)) for w in caught]
    pairs = zip(marks[::2], marks[1::2])
    per_round = [sum(is_sync[a:b]) for (ka, a), (kb, b) in pairs if ka == "start" and kb == "end"]
    return statistics.fmean(per_round) if per_round else float("nan")


# ----------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------
def run_case(w, base: dict, target, draft, inputs, *, args, cuda: bool):
    """All methods on one input batch; writes CSV rows via ``w`` and prints a summary."""
    B = inputs["input_ids"].shape[0]
    M = args.max_new_tokens
    new_tokens = B * M
    gen_kw = dict(do_sample=False, max_new_tokens=M, eos_token_id=NO_EOS, pad_token_id=PAD_ID)
    n_vis = int(sum((inputs["input_ids"] == t).sum() for t in (IMAGE_ID, VIDEO_ID)))
    base = dict(base, batch=B, prompt_tokens=int(inputs["attention_mask"].sum()), visual_tokens=n_vis,
                max_new_tokens=M)

    def row(**kw):
        w.writerow({**base, **kw})

    with torch.no_grad():
        t_gen, ref = timed(lambda: target.generate(**inputs, **gen_kw), cuda, args.repeats)
        t_pre, _ = timed(lambda: target.generate(**inputs, **dict(gen_kw, max_new_tokens=1)), cuda, args.repeats)
    step_ms = (t_gen - t_pre) / (M - 1) * 1e3
    row(method="generate", mode="-", seconds=f"{t_gen:.4f}", tokens_per_s=f"{new_tokens / t_gen:.2f}",
        speedup_vs_generate="1.00", equal_rows=f"{B}/{B}", target_step_ms=f"{step_ms:.3f}",
        note="target_step_ms = (t(M tokens) - t(1 token)) / (M - 1)")
    print(f"  generate           {new_tokens / t_gen:9.1f} tok/s  ({t_gen:.3f}s; decode step {step_ms:.2f} ms)")

    t_asst = None
    if B == 1:
        try:
            with torch.no_grad():
                t_asst, out = timed(lambda: target.generate(**inputs, assistant_model=draft, **gen_kw), cuda,
                                    args.repeats)
            eq = bool(torch.equal(out, ref))
            ok = eq or cuda
            row(method="hf_assisted", mode="chain (HF dynamic num_assistant_tokens)", seconds=f"{t_asst:.4f}",
                tokens_per_s=f"{new_tokens / t_asst:.2f}",
                speedup_vs_generate=f"{t_gen / t_asst:.2f}" if ok else "nan", speedup_vs_assisted="1.00",
                equal_rows=f"{int(eq)}/1")
            print(f"  hf_assisted        {new_tokens / t_asst:9.1f} tok/s  x{t_gen / t_asst:.2f} vs generate"
                  f"{'' if eq else '  (output differs from generate)'}")
        except Exception as exc:  # a peer failing must not hide vspec's rows
            t_asst = None
            row(method="hf_assisted", mode="-", note=f"failed: {type(exc).__name__}: {exc}"[:300])
            print(f"  hf_assisted failed: {type(exc).__name__}: {exc}")

    for name, kw in CONFIGS.items():
        kw = dict(kw)
        if kw["prune"] != "none":
            kw["keep_ratio"] = args.keep_ratio
        cfg = SpecConfig(**kw)
        dec = SpecDecoder(target, draft, cfg)
        t_v, out = timed(lambda dec=dec: dec.generate(**inputs, **gen_kw), cuda, args.repeats)
        eq_rows = int((out.sequences == ref).all(dim=1).sum()) if out.sequences.shape == ref.shape else 0
        ok = eq_rows == B or cuda
        st = out.stats
        rounds: list = []
        with round_clock(dec, cuda, rounds):
            dec.generate(**inputs, **gen_kw)
        if cuda:
            torch.cuda.synchronize()
        rt = summarize_rounds(rounds)
        syncs = count_syncs_per_round(dec, inputs, M) if (cuda and args.sync_debug) else None
        mode = "tree" if cfg.tree is not None else "chain"
        depth = cfg.tree.depth if cfg.tree is not None else cfg.draft_len
        nodes = cfg.tree.num_nodes if cfg.tree is not None else cfg.draft_len + 1
        common = dict(mode=mode, draft_len_or_depth=depth, tree_nodes=nodes, prune=cfg.prune,
                      keep_ratio=kw.get("keep_ratio", 1.0))
        row(method=f"vspec:{name}", seconds=f"{t_v:.4f}", tokens_per_s=f"{new_tokens / t_v:.2f}",
            speedup_vs_generate=f"{t_gen / t_v:.2f}" if ok else "nan",
            speedup_vs_assisted=(f"{t_asst / t_v:.2f}" if ok else "nan") if t_asst else "",
            mal=f"{st.mean_accepted_length:.3f}", target_calls=st.target_calls, equal_rows=f"{eq_rows}/{B}",
            note="" if ok else "OUTPUT DIFFERS FROM generate: no speedup reported", **common)
        row(method=f"component:{name}", draft_ms=f"{rt.draft_ms:.3f}", target_fwd_ms=f"{rt.target_fwd_ms:.3f}",
            verify_ms=f"{rt.verify_ms:.3f}", bookkeeping_ms=f"{rt.bookkeeping_ms:.3f}", round_ms=f"{rt.round_ms:.3f}",
            target_step_ms=f"{step_ms:.3f}", mal=f"{st.mean_accepted_length:.3f}",
            syncs_per_round=f"{syncs:.2f}" if syncs is not None else "",
            note="mean per decode round; bookkeeping = round - draft - target_fwd - verify", **common)
        mals = [(st.mean_accepted_length, "measured MAL of this run")]
        mals += [(m, "ASSUMED MAL") for m in args.assume_mal]
        for mal, what in mals:
            expected = mal * step_ms / rt.round_ms if rt.round_ms > 0 else float("nan")
            row(method=f"expected:{name}", mal=f"{mal:.3f}", speedup_vs_generate=f"{expected:.2f}",
                round_ms=f"{rt.round_ms:.3f}", target_step_ms=f"{step_ms:.3f}",
                note=f"EXPECTED decode-phase speedup = MAL x target_step_ms / round_ms at {what}; not measured",
                **common)
        flag = "" if eq_rows == B else f"  ({B - eq_rows}/{B} rows differ from generate)"
        print(f"  vspec {name:20s} {new_tokens / t_v:9.1f} tok/s  x{t_gen / t_v:.2f} vs generate"
              f"{f', x{t_asst / t_v:.2f} vs assisted' if t_asst else ''}  MAL {st.mean_accepted_length:.2f}  "
              f"round {rt.round_ms:.2f} ms = draft {rt.draft_ms:.2f} + target {rt.target_fwd_ms:.2f} + verify "
              f"{rt.verify_ms:.2f} + bookkeeping {rt.bookkeeping_ms:.2f}{flag}"
              + (f"  syncs/round {syncs:.1f}" if syncs is not None else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the tiny CPU machinery check even when CUDA is present")
    p.add_argument("--out", default=None, help="CSV path, appended (default: bench/results/e2e_gpu.csv on CUDA, "
                                               "none on the CPU)")
    p.add_argument("--batches", default=None, type=lambda s: [int(x) for x in s.split(",")],
                   help="batch sizes (default 1,4 on CPU, 1,4 on CUDA)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (CPU), 128 (CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep-ratio", type=float, default=0.1)
    p.add_argument("--frames", type=int, default=None, help="video frames (default 8 CPU, 32 CUDA)")
    p.add_argument("--size", type=int, default=None, help="frame height = width in px (default 56 CPU, 336 CUDA)")
    p.add_argument("--families", default="qwen2_5_vl,llava_onevision", help="CPU path only")
    p.add_argument("--assume-mal", default=[2.5, 3.0, 3.5], type=lambda s: [float(x) for x in s.split(",")],
                   help="MALs for the EXPECTED speedup rows")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: count synchronisations per round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu and os.environ.get("TRITON_INTERPRET") != "1"
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if cuda else 32
    if args.max_new_tokens < 2:
        p.error("--max-new-tokens must be >= 2 (the decode step time needs it)")
    batches = args.batches or [1, 4]
    frames = args.frames or (32 if cuda else 8)
    size = args.size or (336 if cuda else 56)
    if args.out:
        out = Path(args.out)
    elif cuda:
        out = ROOT / "bench" / "results" / "e2e_gpu.csv"
    else:
        out = Path(os.devnull)
    if out != Path(os.devnull):
        out.parent.mkdir(parents=True, exist_ok=True)
    new = out == Path(os.devnull) or not out.exists()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    base = dict(utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=device,
                torch=torch.__version__, transformers=transformers.__version__, triton=triton_version(),
                vspec=vspec_version, git_sha=git_sha(), threads=torch.get_num_threads())
    print(f"{device} | torch {torch.__version__} | transformers {transformers.__version__} | vspec {vspec_version} | "
          f"{base['git_sha']} | {base['threads']} CPU threads")
    with out.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, restval="")
        if new:
            w.writeheader()
        if cuda:
            label = "cuda-7b-shaped-random-weights (speedups: overhead bound at MAL~1; see expected rows)"
            print("building a 7B-shaped Qwen2.5-VL target and a ~0.6B-shaped draft (random bf16 weights)")
            target, draft = cuda_models()
            for B in batches:
                inputs = make_inputs(target, batch_size=B, prompt_lens=[24 + 8 * i for i in range(B)], frames=frames,
                                     height=size, width=size, seed=B)
                inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k.startswith("pixel") else v)
                          for k, v in inputs.items()}
                print(f"qwen2_5_vl 7B-shaped, batch {B}, {frames} frames {size}x{size}")
                run_case(w, dict(base, label=label, family="qwen2_5_vl-7b-shaped", dtype="bf16"), target, draft,
                         inputs, args=args, cuda=True)
                fh.flush()
        else:
            label = "cpu-tiny (machinery check, not a speed claim)"
            print(f"no CUDA (or --cpu): tiny random models, {label}")
            for family in args.families.split(","):
                target, _ = tiny_pair(family)
                draft = perturbed_copy(target, noise=0.1, seed=1)
                for B in batches:
                    inputs = make_inputs(target, batch_size=B, prompt_lens=[3 + (2 * i) % 7 for i in range(B)],
                                         frames=frames, height=size, width=size, seed=B)
                    print(f"{family} tiny, batch {B}")
                    run_case(w, dict(base, label=label, family=family, dtype="fp32"), target, draft, inputs,
                             args=args, cuda=False)
                    fh.flush()
    print(f"rows appended to {out}" if out != Path(os.devnull) else "no CSV written (pass --out)")


if __name__ == "__main__":
    main()
