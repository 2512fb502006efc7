"""The runtime's own time per round on the demo pair, eager against compiled (``SpecConfig(compile=...)``).

    python bench/bench_overhead.py --out bench/results/overhead_cpu.csv
    python bench/bench_overhead.py --compile-backend eager --clips 4     # dynamo capture without inductor

Per configuration, over the same held-out clips (batch 1, greedy, the shipped pair): the decode time per round
(from ``RoundSteps.start_decode``, after both prefills, to the end of ``generate``, over the rounds), the time
inside the models' forwards per round (timed around the calls that run them: module hooks on the eager path, a
wrapper of the compiled runner on the compiled one), and their difference, the runtime's own time per round
(masks, verification, commit, the round's host sync, trimming), absolute and as a fraction of the round. Tiny
models make the forwards cheap, so this is where the runtime's own cost shows most.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e_synthetic import on_start_decode  # noqa: E402

from vspec import SpecConfig, SpecDecoder  # noqa: E402
from vspec.demo.evaluate import workload  # noqa: E402
from vspec.demo.models import load_pair  # noqa: E402
from vspec.runtime.state import ModelState  # noqa: E402

COLUMNS = ["config", "clips", "rounds", "mal", "round_ms", "forward_ms", "runtime_ms", "runtime_frac", "identical"]


class ForwardClock:
    """Milliseconds spent inside the models' decode forwards. Eager: module hooks on both models, each model's
    first call per ``generate`` (its prefill) skipped. Compiled: a wrapper around each state's compiled runner,
    which runs exactly the decode forwards (no module hooks then: dynamo would trace them)."""

    def __init__(self):
        self.ms = 0.0
        self.on = False
        self.seen: set[int] = set()

    def reset(self):
        self.ms, self.seen = 0.0, set()

    def hooks(self, models):
        handles = []
        for m in models:
            handles.append(m.register_forward_pre_hook(self._pre))
            handles.append(m.register_forward_hook(self._post))
        return handles

    def _pre(self, module, args):
        module._vspec_t0 = time.perf_counter()

    def _post(self, module, args, out):
        if not self.on:
            return
        if id(module) not in self.seen:  # the prefill
            self.seen.add(id(module))
            return
        self.ms += 1000 * (time.perf_counter() - module._vspec_t0)

    def wrap_runners(self):
        """Patch ``ModelState.__init__`` so each compiled runner is timed; returns the original."""
        orig_init = ModelState.__init__
        clock = self

        def init(state, *args, **kwargs):
            orig_init(state, *args, **kwargs)
            if state.runner is not state.model:
                inner = state.runner

                def timed_runner(**kw):
                    t0 = time.perf_counter()
                    try:
                        return inner(**kw)
                    finally:
                        if clock.on:
                            clock.ms += 1000 * (time.perf_counter() - t0)

                state.runner = timed_runner

        ModelState.__init__ = init
        return orig_init


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="CSV path (default: print only)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--draft-len", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, draft, tok = load_pair()
    wl = workload(args.clips, batch_size=1, max_new_tokens=args.max_new_tokens, target=target, tokenizer=tok)
    clock = ForwardClock()
    configs = [("eager", SpecConfig(draft_len=args.draft_len)),
               (f"compiled ({args.compile_backend})",
                SpecConfig(draft_len=args.draft_len, compile={"backend": args.compile_backend}))]
    rows = []
    for name, cfg in configs:
        compiled = cfg.compile is not False
        handles = [] if compiled else clock.hooks((target, draft))
        orig_init = clock.wrap_runners() if compiled else None
        try:
            rows.append(measure(name, SpecDecoder(target, draft, cfg), target, wl, clock, args))
        finally:
            for h in handles:
                h.remove()
            if orig_init is not None:
                ModelState.__init__ = orig_init
        print(rows[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}")
    return 0 if all(r["identical"] for r in rows) else 1


def measure(name, dec, target, wl, clock, args) -> dict:
    rounds = fwd = decode = 0.0
    emitted = 0
    same = True
    n = args.max_new_tokens
    with torch.inference_mode():
        for batch in wl.batches:  # warm-up: every shape compiled before timing
            dec.generate(**batch, max_new_tokens=n)
        for batch, ref in zip(wl.batches, wl.refs):
            clock.reset()
            clock.on = True
            start = []
            with on_start_decode(lambda: start.append(time.perf_counter())):  # noqa: B023
                out = dec.generate(**batch, max_new_tokens=n)
            end = time.perf_counter()
            clock.on = False
            same &= torch.equal(out.sequences, ref)
            decode += 1000 * (end - start[0])
            fwd += clock.ms
            rounds += out.stats.rounds
            emitted += out.stats.emitted
    round_ms, fwd_ms = decode / rounds, fwd / rounds
    return dict(config=name, clips=len(wl.batches), rounds=int(rounds), mal=round(emitted / rounds, 3),
                round_ms=round(round_ms, 3), forward_ms=round(fwd_ms, 3), runtime_ms=round(round_ms - fwd_ms, 3),
                runtime_frac=round((round_ms - fwd_ms) / round_ms, 3), identical=same)


if __name__ == "__main__":
    sys.exit(main())
