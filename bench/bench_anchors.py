"""Cost of loose verification's anchor detectors relative to the verification forward they ride on.

    python bench/bench_anchors.py                      # CUDA: 7B-shaped Qwen2.5-VL text stack (random weights, bf16)
    python bench/bench_anchors.py --layers 4 --quick   # fewer layers / repeats

A target is prefilled once with a prompt of ``--visual`` visual tokens and ``--text`` text tokens; then the same
verification forward over ``γ+1`` tokens is timed without a detector, with the hidden-state detector (forward hook
+ top-N cosine against the visual hidden states), with the attention detector (``visual_attention_mass`` per
draft token at the configured layers) and with the grounded detector (at every layer, one ``[γ, S]`` attention
score block per query head from one matmul with the layer's keys, a softmax and a gather of the visual columns;
plus a softmax over the vocabulary per draft token) and with the attribution detector (the grounded detector's
score blocks, then the visual values through each layer's o_proj, two final norms and the top-5 candidates'
unembedding rows per draft token). Each forward is undone (cache truncated) before the next, so
every timing sees the same cache. The overhead is ``(t_detector - t_plain) / t_plain``.

On CUDA the target is a Qwen2.5-VL language stack with 7B text shapes (hidden 3584, 28 heads / 4 kv heads, MLP
18944, vocab 152064; ``--layers`` of the 28 layers, because the overhead per layer is what matters: the hidden
detector's cost is per round, the attention detector's per scored layer) built from a config with random
weights; visual tokens are fed as embeddings (the vision tower plays no part in a verification forward). Without
CUDA it runs on the shipped demo pair's target (float32) as a machinery check: those ratios say nothing about
large models. CSV to ``--out`` (default bench/results/anchors_<device>.csv).
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

from vspec.runtime.anchors import (  # noqa: E402
    AttentionDetector,
    AttributionDetector,
    GroundedDetector,
    HiddenStateDetector,
)
from vspec.runtime.config import LooseConfig  # noqa: E402
from vspec.runtime.models import get_adapter  # noqa: E402
from vspec.runtime.state import ModelState, padded_indices  # noqa: E402


def _target(device: str, layers: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if device != "cuda":
        from vspec.demo.models import load_pair

        return load_pair()[0], torch.float32
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=3584)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.to(device).eval(), torch.bfloat16


def _time(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--visual", type=int, default=1568, help="visual tokens in the prompt (CUDA)")
    p.add_argument("--text", type=int, default=64, help="text tokens after the visual tokens (CUDA)")
    p.add_argument("--gamma", type=int, default=6)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped stack (CUDA)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.repeats = 5
    if device == "cpu":
        print("No CUDA device: timing the demo target on CPU (a machinery check, not a 7B figure).")
    model, dtype = _target(device, args.layers)
    adapter = get_adapter(model)
    H = model.config.get_text_config().hidden_size
    if device == "cuda":
        nv, nt = args.visual, args.text
    else:
        nv, nt = 64, 8
    L = nv + nt + 2
    embeds = (torch.randn(1, L, H, device=device) * 0.02).to(dtype)
    vis = torch.zeros(1, L, dtype=torch.bool, device=device)
    vis[0, 1:1 + nv] = True
    pos = torch.arange(L, device=device)[None, None].expand(3, 1, L)
    vocab = model.config.get_text_config().vocab_size
    drafts = torch.randint(8, min(100, vocab), (1, args.gamma), device=device)
    t_in = torch.cat([drafts[:, :1], drafts], dim=1)
    t_pos = adapter.decode_positions(L + torch.arange(args.gamma + 1, device=device)[None])
    rows = []
    for name, det in [("plain", None),
                      ("hidden", HiddenStateDetector(LooseConfig(detector="hidden"), model, adapter)),
                      ("attention-1-layer", AttentionDetector(LooseConfig(detector="attention"), model)),
                      ("attention-all-layers", AttentionDetector(
                          LooseConfig(detector="attention",
                                      attention_layers=tuple(range(model.config.get_text_config().num_hidden_layers))),
                          model)),
                      ("grounded-all-layers", GroundedDetector(LooseConfig(detector="grounded"), model)),
                      ("attribution-all-layers", AttributionDetector(LooseConfig(detector="attribution"), model,
                                                                     adapter))]:
        state = ModelState(model, adapter)
        vidx = padded_indices(vis)
        ctx = det.prefill(vidx) if det is not None else None
        if ctx is not None:
            with ctx:
                state.forward(inputs_embeds=embeds, positions=pos, new_valid=torch.ones_like(vis), logits_to_keep=1)
        else:
            state.forward(inputs_embeds=embeds, positions=pos, new_valid=torch.ones_like(vis), logits_to_keep=1)
        base = state.length

        def verify(det=det, state=state, base=base):
            if det is None:
                state.forward(input_ids=t_in, positions=t_pos, new_valid=torch.ones_like(t_in, dtype=torch.bool))
            else:
                with det.verify(drafts, state):
                    state.forward(input_ids=t_in, positions=t_pos, new_valid=torch.ones_like(t_in, dtype=torch.bool))
                det.strict(drafts)
            state.truncate(base)

        t = _time(verify, args.repeats, device)
        rows.append({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "detector": name,
                     "layers": model.config.get_text_config().num_hidden_layers, "hidden": H, "visual": nv,
                     "gamma": args.gamma, "dtype": str(dtype).removeprefix("torch."), "ms": round(t * 1e3, 4)})
    plain = rows[0]["ms"]
    for r in rows:
        r["overhead"] = round((r["ms"] - plain) / plain, 4)
        print(f"{r['detector']:<22} {r['ms']:9.3f} ms  overhead {100 * r['overhead']:6.2f}%")
    tag = "gpu" if device == "cuda" else "cpu"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"anchors_{tag}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
