"""A small labelled video dataset written with PyAV, for trying ``x3dnet evaluate`` without Kinetics.

Each class is a motion pattern of a bright square on a textured background: moving sideways, up or down
(straight or diagonally), blinking, still, growing, shrinking or changing colour; videos of one class differ
in position, speed, direction (left or right), colour and texture. No class is the mirror image of another,
so a training recipe that flips clips horizontally (the original's does) keeps every label true: with
"moving east" and "moving west" as classes, half of the flipped clips would be labelled wrongly. The
same clips are listed three ways: the original's ``path label`` list, an official-style Kinetics CSV, and
the folder tree itself (one folder per class), so every list format can be evaluated on the same data.
"""

from __future__ import annotations

import colorsys
import math
import os
import random
import shutil
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .errors import ConfigError

PATTERNS = ("moving sideways", "moving up diagonally", "moving up", "moving down diagonally", "moving down",
            "blinking", "still", "growing", "shrinking", "changing colour")
# The direction of each moving pattern in degrees (0 is right, 90 up); its mirror image is as likely.
DIRECTIONS = {"moving sideways": 0, "moving up diagonally": 45, "moving up": 90, "moving down diagonally": -45,
              "moving down": -90}


@dataclass(frozen=True)
class SyntheticDataset:
    root: Path
    classes: Path  # class names, one per line, in index order
    slowfast: Path  # "<class>/<clip>.mp4 <index>" lines, relative to root
    kinetics_csv: Path  # label,youtube_id,time_start,time_end,split
    videos: Path  # the folder tree: videos/<class>/<clip>.mp4 (the lists' paths are relative to it)
    labels: tuple[int, ...]  # per clip, in list order


