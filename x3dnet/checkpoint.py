"""Checkpoint files: read any published layout without running pickled code, load strictly, write any layout.

Our own format is safetensors with the config and recipe as JSON metadata. A file's layout is told from
its keys, never from its name; its architecture from its tensor shapes; its training clip (frames and
crop, which set the head window) from the file's metadata when it has any.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import yaml
from torch import Tensor

from . import layouts
from .errors import CheckpointError, ConfigError, FieldError, require_int
from .layouts import NATIVE, foreign_name, name_list
from .model import VARIANTS, X3D, X3DConfig, get_config
from .paths import PathError, atomic_path, input_file, output_file, write_atomic_with
from .recipe import MAX_FRAMES, MAX_SIZE, RECIPES, Recipe

_META_FORMAT, _META_CONFIG, _META_RECIPE = "x3dnet.format", "x3dnet.config", "x3dnet.recipe"
_META_CLASSES = "x3dnet.classes"  # the class names, in index order, of a model x3dnet trained
_MAX_NAME = 1000  # characters of one class name
_STATE_KEYS = ("model_state", "state_dict", "model")  # SlowFast and pytorchvideo, mmaction2, others
_MAX_CFG = 1_000_000  # characters: SlowFast writes about 10 kB of YAML
# Recipe fields and the SlowFast cfg keys they are read from, to name a bad one as the file names it.
_CFG_NAMES = {"frames": "DATA.NUM_FRAMES", "train_crop": "DATA.TRAIN_CROP_SIZE", "stride": "DATA.SAMPLING_RATE",
              "test_short_side": "DATA.TRAIN_JITTER_SCALES[0]", "test_crop": "DATA.TEST_CROP_SIZE",
              "target_fps": "DATA.TARGET_FPS", "mean": "DATA.MEAN", "std": "DATA.STD"}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from ``path`` and renamed to x3dnet's keys and shapes."""

    path: Path
    layout: str  # the key layout the file was written in (layouts.LAYOUTS)
    state_dict: dict[str, Tensor]
    # Complete only when the file records its training clip (x3dnet metadata, a SlowFast cfg) or only
    # one published size has its shapes; XS, S and M weights have the same shapes.
    config: X3DConfig | None
    recipe: Recipe | None
    architecture: dict[str, object] | None  # read off the tensor shapes; None if they are incomplete
    classes: tuple[str, ...] | None = None  # class names, where the file records them (x3dnet train writes them)

    @property
    def num_classes(self) -> int | None:
        fc2 = self.state_dict.get("fc2.weight")
        return None if fc2 is None else fc2.shape[0]

    @property
    def variants(self) -> tuple[str, ...]:
        """The published sizes whose tensors have this file's shapes (any number of classes)."""
        return tuple(n for n, c in VARIANTS.items() if c.architecture() == self.architecture)

    def describe(self) -> str:
        if self.config is not None and self.config.name in VARIANTS:
            return self.config.name
        if self.variants:
            return " or ".join(self.variants)
        if self.architecture is None:
            missing = [foreign_name(k, self.layout) for k in _ARCHITECTURE_KEYS if k not in self.state_dict]
            return f"an incomplete X3D (without {name_list(missing, 3)})" if missing else "an incomplete X3D"
        a = self.architecture
        return f"an X3D of no published size (blocks {_csv(a['depths'])}, widths {_csv(a['widths'])})"


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read an X3D checkpoint in any supported layout; see the module docstring."""
    try:
        path = input_file(path, "checkpoint")  # a FIFO would make torch.load wait forever
    except PathError as e:
        raise CheckpointError(str(e)) from None
    obj, metadata = _read(path)
    state_dict, extra = _unwrap(obj, path)
    found = layouts.detect_layout(state_dict)
    if found is None:
        raise CheckpointError(
            f"{path}: not an X3D checkpoint: few of its keys are X3D keys in any layout "
            f"({', '.join(layouts.LAYOUTS)}; first keys: {name_list(state_dict, 4)})"
        )
    layout, prefix = found
    state_dict = layouts.to_native({k[len(prefix) :]: v for k, v in state_dict.items()}, layout)
    broken = [foreign_name(k, layout) for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        many = len(broken) > 1
        raise CheckpointError(f"{path}: the weights are not finite: {len(broken)} tensor{'s hold' if many else ' holds'} "
                              f"NaN or Inf ({name_list(broken, 4)})")
    architecture = _architecture(state_dict)
    recorded, recipe = _recorded_clip(metadata, extra, path)
    if isinstance(recorded, X3DConfig):
        _agrees(recorded, architecture, state_dict, path)
    config = _config(architecture, recorded, state_dict)
    classes = _classes(metadata, state_dict, path) if _META_CLASSES in metadata else None
    return Checkpoint(path, layout, state_dict, config, recipe, architecture, classes)


def _classes(metadata: dict[str, str], sd: Mapping[str, Tensor], path: Path) -> tuple[str, ...]:
    try:
        names = json.loads(metadata[_META_CLASSES])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: damaged {_META_CLASSES} metadata (not JSON)") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and 0 < len(n) <= _MAX_NAME for n in names):
        raise CheckpointError(f"{path}: {_META_CLASSES} metadata: must be a list of class names")
    if "fc2.weight" in sd and len(names) != sd["fc2.weight"].shape[0]:
        raise CheckpointError(f"{path}: its metadata names {len(names)} classes, but its classifier has "
                              f"{sd['fc2.weight'].shape[0]}")
    return tuple(names)


def _agrees(config: X3DConfig, architecture: dict | None, sd: Mapping[str, Tensor], path: Path) -> None:
    """A recorded config must describe the file's own tensors (what it says of the rest is validated)."""
    said = {**config.architecture(), "num_classes": config.num_classes}
    found = {**(architecture or {}), "num_classes": sd["fc2.weight"].shape[0] if "fc2.weight" in sd else None}
    for field, value in said.items():
        if found.get(field) is not None and found[field] != value:
            raise CheckpointError(f"{path}: its metadata says {field}={_csv(value) if isinstance(value, tuple) else value}"
                                  f", but its tensors have {_csv(found[field]) if isinstance(value, tuple) else found[field]}")


