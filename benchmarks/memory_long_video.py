"""Peak memory of building 30 views from a long high-resolution video.

    python benchmarks/memory_long_video.py [--minutes 10] [--video PATH]

Writes (or reads) a 1920x1080 30 fps H.264 video, then in a fresh process builds X3D-M's 30 views
(10 clips x 3 crops, short side 256) and reports the peak resident memory above the process's baseline,
the frames decoded out of the total, and the time. Decoding the whole video as RGB would need
frames x 1920 x 1080 x 3 bytes.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np


def write_video(path: Path, minutes: float) -> Path:
    width, height, fps = 1920, 1080, 30
    base = np.zeros((height, width, 3), np.uint8)
    base[:, :, 0] = np.arange(width) % 256
    base[:, :, 1] = (np.arange(height) % 256)[:, None]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(int(minutes * 60 * fps)):
            image = base.copy()
            y, x = (7 * i) % (height - 64), (11 * i) % (width - 64)
            image[y:y + 64, x:x + 64] = 255  # a moving square: every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def measure(path: str) -> None:
    import torch

    from x3dnet import RECIPES
    from x3dnet import video as video_module
    from x3dnet.views import make_views, view_recipe

    decoded = 0
    real = video_module._decode

    def counting(*args):
        nonlocal decoded
        for frame in real(*args):
            decoded += 1
            yield frame

    video_module._decode = counting
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    views = make_views(path, view_recipe(RECIPES["x3d_m"], 30))
    batch = next(views.batches(8))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = views.video
    clips_mb = sum(c.numel() * c.element_size() for c in views.clips) / 2**20
    print(f"{path}: {info.width}x{info.height}, {info.frames} frames, {info.seconds:.0f} s")
    print(f"30 views of x3d_m: {seconds:.1f} s, decoded {decoded} of {info.frames} frames; "
          f"clips held {clips_mb:.0f} MiB, "
          f"one batch {tuple(batch.shape)} {batch.numel() * 4 / 2**20:.0f} MiB; peak RSS {peak:.0f} MiB, "
          f"{peak - baseline:.0f} MiB above the baseline after imports (torch {torch.__version__})")
    print(f"all frames as RGB would be {info.frames * info.width * info.height * 3 / 2**30:.0f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--video", help="an existing video instead of writing one")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    path = Path(args.video) if args.video else write_video(Path("long_1080p.mp4").resolve(), args.minutes)
    subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True)


if __name__ == "__main__":
    main()
