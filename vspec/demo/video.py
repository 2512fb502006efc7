"""Demo clips as real video files, and what such files do to frames (the training augmentation).

:func:`write_clip` writes a clip to an H.264 (yuv420p) mp4 with :func:`vspec.testing.write_video`;
:func:`read_clip` reads any video back as the demo models take it, exactly as ``python -m vspec generate`` does
(8 frames sampled uniformly with PyAV, resized to 112 × 112, bilinear with antialiasing). :func:`augment` is what
:mod:`vspec.demo.train` shows the models so that they read such files: lossy codec round trips, small brightness /
colour jitter and resampling, drawn from a seeded ``random.Random`` (the same draws give the same bytes).

    >>> from vspec.demo import make_clip, clip_seed
    >>> from vspec.demo.video import write_clip, read_clip
    >>> frames, meta = make_clip(clip_seed("test", 0))
    >>> write_clip("clip.mp4", frames)
    >>> back, info = read_clip("clip.mp4")   # float32 [8, 3, 112, 112], info["indices"] == [0, ..., 7]
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..testing import write_video
from ..video_io import sample_video
from .task import FRAMES, SIZE

__all__ = [
    "CRFS",
    "JPEG_QUALITIES",
    "RESAMPLE_SIZES",
    "to_uint8",
    "from_uint8",
    "write_clip",
    "read_clip",
    "resize",
    "h264_round_trip",
    "jpeg_round_trip",
    "augment",
]

CRFS = (18, 23, 28, 33)  # x264 quality levels of the H.264 round trips (18: what write_clip writes)
JPEG_QUALITIES = (50, 70, 85, 95)
RESAMPLE_SIZES = (80, 96, 128, 160)  # frame sides a video may have before it is resized to 112


def to_uint8(frames: torch.Tensor):
    """float ``[T, 3, H, W]`` in [0, 1] → uint8 numpy ``[T, H, W, 3]`` (rounded), as a video file holds frames."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(frames) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` (numpy) → float32 ``[T, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


def resize(frames: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """float ``[T, 3, H, W]`` → ``[T, 3, size, size]`` in [0, 1]: bilinear with antialiasing, as ``vspec
    generate`` resizes a video's frames to the demo model's size."""
    if tuple(frames.shape[-2:]) == (size, size):
        return frames
    return F.interpolate(frames.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)


def write_clip(path, frames: torch.Tensor, *, fps: int = 4, crf: int = 18, threads: int = 0) -> None:
    """Write a demo clip (float ``[T, 3, H, W]`` in [0, 1], e.g. :func:`vspec.demo.make_clip`'s frames) to an H.264
    yuv420p mp4 at ``fps`` with PyAV (:func:`vspec.testing.write_video`; ``crf`` and ``threads`` as there)."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames.shape)}")
    write_video(path, to_uint8(frames), fps=fps, crf=crf, threads=threads)


def read_clip(path) -> tuple[torch.Tensor, dict]:
    """``(frames, info)``: a video file as the demo models take it, the way ``python -m vspec generate`` reads it.

    ``frames``: float32 ``[8, 3, 112, 112]`` in [0, 1], 8 frames sampled uniformly over the video (PyAV) and
    resized with :func:`resize`. ``info``: ``total`` frames, ``video_fps``, ``duration`` (s), ``indices`` (the
    frames kept), ``sampled_fps``, and ``size`` (the video's ``(height, width)``).
    """

    clip, info = sample_video(Path(path), frames=FRAMES)
    info = {**info, "size": tuple(clip.shape[-2:])}
    return resize(clip.float() / 255.0), info


def h264_round_trip(frames: torch.Tensor, crf: int = 18) -> torch.Tensor:
    """``frames`` (float ``[T, 3, H, W]`` in [0, 1], even H and W) encoded to an in-memory H.264 yuv420p mp4 at
    ``crf`` (1 x264 thread: byte-identical on every machine) and decoded back with PyAV."""
    import av
    import numpy as np

    buf = io.BytesIO()
    write_clip(buf, frames, crf=crf, threads=1)
    buf.seek(0)
    with av.open(buf) as container:
        out = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return from_uint8(out)


def jpeg_round_trip(frames: torch.Tensor, quality: int = 85) -> torch.Tensor:
    """Each frame of ``frames`` (float ``[T, 3, H, W]`` in [0, 1]) through a JPEG at ``quality`` (Pillow)."""
    import numpy as np
    from PIL import Image

    out = []
    for img in to_uint8(frames):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return from_uint8(np.stack(out))


def augment(frames: torch.Tensor, rng: random.Random, *, clean: float = 0.2) -> torch.Tensor:
    """What a real video file may do to a clip: float ``[T, 3, 112, 112]`` in [0, 1] → the same shape.

    With probability ``clean`` the frames come back unchanged (the exact renderer). Otherwise, in this order:
    brightness / colour jitter (probability 0.7: a global gain in [0.92, 1.08], per-channel gains in [0.97, 1.03]
    and offsets in [-0.03, 0.03]); a resampling to a side from :data:`RESAMPLE_SIZES` (probability 0.3, as a video
    of another size); then an H.264 yuv420p round trip at a CRF from :data:`CRFS` (0.5), a JPEG round trip at a
    quality from :data:`JPEG_QUALITIES` (0.3) or 8-bit rounding only (0.2); finally back to 112 × 112 as
    :func:`read_clip` resizes. Every random choice comes from ``rng``.
    """
    if rng.random() < clean:
        return frames
    x = frames.float()
    if rng.random() < 0.7:
        gain = rng.uniform(0.92, 1.08)
        ch_gain = torch.tensor([rng.uniform(0.97, 1.03) for _ in range(3)]).view(1, 3, 1, 1)
        offset = torch.tensor([rng.uniform(-0.03, 0.03) for _ in range(3)]).view(1, 3, 1, 1)
        x = (x * gain * ch_gain + offset).clamp(0, 1)
    if rng.random() < 0.3:
        x = resize(x, rng.choice(RESAMPLE_SIZES))
    u = rng.random()
    if u < 0.5:
        x = h264_round_trip(x, rng.choice(CRFS))
    elif u < 0.8:
        x = jpeg_round_trip(x, rng.choice(JPEG_QUALITIES))
    else:
        x = from_uint8(to_uint8(x))
    return resize(x)
