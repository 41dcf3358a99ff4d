"""30-view predict time, split into decode + views and model, for X3D-XS and X3D-M (random weights).

    python benchmarks/bench_predict.py [--repeats 3]

Writes a 10 s 340x256 30 fps H.264 video with moving content, then per model, interleaved over repeats:
decode + views (``make_views`` and cutting every normalised view), model only (the same batches through
the network), and end to end (``predict_video``). Prints medians and the ratio end-to-end / model-only;
the target is at most 1.15 for X3D-M (decoding and views add at most 15%).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from x3dnet import RECIPES, create_model
from x3dnet.predict import predict_video
from x3dnet.profile import cpu_name
from x3dnet.views import make_views, view_recipe


def write_video(path: Path, seconds: int = 10, fps: int = 30, width: int = 340, height: int = 256) -> Path:
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height * 2, width * 2, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            y, x = (3 * i) % height, (5 * i) % width  # a panning texture: every frame differs
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[y:y + height, x:x + width]), "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "bench.mp4")
        print(f"video: 10 s 340x256 30 fps H.264; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"CPU: {cpu_name()}")
        for name in ("x3d_xs", "x3d_m"):
            model = create_model(name).eval()
            recipe = view_recipe(RECIPES[name], 30)
            times: dict[str, list[float]] = {"views": [], "model": [], "end_to_end": []}
            with torch.inference_mode():
                predict_video(model, video, recipe, batch_size=args.batch_size)  # warm-up
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    views = make_views(video, recipe)
                    batches = list(views.batches(args.batch_size))
                    t1 = time.perf_counter()
                    for batch in batches:
                        model(batch).softmax(1)
                    t2 = time.perf_counter()
                    predict_video(model, video, recipe, batch_size=args.batch_size)
                    t3 = time.perf_counter()
                    times["views"].append(t1 - t0)
                    times["model"].append(t2 - t1)
                    times["end_to_end"].append(t3 - t2)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{name}: 30 views ({recipe.describe()}): decode+views {med['views']:.3f} s, "
                f"model {med['model']:.3f} s, end to end {med['end_to_end']:.3f} s; "
                f"views/model {med['views'] / med['model']:.3f}, "
                f"end-to-end/model {med['end_to_end'] / med['model']:.3f}"
            )


if __name__ == "__main__":
    main()
