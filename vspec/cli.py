"""``python -m vspec demo | bench | generate``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .video_io import frame_indices, resize_clip, sample_video


def _progress(i: int, n: int, label: str) -> None:
    width = 24
    done = int(width * i / n)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label:<40}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def cmd_demo(args) -> int:
    import torch

    from . import LooseConfig, SpecConfig, SpecDecoder
    from .demo.evaluate import run_method, workload
    from .demo.models import WEIGHTS_DIR, load_pair

    torch.set_num_threads(args.threads)
    try:
        target, draft, tok = load_pair()
    except FileNotFoundError as e:
        print(f"vspec demo: {e}", file=sys.stderr)
        return 2
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in draft.parameters())
    print(f"vspec demo — the shipped Qwen2.5-VL pair trained on the synthetic video task ({WEIGHTS_DIR}):")
    print(f"target {n_t / 1e6:.2f}M parameters, draft {n_d / 1e6:.2f}M; {args.clips} held-out clips of 8 frames "
          f"(64 visual tokens), batch {args.batch_size}, up to {args.max_new_tokens} new tokens, greedy.")
    print("Every figure below is measured in this run.\n")
    wl = workload(args.clips, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, target=target,
                  tokenizer=tok)
    n = args.max_new_tokens
    runs = [("target.generate (greedy)", "hf", None)]
    if args.batch_size == 1:
        runs.append(("HF assisted generation", "assisted", None))
    for prune in ("semantic", "attention", "uniform", "random", "none"):
        ratio = 1.0 if prune == "none" else args.keep_ratio
        runs.append((f"vspec strict, prune={prune} keep={ratio:g}", "vspec",
                     SpecConfig(draft_len=args.draft_len, prune=prune, keep_ratio=ratio)))
    try:
        runs.append((f"vspec parallel, prune=semantic keep={args.keep_ratio:g}", "vspec",
                     SpecConfig(draft_len=args.draft_len, keep_ratio=args.keep_ratio, parallel=True)))
    except NotImplementedError:
        pass
    runs.append((f"vspec LOOSE, prune=semantic keep={args.keep_ratio:g}", "vspec",
                 SpecConfig(draft_len=args.draft_len, keep_ratio=args.keep_ratio, verify="loose",
                            loose=LooseConfig())))
    results = []
    total = len(runs) * len(wl.batches)
    for i, (label, kind, cfg) in enumerate(runs):
        if kind == "hf":
            fn = lambda inputs: target.generate(**inputs, max_new_tokens=n, do_sample=False)
        elif kind == "assisted":
            fn = lambda inputs: target.generate(**inputs, max_new_tokens=n, do_sample=False, assistant_model=draft)
        else:
            dec = SpecDecoder(target, draft, cfg)
            fn = lambda inputs, d=dec: d.generate(**inputs, max_new_tokens=n)
        results.append((cfg, run_method(label, wl, fn, repeats=args.repeats,
                                        progress=lambda b, i=i, label=label: _progress(
                                            i * len(wl.batches) + b, total, label[:40]))))
    _progress(total, total, "done")
    base = results[0][1].tokens_per_second
    print(f"\n{'method':<44} {'tok/s':>8} {'speedup':>8} {'MAL':>6} {'tgt calls/tok':>14} {'identical':>10} "
          f"{'score':>6}")
    for _, r in results:
        mal = f"{r.mal:.2f}" if r.row_rounds else "-"
        calls = f"{r.target_calls_per_token:.3f}" if r.row_rounds or r.label.startswith("target") else "-"
        print(f"{r.label:<44} {r.tokens_per_second:>8.1f} {r.tokens_per_second / base:>7.2f}x {mal:>6} {calls:>14} "
              f"{r.identical:>4}/{r.rows:<5} {r.score:>6.3f}")
    print(f"\nidentical = outputs equal to target.generate's; score = fraction of the clips' anchor fields (count, "
          f"colour, position, motion) stated correctly. draft_len={args.draft_len}; median of {args.repeats} run(s); "
          f"CPU, {torch.get_num_threads()} threads. Target calls per token count the prefill.")
    print("On a CPU these tiny models cost about as much per token as each other, so wall-clock speedups are not")
    print("expected here; MAL and target calls per token carry over to large models, where the target dominates.")
    print("LOOSE verification is not lossless by design: its identical/score columns are its fidelity.")
    strict_ok = all(r.identical == r.rows for cfg, r in results if cfg is None or cfg.verify == "strict")
    return 0 if strict_ok else 1


def cmd_bench(args) -> int:
    root = Path(__file__).resolve().parent.parent
    bench_dir = root / "bench"
    if args.suite == "quality":
        from .demo.quality import main as quality_main

        return quality_main(args.rest)
    suites = {"kernels": ["bench_scoring.py", "bench_verify.py", "bench_kv.py", "bench_gated_delta.py"],
              "e2e": ["bench_e2e.py", "bench_parallel.py"]}
    if args.suite not in suites:
        print(f"vspec bench: unknown suite {args.suite!r}; available: quality, {', '.join(suites)}", file=sys.stderr)
        return 2
    if not bench_dir.is_dir():
        print(f"vspec bench: the bench/ folder is not next to the package ({bench_dir}); run from a source checkout",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("No CUDA device: each benchmark runs its CPU smoke part only (no GPU timings).")
    scripts = suites[args.suite]
    rest = list(args.rest)
    if args.suite == "e2e" and "--synthetic" in rest:  # the synthetic-acceptance benchmark at real cost ratios
        rest.remove("--synthetic")
        scripts = ["bench_e2e_synthetic.py"]
    rc = 0
    for script in scripts:
        path = bench_dir / script
        if not path.exists():
            print(f"missing {path}", file=sys.stderr)
            rc = 1
            continue
        print(f"== {script}", flush=True)
        rc |= subprocess.call([sys.executable, str(path), *rest], cwd=root)
    return rc


WORD_TOKENIZER_FILE = "vspec_tokenizer.json"
DEFAULT_FPS = 2.0  # frames sampled per second of video, as Qwen's own video utilities do
_frame_indices, _sample_video, _resize = frame_indices, sample_video, resize_clip  # the CLI's names for them


def _read_video(path: Path, frames: int, size: int):
    """``[frames, 3, size, size]`` float32 in [0, 1]: ``frames`` frames sampled uniformly, resized (PyAV)."""
    import torch

    clip, _ = _sample_video(path, frames=frames)
    return torch.nn.functional.interpolate(clip.float() / 255.0, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


class _WordStreamer:
    """Prints generated words as they arrive (the HF streamer protocol: put(ids) … end())."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prompt_seen = False

    def put(self, ids):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        text = self.tokenizer.decode(ids.flatten().tolist())
        if text:
            print(text, end=" ", flush=True)

    def end(self):
        print(flush=True)


