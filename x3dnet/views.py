"""Views of a video: N clips (temporal windows) x C crops (spatial windows), normalised, (V, 3, T, S, S).

Two protocols, both written from the spec (section 4):

* ``slowfast`` (the original's test loader): clip i of N starts at ``max(V - L, 0) * i / N`` source frames,
  L = T * tau * fps / 30; each clip is decoded on its own pts window and its frames are picked by
  ``linspace`` inside that window; the short side is resized to the test scale; 3 crops run along the
  longer side at offsets 0, ``ceil((long - S) / 2)``, ``long - S``; one crop is centred with ``ceil``.
* ``co3d`` (the co3d port, which published 1/10/30-clip tables): clips centred on N equal segments, short
  side and crop both at the training crop, centre offsets with Python ``round``, three crops always
  left/centre/right (never switched for portrait videos), bilinear resizing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import VideoError
from .recipe import Recipe
from .video import RESIZE_MODES, FrameFormat, Segment, VideoInfo, Window, count_frames, probe, read_segments

PLACEMENTS = ("slowfast", "co3d")
VIEW_PRESETS = (1, 10, 30)
_STILL = ("{}: a still image (or a video of one frame), not a video; predict --stills takes it as a clip of that "
          "frame repeated")


@dataclass(frozen=True)
class ViewRecipe:
    """Everything that decides which pixels of a video reach the model."""

    frames: int  # T
    stride: int  # tau, in frames at target_fps
    short_side: int  # the short side is resized to this
    crop: int  # square crops of this size
    clips: int  # N temporal windows
    crops: int  # C spatial windows per clip: 1 (centre) or 3 (along the long side)
    placement: str = "slowfast"
    resize: str = "area"
    target_fps: float = 30
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        if self.crops not in (1, 3) or self.clips < 1 or not 0 < self.crop <= self.short_side:
            raise ValueError(f"impossible views: {self.clips} clips x {self.crops} crops of {self.crop} "
                             f"from short side {self.short_side}")

    @property
    def views(self) -> int:
        return self.clips * self.crops

    def span(self, fps: float) -> float:
        """L: the source frames one clip covers (at least one, as the original's later code clamps)."""
        return max(1.0, self.frames * self.stride / self.target_fps * fps)

    def describe(self) -> str:
        return (f"{self.clips}x{self.crops} views ({self.placement}), {self.frames}x{self.stride} clips, "
                f"short side {self.short_side} ({self.resize}), crop {self.crop}")


def view_recipe(
    recipe: Recipe, views: int = 30, *, placement: str = "slowfast", resize: str | None = None
) -> ViewRecipe:
    """The preset for 1, 10 or 30 views of a weights record's recipe.

    ``slowfast``: 30 = 10 clips x 3 crops at the 3-crop test size; 10 = 10 clips x 1 centre crop at the
    training crop from the 1-crop short side; 1 = the first of those clips. ``co3d``: the same clip and crop
    counts with short side and crop at the training crop. ``resize`` defaults to each protocol's decoder:
    ``area`` for slowfast, ``bilinear`` for co3d.
    """
    if views not in VIEW_PRESETS:
        raise ValueError(f"views must be one of {', '.join(map(str, VIEW_PRESETS))}, not {views}")
    clips, crops = {1: (1, 1), 10: (10, 1), 30: (10, 3)}[views]
    if placement == "co3d":
        short_side = crop = recipe.train_crop
    elif crops == 3:
        short_side = crop = recipe.test_crop
    else:
        short_side, crop = recipe.test_short_side, recipe.train_crop
    return ViewRecipe(
        frames=recipe.frames, stride=recipe.stride, short_side=short_side, crop=crop, clips=clips, crops=crops,
        placement=placement, resize=resize or ("bilinear" if placement == "co3d" else "area"),
        target_fps=recipe.target_fps, mean=recipe.mean, std=recipe.std,
    )


def clip_starts(length: float, span: float, clips: int, placement: str) -> list[float]:
    """First source frame (fractional) of each clip, for a video of ``length`` frames."""
    if placement == "co3d":
        segment = length / clips
        return [max(0.0, i * segment + segment / 2 - span / 2) for i in range(clips)]
    delta = max(length - span, 0)
    return [delta * i / clips for i in range(clips)]  # not i / (N - 1): the last clip stops short of the end


def frame_positions(start: float, end: float, frames: int) -> tuple[int, ...]:
    """``linspace(start, end, T)`` truncated, in float32 like the original, before clamping to the video."""
    return tuple(int(v) for v in torch.linspace(start, end, frames).tolist())


def crop_offsets(height: int, width: int, size: int, crops: int, placement: str) -> list[tuple[int, int]]:
    """(y, x) of each crop's top-left corner."""
    if placement == "co3d":
        def centre(dim: int) -> int:
            return 0 if size >= dim else int(round((dim - size) / 2.0))
        y, x = centre(height), centre(width)
        if crops == 1:
            return [(y, x)]
        return [(y, 0), (y, x), (y, max(width - size, 0))]  # always horizontal, even for portrait video
    y, x = math.ceil((height - size) / 2), math.ceil((width - size) / 2)
    if crops == 1:
        return [(y, x)]
    if height > width:
        return [(0, x), (y, x), (height - size, x)]
    return [(y, 0), (y, x), (y, width - size)]


@dataclass
class Views:
    """The decoded clips of one video and the crops to take from them; views are cut on demand.

    Clips are stored once (uint8 (T, H, W, 3) after area resizing, normalised float (3, T, H, W) after
    bilinear), so 30 views cost the memory of 10 clips plus one batch.
    """

    video: VideoInfo
    recipe: ViewRecipe
    clips: list[Tensor]
    size: tuple[int, int]  # (H, W) of the resized frames
    offsets: list[tuple[int, int]]
    pts: list[list[int]]  # per clip, the pts of its T frames
    decoded: list[str]  # per clip: "window" (selective, as the original) or "whole" (header unusable)
    corrupt: list[float] = dataclasses.field(default_factory=list)  # seconds of frames the decoder flagged

    def __len__(self) -> int:
        return len(self.clips) * len(self.offsets)

    def view(self, index: int) -> Tensor:
        """View ``index`` (clip ``index // crops``, crop ``index % crops``) as normalised float (3, T, S, S)."""
        return self.stack(range(index, index + 1))[0]

    def stack(self, indices: Sequence[int], *, out: Tensor | None = None) -> Tensor:
        """Views ``indices`` as one normalised float batch (B, 3, T, S, S), written into ``out`` if given."""
        s, crops = self.recipe.crop, len(self.offsets)
        first = self.clips[0]
        channels_last = first.dtype == torch.uint8
        frames = first.shape[0] if channels_last else first.shape[1]
        if out is None:
            out = torch.empty(len(indices), 3, frames, s, s)
        for b, i in enumerate(indices):
            clip = self.clips[i // crops]
            y, x = self.offsets[i % crops]
            if channels_last:  # (T, H, W, 3) uint8 -> crop -> (3, T, S, S) float, in one copy
                out[b].copy_(clip[:, y:y + s, x:x + s].permute(3, 0, 1, 2))
            else:  # already normalised float (3, T, H, W)
                out[b].copy_(clip[:, :, y:y + s, x:x + s])
        if channels_last:
            # In place, in the original's order of operations: x / 255, then (x - mean) / std.
            out.div_(255.0)
            mean, std = self.recipe.mean, self.recipe.std
            if len(set(mean)) == 1 and len(set(std)) == 1:
                out.sub_(mean[0]).div_(std[0])
            else:
                for c in range(3):
                    out[:, c].sub_(mean[c]).div_(std[c])
        return out

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Consecutive views stacked to (B, 3, T, S, S)."""
        for first in range(0, len(self), batch_size):
            yield self.stack(range(first, min(first + batch_size, len(self))))

    def tensor(self) -> Tensor:
        """All views, (V, 3, T, S, S)."""
        return self.stack(range(len(self)))


def make_views(path: str | os.PathLike[str], recipe: ViewRecipe, *, threads: int = 0, stills: bool = False) -> Views:
    """Decode ``path`` once and build its ``recipe.views`` views.

    Clips are placed from the stream header and read on their own pts windows, as the original does. A clip
    whose window holds no frame (or every clip, when the header gives no duration or frame count) is
    placed instead on the frames of the whole video, counted by decoding it: the original's fallback.
    Windows count from the stream's start time (the original counts from pts 0, which moves every clip of
    a stream that starts later). ``threads``: decoder threads (0: FFmpeg's choice). A still image, or a
    video of one frame, is refused unless ``stills``: then its clips repeat that frame.
    """
    info = probe(path)
    if info.still and not stills:
        raise VideoError(_STILL.format(path))
    fmt = FrameFormat(recipe.short_side, recipe.resize, recipe.mean, recipe.std)
    span = recipe.span(info.fps)
    segments: list[Segment | None] = [None] * recipe.clips
    decoded = ["whole"] * recipe.clips
    corrupt: set[float] = set()
    if info.selective:
        local = frame_positions(0, span - 1, recipe.frames)
        p = info.pts_per_frame
        windows = [Window(info.start + int(s * p), info.start + int((s + span - 1) * p), local)
                   for s in clip_starts(info.frames, span, recipe.clips, recipe.placement)]
        found = read_segments(path, windows, fmt, threads=threads)
        segments, decoded = found.segments, ["window" if s is not None else "whole" for s in found.segments]
        corrupt.update(found.corrupt)
    missing = [i for i, s in enumerate(segments) if s is None]
    if missing:
        n = count_frames(path, threads=threads)
        if n == 0:
            raise VideoError(f"{path}: has no frames")
        if n == 1 and not stills:
            raise VideoError(_STILL.format(path))
        starts = clip_starts(n, span, recipe.clips, recipe.placement)
        windows = [Window(-math.inf, math.inf, frame_positions(starts[i], starts[i] + span - 1, recipe.frames),
                          one_past=False) for i in missing]
        found = read_segments(path, windows, fmt, threads=threads)
        for i, segment in zip(missing, found.segments, strict=True):
            segments[i] = segment
        corrupt.update(found.corrupt)
    sizes = {tuple(f.shape) for s in segments for f in s.frames}
    if len(sizes) > 1:  # each pass checks its own frames; this compares the two passes (and mid-video rotations)
        raise VideoError(f"{path}: the frame size changes within the video")
    h, w = segments[0].frames[0].shape[:2] if recipe.resize == "area" else segments[0].frames[0].shape[1:]
    clips = [torch.stack(s.frames, dim=0 if recipe.resize == "area" else 1) for s in segments]
    return Views(
        video=info, recipe=recipe, clips=clips, size=(h, w),
        offsets=crop_offsets(h, w, recipe.crop, recipe.crops, recipe.placement),
        pts=[s.pts for s in segments], decoded=decoded, corrupt=sorted(corrupt),
    )


@dataclass(frozen=True)
class TrainClip:
    """How the original samples a training clip (``Kinetics.__getitem__``, train split), spec "Training clips"."""

    frames: int  # T
    stride: int  # tau, in frames at target_fps
    crop: int  # the training crop
    jitter: tuple[int, int]  # the short side is resized to a size drawn uniformly in this range (inclusive)
    flip: bool = True  # horizontal flip with probability 0.5
    target_fps: float = 30
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)

    def __post_init__(self) -> None:
        low, high = self.jitter
        if not 0 < self.crop <= low <= high:
            raise ValueError(f"impossible training clips: crop {self.crop} from short sides {low} to {high}")

    def span(self, fps: float) -> float:
        return max(1.0, self.frames * self.stride / self.target_fps * fps)


def train_clip(path: str | os.PathLike[str], recipe: TrainClip, rng: np.random.Generator, *,
               threads: int = 0) -> tuple[Tensor, list[float]]:
    """One random training clip of ``path``, normalised float (3, T, crop, crop), and the seconds of any
    frames the decoder flagged as corrupt.

    In the original's order: a window of T x tau frames (at 30 fps) starting uniformly at random in the
    video, its frames picked by ``linspace``; normalised, then the short side resized (bilinear) to a size
    drawn from ``recipe.jitter``; a random ``crop`` x ``crop`` window; a horizontal flip with p 0.5. Every
    draw comes from ``rng``, in a fixed order whatever the video, so a clip is a function of the
    generator's seed alone.
    """
    where, size = rng.uniform(), round(rng.uniform(*recipe.jitter))
    corner, flip = rng.uniform(size=2), rng.uniform() < 0.5
    info = probe(path)
    if info.still:
        raise VideoError(f"{path}: a still image (or a video of one frame), not a video")
    fmt = FrameFormat(size, "bilinear", recipe.mean, recipe.std)
    span = recipe.span(info.fps)
    local = frame_positions(0, span - 1, recipe.frames)
    segment, corrupt = None, []
    if info.selective:
        start = where * max(info.frames - span, 0)
        p = info.pts_per_frame
        window = Window(info.start + int(start * p), info.start + int((start + span - 1) * p), local)
        found = read_segments(path, [window], fmt, threads=threads)
        segment, corrupt = found.segments[0], found.corrupt
    if segment is None:  # no usable header, or an empty window: place the clip on the counted frames
        n = count_frames(path, threads=threads)
        if n < 2:
            raise VideoError(f"{path}: has {'no frames' if n == 0 else 'one frame'}")
        start = where * max(n - span, 0)
        window = Window(-math.inf, math.inf, frame_positions(start, start + span - 1, recipe.frames), one_past=False)
        found = read_segments(path, [window], fmt, threads=threads)
        segment, corrupt = found.segments[0], found.corrupt
    if len({tuple(f.shape) for f in segment.frames}) > 1:
        raise VideoError(f"{path}: the frame size changes within the video")
    clip = torch.stack(segment.frames, dim=1)  # T x (3, H, W) -> (3, T, H, W), normalised
    h, w = clip.shape[-2:]
    # The original's random_crop: offsets drawn from [0, side - crop), so the last one is never taken.
    y = int(corner[0] * (h - recipe.crop)) if h > recipe.crop else 0
    x = int(corner[1] * (w - recipe.crop)) if w > recipe.crop else 0
    clip = clip[:, :, y:y + recipe.crop, x:x + recipe.crop]
    if recipe.flip and flip:
        clip = clip.flip(-1)
    return clip.contiguous(), sorted(corrupt)