def load_weights(model: X3D, checkpoint: Checkpoint | str | os.PathLike[str], *, classifier: bool = True,
                 match_clip: bool = True) -> None:
    """Load strictly: every missing, unexpected or mis-shaped key is an error that names it (in the
    file's own names). ``classifier=False`` keeps the model's fc2 (fine-tuning to other classes).
    ``match_clip`` refuses a file that records another training clip than the model's head window."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    cfg = model.config
    state_dict = ckpt.state_dict
    expected = model.state_dict()
    if not classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc2.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("fc2.")}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        problems = []
        if ckpt.variants and cfg.name not in ckpt.variants:
            problems.append(f"the file looks like {ckpt.describe()}")

        def name(key: str) -> str:
            return foreign_name(key, ckpt.layout)

        if missing:
            problems.append(f"{len(missing)} missing: {name_list(map(name, missing))}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {name_list(map(name, unexpected))}")
        if misshaped:
            shapes = [f"{name(k)} {_shape(state_dict[k])} vs {_shape(expected[k])}" for k in misshaped]
            problems.append(f"{len(misshaped)} of the wrong shape (file vs model): {name_list(shapes)}")
        raise CheckpointError(f"{ckpt.path}: does not fit {cfg.name}: {'; '.join(problems)}")
    trained = ckpt.config
    if match_clip and trained is not None and (trained.frames, trained.train_crop) != (cfg.frames, cfg.train_crop):
        raise CheckpointError(
            f"{ckpt.path}: trained as {trained.name} on {trained.frames} frames at {trained.train_crop}px, "
            f"but {cfg.name}'s head pools over {cfg.frames} frames at {cfg.train_crop}px; "
            f"use the model {trained.name}"
        )
    model.load_state_dict(state_dict, strict=classifier)


def save_checkpoint(model: X3D, path: str | os.PathLike[str], *, recipe: Recipe | None = None,
                    classes: Sequence[str] | None = None) -> Path:
    """Write ``model`` in x3dnet's format: safetensors, with its config, recipe and class names as metadata."""
    return write_checkpoint(model.state_dict(), path, layout=NATIVE, config=model.config, recipe=recipe,
                            classes=classes)


