"""Prediction for a few videos: views through the model in batches, mean of the per-view probabilities."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .backends import Engine, check_device, create_engine
from .errors import ConfigError, X3DNetError
from .factory import load_model
from .model import X3D
from .views import ViewRecipe, Views, make_views, view_recipe


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics class names in checkpoint index order (alphabetical)."""
    return resources.files("x3dnet").joinpath("data/kinetics400_classes.txt").read_text().splitlines()


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names, one per line, in index order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read labels ({getattr(e, 'strerror', None) or e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


@dataclass
class Prediction:
    video: str
    model: str
    views: int
    scores: Tensor  # (classes,): the mean of the per-view probabilities
    corrupt: list[float] = field(default_factory=list)  # seconds of the frames the decoder flagged as damaged
    classes: tuple[str, ...] | None = None  # the class names the weights' file records (x3dnet train writes them)

    def top(self, k: int, labels: Sequence[str] | None = None) -> list[dict[str, object]]:
        """The ``k`` best classes, best first: ``{"label", "index", "score"}``; labels default to indices."""
        scores, indices = self.scores.topk(min(k, self.scores.numel()))
        return [
            {"label": labels[i] if labels else str(i), "index": i, "score": s}
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]


@torch.inference_mode()
def view_probabilities(model: X3D | Engine, views: Views, *, batch_size: int = 8) -> Tensor:
    """(V, classes) probabilities, one row per view. The model averages the softmax over its head windows
    when a view is larger than its training crop; the softmax of its output is that average. ``model``
    is an ``X3D`` (on the CPU) or an engine from ``x3dnet.backends.create_engine``."""
    return torch.cat([model(batch).float().softmax(1).cpu() for batch in views.batches(batch_size)])


def predict_video(model: X3D | Engine, path: str | os.PathLike[str], recipe: ViewRecipe, *,
                  batch_size: int = 8, stills: bool = False) -> Prediction:
    views = make_views(path, recipe, stills=stills)
    probs = view_probabilities(model, views, batch_size=batch_size)
    return Prediction(str(path), model.config.name, len(views), probs.mean(0), views.corrupt)


def predict(
    videos: Sequence[str | os.PathLike[str]],
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    views: int = 30,
    placement: str = "slowfast",
    resize: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    backend: str = "auto",
    precision: str = "fp32",
    stills: bool = False,
) -> Iterator[Prediction | X3DNetError]:
    """Predict each video; a video that cannot be read yields its error, and the others go on.

    The model and its recipe come from ``load_model`` (the published weights by default); the views are
    the recipe's 1-, 10- or 30-view preset for ``placement``; ``backend`` is an engine of
    ``x3dnet.backends`` (``auto``: the fastest installed), checked against eager PyTorch before use.
    ``stills``: take a still image (or a one-frame video) as a clip of that frame repeated.
    """
    check_device(device)
    net, recipe = load_model(model, weights=weights)
    try:
        view_set = view_recipe(recipe, views, placement=placement, resize=resize)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shape = (view_set.frames, view_set.crop, view_set.crop)
    engine = create_engine(net, backend=backend, device=device, precision=precision, input_shape=shape)
    for video in videos:
        try:
            result = predict_video(engine, video, view_set, batch_size=batch_size, stills=stills)
            result.classes = net.class_names
            yield result
        except X3DNetError as e:
            yield e