def _processor_inputs(processor, video: Path, args):
    """``(inputs, note)``: the frames ``args`` asks for, through the HF ``processor`` with a one-turn chat prompt.

    Frames are sampled at ``--fps`` (or exactly ``--frames``), at most ``--max-frames``, in multiples of the video
    processor's temporal patch size; ``--size`` squares them (the old behaviour), ``--max-pixels`` caps each frame's
    area (here and in a Qwen processor's own resizing). The processor is told the sampled frame rate (Qwen2.5-VL's
    temporal positions depend on it) and not to sample again."""
    vp = getattr(processor, "video_processor", None)
    factor = int(getattr(vp, "temporal_patch_size", None) or 1)
    fps = args.fps if args.fps is not None or args.frames is not None else DEFAULT_FPS
    clip, info = _sample_video(video, fps=fps, max_frames=args.max_frames, frames=args.frames, factor=factor)
    clip = _resize(clip, size=args.size, max_pixels=args.max_pixels)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    kwargs = {"do_sample_frames": False}
    try:
        from transformers.video_utils import VideoMetadata

        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=clip.shape[0], fps=info["sampled_fps"],
                                                  height=clip.shape[2], width=clip.shape[3])]
    except ImportError:
        pass
    size = dict(getattr(vp, "size", None) or {})
    if args.max_pixels is not None and size.get("longest_edge"):  # a Qwen-style pixel budget: cap it too
        shortest = min(int(size.get("shortest_edge") or args.max_pixels), args.max_pixels)
        kwargs["size"] = {"longest_edge": args.max_pixels, "shortest_edge": shortest}
    try:
        inputs = processor(text=[text], videos=[clip], return_tensors="pt", **kwargs)
    except ImportError as e:
        raise SystemExit(f"vspec generate: the processor needs a missing package: {e}") from e
    how = (f"exactly {args.frames} asked" if args.frames is not None
           else f"{fps:g} fps" + (f", at most {args.max_frames}" if args.max_frames is not None else ""))
    note = (f"video: {clip.shape[0]} of {info['total']} frames ({how}; {info['duration']:.2f} s at "
            f"{info['video_fps']:g} fps), {clip.shape[3]}x{clip.shape[2]} px")
    grid = inputs.get("video_grid_thw")
    patch = getattr(vp, "patch_size", None)
    if grid is not None and patch:
        t, gh, gw = (int(v) for v in grid[0])
        note += f", {gw * patch}x{gh * patch} px after the processor (grid {t}x{gh}x{gw})"
    return dict(inputs), note


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoConfig

    from . import LooseConfig, SpecConfig, SpecDecoder
    from .runtime.models import SUPPORTED_MODEL_TYPES

    for name in ("target", "draft"):
        d = Path(getattr(args, name))
        if not (d / "config.json").is_file():
            print(f"vspec generate: --{name} {d} is not a model folder (no config.json)", file=sys.stderr)
            return 2
    video = Path(args.video)
    if not video.is_file():
        print(f"vspec generate: --video {video}: no such file", file=sys.stderr)
        return 2
    cfgs = {name: AutoConfig.from_pretrained(getattr(args, name)) for name in ("target", "draft")}
    for name, c in cfgs.items():
        if c.model_type not in SUPPORTED_MODEL_TYPES:
            print(f"vspec generate: --{name} is a {c.model_type!r} model; supported: "
                  f"{', '.join(SUPPORTED_MODEL_TYPES)}", file=sys.stderr)
            return 2
    if cfgs["target"].model_type != cfgs["draft"].model_type:
        print(f"vspec generate: target ({cfgs['target'].model_type}) and draft ({cfgs['draft'].model_type}) must be "
              "of one family", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    word_tok = Path(args.target) / WORD_TOKENIZER_FILE
    if word_tok.is_file():  # a vspec demo-style model: word tokenizer, vspec's own video patching
        from transformers import Qwen2_5_VLForConditionalGeneration

        from .demo.models import build_batch
        from .demo.task import FRAMES, SIZE
        from .demo.tokenizer import WordTokenizer
        from .demo.video import read_clip

        if cfgs["target"].model_type != "qwen2_5_vl":
            print("vspec generate: a word-tokenizer folder must hold a qwen2_5_vl model", file=sys.stderr)
            return 2
        given = [f"--{n.replace('_', '-')}" for n in ("fps", "max_frames", "max_pixels", "frames", "size")
                 if getattr(args, n) is not None]
        if given:
            print(f"vspec generate: {', '.join(given)} ignored: a {WORD_TOKENIZER_FILE} model takes {FRAMES} frames "
                  f"of {SIZE}x{SIZE}", file=sys.stderr)
        tok = WordTokenizer.load(word_tok)
        frames, info = read_clip(video)  # FRAMES frames spread uniformly, resized to SIZE x SIZE
        inputs = build_batch([frames], tok, prompt=args.prompt, device=device)[0]
        h, w = info["size"]
        video_note = (f"video: {len(info['indices'])} of {info['total']} frames (fixed by the model), {w}x{h} px"
                      + ("" if (h, w) == (SIZE, SIZE) else f" resized to {SIZE}x{SIZE}"))
        load = Qwen2_5_VLForConditionalGeneration.from_pretrained
        streamer = _WordStreamer(tok)
        pair_tokenizer = None
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

        try:
            processor = AutoProcessor.from_pretrained(args.target)
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            print(f"vspec generate: cannot load a processor from {args.target}: {e}", file=sys.stderr)
            return 2
        inputs, video_note = _processor_inputs(processor, video, args)
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        load = AutoModelForImageTextToText.from_pretrained
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        pair_tokenizer = processor.tokenizer
        error = _check_draft_tokenizer(args.draft, pair_tokenizer)
        if error:
            print(f"vspec generate: {error}", file=sys.stderr)
            return 2
    target = load(args.target, dtype=dtype).to(device).eval()
    draft = load(args.draft, dtype=dtype).to(device).eval()
    config = SpecConfig(draft_len=args.draft_len, keep_ratio=args.keep_ratio, prune=args.prune,
                        verify=args.verify, loose=LooseConfig())
    try:
        out = SpecDecoder(target, draft, config, tokenizer=pair_tokenizer).generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    except ValueError as e:
        print(f"\nvspec generate: {e}", file=sys.stderr)
        return 2
    st = out.stats
    print(f"[{st.emitted + 1} tokens; MAL {st.mean_accepted_length:.2f}; target calls {st.target_calls + 1} "
          f"(prefill included); draft calls {st.draft_calls}; visual tokens kept {st.kept_visual_tokens}/"
          f"{st.total_visual_tokens}; prefill {st.prefill_seconds:.2f} s, decode {st.decode_seconds:.2f} s"
          + (f"; loosely accepted {st.loose_accepted}" if args.verify == "loose" else "") + f"; {video_note}]")
    return 0


def _check_draft_tokenizer(draft_dir, tokenizer) -> str | None:
    """An error when the draft folder holds a tokenizer whose vocabulary differs from the target's (None when it
    matches or the folder has none): a pair whose logit counts differ is only padding when the tokenizers agree."""
    from transformers import AutoTokenizer

    if not any((Path(draft_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None  # no tokenizer there (AutoTokenizer would make up a one-token one)
    try:
        other = AutoTokenizer.from_pretrained(draft_dir)
    except (OSError, ValueError, ImportError):
        return None
    if other.get_vocab() != tokenizer.get_vocab():
        return (f"the draft's tokenizer ({draft_dir}) differs from the target's: {len(other)} against "
                f"{len(tokenizer)} tokens; target and draft must share one tokenizer")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vspec", description="Speculative decoding for Video-LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the shipped demo pair on held-out clips and print a measured table")
    demo.add_argument("--clips", type=int, default=8, help="held-out synthetic clips (default 8)")
    demo.add_argument("--batch-size", type=int, default=1, help="clips per generate call (HF assisted needs 1)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--draft-len", type=int, default=6)
    demo.add_argument("--keep-ratio", type=float, default=0.1)
    demo.add_argument("--repeats", type=int, default=1, help="timed runs per batch; the median is reported")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for tiny models)")
    demo.set_defaults(fn=cmd_demo)
    bench = sub.add_parser("bench", help="run a benchmark suite: quality | kernels | e2e [--synthetic]",
                           description="quality: MAL against pruning and loose against strict on the demo pair "
                                       "(needs --out DIR); kernels / e2e: the bench/ scripts of a source checkout; "
                                       "e2e --synthetic --out DIR: end-to-end speed at real model-size ratios with "
                                       "synthetic acceptance (bench/bench_e2e_synthetic.py). Arguments after the "
                                       "suite name go to the suite (try `bench quality --help`).")
    bench.add_argument("suite", help="quality | kernels | e2e")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the suite")
    bench.set_defaults(fn=cmd_bench)
    gen = sub.add_parser(
        "generate", help="describe a local video with a local target/draft pair, streaming the text",
        description="Loads --target and --draft from local folders (a processor in the target's folder, or a vspec "
                    f"{WORD_TOKENIZER_FILE} for demo-style models), reads --video with PyAV, and generates greedily "
                    "with SpecDecoder, streaming the text and printing the stats at the end.")
    gen.add_argument("--target", required=True, help="target model folder (config.json + weights)")
    gen.add_argument("--draft", required=True, help="draft model folder, same family and vocabulary")
    gen.add_argument("--video", required=True, help="video file (anything PyAV decodes)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--draft-len", type=int, default=6)
    gen.add_argument("--keep-ratio", type=float, default=0.1)
    gen.add_argument("--prune", default="semantic", choices=["semantic", "attention", "uniform", "random", "none"])
    gen.add_argument("--verify", default="strict", choices=["strict", "loose"])
    gen.add_argument("--fps", type=float, default=None,
                     help="frames sampled per second of video (processor path; default 2, as Qwen's utilities)")
    gen.add_argument("--max-frames", type=int, default=None, help="at most this many frames (processor path)")
    gen.add_argument("--max-pixels", type=int, default=None,
                     help="at most this many pixels a frame, aspect kept (processor path; default: the processor's)")
    gen.add_argument("--frames", type=int, default=None,
                     help="exactly this many frames, spread uniformly, instead of --fps (processor path)")
    gen.add_argument("--size", type=int, default=None,
                     help="resize frames to SIZE x SIZE before the processor (processor path; default: keep aspect)")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.set_defaults(fn=cmd_generate)
    args = parser.parse_args(argv)
    for name in ("clips", "max_new_tokens", "draft_len", "repeats", "batch_size", "frames", "size", "threads",
                 "max_frames", "max_pixels"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "keep_ratio", 0.5) is not None and not 0 < getattr(args, "keep_ratio", 0.5) <= 1:
        parser.error("--keep-ratio must be in (0, 1]")
    if getattr(args, "fps", None) is not None and not args.fps > 0:
        parser.error("--fps must be > 0")
    if getattr(args, "frames", None) is not None and getattr(args, "fps", None) is not None:
        parser.error("--frames and --fps are alternatives: pass one")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
