"""``create_model``: a variant by name, with weights from a file or the published table;
``load_model``: the same for inference, with the clip recipe those weights were trained for."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint, load_weights
from .errors import CheckpointError
from .model import X3D, X3DConfig, get_config
from .recipe import RECIPES, Recipe
from .weights import get_weights, resolve_weights

DEFAULT_MODEL = "x3d_m"


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    **overrides: object,
) -> X3D:
    """Build ``x3d_xs``, ``x3d_s``, ``x3d_m``, ``x3d_l`` or the derived ``x3d_xl``.

    Args:
        name: the variant (``"x3d_m"``; ``"X3D-M"`` and ``"m"`` work too).
        weights: a checkpoint file in any supported layout, or a published record's name
            (``"x3d_m.pytorchvideo"``; see ``x3dnet weights list``), downloaded into the cache if missing.
        pretrained: load the variant's default published weights (the SlowFast original).
        num_classes: 400 by default, or the checkpoint's class count. A count other than the
            checkpoint's loads everything but the classifier, which is freshly initialised (fine-tuning).
        overrides: other ``X3DConfig`` fields, e.g. ``head_pooling="global"``. Overriding ``frames`` or
            ``train_crop`` lets a checkpoint load into a head window other than the one it was trained with.

    The model is returned in training mode, as ``torch.nn`` modules are: call ``.eval()`` for inference.
    """
    config = get_config(name, **overrides)
    if pretrained and weights is None:
        weights = get_weights(config.name).name
    if weights is None:
        return X3D(config if num_classes is None else config.replace(num_classes=num_classes))
    ckpt = load_checkpoint(resolve_weights(weights))
    return loaded(config, ckpt, num_classes, match_clip=not {"frames", "train_crop"} & overrides.keys())


def load_model(
    name: str | None = None, *, weights: str | os.PathLike[str] | None = None
) -> tuple[X3D, Recipe]:
    """An eval-mode model with weights, and the recipe (clip, sizes, mean/std) they were trained for.

    ``weights`` is a file or a published record's name; without it the variant's default published
    weights are used. Without ``name`` the model is the record's, or the one the file records (x3dnet
    files, SlowFast files with their cfg); a file that cannot tell (XS, S and M share shapes) needs it.
    """
    if weights is None:
        weights = get_weights(name or DEFAULT_MODEL).name
    config, recipe, ckpt = resolve_checkpoint(name, weights)
    if recipe is None:
        raise CheckpointError(f"{ckpt.path}: no recipe for {config.name}: the file records none")
    return loaded(config, ckpt, None, match_clip=True).eval(), recipe


def resolve_checkpoint(
    name: str | None, weights: str | os.PathLike[str]
) -> tuple[X3DConfig, Recipe | None, Checkpoint]:
    """The config a checkpoint is loaded into, the recipe its weights were trained for (None where nothing
    says), and the checkpoint: the variant ``name``, else the published record's, else the one the file
    records; a file that cannot tell (XS, S and M share shapes) needs ``name``."""
    path = resolve_weights(weights)
    record = None if Path(weights).exists() else get_weights(str(weights))
    ckpt = load_checkpoint(path)
    if name is not None:
        config = get_config(name)
    elif record is not None:
        config = get_config(record.model)
    elif ckpt.config is not None:
        config = ckpt.config
    else:
        raise CheckpointError(f"{ckpt.path}: the file does not say which model it holds "
                              f"({ckpt.describe()}); name it with --model")
    recipe = record.recipe if record is not None else ckpt.recipe or RECIPES.get(config.name)
    return config, recipe, ckpt


def loaded(config: X3DConfig, ckpt: Checkpoint, num_classes: int | None, *, match_clip: bool = True) -> X3D:
    """``config`` with ``ckpt``'s weights, strictly; a ``num_classes`` other than the file's gets a new classifier."""
    file_classes = ckpt.num_classes or config.num_classes
    model = X3D(config.replace(num_classes=num_classes or file_classes))
    classifier = num_classes in (None, file_classes)
    load_weights(model, ckpt, classifier=classifier, match_clip=match_clip)
    if classifier:
        model.class_names = ckpt.classes
    return model