def write_checkpoint(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str], *, layout: str,
                     config: X3DConfig | None = None, recipe: Recipe | None = None,
                     classes: Sequence[str] | None = None) -> Path:
    """Write an x3dnet state dict in ``layout``, atomically (a temporary file renamed at the end).

    Files are shaped as their projects write them: SlowFast ``{"model_state", "cfg"}``, pytorchvideo
    ``{"model_state"}``, mmaction2 ``{"state_dict", "meta"}``. The SlowFast cfg is a short YAML that
    records the config's training clip and the recipe, where they are known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in layouts.from_native(state_dict, layout).items()}
    if layout == NATIVE:
        if config is None:
            raise CheckpointError(f"{path}: x3dnet's format records the model config; none is known")
        metadata = {_META_FORMAT: "1", _META_CONFIG: json.dumps(dataclasses.asdict(config))}
        if recipe is not None:
            metadata[_META_RECIPE] = json.dumps(recipe.to_dict())
        if classes is not None:
            if len(classes) != config.num_classes:
                raise CheckpointError(f"{path}: {len(classes)} class names for {config.num_classes} classes")
            metadata[_META_CLASSES] = json.dumps(list(classes))
        return write_atomic_with(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    if layout == "slowfast":
        obj = {"model_state": tensors}
        if config is not None:
            obj["cfg"] = _slowfast_cfg(config, recipe)
    elif layout == "pytorchvideo":
        obj = {"model_state": tensors}
    else:
        obj = {"state_dict": tensors, "meta": {}}
    return write_atomic_with(path, lambda tmp: torch.save(obj, tmp))


@dataclass(frozen=True)
class Conversion:
    source: Checkpoint
    path: Path
    layout: str
    tensors: int
    max_abs_diff: float  # largest probability difference, written file vs source, on a random clip


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str = NATIVE,
                       model: str | None = None, force: bool = False) -> Conversion:
    """Convert a checkpoint to another layout. The written file is read back and run against the
    source before it takes its name; ``model`` names the size where the file cannot tell (XS/S/M).
    An existing ``dst`` is replaced only with ``force``, never when it is ``src`` itself; its extension must
    be the format's (``.safetensors`` for native, ``.pyth``/``.pth``/``.pt`` for the PyTorch layouts)."""
    if to not in layouts.LAYOUTS:
        raise CheckpointError(f"unknown layout {to!r}; choose one of {', '.join(layouts.LAYOUTS)}")
    suffixes = (".safetensors",) if to == NATIVE else (".pyth", ".pth", ".pt")
    if Path(dst).suffix.lower() not in suffixes:
        raise CheckpointError(f"{dst}: a {to} checkpoint is a {'safetensors' if to == NATIVE else 'PyTorch'} file: "
                              f"name it {' or '.join('*' + s for s in suffixes)}")
    try:
        if Path(dst).exists() and Path(src).exists() and os.path.samefile(src, dst):
            raise CheckpointError(f"{dst}: is the source file; write the conversion to another file")
        dst = output_file(dst, force=force, what="checkpoint")
    except PathError as e:
        raise CheckpointError(str(e)) from None
    ckpt = load_checkpoint(src)
    reference = _probe(ckpt)  # loads the source strictly first: a bad key is named before anything is written
    config, recipe = ckpt.config, ckpt.recipe
    if model is not None:
        config = get_config(model, num_classes=ckpt.num_classes or 400)
        load_weights(X3D(config), ckpt)  # refuses a file of another size or training clip
    if to == NATIVE and config is None:
        raise CheckpointError(
            f"{ckpt.path}: cannot tell which model this is ({ckpt.describe()} have the same tensors); "
            "name it (--model)"
        )
    if recipe is None and config is not None:
        recipe = RECIPES.get(config.name)
    with atomic_path(dst) as tmp:  # checked under a temporary name, then renamed
        write_checkpoint(ckpt.state_dict, tmp, layout=to, config=config, recipe=recipe,
                         classes=ckpt.classes if to == NATIVE else None)
        diff = (_probe(load_checkpoint(tmp)) - reference).abs().max().item()
        if not diff <= 1e-5:
            raise CheckpointError(f"{dst}: converted file computes something else (max |dp| = {diff:.2e})")
    return Conversion(ckpt, dst, to, len(layouts.from_native(ckpt.state_dict, to)), diff)


