"""Reading a video file as a model expects it: which frames to keep (at a rate, at most N, a multiple of the temporal
patch), decoding only those (PyAV), resizing. Used by ``vspec generate`` and the demo's ``read_clip``."""

from __future__ import annotations

from pathlib import Path


def frame_indices(total: int, video_fps: float, *, fps: float | None, max_frames: int | None,
                   frames: int | None, factor: int = 1) -> list[int]:
    """Indices of the frames to keep from a video of ``total`` frames at ``video_fps``.

    ``frames``: exactly that many, spread uniformly. Otherwise ``fps`` frames per second of video (Qwen's own
    utilities sample 2; ``None``: every frame), at most ``max_frames`` and ``total``, rounded down to a multiple of
    ``factor`` (the model's temporal patch size) but at least ``min(factor, total)``. Spread uniformly:
    ``linspace(0, total - 1, n)``.
    """
    import math

    import torch

    if frames is not None:
        n = frames
    else:
        n = total / video_fps * fps if fps is not None else total
        n = min(n, total, max_frames if max_frames is not None else total)
        n = max(min(factor, total), math.floor(n / factor) * factor)
    return torch.linspace(0, total - 1, int(n)).round().long().tolist()


def sample_video(path: Path, *, fps: float | None = 2.0, max_frames: int | None = None, frames: int | None = None,
                  factor: int = 1):
    """``(clip, info)``: the frames kept from ``path`` as uint8 ``[T, 3, H, W]`` (PyAV; only the kept frames are
    converted) and what was done: ``total`` frames, ``video_fps``, ``duration`` (s), ``indices``, ``sampled_fps``
    (kept frames per second of video). See :func:`frame_indices` for the choice."""
    import numpy as np
    import torch

    try:
        import av
    except ImportError as e:
        raise SystemExit("vspec generate: reading videos needs PyAV: pip install 'vspec[video]'") from e

    def open_stream():
        container = av.open(str(path))
        return container, container.streams.video[0]

    try:
        container, stream = open_stream()
        with container:
            rate = stream.average_rate or stream.guessed_rate
            expected = int(stream.frames or 0)
        video_fps = float(rate) if rate else 24.0
        if not expected:  # no count in the header: count the packets (no decoding)
            container, stream = open_stream()
            with container:
                expected = sum(1 for packet in container.demux(stream) if packet.size)
        kept: dict = {}
        for _attempt in range(2):  # a second pass only when the count above was wrong
            if not expected:
                break
            indices = frame_indices(expected, video_fps, fps=fps, max_frames=max_frames, frames=frames,
                                     factor=factor)
            wanted, kept, n = set(indices), {}, 0
            container, stream = open_stream()
            with container:
                for n, frame in enumerate(container.decode(stream), start=1):
                    if n - 1 in wanted:
                        kept[n - 1] = frame.to_ndarray(format="rgb24")
            if wanted <= kept.keys():
                break
            expected = n
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise SystemExit(f"vspec generate: cannot decode a video stream from {path}: {e}") from e
    if not expected or not kept or not set(indices) <= kept.keys():
        raise SystemExit(f"vspec generate: {path} holds no video frames")
    clip = torch.from_numpy(np.stack([kept[i] for i in indices])).permute(0, 3, 1, 2).contiguous()
    duration = expected / video_fps
    info = dict(total=expected, video_fps=video_fps, duration=duration, indices=indices,
                sampled_fps=len(indices) / duration)
    return clip, info


def resize_clip(clip, *, size: int | None = None, max_pixels: int | None = None):
    """uint8 ``[T, 3, H, W]`` resized to ``size`` × ``size``, or down (aspect kept) to at most ``max_pixels`` pixels
    a frame; unchanged when neither applies."""
    import math

    import torch

    h, w = clip.shape[-2:]
    if size is not None:
        new = (size, size)
    elif max_pixels is not None and h * w > max_pixels:
        scale = math.sqrt(max_pixels / (h * w))
        new = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
    else:
        return clip
    x = torch.nn.functional.interpolate(clip.float(), size=new, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)
