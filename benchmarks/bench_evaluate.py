"""``x3dnet evaluate`` throughput against the model alone, 30-view X3D-XS and X3D-M (random weights).

    python benchmarks/bench_evaluate.py [--videos 8] [--workers 2] [--backend auto]

Writes a synthetic Kinetics-like dataset (``x3dnet.synthetic``: 10 s, 340x256, 30 fps H.264 with film
grain, about 1.5 Mbit/s) labelled with Kinetics-400 classes, then per model, in one run: the model alone
on the views of those videos (the same engine and batch size, views already decoded and cut; timed once
before and once after the evaluation, both counted), and the whole evaluation (decoding and views in DataLoader
workers, batching, logging). Prints videos per second of both and their ratio; the target is at least
0.80 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from x3dnet import RECIPES, create_model, save_checkpoint
from x3dnet.backends import create_engine
from x3dnet.evaluate import evaluate
from x3dnet.predict import kinetics400_classes
from x3dnet.profile import cpu_name
from x3dnet.synthetic import make_dataset
from x3dnet.views import make_views, view_recipe


def model_only(engine, views: list, batch_size: int) -> float:
    """Seconds the engine alone takes over every video's views (cut into batches beforehand, untimed)."""
    total = 0.0
    for video in views:
        batches = list(video.batches(batch_size))
        start = time.perf_counter()
        for batch in batches:
            engine(batch).float().softmax(1)
        total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=6, help="videos per model (default 6)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--models", nargs="+", default=["x3d_xs", "x3d_m"])
    args = parser.parse_args()
    classes = kinetics400_classes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", classes=classes, used=range(0, 400, 400 // args.videos)[:args.videos],
                            videos_per_class=1, seconds=10, size=(340, 256), grain=3)
        first = data.videos / data.slowfast.read_text().split()[0]
        print(f"{args.videos} videos, 10 s 340x256 30 fps H.264, {os.path.getsize(first) * 8 / 10e6:.2f} Mbit/s; "
              f"{os.cpu_count()} cores, {args.workers} workers, batch {args.batch_size}, torch {torch.__version__}")
        print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads")
        print(f"{'model':8} {'engine':18} {'model only':>12} {'evaluate':>12} {'ratio':>6}")
        for name in args.models:
            weights = save_checkpoint(create_model(name).eval(), tmp / f"{name}.safetensors", recipe=RECIPES[name])
            recipe = view_recipe(RECIPES[name], 30)
            net = create_model(name, weights=weights).eval()
            engine = create_engine(net, backend=args.backend, input_shape=(recipe.frames, recipe.crop, recipe.crop))
            views = [make_views(data.videos / v, recipe) for v in data.slowfast.read_text().split()[::2]]
            engine(next(views[0].batches(args.batch_size)))  # warm-up
            before = model_only(engine, views, args.batch_size)
            metrics = evaluate(data.slowfast, weights=weights, views=30, batch_size=args.batch_size,
                               workers=args.workers, backend=args.backend, out=tmp / f"run-{name}", progress=False,
                               log=lambda line: None)
            alone = 2 * len(views) / (before + model_only(engine, views, args.batch_size))
            rate = metrics["videos_per_s"]
            print(f"{name:8} {engine.describe():18} {alone:9.3f} v/s {rate:9.3f} v/s {rate / alone:6.2f}", flush=True)
        print("target: evaluate / model only >= 0.80")


if __name__ == "__main__":
    main()
