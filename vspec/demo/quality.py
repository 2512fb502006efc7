"""``python -m vspec bench quality``: acceptance against visual pruning, and loose against strict verification.

On held-out clips of the synthetic task, with the shipped target/draft pair:

1. strict verification, MAL for every prune method at keep ratios 1.0, 0.5, 0.25, 0.1, 0.05 (at 1.0 every
   method keeps every token, so one ``prune="none"`` run stands for all of them), and an ORACLE keep-set (the
   ground-truth square tokens, at ``--keep-ratio``'s budget) as the ceiling for any scoring;
2. the anchor detectors measured against the task's known anchor vocabulary (how well relevance separates anchor
   words from fillers: ROC AUC over the draft tokens of every round);
3. loose verification at the default prune setting: MAL, outputs identical to strict, and task score relative
   to strict, for each detector and threshold and a few filler rules, at every draft length of ``--draft-lens``;
4. the same clips written to H.264 mp4 files and read back as ``vspec generate`` reads a video (section ``mp4``):
   the target's task score and strict MAL.

``--setting skewed`` (default) pairs the target with ``weights/draft``, trained on the target's own caption style;
``--setting divergent`` with ``weights/draft_divergent``, trained on the inverted style (another most likely filler
in every slot, the same anchors), as two real models phrase things differently.

Thresholds: on ``--split val`` every detector runs at quantiles of its own relevance; a test run given
``--choose-from VAL/quality.csv`` runs, per detector setting and draft length, only the threshold that had the
highest MAL on those validation clips among those within ``--min-score-rel`` of strict's task score (else the one
with the highest score). So the test clips never choose anything.

Writes ``quality.csv`` (every run), ``detectors.csv`` (ROC AUC and cost per round of each detector) and
``quality.png`` to ``--out``, and prints a summary. With ``--sweep`` it also measures the semantic fusion's weights
and per-frame floor at ``--keep-ratio`` (``sweep.csv``); choose settings on ``--split val`` clips, report on the
test clips.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import sys
import time
from pathlib import Path

import torch

from ..ops import LOOSE_RULE_DEFAULTS
from ..runtime.anchors import tracing
from ..runtime.config import LooseConfig, PruneConfig, SpecConfig
from ..runtime.engine import SpecDecoder
from .evaluate import Result, run_method, workload
from .models import DRAFTS, VIDEO_TOKENS, load_pair
from .task import GRID, anchor_token_ids

RATIOS = (1.0, 0.5, 0.25, 0.1, 0.05)
QUANTILES = (0.3, 0.5, 0.6, 0.7, 0.8)  # relevance quantiles tried as thresholds on validation clips
DETECTOR_COLOURS = {"none": "grey", "token_ids": "black", "hidden": "tab:blue", "attention": "tab:orange",
                    "grounded": "tab:green", "attribution": "tab:red"}
# Filler rules. A label's "{}" is the op's own default rule (ops.LOOSE_RULE_DEFAULTS: top-3, p >= 0.3, entropy gate
# 0.3), named explicitly so that the labels keep their meaning whatever LooseConfig's defaults are.
OP_RULE = {k: LOOSE_RULE_DEFAULTS[k] for k in ("top_k", "min_prob_ratio", "shift", "entropy_gate")}
WIDE = dict(top_k=5, min_prob_ratio=0.1, entropy_gate=0.0)  # a filler rule loose enough to cost task score alone
NARROW = dict(top_k=2, min_prob_ratio=0.5, shift=0)
THRESHOLD_DETECTORS = ("hidden", "attention", "grounded", "attribution")  # run at relevance thresholds
WIDE_RULE_DETECTORS = ("grounded", "attribution")  # also run with the WIDE rule
METHODS = ("semantic", "attention", "uniform", "random")
SWEEP_TEMPORAL = (0.0, 0.25, 0.5, 1.0, 2.0)
SWEEP_SPATIAL = (0.0, 0.25)
SWEEP_FLOOR = (0, 1)
SWEEP_NORM = ("frame", "global")
FIELDS = ["section", "label", "prune", "keep_ratio", "verify", "detector", "threshold", "top_k", "min_prob_ratio",
          "shift", "entropy_gate", "draft_len", "clips", "mal", "target_calls_per_token", "identical", "score",
          "score_rel_strict", "loose_accepted", "kept_visual", "total_visual", "tokens", "seconds"]


def _row(section: str, res: Result, cfg: SpecConfig | None, clips: int, strict_score: float | None) -> dict:
    lc = cfg.loose if cfg is not None and cfg.verify == "loose" else None
    return {
        "section": section, "label": res.label,
        "prune": cfg.prune if cfg else "", "keep_ratio": cfg.keep_ratio if cfg else "",
        "verify": cfg.verify if cfg else "", "detector": lc.detector if lc else "",
        "threshold": lc.threshold if lc else "", "top_k": lc.top_k if lc else "",
        "min_prob_ratio": lc.min_prob_ratio if lc else "", "shift": lc.shift if lc else "",
        "entropy_gate": lc.entropy_gate if lc else "", "draft_len": cfg.draft_len if cfg else "",
        "clips": clips, "mal": round(res.mal, 4), "target_calls_per_token": round(res.target_calls_per_token, 4),
        "identical": res.identical, "score": round(res.score, 4),
        "score_rel_strict": round(res.score / strict_score, 4) if strict_score else "",
        "loose_accepted": res.loose_accepted, "kept_visual": res.kept_visual, "total_visual": res.total_visual,
        "tokens": res.tokens, "seconds": round(res.seconds, 3),
    }


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(relevance of a random anchor > that of a random filler), ties counting half (Mann-Whitney)."""
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    allv = torch.cat([pos, neg]).double()
    ranks = torch.empty_like(allv)
    order = allv.argsort()
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv = torch.unique(allv, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
    cnts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    r_pos = ranks[: pos.numel()].sum()
    return float((r_pos - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vspec bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for quality.csv, detectors.csv and quality.png")
    p.add_argument("--clips", type=int, default=48, help="held-out clips (default 48)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--draft-len", type=int, default=6)
    p.add_argument("--draft-lens", default=None,
                   help="comma-separated draft lengths of the detector and loose sections (default: --draft-len)")
    p.add_argument("--setting", choices=list(DRAFTS), default="skewed",
                   help="skewed: the draft trained on the target's caption style (default); divergent: the draft "
                        "trained on the inverted style, which phrases fillers differently")
    p.add_argument("--choose-from", default=None,
                   help="a validation run's quality.csv: run only the threshold it chose per detector and draft "
                        "length (for test runs)")
    p.add_argument("--choose-on-val", type=int, default=0, metavar="N",
                   help="first run the detector and loose sections on N validation clips (written to OUT/val/), "
                        "then use that run's choices as --choose-from does: one command per setting")
    p.add_argument("--min-score-rel", type=float, default=0.998,
                   help="with --choose-from: the task score relative to strict a threshold must keep (default 0.998)")
    p.add_argument("--no-mp4", action="store_true", help="skip the clips-through-mp4 section")
    p.add_argument("--no-pruning", action="store_true",
                   help="section 1 at --prune / --keep-ratio only (no other methods or ratios, no oracle keep-set)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prune", default="semantic", help="prune method of the loose sweep (default semantic)")
    p.add_argument("--keep-ratio", type=float, default=0.1, help="keep ratio of the loose sweep (default 0.1)")
    p.add_argument("--quick", action="store_true", help="fewer settings (for smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for these tiny models)")
    p.add_argument("--weights", default=None, help="folder with target/ and draft/ (default: the shipped pair)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="clips to measure on: test (reported figures) or val (for choosing settings)")
    p.add_argument("--no-loose", action="store_true", help="skip the detector and loose sections")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep the semantic fusion weights and per-frame floor at --keep-ratio (sweep.csv)")
    args = p.parse_args(argv)
    if args.clips < 1 or args.batch_size < 1 or args.draft_len < 1 or args.max_new_tokens < 1:
        p.error("--clips, --batch-size, --draft-len and --max-new-tokens must be >= 1")
    try:
        gammas = [int(g) for g in args.draft_lens.split(",")] if args.draft_lens else [args.draft_len]
    except ValueError:
        p.error(f"--draft-lens must be comma-separated integers, got {args.draft_lens!r}")
    if any(g < 1 for g in gammas):
        p.error(f"--draft-lens must be >= 1, got {args.draft_lens!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.choose_on_val:
        if args.choose_from or args.split == "val":
            p.error("--choose-on-val runs the validation pass itself: drop --choose-from / --split val")
        val_argv = ["--out", str(out / "val"), "--split", "val", "--clips", str(args.choose_on_val),
                    "--batch-size", str(args.batch_size), "--draft-len", str(args.draft_len),
                    "--draft-lens", ",".join(map(str, gammas)), "--setting", args.setting, "--prune", args.prune,
                    "--keep-ratio", str(args.keep_ratio), "--max-new-tokens", str(args.max_new_tokens),
                    "--threads", str(args.threads), "--no-pruning", "--no-mp4"]
        val_argv += (["--quick"] if args.quick else []) + (["--weights", args.weights] if args.weights else [])
        print(f"validation pass: vspec bench quality {' '.join(val_argv)}", file=sys.stderr, flush=True)
        if main(val_argv) != 0:
            return 1
        args.choose_from = str(out / "val" / "quality.csv")
    chosen = _read_choices(Path(args.choose_from), args.min_score_rel) if args.choose_from else None
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    try:
        target, draft, tok = load_pair(weights_dir=args.weights, setting=args.setting)
    except FileNotFoundError as e:
        print(f"vspec bench quality: {e}", file=sys.stderr)
        return 2
    wl = workload(args.clips, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, target=target,
                  tokenizer=tok, split=args.split)
    rows: list[dict] = []

    def spec(cfg, draft=draft):
        dec = SpecDecoder(target, draft, cfg)
        return lambda inputs: dec.generate(**inputs, max_new_tokens=args.max_new_tokens)

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    ref = run_method("target.generate", wl, lambda inputs: target.generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=False))
    rows.append(_row("reference", ref, None, wl.clips, None))
    say(f"target.generate: score {ref.score:.4f}")

    # ---- 1. strict: MAL against keep ratio -------------------------------------------------------------
    ratios = (1.0, 0.25, 0.1) if args.quick else RATIOS
    methods = ("semantic", "random") if args.quick else METHODS
    if args.no_pruning:
        ratios, methods = (1.0, args.keep_ratio), (args.prune,)
    full_cfg = SpecConfig(draft_len=args.draft_len, prune="none", keep_ratio=1.0)
    full = run_method("strict prune=none keep=1", wl, spec(full_cfg))
    rows.append(_row("pruning", full, full_cfg, wl.clips, ref.score))
    say(f"strict none 1.0: MAL {full.mal:.3f}")
    mal = {m: {1.0: full.mal} for m in methods}
    strict_default = None
    for m in methods:
        for r in ratios:
            if r == 1.0:
                continue
            cfg = SpecConfig(draft_len=args.draft_len, prune=m, keep_ratio=r)
            res = run_method(f"strict prune={m} keep={r:g}", wl, spec(cfg))
            rows.append(_row("pruning", res, cfg, wl.clips, ref.score))
            mal[m][r] = res.mal
            if m == args.prune and r == args.keep_ratio:
                strict_default = res
            say(f"strict {m} {r:g}: MAL {res.mal:.3f} identical {res.identical}/{res.rows}")
    if strict_default is None:
        cfg = SpecConfig(draft_len=args.draft_len, prune=args.prune, keep_ratio=args.keep_ratio)
        strict_default = run_method(f"strict prune={args.prune} keep={args.keep_ratio:g}", wl, spec(cfg))
        rows.append(_row("pruning", strict_default, cfg, wl.clips, ref.score))
    # An upper reference from the ground truth: each square's first and last token (then its others, then the
    # lowest free positions) at the same budget. Not a method: it reads the clip's metadata.
    if not args.no_pruning:
        cfg = SpecConfig(draft_len=args.draft_len, prune="semantic", keep_ratio=args.keep_ratio)
        with _oracle_keep_sets(wl) as fn:
            oracle = run_method(f"strict oracle keep-set keep={args.keep_ratio:g}", wl, fn(spec(cfg)))
        row = _row("pruning", oracle, cfg, wl.clips, ref.score)
        row["prune"] = "oracle"
        rows.append(row)
        say(f"strict oracle keep-set {args.keep_ratio:g}: MAL {oracle.mal:.3f} identical {oracle.identical}/"
            f"{oracle.rows}")

    # ---- 1b. semantic fusion weights (optional) ---------------------------------------------------------------
    sweep_rows = []
    if args.sweep:
        grid = ((0.0, 0.5), (0.0,), (1,), ("frame",)) if args.quick else (SWEEP_TEMPORAL, SWEEP_SPATIAL, SWEEP_FLOOR,
                                                                          SWEEP_NORM)
        for wt, ws, floor, norm in itertools.product(*grid):
            pc = PruneConfig(weights=(1.0, wt, ws), per_frame_floor=floor, score_norm=norm)
            cfg = SpecConfig(draft_len=args.draft_len, prune="semantic", keep_ratio=args.keep_ratio, prune_config=pc)
            res = run_method(f"semantic w=(1,{wt:g},{ws:g}) floor={floor} norm={norm}", wl, spec(cfg))
            sweep_rows.append({"w_attention": 1.0, "w_temporal": wt, "w_spatial": ws, "per_frame_floor": floor,
                               "score_norm": norm, "keep_ratio": args.keep_ratio, "split": args.split,
                               "clips": wl.clips, "mal": round(res.mal, 4),
                               "mal_rel_full": round(res.mal / full.mal, 4), "identical": res.identical})
            say(f"sweep {res.label}: MAL {res.mal:.3f}")

    det_rows: list[dict] = []
    if not args.no_loose:
        anchors = torch.tensor(anchor_token_ids(tok))
        detector_settings = [("hidden", dict(layer=1)), ("attention", {}), ("grounded", {}), ("attribution", {})]
        if not args.quick:
            detector_settings += [("hidden", dict(layer=-1)), ("grounded", dict(visual_layers=(-2, -1)))]
        for gamma in gammas:
            strict_cfg = SpecConfig(draft_len=gamma, prune=args.prune, keep_ratio=args.keep_ratio)
            if gamma == args.draft_len:
                strict_g = strict_default
            else:
                strict_g = run_method(f"strict prune={args.prune} keep={args.keep_ratio:g}", wl, spec(strict_cfg))
            rows.append(_row("loose", strict_g, strict_cfg, wl.clips, strict_g.score))
            say(f"γ={gamma} strict: MAL {strict_g.mal:.3f}")

            def loose_run(label, lc, gamma=gamma, strict_g=strict_g):
                cfg = SpecConfig(draft_len=gamma, prune=args.prune, keep_ratio=args.keep_ratio, verify="loose",
                                 loose=lc)
                res = run_method(label, wl, spec(cfg))
                row = _row("loose", res, cfg, wl.clips, strict_g.score)
                row["identical_to_strict"] = res.identical
                rows.append(row)
                rel = res.score / strict_g.score if strict_g.score else float("nan")
                say(f"γ={gamma} {label}: MAL {res.mal:.3f} ({res.mal / strict_g.mal:.2f}x strict) score {rel:.4f} "
                    f"of strict, identical to strict {res.identical}/{res.rows}")
                return res

            # ---- 2. detectors against the known anchor vocabulary (nothing strict by threshold: just trace) ----
            none_run = loose_run("loose none {}", LooseConfig(detector="none", **OP_RULE))
            thresholds: dict[tuple, list[float]] = {}
            for det, extra in detector_settings:
                lc = LooseConfig(detector=det, threshold=float("inf"), **extra, **OP_RULE)
                cfg = SpecConfig(draft_len=gamma, prune=args.prune, keep_ratio=args.keep_ratio, verify="loose",
                                 loose=lc)
                with tracing() as trace:
                    traced = run_method("trace", wl, spec(cfg))
                drafts = torch.cat([d.flatten() for d, _ in trace])
                rel = torch.cat([r.flatten() for _, r in trace]).float()
                is_anchor = torch.isin(drafts, anchors)
                auc = _auc(rel[is_anchor], rel[~is_anchor])
                key = (det, tuple(sorted(extra.items())))
                thresholds[key] = [round(float(v), 4) for v in torch.quantile(rel, torch.tensor(QUANTILES))]
                # the traced run and the "none" run decode the same tokens (every token loose in both): the time
                # difference per verification round is the detector's cost
                cost = (traced.seconds / max(traced.rounds, 1) - none_run.seconds / max(none_run.rounds, 1)) * 1e3
                det_rows.append({"setting": args.setting, "split": args.split, "draft_len": gamma, "detector": det,
                                 "options": str(extra) or "default", "draft_tokens": rel.numel(),
                                 "anchor_share": round(float(is_anchor.float().mean()), 4), "auc": round(auc, 4),
                                 "relevance_anchor_mean": round(float(rel[is_anchor].mean()), 4),
                                 "relevance_filler_mean": round(float(rel[~is_anchor].mean()), 4),
                                 "quantiles": str(dict(zip(QUANTILES, thresholds[key]))),
                                 "rounds": traced.rounds, "ms_per_round": round(traced.seconds / max(traced.rounds, 1)
                                                                                 * 1e3, 3),
                                 "ms_per_round_over_none": round(cost, 3)})
                say(f"γ={gamma} detector {det} {extra}: AUC {auc:.3f} over {rel.numel()} draft tokens, "
                    f"{cost:+.2f} ms per round over no detector")

            # ---- 3. loose against strict ----------------------------------------------------------------------
            # The default filler rule, and at the first draft length two others; WIDE (top-5, p >= 0.1 p(argmax), no
            # entropy gate) at every draft length: there the rule alone loses task score, so the detector has work.
            rules = [dict(), WIDE] if args.quick or gamma != gammas[0] else [dict(), WIDE, NARROW]
            for rule in rules:
                if rule:
                    loose_run(f"loose none {rule}", LooseConfig(detector="none", **{**OP_RULE, **rule}))
                loose_run(f"loose oracle-ids {rule}", LooseConfig(detector="token_ids",
                                                                  anchor_token_ids=tuple(anchors.tolist()),
                                                                  **{**OP_RULE, **rule}))
            for (det, extra_items), qs in thresholds.items():
                extra = dict(extra_items)
                for rule in [dict()] + [WIDE] * (det in WIDE_RULE_DETECTORS):
                    name = f"loose {det} {extra}" + (f" {rule}" if rule else "")
                    ths = qs
                    if chosen is not None:
                        th = chosen.get((gamma, name))
                        if th is None:
                            say(f"γ={gamma} {name}: no validation choice in {args.choose_from}: skipped")
                            continue
                        ths = [th]
                    elif args.quick:
                        ths = qs[1:2]
                    for th in ths:
                        loose_run(f"{name} th={th}", LooseConfig(detector=det, threshold=th, **extra,
                                                                          **{**OP_RULE, **rule}))

    # ---- 4. clips read back from mp4 ---------------------------------------------------------------------
    if not args.no_mp4:
        wl_mp4 = workload(args.clips, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, target=target,
                          tokenizer=tok, split=args.split, via_mp4=True)
        ref_mp4 = run_method("target.generate (mp4)", wl_mp4, lambda inputs: target.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False))
        rows.append(_row("mp4", ref_mp4, None, wl_mp4.clips, ref.score))
        say(f"mp4: target.generate score {ref_mp4.score:.4f} (in memory {ref.score:.4f})")
        for prune, keep in (("none", 1.0), (args.prune, args.keep_ratio)):
            cfg = SpecConfig(draft_len=args.draft_len, prune=prune, keep_ratio=keep)
            res = run_method(f"strict prune={prune} keep={keep:g} (mp4)", wl_mp4, spec(cfg))
            rows.append(_row("mp4", res, cfg, wl_mp4.clips, ref.score))
            say(f"mp4: strict {prune} {keep:g}: MAL {res.mal:.3f} identical {res.identical}/{res.rows}")

    # ---- write ------------------------------------------------------------------------------------------
    fields = FIELDS + ["identical_to_strict"]
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    if det_rows:
        _summary([r for r in rows if r["section"] == "loose"], det_rows)
        with open(out / "detectors.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(det_rows[0]))
            w.writeheader()
            w.writerows(det_rows)
    if sweep_rows:
        with open(out / "sweep.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(sweep_rows[0]))
            w.writeheader()
            w.writerows(sweep_rows)
        best = max(sweep_rows, key=lambda r: r["mal"])
        print(f"fusion sweep at keep {args.keep_ratio:g} ({args.split} clips): best weights "
              f"(1, {best['w_temporal']:g}, {best['w_spatial']:g}) floor {best['per_frame_floor']} "
              f"norm {best['score_norm']}: "
              f"MAL {best['mal']:.3f}; wrote {out / 'sweep.csv'}")
    plotted = _plot(out / "quality.png", mal, [r for r in rows if r["section"] == "loose"])
    print(f"\nsetting {args.setting}; held-out {args.split} clips: {wl.clips}; draft_len {args.draft_len}; "
          f"max_new_tokens {args.max_new_tokens}; target task score {ref.score:.4f}")
    print("MAL (strict) by keep ratio:")
    print("  method      " + " ".join(f"{r:>6g}" for r in sorted(mal[methods[0]], reverse=True)))
    for m in methods:
        print(f"  {m:<11} " + " ".join(f"{mal[m][r]:6.3f}" for r in sorted(mal[m], reverse=True)))
    written = (["quality.csv"] + ["detectors.csv"] * bool(det_rows) + ["sweep.csv"] * bool(sweep_rows)
               + ["quality.png"] * plotted)
    print(f"wrote {', '.join(written)} to {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def _read_choices(path: Path, min_score_rel: float) -> dict:
    """``{(draft_len, "loose DET {options}"): threshold}`` from a validation run's quality.csv: per detector setting
    and draft length, the threshold with the highest MAL among rows whose task score relative to strict is at least
    ``min_score_rel`` (if none is, the row with the highest relative score)."""
    if not path.is_file():
        raise SystemExit(f"vspec bench quality: --choose-from {path}: no such file")
    groups: dict[tuple, list[dict]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (r["section"] != "loose" or r["detector"] not in THRESHOLD_DETECTORS
                    or " th=" not in r["label"]):
                continue
            groups.setdefault((int(r["draft_len"]), r["label"].rsplit(" th=", 1)[0]), []).append(r)
    def rel(r):  # empty when strict's score was 0
        return float(r["score_rel_strict"]) if r["score_rel_strict"] else float("-inf")

    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if rel(r) >= min_score_rel]
        best = max(ok, key=lambda r: float(r["mal"])) if ok else max(rs, key=rel)
        out[key] = float(best["threshold"])
    return out


def _summary(loose_rows: list[dict], det_rows: list[dict]) -> None:
    """Per draft length: strict MAL, then for each loose run MAL (× strict), score relative to strict, identical
    fraction; then each detector's AUC."""
    for gamma in sorted({r["draft_len"] for r in loose_rows}):
        rs = [r for r in loose_rows if r["draft_len"] == gamma]
        strict = next(r for r in rs if r["verify"] == "strict")
        print(f"γ = {gamma}: strict MAL {strict['mal']:.3f}")
        for r in rs:
            if r["verify"] != "loose":
                continue
            rel = r["score_rel_strict"]
            print(f"  {r['label']:<58} MAL {r['mal']:.3f} ({r['mal'] / strict['mal']:.2f}x)  score "
                  f"{rel if rel == '' else f'{rel:.4f}'} of strict  identical {r['identical'] / r['clips']:.3f}")
        for d in det_rows:
            if d["draft_len"] == gamma:
                print(f"  AUC {d['detector']} {d['options']}: {d['auc']:.3f} ({d['ms_per_round_over_none']:+.2f} ms "
                      "per round over no detector)")


@contextlib.contextmanager
def _oracle_keep_sets(wl):
    """Make SpecDecoder keep the ground-truth square tokens: patches ``pruning.select_keep`` while the returned
    wrapper runs a batch of ``wl`` (measurement only; the keep budget is unchanged)."""
    from ..runtime import pruning

    current: list = []
    original = pruning.select_keep

    def oracle(visual, *, keep, **_):
        rows = []
        for meta in current[0]:
            n = VIDEO_TOKENS
            k = pruning.keep_count(n, keep)
            per = [[s * GRID * GRID + c[0] * GRID + c[1] for s, c in enumerate(o.cells) if c is not None]
                   for o in meta.objects]
            order = [p[0] for p in per] + [p[-1] for p in per] + [t for p in per for t in p[1:-1]]
            chosen = list(dict.fromkeys(order))[:k]
            chosen += [t for t in range(n) if t not in chosen][:k - len(chosen)]
            rows.append(torch.tensor(sorted(chosen)))
        return pruning.pad_keep(rows)

    def wrap(fn):
        def run(inputs):
            current[:] = [next(m for b, m in zip(wl.batches, wl.metas) if b is inputs)]
            return fn(inputs)
        return run

    pruning.select_keep = oracle
    try:
        yield wrap
    finally:
        pruning.select_keep = original


def _plot(path: Path, mal: dict, loose_rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'vspec[plot]'): no PNG written", file=sys.stderr)
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, by_ratio in mal.items():
        rs = sorted(by_ratio)
        a.plot(rs, [by_ratio[r] for r in rs], marker="o", label=m)
    a.set_xscale("log")
    a.set_xlabel("keep ratio (visual tokens the draft sees)")
    a.set_ylabel("mean accepted length (strict)")
    a.set_title("Acceptance against visual pruning")
    a.legend()
    a.grid(alpha=0.3)
    strict_mal = {r["draft_len"]: r["mal"] for r in loose_rows if r["verify"] == "strict"}
    markers = dict(zip(sorted(strict_mal), "os^Dv"))
    for r in loose_rows:
        if r["verify"] != "loose":
            continue
        b.scatter(r["mal"] / strict_mal[r["draft_len"]], r["score_rel_strict"], s=16,
                  c=DETECTOR_COLOURS[r["detector"]], marker=markers.get(r["draft_len"], "o"))
    b.scatter([1.0], [1.0], marker="*", s=120, c="red", label="strict")
    for det, c in DETECTOR_COLOURS.items():
        b.scatter([], [], c=c, s=14, label=det)
    for gamma, m in markers.items():
        b.scatter([], [], c="white", edgecolors="k", marker=m, s=16, label=f"γ = {gamma}")
    b.axhline(0.998, ls="--", c="red", lw=0.8)
    b.set_xlabel("MAL relative to strict")
    b.set_ylabel("task score relative to strict")
    b.set_title("Loose verification")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