def _probe(ckpt: Checkpoint) -> Tensor:
    """The checkpoint's probabilities on a fixed random clip, after loading it strictly. Global pooling
    makes this independent of the head window, so no training clip is needed, and 4 x 64 x 64 is
    enough input to go through every layer."""
    if ckpt.architecture is None:
        raise CheckpointError(f"{ckpt.path}: {ckpt.describe()}: cannot tell its architecture")
    name = ckpt.config.name if ckpt.config else "x3d"
    config = X3DConfig(name, frames=1, train_crop=32, num_classes=ckpt.num_classes or 400, head_pooling="global",
                       **ckpt.architecture)
    net = X3D(config).eval()
    load_weights(net, ckpt, match_clip=False)
    x = torch.randn(2, 3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return net(x).softmax(1)


def _read(path: Path) -> tuple[object, dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        return _torch_load(path), {}
    # safetensors: a u64 header length (safetensors caps it at 100 MB), then the JSON header
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= 100_000_000:
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for each kind of damage
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    if head.startswith(b"\x80"):  # a bare pickle: torch.save's legacy format
        return _torch_load(path), {}
    raise CheckpointError(f"{path}: not a checkpoint: neither a PyTorch nor a safetensors file")


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower().replace(" ", "_"):
            raise CheckpointError(f"{path}: corrupt PyTorch file ({_first_line(e)})") from None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be listed without unpickling it
            names = re.findall(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: refused: loading it would run pickled code ({', '.join(names) or 'unknown objects'}); "
            "x3dnet reads only tensors and plain containers. If you trust the file, save just its "
            "state dict with torch.save and load that"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch file ({_first_line(e)})") from None


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], dict]:
    """The state dict inside a loaded file, and the file's other top-level entries."""
    if _is_state_dict(obj):
        return dict(obj), {}
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), {k: v for k, v in obj.items() if k != key}
        raise CheckpointError(f"{path}: no state dict in this file (top-level keys: {name_list(map(str, obj), 8)})")
    raise CheckpointError(f"{path}: no state dict in this file (it holds a {type(obj).__name__})")


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


# The tensors whose shapes say which X3D a file holds.
_ARCHITECTURE_KEYS = ("stem.conv_spatial.weight", *(f"res{k}.0.{p}.weight" for k in range(2, 6)
                                                    for p in ("conv_a", "conv_c", "se.fc1")), "fc1.weight")


def _architecture(sd: Mapping[str, Tensor]) -> dict[str, object] | None:
    try:
        depths = []
        for k in range(2, 6):
            blocks = {int(m.group(1)) for key in sd if (m := re.fullmatch(rf"res{k}\.(\d+)\.conv_a\.weight", key))}
            depths.append(len(blocks))
        first = [f"res{k}.0" for k in range(2, 6)]
        return {
            "stem_width": sd["stem.conv_spatial.weight"].shape[0],
            "depths": tuple(depths),
            "widths": tuple(sd[f"{b}.conv_c.weight"].shape[0] for b in first),
            "inner_widths": tuple(sd[f"{b}.conv_a.weight"].shape[0] for b in first),
            "se_widths": tuple(sd[f"{b}.se.fc1.weight"].shape[0] for b in first),
            "head_width": sd["fc1.weight"].shape[0],
        }
    except (KeyError, IndexError):
        return None


