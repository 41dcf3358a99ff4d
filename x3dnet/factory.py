"""``create_model``: a variant by name, with weights from a file or the published table."""

from __future__ import annotations

import os

from .checkpoint import load_checkpoint, load_weights
from .model import X3D, get_config
from .weights import get_weights, resolve_weights


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
    file_classes = ckpt.num_classes or config.num_classes
    model = X3D(config.replace(num_classes=num_classes or file_classes))
    load_weights(
        model,
        ckpt,
        classifier=num_classes in (None, file_classes),
        match_clip=not {"frames", "train_crop"} & overrides.keys(),
    )
    return model
