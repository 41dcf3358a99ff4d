"""Decoding with PyAV: one pass per video, keeping only the frames the clips pick, resized as they arrive.

The original decodes a video once per view (30 times for 30-view testing) and holds every decoded frame
of a clip's window. Here the windows of all clips are read in a single pass over the file, seeking over
long gaps, and a frame is converted to RGB (and resized) only if some clip picks it; everything else is
dropped as soon as it is decoded.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import av
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import VideoError
from .paths import input_file

RESIZE_MODES = ("area", "bilinear")
_INTERRUPTED = threading.Event()  # set by on_sigint: FFmpeg's interrupt callback can swallow Ctrl-C
_SEEK_GAP_S = 2.0  # seek only across gaps longer than this; shorter ones decode faster than a seek


@dataclass(frozen=True)
class VideoInfo:
    """What the stream header says. ``frames`` is 0 and ``duration`` None where the container omits them."""

    path: str
    width: int
    height: int
    fps: float  # the stream's average frame rate
    frames: int
    duration: int | None  # in time_base units
    time_base: Fraction
    codec: str
    start: int = 0  # the stream's start time (pts of its first frame), in time_base units
    still: bool = False  # an image (PNG, JPEG, ...) or a video of one frame: nothing moves in it

    @property
    def seconds(self) -> float | None:
        return None if self.duration is None else float(self.duration * self.time_base)

    @property
    def selective(self) -> bool:
        """Whether clips can be placed from the header alone (the original's condition, plus a frame count)."""
        return self.duration is not None and self.duration > 0 and self.frames > 0

    @property
    def pts_per_frame(self) -> float:
        # The original's PyAV decoder converts frame numbers to pts with duration / frame count.
        return self.duration / self.frames


@dataclass(frozen=True)
class Window:
    """Frames of one clip: those with ``start <= pts <= end``, then (``one_past``) the next frame too.

    ``positions`` are frame numbers inside that segment, before clamping to its last frame: the original
    decodes just the window and picks ``linspace`` indices within it (spec 4.3 step 3).
    """

    start: float
    end: float
    positions: tuple[int, ...]
    one_past: bool = True


@dataclass
class Segment:
    """A window as decoded: its length and, for each position (clamped to the length), the frame."""

    length: int
    positions: list[int]
    pts: list[int]
    frames: list[Tensor]


def output_size(height: int, width: int, short_side: int, mode: str) -> tuple[int, int]:
    """(H, W) after resizing the short side to ``short_side``.

    ``area`` is the original's default decoder (torchvision's reader asks swscale for the short side and
    rounds the long one half up); ``bilinear`` is its PyAV path, which floors ``long / short * size``.
    """
    if min(height, width) == short_side:
        return height, width
    if mode == "area":
        def scale(long: int, short: int) -> int:
            return math.floor(long * short_side / short + 0.5)
    else:
        def scale(long: int, short: int) -> int:
            return math.floor(float(long) / short * short_side)
    if width < height:
        return scale(height, width), short_side
    return short_side, scale(width, height)


@dataclass(frozen=True)
class FrameFormat:
    """How a picked frame is stored: RGB resized to ``short_side`` by ``resize``, turned upright.

    ``area`` frames stay uint8 (H, W, 3); swscale resizes them while converting from YUV. ``bilinear``
    frames come back normalised, float32 (3, H, W): the original normalises before its bilinear
    resize, and the order changes the last bits. A frame with a display rotation (a phone held
    upright) is rotated as players show it; the original ignores the rotation, and so sees such
    videos sideways (Kinetics was re-encoded by FFmpeg, which applies it).
    """

    short_side: int
    resize: str = "area"
    mean: tuple[float, ...] = (0.45, 0.45, 0.45)
    std: tuple[float, ...] = (0.225, 0.225, 0.225)

    def __call__(self, frame: av.VideoFrame) -> Tensor:
        h, w = output_size(frame.height, frame.width, self.short_side, self.resize)
        turns = quarter_turns(frame)
        if self.resize == "area":
            rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA")
            x = torch.from_numpy(rgb.to_ndarray())
            return x.rot90(turns, (0, 1)).contiguous() if turns else x
        # (H, W, 3) uint8 -> normalised float -> (1, 3, H, W) for interpolate
        x = torch.from_numpy(frame.to_ndarray(format="rgb24")).float() / 255.0
        x = ((x - torch.tensor(self.mean)) / torch.tensor(self.std)).permute(2, 0, 1)[None]
        if (h, w) != (frame.height, frame.width):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x[0].rot90(turns, (1, 2)).contiguous() if turns else x[0]


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that show ``frame`` upright, from its display matrix (0 without one).

    FFmpeg reports the angle by which the display matrix turns the frame counter-clockwise (-90 for a
    phone video that must be turned clockwise); the same turn, in ``rot90``'s sense."""
    return round((frame.rotation or 0) / 90) % 4


@dataclass
class _Collector:
    window: Window
    wanted: frozenset[int]
    length: int = 0
    done: bool = False
    kept: dict[int, tuple[int, Tensor]] = field(default_factory=dict)
    last: tuple[int, int, av.VideoFrame] | None = None  # (ordinal, pts, frame): maybe needed at the end

    def feed(self, ordinal: int, pts: int, frame: av.VideoFrame, convert: Callable[[int, av.VideoFrame], Tensor]):
        if self.done or pts < self.window.start:
            return
        if pts > self.window.end:
            self.done = True
            if not self.window.one_past:
                return
        if self.length in self.wanted:
            self.kept[self.length] = (pts, convert(ordinal, frame))
        self.last = (ordinal, pts, frame)
        self.length += 1

    def finish(self, convert: Callable[[int, av.VideoFrame], Tensor]) -> Segment | None:
        if self.length == 0:
            return None
        positions = [min(p, self.length - 1) for p in self.window.positions]
        if self.length - 1 in positions and self.length - 1 not in self.kept:
            ordinal, pts, frame = self.last
            self.kept[self.length - 1] = (pts, convert(ordinal, frame))
        self.last = None
        return Segment(self.length, positions, [self.kept[p][0] for p in positions],
                       [self.kept[p][1] for p in positions])


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Read the header of ``path``; a file that is not a readable video raises ``VideoError``."""
    with _open(path) as container:
        return _info(path, container)


@dataclass
class Decoded:
    """What one decoding pass found: per window its segment (None where no frame fell in it), and the
    times (seconds) of the frames the decoder flagged as corrupt (damaged data it concealed)."""

    segments: list[Segment | None]
    corrupt: list[float]


def read_segments(
    path: str | os.PathLike[str], windows: Sequence[Window], convert: Callable[[av.VideoFrame], Tensor], *,
    threads: int = 0,
) -> Decoded:
    """Decode ``path`` once and return each window's segment, and where the decoder met damaged data.

    Windows are visited in order of start; a gap of more than two seconds to the next one is crossed by
    seeking to the key frame before it, so a long video is decoded only around its clips. ``threads``:
    decoder threads (0: as many as FFmpeg likes; 1 where several decoders share the cores). Every frame
    decoded must have the size of the first: a video whose size changes is refused, not cut at crop
    offsets computed for another size.
    """
    order = sorted(range(len(windows)), key=lambda i: windows[i].start)
    collectors = [_Collector(w, frozenset(w.positions)) for w in windows]
    segments: list[Segment | None] = [None] * len(windows)
    recent: dict[int, Tensor] = {}  # the last frames converted, shared by overlapping windows

    def convert_once(ordinal: int, frame: av.VideoFrame) -> Tensor:
        if ordinal not in recent:
            if len(recent) > 4:
                recent.clear()
            recent[ordinal] = convert(frame)
        return recent[ordinal]

    corrupt: list[float] = []
    size: tuple[int, int] | None = None
    with _open(path) as container:
        time_base = _info(path, container).time_base
        stream = container.streams.video[0]
        _threads(stream, threads)
        frames = _decode(path, container, stream)
        pending, active = list(order), []
        ordinal, position, seekable, seeked, sought = 0, None, bool(time_base), False, None
        while pending or active:
            if not active and seekable and position is not None and sought != pending[0]:
                target = windows[pending[0]].start
                if (target - position) * time_base > _SEEK_GAP_S:
                    # Once per window: the key frame it lands on may itself be far before the window.
                    container.seek(int(target), backward=True, any_frame=False, stream=stream)
                    frames, seeked, sought = _decode(path, container, stream), True, pending[0]
            frame = next(frames, None)
            if frame is None:
                break
            if frame.pts is None:
                raise VideoError(f"{path}: frames without timestamps")
            size = size or (frame.width, frame.height)  # the first frame's, not the header's: they can differ
            if (frame.width, frame.height) != size:
                raise VideoError(f"{path}: the frame size changes within the video (from {size[0]}x{size[1]} "
                                 f"to {frame.width}x{frame.height} at {_seconds(frame.pts, time_base)})")
            if frame.is_corrupt:
                corrupt.append(float(frame.pts * time_base) if time_base else float(ordinal))
            if seeked and frame.pts > windows[pending[0]].start:
                # The seek landed past the window: read on from the start instead, and seek no more.
                container.seek(0, backward=True, any_frame=False, stream=stream)
                frames, seekable, seeked, position = _decode(path, container, stream), False, False, None
                continue
            seeked, position = False, frame.pts
            while pending and windows[pending[0]].start <= frame.pts:
                active.append(pending.pop(0))
            for i in active:
                collectors[i].feed(ordinal, frame.pts, frame, convert_once)
            for i in [i for i in active if collectors[i].done]:
                active.remove(i)
                segments[i] = collectors[i].finish(convert_once)
            ordinal += 1
        for i in active:  # windows still open at the end of the stream
            segments[i] = collectors[i].finish(convert_once)
    return Decoded(segments, sorted(set(corrupt)))


def on_sigint(signum: int, frame: object) -> None:
    """SIGINT handler (``x3dnet`` installs it): remember the interrupt, then raise KeyboardInterrupt as Python
    does. PyAV runs pending signal handlers inside FFmpeg's interrupt callback, where the exception can be
    lost or turned into a decoding error; ``check_interrupt`` and ``_decode`` raise it again from the flag."""
    _INTERRUPTED.set()
    signal.default_int_handler(signum, frame)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came while FFmpeg was running (see ``on_sigint``)."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class FrameSource:
    """Every frame of a video file or a live source (``rtsp://``, ``http://``, ... as FFmpeg opens them),
    decoded one at a time, in order: iterate for ``(ordinal, seconds, frame)``. ``timeout``: seconds a live
    source may stay silent (opening, then between packets) before it counts as broken, not a hang."""

    def __init__(self, source: str | os.PathLike[str], *, threads: int = 0, timeout: float = 10.0) -> None:
        self.source = str(source)
        if URL.match(self.source) and not self.source.startswith("file:"):
            try:
                self.container = av.open(self.source, timeout=timeout, metadata_errors="ignore")
            except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
                raise VideoError(f"{self.source}: cannot be opened ({_reason(e)})") from None
            if not self.container.streams.video:
                self.container.close()
                raise VideoError(f"{self.source}: has no video stream")
        else:
            self.container = _open(source).container
        try:
            self.info = _info(self.source, self.container)
        except VideoError:
            self.container.close()
            raise
        if self.info.still:
            self.container.close()
            raise VideoError(f"{self.source}: a still image (or a video of one frame), not a video")
        self.stream = self.container.streams.video[0]
        _threads(self.stream, threads)

    def __iter__(self) -> Iterator[tuple[int, float, av.VideoFrame]]:
        size, base, start = None, self.info.time_base, self.info.start
        for ordinal, frame in enumerate(_decode(self.source, self.container, self.stream)):
            size = size or (frame.width, frame.height)
            if (frame.width, frame.height) != size:
                raise VideoError(f"{self.source}: the frame size changes within the video (from {size[0]}x"
                                 f"{size[1]} to {frame.width}x{frame.height} at frame {ordinal})")
            seconds = float((frame.pts - start) * base) if frame.pts is not None and base else ordinal / self.info.fps
            yield ordinal, seconds, frame

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> FrameSource:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_frames(path: str | os.PathLike[str], *, threads: int = 0) -> int:
    """Decode the whole video and count its frames (for files whose header has no usable count)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        _threads(stream, threads)
        return sum(1 for _ in _decode(path, container, stream))


def _seconds(pts: int, time_base: Fraction) -> str:
    return f"{float(pts * time_base):.2f} s" if time_base else f"pts {pts}"


def _threads(stream: av.video.stream.VideoStream, threads: int) -> None:
    if threads != 1:
        stream.thread_type = "AUTO"
        stream.thread_count = threads


class _open:
    """``av.open`` with every way it fails turned into a one-line ``VideoError``."""

    def __init__(self, path: str | os.PathLike[str]):
        p = input_file(path, "video")  # a FIFO would block the demuxer forever
        try:
            # "file:" and an absolute path: FFmpeg would read "file:x.mp4" or "rtmp:x.mp4" as a protocol
            # and a name, and open another file or none; a local path is always a file.
            self.container = av.open("file:" + os.path.abspath(p), metadata_errors="ignore")
        except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
            raise VideoError(f"{path}: not a readable video ({_reason(e)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path}: has no video stream")

    def __enter__(self) -> av.container.InputContainer:
        return self.container

    def __exit__(self, *exc: object) -> None:
        self.container.close()


def _info(path: str | os.PathLike[str], container: av.container.InputContainer) -> VideoInfo:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if ctx is None:
        raise VideoError(f"{path}: no decoder for its video codec in this FFmpeg build")
    if not ctx.width or not ctx.height:
        raise VideoError(f"{path}: the video stream has no frame size")
    if not rate:
        raise VideoError(f"{path}: the video stream has no frame rate")
    # An image demuxer (png_pipe, jpeg_pipe, image2, ...) holds pictures, not a video.
    image = container.format.name == "image2" or container.format.name.endswith("_pipe")
    return VideoInfo(
        path=str(path), width=ctx.width, height=ctx.height, fps=float(rate), frames=stream.frames or 0,
        duration=stream.duration, time_base=stream.time_base or Fraction(0), codec=ctx.name,
        start=stream.start_time or 0, still=image or stream.frames == 1,
    )


def _decode(path: str | os.PathLike[str], container: av.container.InputContainer, stream: av.VideoStream):
    # Demux and decode by hand: a frame-threaded decoder drops the errors of a truncated packet silently,
    # but the demuxer marks such a packet as corrupt.
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                where = f" at {float(packet.pts * stream.time_base):.2f}s" if packet.pts is not None else ""
                raise VideoError(f"{path}: cannot be decoded (truncated or corrupt data{where})")
            yield from packet.decode()
    except av.ExitError:
        # FFmpeg stopped because a signal came (PyAV's interrupt callback): Ctrl-C, not a broken video.
        raise KeyboardInterrupt from None
    except av.FFmpegError as e:
        check_interrupt()
        raise VideoError(f"{path}: cannot be decoded ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0].rstrip(".")