def _recorded_clip(
    metadata: dict[str, str], extra: dict, path: Path
) -> tuple[X3DConfig | tuple | None, Recipe | None]:
    """What the file says of how it was trained: the whole config (x3dnet metadata), or the training
    clip (frames, crop) and the recipe from a SlowFast YAML cfg; None where it says nothing. Every field
    is validated (types, ranges) before it can size anything; a bad one is an error that names it."""
    if _META_CONFIG in metadata:
        config = _metadata_field(metadata, _META_CONFIG, lambda fields: X3DConfig(**fields), path)
        recipe = _metadata_field(metadata, _META_RECIPE, Recipe.from_dict, path) if _META_RECIPE in metadata else None
        return config, recipe
    cfg = extra.get("cfg")
    if not isinstance(cfg, str):
        return None, None
    if len(cfg) > _MAX_CFG:
        raise CheckpointError(f"{path}: cfg: {len(cfg)} characters, far more than a SlowFast config (at most {_MAX_CFG})")
    try:
        parsed = yaml.safe_load(cfg)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: cfg: not readable YAML ({_first_line(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cfg: nested too deeply to be a SlowFast config") from None
    data = parsed.get("DATA") if isinstance(parsed, dict) else None
    if not isinstance(data, dict) or "NUM_FRAMES" not in data or "TRAIN_CROP_SIZE" not in data:
        return None, None  # the cfg says nothing of the clip; the shapes still say what they can
    try:
        clip = (require_int("frames", data["NUM_FRAMES"], 1, MAX_FRAMES),
                require_int("train_crop", data["TRAIN_CROP_SIZE"], 1, MAX_SIZE))
        if not all(k in data for k in ("SAMPLING_RATE", "TRAIN_JITTER_SCALES", "TEST_CROP_SIZE")):
            return clip, None
        scales = data["TRAIN_JITTER_SCALES"]
        if not isinstance(scales, list) or not scales:
            raise FieldError("test_short_side", f"must be a list of sizes, not {scales!r}"[:200])
        recipe = Recipe(frames=clip[0], stride=data["SAMPLING_RATE"], train_crop=clip[1], test_short_side=scales[0],
                        test_crop=data["TEST_CROP_SIZE"], target_fps=data.get("TARGET_FPS", 30),
                        mean=data.get("MEAN", (0.45,) * 3), std=data.get("STD", (0.225,) * 3))
    except FieldError as e:
        name, _, index = e.field.partition("[")
        raise CheckpointError(f"{path}: cfg {_CFG_NAMES.get(name, name)}{'[' + index if index else ''}: "
                              f"{e.reason}") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: cfg DATA: {e}") from None
    return clip, recipe


def _metadata_field(metadata: dict[str, str], key: str, build, path: Path):
    """``build(fields)`` from the JSON object stored under ``key``, or an error naming the key and field."""
    try:
        fields = json.loads(metadata[key])
        if not isinstance(fields, dict):
            raise ConfigError(f"must be an object of fields, not {type(fields).__name__}")
        return build(fields)
    except RecursionError:
        raise CheckpointError(f"{path}: {key} metadata: nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged {key} metadata ({_first_line(e)})") from None


def _config(
    architecture: dict | None, recorded: X3DConfig | tuple | None, sd: Mapping[str, Tensor]
) -> X3DConfig | None:
    if isinstance(recorded, X3DConfig):
        return recorded
    if architecture is None:
        return None
    classes = sd["fc2.weight"].shape[0] if "fc2.weight" in sd else 400
    matches = [c for c in VARIANTS.values() if c.architecture() == architecture]
    if recorded is not None:
        frames, crop = recorded
        same = [c for c in matches if (c.frames, c.train_crop) == recorded]
        base = same[0] if same else X3DConfig(name="custom", frames=frames, train_crop=crop, **architecture)
        return base.replace(num_classes=classes)
    if len(matches) == 1:
        return matches[0].replace(num_classes=classes)
    return None


def _slowfast_cfg(config: X3DConfig, recipe: Recipe | None) -> str:
    data = {"NUM_FRAMES": config.frames, "TRAIN_CROP_SIZE": config.train_crop}
    if recipe is not None:
        # Only the first jitter scale is known: it is the 1-crop test short side.
        data.update(SAMPLING_RATE=recipe.stride, TEST_CROP_SIZE=recipe.test_crop, TARGET_FPS=recipe.target_fps,
                    TRAIN_JITTER_SCALES=[recipe.test_short_side], MEAN=list(recipe.mean), STD=list(recipe.std))
    model = {"ARCH": "x3d", "MODEL_NAME": "X3D", "NUM_CLASSES": config.num_classes}
    return yaml.safe_dump({"DATA": data, "MODEL": model}, sort_keys=True)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def _csv(values: object) -> str:
    return ",".join(map(str, values))


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: libraries append advice meant for their own users."""
    text = str(e).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".")[:200] if text else type(e).__name__
