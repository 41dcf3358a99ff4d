"""Videos written by the tests with PyAV, whose frames say which frame they are.

Frame i is one solid colour: each of R, G, B carries four bits of i (16 * nibble + 8), which survives
YUV 4:2:0 and the encoder, so the index of any decoded, resized, cropped or normalised frame can be read
back from its mean colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

MEAN, STD = 0.45, 0.225


def colour(i: int) -> tuple[int, int, int]:
    return tuple(16 * ((i >> (4 * k)) & 15) + 8 for k in range(3))


def write_video(
    path: Path, frames: int, *, fps: int = 30, width: int = 64, height: int = 48, codec: str = "libx264",
    pix_fmt: str = "yuv420p", pts: Sequence[int] | None = None, time_base: Fraction | None = None,
    options: dict[str, str] | None = None, container_options: dict[str, str] | None = None,
    gop: int | None = None, noise: bool = False,
) -> Path:
    """Write ``frames`` solid frames; ``pts`` (in ``time_base``) makes a variable frame rate."""
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": "0", **(options or {})} if codec == "libx264" else (options or {})
        if gop:
            stream.codec_context.gop_size = gop
        if time_base is not None:
            stream.codec_context.time_base = time_base
        rng = np.random.default_rng(0)
        for i in range(frames):
            image = np.empty((height, width, 3), np.uint8)
            image[:] = colour(i)
            if noise:
                image = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def index_of(frame: torch.Tensor) -> int:
    """The index a frame carries: uint8 (H, W, 3) or normalised float (3, H, W)."""
    if frame.dtype == torch.uint8:
        rgb = frame.float().mean((0, 1))
    else:
        rgb = (frame * STD + MEAN).mean((1, 2)) * 255
    nibbles = [int(round((float(v) - 8) / 16)) for v in rgb]
    return sum(max(0, min(15, n)) << (4 * k) for k, n in enumerate(nibbles))


def decoded_pts(path: Path) -> list[int]:
    """The pts of every frame, decoding the whole file: the reference the tests compare with."""
    with av.open(str(path)) as c:
        return [f.pts for f in c.decode(video=0)]