def make_dataset(
    root: str | os.PathLike[str],
    *,
    classes: Sequence[str] = PATTERNS,
    used: Sequence[int] | None = None,
    videos_per_class: int = 2,
    seconds: float = 2.0,
    fps: int = 30,
    size: tuple[int, int] = (128, 96),
    grain: float = 0.0,
    seed: int = 0,
    force: bool = False,
) -> SyntheticDataset:
    """Write ``videos_per_class`` clips for each class index in ``used`` (default: all of ``classes``).

    ``classes`` is the full class list in index order (for example the 400 Kinetics names); class index
    ``i`` gets motion pattern ``i % 10``. Listing only some of them in ``used`` makes a dataset where
    labels must map through the class list, not through the classes present. ``size`` is (width, height);
    ``grain`` adds fresh noise of that standard deviation to every frame, which brings the bitrate (and the
    cost of decoding) up to that of camera footage. A folder that holds files already is refused unless
    ``force``: then its ``videos`` folder (an earlier dataset) is replaced.
    """
    root = Path(root)
    videos = root / "videos"
    _check(root, seconds=seconds, fps=fps, size=size, videos_per_class=videos_per_class, force=force)
    if force and videos.is_dir():
        shutil.rmtree(videos)  # the videos of an earlier run would join this one's folder format
    rng = random.Random(seed)
    used = list(range(len(classes))) if used is None else list(used)
    lines, rows, labels = [], [], []
    for label in used:
        folder = classes[label].replace(" ", "_")
        (videos / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(videos_per_class):
            youtube_id = "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(11))
            start = rng.randrange(0, 300)
            end = start + max(1, math.ceil(seconds))
            clip = f"{folder}/{youtube_id}_{start:06d}_{end:06d}.mp4"
            _write_clip(videos / clip, label % len(PATTERNS), seconds=seconds, fps=fps, size=size, grain=grain,
                        rng=np.random.default_rng(rng.randrange(2**32)))
            lines.append(f"{clip} {label}")
            quoted = f'"{classes[label]}"' if " " in classes[label] else classes[label]
            rows.append(f"{quoted},{youtube_id},{start},{end},val")
            labels.append(label)
    paths = SyntheticDataset(root, root / "classes.txt", videos / "slowfast.txt", root / "kinetics_val.csv",
                             videos, tuple(labels))
    paths.classes.write_text("\n".join(classes) + "\n")
    paths.slowfast.write_text("\n".join(lines) + "\n")
    paths.kinetics_csv.write_text("label,youtube_id,time_start,time_end,split\n" + "\n".join(rows) + "\n")
    return paths


def _check(root: Path, *, seconds: float, fps: int, size: tuple[int, int], videos_per_class: int,
           force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ConfigError(f"{root}: is not empty (an earlier dataset's videos would be listed with the new ones); "
                          "choose an empty folder, or add --force to replace the videos there")
    if not (math.isfinite(seconds) and 0 < seconds <= 3600):
        raise ConfigError(f"seconds: must be a number above 0 up to 3600, not {seconds}")
    if not 1 <= fps <= 240:
        raise ConfigError(f"fps: must be from 1 to 240, not {fps}")
    if round(seconds * fps) < 1:
        raise ConfigError(f"{seconds} s at {fps} fps is less than one frame")
    if not 1 <= videos_per_class <= 10_000:
        raise ConfigError(f"videos per class: must be from 1 to 10000, not {videos_per_class}")
    width, height = size
    # H.264 in 4:2:0 needs even sizes; below 16 pixels the pattern (a square a quarter of the side) vanishes.
    if not all(16 <= v <= 4096 and v % 2 == 0 for v in size):
        raise ConfigError(f"size: width and height must be even numbers from 16 to 4096, not {width}x{height}")


def _write_clip(path: Path, pattern: int, *, seconds: float, fps: int, size: tuple[int, int], grain: float,
                rng: np.random.Generator) -> None:
    width, height = size
    short = min(width, height)
    side = max(4, short // 4)
    name = PATTERNS[pattern]
    background = rng.integers(0, 96, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    background = background.repeat(8, 0).repeat(8, 1)[:height, :width]  # (H, W, 3): coarse texture
    colour = rng.integers(160, 256, 3, dtype=np.uint8)
    # Near the middle: training crops (random, 60-90% of the short side) and centre test crops keep it in view.
    cx, cy = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height  # the square's centre at t = 0
    # An eighth to a quarter of the short side per second: between the frames of an X3D-XS clip (12 apart)
    # the square moves a fifth to two fifths of its side, so its frames overlap and the direction shows in
    # a 3x3x3 neighbourhood, and a 4-frame clip stays inside the crop.
    speed = rng.uniform(1 / 8, 1 / 4) * short / fps  # pixels per frame
    angle = math.radians(DIRECTIONS.get(name, 0))
    if rng.random() < 0.5:
        angle = math.pi - angle  # the mirror image: left instead of right
    growth = rng.uniform(0.25, 0.5) * side / fps  # growing or shrinking: side change per frame
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for t in range(int(round(seconds * fps))):
            image = background.copy()
            x, y, s, shown = cx, cy, side, True
            if name in DIRECTIONS:  # leaving on one side, coming back on the other: never reversing
                x = _wrap(cx + speed * t * math.cos(angle), width, side)
                y = _wrap(cy - speed * t * math.sin(angle), height, side)
            elif name in ("growing", "shrinking"):  # from half to one and a half sides (or back), then again
                span = side  # what the side changes by over one cycle
                change = (growth * t) % span
                s = side / 2 + (change if name == "growing" else span - change)
            elif name == "blinking":
                shown = (t // 5) % 2 == 0
            if name == "changing colour":  # around the hue circle once every two seconds
                paint = _hue_turned(colour, t / (2 * fps))
            else:
                paint = colour
            if shown:
                half = s / 2
                top, left = int(round(y - half)), int(round(x - half))
                bottom, right = int(round(y + half)), int(round(x + half))
                image[max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = paint
            if grain:
                image = np.clip(image + rng.normal(0, grain, image.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _hue_turned(colour: np.ndarray, turns: float) -> np.ndarray:
    """``colour`` with its hue turned by ``turns`` of the circle, keeping its brightness and saturation."""
    r, g, b = (float(v) / 255 for v in colour)
    h, lightness, saturation = colorsys.rgb_to_hls(r, g, b)
    return np.array([round(v * 255) for v in colorsys.hls_to_rgb((h + turns) % 1.0, lightness, max(saturation, 0.8))],
                    dtype=np.uint8)


def _wrap(centre: float, size: int, side: int) -> float:
    """The square's centre at ``centre`` on a loop of ``size + side``: it slides out of one border and back
    in from the opposite one."""
    return (centre + side / 2) % (size + side) - side / 2
