"""End-to-end speed at a realistic cost ratio, with synthetic acceptance: ``python -m vspec bench e2e --synthetic``.

    python -m vspec bench e2e --synthetic --out bench/results/e2e_synthetic_cpu       # CPU: ~1.2B target, fp32
    python -m vspec bench e2e --synthetic --quick --out /tmp/e2e                      # fewer points
    python bench/bench_e2e_synthetic.py --tiny --out /tmp/e2e                         # tiny models (smoke test)

Random-weight models accept nothing, and trained pairs small enough for this machine cost the same per forward
(the demo pair), so neither shows what speculative decoding buys. Here the models have real pair proportions and
acceptance is synthetic:

* target: Qwen2.5-VL architecture with random weights, >= 1B parameters (CPU: hidden 1536, 20 layers, vocab
  152064, a 4-block vision tower; CUDA: Qwen2.5-VL-7B's shapes, bf16); draft: the same architecture with <= 10 % of
  the target's weights (CPU: hidden 512, 6 layers; CUDA: Qwen2.5-0.5B's shapes). A video prompt of ~300 tokens.
* a reference ``target.generate`` run gives the target's own greedy continuation ``ref``. A wrapper of the
  draft's ``ModelState.forward`` (outside any compiled region) replaces the token it proposes for continuation
  index k (read off the position it predicts) by ``ref[k]`` with probability p and by another token otherwise,
  after every real draft forward. Everything else is real: the
  draft's compute, the target's verify forward, verification, rollback, and the output must equal ``ref``
  (``identical``).

Rows (``e2e_synthetic.csv``): per method (``eager-serial``, ``eager-parallel``, and ``compiled-*`` with
``--compile``), γ and p: ``mal``; ``tok_s`` (new tokens / median wall time); ``speedup`` over ``target.generate``
end to end (prefill included, same run); ``decode_speedup``: the same over the decode phase only (timed inside
each run: from the end of the target's first forward in ``generate``, from ``RoundSteps.start_decode`` in vspec,
i.e. after both models' prefills); ``ideal_speedup`` =
MAL × T_t(1) / (T_t(γ+1) + γ·T_d) from component costs measured in the same run (T_t(n): one target forward
over n new tokens at this context, timed inside the runs by forward hooks; T_d: one draft step); ``efficiency`` =
decode_speedup / ideal_speedup (the ideal is a decode-phase figure); ``overhead_ms``: the runtime's own time per
round (round time minus its model forwards). ``component`` rows give T_t(1), T_t(γ+1) and T_d. A PNG plots
speedup against MAL, measured and ideal.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from bench_e2e import git_sha, qwen25vl_config, random_model, timed  # noqa: E402

from vspec import SpecConfig, SpecDecoder  # noqa: E402
from vspec.runtime.state import ModelState  # noqa: E402
from vspec.runtime.steps import RoundSteps  # noqa: E402
from vspec.testing import make_inputs  # noqa: E402

NO_EOS = 10**6  # an id no model produces: every run generates exactly max_new_tokens

SHAPES = {  # name -> (target config kwargs, draft config kwargs)
    "cpu": (dict(hidden=1536, layers=20, heads=12, kv_heads=2, mlp=8960, vision_depth=4, vision_hidden=640,
                 vision_mlp=1710, vision_heads=10, tie=True),
            dict(hidden=512, layers=6, heads=8, kv_heads=2, mlp=1536, vision_depth=2, vision_hidden=256,
                 vision_mlp=512, vision_heads=4, tie=True)),
    "gpu": (dict(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18_944, vision_depth=32, vision_hidden=1280,
                 vision_mlp=3420, vision_heads=16),
            dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vision_depth=8, vision_hidden=640,
                 vision_mlp=1710, vision_heads=8, tie=True)),
    "tiny": (dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=256, vision_depth=1, vision_hidden=64,
                  vision_mlp=128, vision_heads=2, vocab=512, tie=True),
             dict(hidden=64, layers=1, heads=2, kv_heads=1, mlp=128, vision_depth=1, vision_hidden=32,
                  vision_mlp=64, vision_heads=2, vocab=512, tie=True)),
}
COLUMNS = ["date", "git", "method", "device", "dtype", "target_params_m", "draft_params_m", "context", "gamma", "p",
           "mal", "tok_s", "speedup", "decode_speedup", "ideal_speedup", "efficiency", "overhead_ms",
           "overhead_frac", "identical", "note"]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Clock:
    """Forward hooks timing every call of a model: ``(new tokens, ms)`` per call (CUDA: synchronised)."""

    def __init__(self, model, cuda: bool):
        self.calls: list[tuple[int, float]] = []
        self.cuda = cuda
        self._t0 = 0.0
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True)]
        self.active = False

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args, kwargs):
        if self.active:
            self._t0 = self._now()

    def _post(self, module, args, kwargs, out):
        if self.active:
            ids = kwargs.get("input_ids")
            emb = kwargs.get("inputs_embeds")
            n = ids.shape[1] if ids is not None else emb.shape[1]
            self.calls.append((n, 1000 * (self._now() - self._t0)))

    @contextlib.contextmanager
    def on(self):
        self.calls.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def median(self, n: int, skip_first: bool = True) -> float:
        """Median ms of the calls over ``n`` new tokens (the first call, a prefill, skipped)."""
        calls = self.calls[1:] if skip_first else self.calls
        ms = [t for k, t in calls if k == n]
        return statistics.median(ms) if ms else float("nan")

    def total_ms(self, skip_first: bool = True) -> float:
        calls = self.calls[1:] if skip_first else self.calls
        return sum(t for _, t in calls)


class SyntheticAcceptance:
    """Wraps ``ModelState.forward`` of the draft (outside any compiled region): the token proposed for continuation
    index k becomes ``ref[k]`` with probability p, another token otherwise (the logits are overwritten so that
    this token is the argmax).

    k is read off the logical position the draft predicts: the prompt's last position is the largest one in the
    draft's first call (its prefill); an output at position q predicts continuation index ``q − P_last``.
    ``clock``: also times every forward of both models (``(model, new tokens, ms)`` in ``calls``; CUDA: synced).
    """

    def __init__(self, draft, ref: torch.Tensor, p: float, seed: int, cuda: bool):
        self.draft, self.ref, self.p, self.seed, self.cuda = draft, ref, p, seed, cuda
        self.gen = torch.Generator()
        self.clock = False
        self.calls: list[tuple[str, int, float]] = []
        self.restart()

    def restart(self):
        self.gen.manual_seed(self.seed)
        self.p_last = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def installed(self):
        orig = ModelState.forward
        hook = self

        def forward(state, *args, **kwargs):
            t0 = hook._now() if hook.clock else 0.0
            logits = orig(state, *args, **kwargs)
            if hook.clock:
                n = kwargs["new_valid"].shape[1]
                hook.calls.append(("draft" if state.model is hook.draft else "target", n,
                                   1000 * (hook._now() - t0)))
            if state.model is hook.draft:
                hook._replace(logits, kwargs["positions"])
            return logits

        ModelState.forward = forward
        try:
            yield self
        finally:
            ModelState.forward = orig

    def _replace(self, logits: torch.Tensor, positions: torch.Tensor) -> None:
        text_pos = positions[0]  # [B, n] logical positions; M-RoPE rows agree on text tokens
        if self.p_last is None:
            self.p_last = int(text_pos.max())
        L, V = logits.shape[1], logits.shape[2]
        k = (text_pos[:, -L:] - self.p_last).cpu()  # [B, L]
        inside = (k >= 0) & (k < self.ref.numel())
        want = torch.where(inside, self.ref[k.clamp(0, self.ref.numel() - 1)], 0)
        hit = torch.rand(k.shape, generator=self.gen) < self.p
        tok = torch.where(hit, want, (want + 1) % V).to(logits.device)
        logits.zero_()
        logits.scatter_(2, tok[..., None], 1.0)


class DecodeMark:
    """When a run's decode phase starts: after the target's first forward (its prefill) in ``generate``
    (a forward hook), at ``RoundSteps.start_decode`` in vspec (patched while installed). ``t0`` is None until
    then; ``reset`` before each run."""

    def __init__(self, target, cuda: bool):
        self.cuda, self.t0 = cuda, None
        self.handle = target.register_forward_hook(self._post)
        self.gen_on = False

    def reset(self, gen: bool):
        self.t0, self.gen_on = None, gen

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _post(self, module, args, out):
        if self.gen_on and self.t0 is None:
            self.t0 = self.now()

    def on_start_decode(self):
        return on_start_decode(self._start)

    def _start(self):
        if self.t0 is None:
            self.t0 = self.now()


@contextlib.contextmanager
def on_start_decode(callback):
    """Call ``callback()`` whenever a vspec call's decode phase starts (``RoundSteps.start_decode``, after both
    prefills), while the block runs."""
    orig = RoundSteps.start_decode

    def start_decode(*args, **kwargs):
        callback()
        return orig(*args, **kwargs)

    RoundSteps.start_decode = start_decode
    try:
        yield
    finally:
        RoundSteps.start_decode = orig


def timed_phases(fn, mark: DecodeMark, gen: bool, cuda: bool, repeats: int, warmup: bool = True):
    """``(median seconds, median decode-phase seconds, last output)`` over ``repeats`` runs after a warm-up run;
    the decode phase runs from ``mark.t0`` (set inside the run) to the end."""
    out = fn() if warmup else None
    totals, decodes = [], []
    for _ in range(repeats):
        mark.reset(gen)
        t = mark.now()
        out = fn()
        end = mark.now()
        totals.append(end - t)
        decodes.append(end - (mark.t0 if mark.t0 is not None else t))
    mark.reset(False)
    return statistics.median(totals), statistics.median(decodes), out


def spec_run(dec, hook: SyntheticAcceptance, inputs: dict, gen_kw: dict, n: int):
    """One ``dec.generate`` of n new tokens with the synthetic acceptance restarted (same coins every run)."""
    hook.restart()
    return dec.generate(**inputs, max_new_tokens=n, **gen_kw)


def compiled_generate(target, inputs, n_new, gen_kw, ref, mode, cuda, repeats):
    """``target.generate`` with transformers' static cache and its compiled decode step (the fair peer of the
    compiled path): ``(median seconds or None, note)``."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=False, **({"mode": mode} if mode else {}))
    cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
    try:
        with torch.inference_mode():
            t, out = timed(lambda: target.generate(**inputs, max_new_tokens=n_new, cache_implementation="static",
                                                   compile_config=cc, **gen_kw), cuda, repeats)
    except Exception as e:  # noqa: BLE001 (reported in the CSV: which transformers/torch could not run it)
        return None, f"did not run: {type(e).__name__}: {str(e)[:160]}"
    same = torch.equal(out.cpu(), ref.cpu())
    return t, f"{n_new / t:.2f} tok/s; output equal to eager generate: {same}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in rows if r.get("ideal_speedup") not in (None, "")]
    methods = sorted({r["method"] for r in rows})
    for m in methods:
        for g in sorted({int(r["gamma"]) for r in rows if r["method"] == m}):
            pts = sorted((float(r["mal"]), float(r["decode_speedup"]), float(r["ideal_speedup"]))
                         for r in rows if r["method"] == m and int(r["gamma"]) == g)
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{m} γ={g} measured")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), alpha=0.6,
                    label=f"{m} γ={g} ideal")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("mean accepted length (MAL)")
    ax.set_ylabel("decode speedup over target.generate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for e2e_synthetic.csv and e2e_synthetic.png")
    p.add_argument("--quick", action="store_true", help="fewer points (γ 2,4; p 0.8,0.9) and 32 new tokens")
    p.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of the script; not a speed figure)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is present")
    p.add_argument("--gammas", default=None, type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--ps", default=None, type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--text-tokens", type=int, default=160, help="text tokens of the prompt (plus the video's)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per point (median), after a warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-parallel", action="store_true", help="skip the parallel-schedule rows")
    p.add_argument("--no-eager", action="store_true", help="skip the eager rows (with --compile: compiled only)")
    p.add_argument("--methods", default=None, type=lambda s: s.split(","),
                   help="exactly these of eager-serial, eager-parallel, compiled-serial, compiled-parallel (the "
                        "compiled ones also run the static-cache generate peer)")
    p.add_argument("--append", action="store_true", help="add the rows to OUT/e2e_synthetic.csv (plot all)")
    p.add_argument("--compile", action="store_true",
                   help="also the compiled path (SpecConfig(compile=...)) and its peer, target.generate with "
                        "transformers' static cache + compile")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled rows (default: reduce-overhead on CUDA, default on CPU)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = "tiny" if args.tiny else ("gpu" if cuda else "cpu")
    gammas = args.gammas or ([2, 4] if args.quick or args.tiny else [2, 3, 4, 6])
    ps = args.ps or ([0.8, 0.9] if args.quick or args.tiny else [0.7, 0.8, 0.9])
    n_new = args.max_new_tokens or (8 if args.tiny else 32 if args.quick else 64)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_kw, d_kw = SHAPES[shape]
    target = random_model(qwen25vl_config(**t_kw), dtype=dtype, device=device, seed=0)
    draft = random_model(qwen25vl_config(**d_kw), dtype=dtype, device=device, seed=1)
    tp, dp = n_params(target), n_params(draft)
    text = 8 if args.tiny else args.text_tokens
    inputs = make_inputs(target, batch_size=1, prompt_lens=[text], frames=4 if args.tiny else args.frames,
                         height=56 if args.tiny else args.size, width=56 if args.tiny else args.size, seed=0,
                         device=device)
    context = inputs["input_ids"].shape[1]
    dev_name = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {dev_name} | {dtype} | target {tp / 1e6:.0f}M, draft {dp / 1e6:.0f}M ({100 * dp / tp:.1f} %) | "
          f"context {context} tokens | {n_new} new tokens | torch {torch.__version__}, transformers "
          f"{transformers.__version__}", flush=True)

    gen_kw = dict(do_sample=False, eos_token_id=NO_EOS, pad_token_id=0)
    t_clock = Clock(target, cuda)
    mark = DecodeMark(target, cuda)
    with torch.inference_mode():
        # CPU: the forwards are clocked inside the timed runs (perf_counter, no sync), so components and speed come
        # from the same runs; CUDA: clocking syncs, so one more run is clocked separately
        with t_clock.on() if not cuda else contextlib.nullcontext():
            t_gen, t_gen_dec, ref = timed_phases(lambda: target.generate(**inputs, max_new_tokens=n_new, **gen_kw),
                                                 mark, True, cuda, args.repeats)
        if cuda:
            with t_clock.on():
                target.generate(**inputs, max_new_tokens=n_new, **gen_kw)
        t_t1 = t_clock.median(1)
    for h in t_clock.handles:  # no hooks on the models from here on (dynamo would trace them)
        h.remove()
    mark.handle.remove()
    t_gen1 = t_gen - t_gen_dec  # the prefill (and first token)
    ref_new = ref[0, context:].cpu()
    assert ref_new.numel() == n_new
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    base = dict(date=stamp, git=git_sha(), device=dev_name, dtype=str(dtype).replace("torch.", ""),
                target_params_m=round(tp / 1e6), draft_params_m=round(dp / 1e6), context=context)
    rows = [dict(base, method="target.generate", gamma="", p="", mal=1.0, tok_s=round(n_new / t_gen, 2),
                 speedup=1.0, decode_speedup=1.0, note=f"T_t(1) {t_t1:.1f} ms; prefill {1000 * t_gen1:.0f} ms")]
    print(f"target.generate: {n_new / t_gen:.2f} tok/s, T_t(1) = {t_t1:.1f} ms, prefill {1000 * t_gen1:.0f} ms",
          flush=True)

    known = ("eager-serial", "eager-parallel", "compiled-serial", "compiled-parallel")
    if args.methods is not None:
        bad = [m for m in args.methods if m not in known]
        if bad:
            p.error(f"--methods: unknown {bad}; choose from {known}")
        args.compile = any(m.startswith("compiled") for m in args.methods)
    methods = [("eager-serial", {})]
    if not args.no_parallel:
        methods.append(("eager-parallel", dict(parallel=True)))
    eager = methods if not args.no_eager else []
    t_peer = None
    if args.compile:
        mode = args.compile_mode or ("reduce-overhead" if cuda else None)
        setting = mode if mode else True
        eager = eager + [(m.replace("eager", "compiled"), dict(kw, compile=setting)) for m, kw in methods]
        t_peer, note = compiled_generate(target, inputs, n_new, gen_kw, ref, mode, cuda, args.repeats)
        rows.append(dict(base, method="target.generate static+compile", gamma="", p="", mal=1.0,
                         tok_s=round(n_new / t_peer, 2) if t_peer else "", speedup=round(t_gen / t_peer, 3)
                         if t_peer else "", note=note))
        print(f"target.generate static+compile: {note}", flush=True)
    if args.methods is not None:
        every = {m: kw for m, kw in eager} | {m.replace("eager", "compiled"): dict(kw, compile=setting)
                                              for m, kw in [("eager-serial", {}), ("eager-parallel",
                                                                                    dict(parallel=True))]
                                              if args.compile}
        eager = [(m, every[m]) for m in args.methods]
    for method, extra in eager:
        for gamma in gammas:
            comp = {}
            dec = SpecDecoder(target, draft, SpecConfig(draft_len=gamma, prune="none", **extra))  # one per γ:
            for prob in ps:  # a compiled decoder keeps its graphs across p
                hook = SyntheticAcceptance(draft, ref_new, prob, seed=gamma, cuda=cuda)
                with torch.inference_mode(), hook.installed():
                    run = functools.partial(spec_run, dec, hook, inputs, gen_kw)
                    # warm-up (compilation, caches) with the first p only; CPU: clocked inside the timed runs
                    if prob == ps[0]:
                        run(n_new)  # warm-up (compilation, caches), not clocked
                    hook.clock = not cuda
                    with mark.on_start_decode():
                        t_spec, t_spec_dec, out = timed_phases(lambda: run(n_new), mark, False, cuda,  # noqa: B023
                                                               args.repeats, warmup=False)
                    clocked_runs = args.repeats
                    if cuda:  # one more run, clocked (the clock syncs)
                        hook.calls.clear()
                        hook.clock = True
                        run(n_new)
                        clocked_runs = 1
                t_calls = [(n, t) for who, n, t in hook.calls if who == "target"]
                d_calls = [(n, t) for who, n, t in hook.calls if who == "draft"]
                st = out.stats
                identical = bool(torch.equal(out.sequences.cpu(), ref.cpu()))
                # decode calls: the target's verify forwards (γ+1 tokens), the draft's steps (1 or 2 tokens)
                t_verify = statistics.median([t for n, t in t_calls if n == gamma + 1] or [float("nan")])
                t_d = statistics.median([t for n, t in d_calls if n == 1] or [float("nan")])
                comp = dict(t_verify=t_verify, t_d=t_d)
                mal = st.mean_accepted_length
                ideal = mal * t_t1 / (t_verify + gamma * t_d)
                dec_speed = t_gen_dec / t_spec_dec
                decode_fwd_ms = sum(t for n, t in t_calls + d_calls if n <= gamma + 1) / clocked_runs
                round_ms = 1000 * t_spec_dec / st.rounds
                overhead = round_ms - decode_fwd_ms / st.rounds
                row = dict(base, method=method, gamma=gamma, p=prob, mal=round(mal, 3),
                           tok_s=round(n_new / t_spec, 2), speedup=round(t_gen / t_spec, 3),
                           decode_speedup=round(dec_speed, 3), ideal_speedup=round(ideal, 3),
                           efficiency=round(dec_speed / ideal, 3), overhead_ms=round(overhead, 2),
                           overhead_frac=round(overhead / round_ms, 3), identical=identical,
                           note=f"rounds {st.rounds}" + (f"; {t_peer / t_spec:.2f}x over target.generate "
                                                         f"static+compile" if t_peer and "compiled" in method else ""))
                rows.append(row)
                print(f"{method:15s} γ={gamma} p={prob:.2f}: MAL {mal:.2f}, {n_new / t_spec:.2f} tok/s, speedup "
                      f"{t_gen / t_spec:.2f}× (decode {dec_speed:.2f}×, ideal {ideal:.2f}×, efficiency "
                      f"{dec_speed / ideal:.0%}), overhead {overhead:.1f} ms/round ({overhead / round_ms:.1%}), "
                      f"identical {identical}", flush=True)
            rows.append(dict(base, method="component", gamma=gamma,
                             note=f"{method}: T_t(1) {t_t1:.1f} ms, T_t({gamma + 1}) {comp['t_verify']:.1f} ms, "
                                  f"T_d {comp['t_d']:.1f} ms"))

    csv_path = out_dir / "e2e_synthetic.csv"
    if args.append and csv_path.exists():  # a second invocation (e.g. the compiled rows) adds to the first's
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f)) + rows
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    plot(rows, out_dir / "e2e_synthetic.png",
         f"{dev_name}, {base['dtype']}: target {tp / 1e6:.0f}M, draft {dp / 1e6:.0f}M, context {context}, "
         f"{n_new} new tokens (synthetic acceptance)")
    print(f"wrote {csv_path} and {out_dir / 'e2e_synthetic.png'}")
    bad = [r for r in rows if r.get("identical") is False]
    if bad:
        print(f"{len(bad)} runs differ from target.generate: a bug", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
