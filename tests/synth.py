"""Videos written by the tests with PyAV, whose frames say which frame they are.

Frame i is one solid colour: each of R, G, B carries four bits of i (16 * nibble + 8), which survives
YUV 4:2:0 and the encoder, so the index of any decoded, resized, cropped or normalised frame can be read
back from its mean colour.
"""

from __future__ import annotations

import struct
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


def rotate_mp4(source: Path, path: Path) -> Path:
    """A copy of ``source`` (an MP4 written by ``write_video``) whose track header says: turn the frames a
    quarter clockwise to show them (a display matrix of -90 degrees, as a phone held upright writes)."""
    data = bytearray(source.read_bytes())
    box = data.index(b"tkhd")
    matrix = box + 4 + (40 if data[box + 4] == 0 else 52)  # after version/flags, times, track id, volume...
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


def size_change_video(path: Path, sizes: Sequence[tuple[int, int]], frames: int = 30) -> Path:
    """A Matroska file whose H.264 stream changes frame size: ``frames`` frames at each (width, height) in turn,
    as a broadcast recording can. The pieces are raw H.264 streams joined, then given timestamps."""
    raw = b""
    for k, (width, height) in enumerate(sizes):
        piece = write_video(path.with_name(f".{path.name}.{k}.h264"), frames, width=width, height=height,
                            options={"bframes": "0"})
        raw += piece.read_bytes()
        piece.unlink()
    joined = path.with_name(f".{path.name}.h264")
    joined.write_bytes(raw)
    with av.open(str(joined)) as source, av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for i, packet in enumerate(p for p in source.demux(video=0) if p.size):
            packet.pts = packet.dts = i
            packet.time_base, packet.stream = Fraction(1, 30), stream
            out.mux(packet)
    joined.unlink()
    return path


def damage(source: Path, path: Path, *, seed: int = 1) -> Path:
    """A copy of ``source`` with 2000 random bytes written over the middle of the file."""
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path
