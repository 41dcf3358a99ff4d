"""Loading every layout through the production path, against the original's outputs; errors."""

import dataclasses
import json
import pickle
import re
import zipfile

import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from conftest import LAYOUT_FILES, checkpoint_path, reference_io, tiny_config
from test_cli import assert_one_line_error_here

from x3dnet import (
    VARIANTS,
    X3D,
    CheckpointError,
    Recipe,
    convert_checkpoint,
    create_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from x3dnet.checkpoint import write_checkpoint
from x3dnet.layouts import from_native

CASES = [(name, layout) for name in ("tiny_a", "tiny_b", "x3d_xs") for layout in LAYOUT_FILES]


def reference_model(name, path, **overrides):
    """The model for a fixture, built and loaded the way a user would."""
    if name == "x3d_xs":
        return create_model("x3d_xs", weights=path, **overrides).eval()
    model = X3D(tiny_config(name).replace(**overrides)).eval()
    load_weights(model, path)
    return model


def probabilities(model, x):
    with torch.inference_mode():
        return model(x.float()).softmax(1)


@pytest.mark.parametrize("name,layout", CASES)
def test_outputs_match_the_original(name, layout):
    io = reference_io(name)
    model = reference_model(name, checkpoint_path(name, layout))
    for size in ("train", "test"):  # one head window; 2x2 windows at the 30-view test crop
        torch.testing.assert_close(probabilities(model, io[f"x_{size}"]), io[f"probs_{size}"], atol=1e-5, rtol=0)
    # The tolerance separates right from wrong: global pooling agrees at the training crop only.
    pooled = reference_model(name, checkpoint_path(name, layout), head_pooling="global")
    torch.testing.assert_close(probabilities(pooled, io["x_train"]), io["probs_train"], atol=1e-5, rtol=0)
    assert (probabilities(pooled, io["x_test"]) - io["probs_test"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["tiny_a", "x3d_xs"])
def test_round_trip_slowfast_native_pytorchvideo_slowfast(name, tmp_path):
    io = reference_io(name)
    source = checkpoint_path(name, "slowfast")
    native = convert_checkpoint(source, tmp_path / "a.safetensors", to="native")
    ptv = convert_checkpoint(native.path, tmp_path / "b.pyth", to="pytorchvideo")
    back = convert_checkpoint(ptv.path, tmp_path / "c.pyth", to="slowfast")
    assert (native.max_abs_diff, ptv.max_abs_diff, back.max_abs_diff) < (1e-5, 1e-5, 1e-5)
    assert load_checkpoint(native.path).config == load_checkpoint(source).config  # recorded clip kept
    original = torch.load(source, weights_only=True)["model_state"]
    final = torch.load(back.path, weights_only=True)["model_state"]
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in original.items()}
    model = reference_model(name, back.path)
    for size in ("train", "test"):
        torch.testing.assert_close(probabilities(model, io[f"x_{size}"]), io[f"probs_{size}"], atol=1e-5, rtol=0)


def test_native_format_records_config_and_recipe(tmp_path):
    model = X3D(tiny_config("tiny_b"))
    recipe = Recipe(frames=6, stride=12, train_crop=96, test_short_side=109, test_crop=104)
    path = save_checkpoint(model, tmp_path / "m.safetensors", recipe=recipe)
    assert path.read_bytes()[8:9] == b"{"  # safetensors, not a pickle
    ckpt = load_checkpoint(path)
    assert (ckpt.layout, ckpt.config, ckpt.recipe) == ("native", model.config, recipe)
    assert ckpt.state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())


def test_plain_state_dicts_legacy_files_and_wrapper_prefixes(tmp_path):
    model = X3D(VARIANTS["x3d_l"])
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    ckpt = load_checkpoint(tmp_path / "plain.pth")
    assert ckpt.layout == "native" and ckpt.config == VARIANTS["x3d_l"]  # only L has these shapes

    xs = X3D(VARIANTS["x3d_xs"]).state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in xs.items()}}, tmp_path / "ddp.pth")
    ckpt = load_checkpoint(tmp_path / "ddp.pth")
    assert ckpt.config is None and ckpt.variants == ("x3d_xs", "x3d_s", "x3d_m")
    assert ckpt.describe() == "x3d_xs or x3d_s or x3d_m"
    create_model("x3d_s", weights=tmp_path / "ddp.pth")

    sf = from_native(xs, "slowfast")
    torch.save({"epoch": 3, "model_state": sf, "cfg": "DATA: {NUM_FRAMES: 4, TRAIN_CROP_SIZE: 160}"},
               tmp_path / "legacy.pyth", _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(tmp_path / "legacy.pyth")
    assert ckpt.layout == "slowfast" and ckpt.config == VARIANTS["x3d_xs"] and ckpt.recipe is None


def test_fine_tuning_keeps_everything_but_the_classifier(tmp_path):
    source = X3D(VARIANTS["x3d_xs"])
    torch.save(source.state_dict(), tmp_path / "xs.pth")
    model = create_model("x3d_xs", weights=tmp_path / "xs.pth", num_classes=10)
    assert model.fc2.weight.shape == (10, 2048) and model.config.num_classes == 10
    for key, value in model.state_dict().items():
        assert key.startswith("fc2.") or torch.equal(value, source.state_dict()[key]), key
    assert create_model("x3d_xs", weights=tmp_path / "xs.pth").config.num_classes == 400


# --- errors: one clear message naming the file and what is wrong ---------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pyth: no such file"):
        load_checkpoint(tmp_path / "nope.pyth")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_truncated_files(tmp_path):
    data = checkpoint_path("tiny_a", "slowfast").read_bytes()
    (tmp_path / "cut.pyth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pyth: truncated or corrupt PyTorch file"):
        load_checkpoint(tmp_path / "cut.pyth")
    save_checkpoint(X3D(tiny_config("tiny_a")), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_files_that_are_not_checkpoints(tmp_path):
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise[7] = ord("{")  # byte 8 of the file: looks like a safetensors header were it not for its length
    (tmp_path / "random.pth").write_bytes(b"\x00" + noise.numpy().tobytes())
    (tmp_path / "notes.pyth").write_text("these are not weights\n")
    for name in ("random.pth", "notes.pyth"):
        with pytest.raises(CheckpointError, match="not a checkpoint: neither a PyTorch nor a safetensors file"):
            load_checkpoint(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as z:
        z.writestr("readme.txt", "a zip, not a torch file")
    with pytest.raises(CheckpointError, match="truncated or corrupt PyTorch file"):
        load_checkpoint(tmp_path / "archive.pth")
    torch.save({"epoch": 1, "note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"no state dict in this file \(top-level keys: epoch, note\)"):
        load_checkpoint(tmp_path / "empty.pth")


def test_checkpoint_of_another_network(tmp_path):
    nn = torch.nn
    resnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    torch.save({"state_dict": resnet.state_dict()}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"not an X3D checkpoint: few of its keys are X3D keys in any layout "
                                              r"\(native, slowfast, pytorchvideo, mmaction2; first keys: 0\.weight"):
        load_checkpoint(tmp_path / "resnet.pth")


def test_a_renamed_key_is_named(tmp_path):
    obj = torch.load(checkpoint_path("tiny_a", "slowfast"), weights_only=True)
    state = obj["model_state"]
    state["s4.pathway0_res9.branch2.a.weight"] = state.pop("s4.pathway0_res1.branch2.a.weight")
    torch.save(obj, tmp_path / "renamed.pyth")
    with pytest.raises(CheckpointError) as e:
        load_weights(X3D(tiny_config("tiny_a")), tmp_path / "renamed.pyth")
    assert str(e.value) == (
        f"{tmp_path / 'renamed.pyth'}: does not fit tiny_a: 1 missing: s4.pathway0_res1.branch2.a.weight; "
        "1 unexpected: s4.pathway0_res9.branch2.a.weight"
    )


def test_a_reshaped_tensor_is_named(tmp_path):
    obj = torch.load(checkpoint_path("tiny_b", "mmaction2"), weights_only=True)
    key = "backbone.layer3.1.conv2.conv.weight"
    obj["state_dict"][key] = obj["state_dict"][key].reshape(24, 2, 3, 3, 3)
    torch.save(obj, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointError, match=rf"does not fit tiny_b: 1 of the wrong shape \(file vs model\): "
                                              rf"{key} \(24, 2, 3, 3, 3\) vs \(48, 1, 3, 3, 3\)$"):
        load_weights(X3D(tiny_config("tiny_b")), tmp_path / "reshaped.pth")


def test_wrong_variant_says_what_the_file_looks_like(tmp_path):
    write_checkpoint(X3D(VARIANTS["x3d_l"]).state_dict(), tmp_path / "l.pyth", layout="slowfast")
    with pytest.raises(CheckpointError, match=r"l\.pyth: does not fit x3d_m: the file looks like x3d_l; "
                                              r"578 unexpected: s2\.pathway0_res3\.branch2\.a\.weight"):
        create_model("x3d_m", weights=tmp_path / "l.pyth")

    xs = VARIANTS["x3d_xs"]
    write_checkpoint(X3D(xs).state_dict(), tmp_path / "xs.pyth", layout="slowfast", config=xs)
    with pytest.raises(CheckpointError, match=r"trained as x3d_xs on 4 frames at 160px, but x3d_m's head pools "
                                              r"over 16 frames at 224px; use the model x3d_xs"):
        create_model("x3d_m", weights=tmp_path / "xs.pyth")
    # Asking for another head window on purpose is allowed.
    assert create_model("x3d_m", weights=tmp_path / "xs.pyth", frames=4, train_crop=160).config.frames == 4


class Payload:
    """Unpickling this would write a file: a stand-in for code a malicious checkpoint runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    state = from_native(X3D(tiny_config("tiny_a")).state_dict(), "slowfast")
    torch.save({"model_state": state, "cfg": Payload(marker)}, tmp_path / "evil.pyth")
    refused = r"evil\.pyth: refused: loading it would run pickled code \((io|builtins)\.open\)"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(tmp_path / "evil.pyth")
    assert not marker.exists()
    torch.save(X3D(tiny_config("tiny_a")), tmp_path / "module.pth")  # a whole pickled model
    with pytest.raises(CheckpointError, match=r"refused: .*x3dnet\.model\.X3D"):
        load_checkpoint(tmp_path / "module.pth")
    with open(tmp_path / "legacy.pth", "wb") as f:  # a bare pickle, no zip container
        pickle.dump({"model_state": state, "cfg": Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused: loading it would run pickled code"):
        load_checkpoint(tmp_path / "legacy.pth")
    assert not marker.exists()


def test_convert_needs_a_model_name_only_where_the_file_cannot_tell(tmp_path):
    write_checkpoint(X3D(VARIANTS["x3d_xs"]).state_dict(), tmp_path / "ptv.pyth", layout="pytorchvideo")
    with pytest.raises(CheckpointError, match=r"cannot tell which model this is \(x3d_xs or x3d_s or x3d_m have "
                                              r"the same tensors\); name it \(--model\)"):
        convert_checkpoint(tmp_path / "ptv.pyth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    done = convert_checkpoint(tmp_path / "ptv.pyth", tmp_path / "out.safetensors", model="x3d_s")
    ckpt = load_checkpoint(done.path)
    assert ckpt.config == VARIANTS["x3d_s"] and ckpt.recipe.clip == "13x6"
    with pytest.raises(CheckpointError, match="does not fit x3d_l: the file looks like x3d_xs or x3d_s or x3d_m"):
        convert_checkpoint(tmp_path / "ptv.pyth", tmp_path / "l.safetensors", model="x3d_l")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ptv.pyth"]  # nothing half-written


def test_convert_refuses_an_incomplete_source_before_writing(tmp_path):
    obj = torch.load(checkpoint_path("tiny_a", "slowfast"), weights_only=True)
    del obj["model_state"]["s2.pathway0_res0.branch1_bn.running_var"]
    torch.save(obj, tmp_path / "holed.pyth")
    with pytest.raises(CheckpointError, match=r"holed\.pyth: does not fit custom: 1 missing: "
                                              r"s2\.pathway0_res0\.branch1_bn\.running_var$"):
        convert_checkpoint(tmp_path / "holed.pyth", tmp_path / "out.pyth", to="pytorchvideo")
    del obj["model_state"]["head.lin_5.weight"]
    torch.save(obj, tmp_path / "headless.pyth")
    with pytest.raises(CheckpointError, match=r"headless\.pyth: an incomplete X3D \(without head\.lin_5\.weight\)"):
        convert_checkpoint(tmp_path / "headless.pyth", tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["headless.pyth", "holed.pyth"]


def _native_with(tmp_path, config=None, recipe=None, tensors=None):
    """tiny_a in x3dnet's format with its metadata (JSON text) or tensors replaced."""
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    path = save_checkpoint(model, tmp_path / "m.safetensors", recipe=Recipe(4, 12, 64, 72, 80))
    metadata = safetensors.safe_open(str(path), "pt").metadata()
    if config is not None:
        metadata["x3dnet.config"] = config
    if recipe is not None:
        metadata["x3dnet.recipe"] = recipe
    state = safetensors.torch.load_file(path)
    state.update(tensors or {})
    safetensors.torch.save_file(state, path, metadata=metadata)
    return path


def _slowfast_with(tmp_path, cfg: str):
    obj = torch.load(checkpoint_path("tiny_a", "slowfast"), weights_only=True)
    obj["cfg"] = cfg
    torch.save(obj, tmp_path / "m.pyth")
    return tmp_path / "m.pyth"


def _config_json(**changes):
    fields = dataclasses.asdict(tiny_config("tiny_a"))
    fields.update(changes)
    return json.dumps(fields)


_SF_DATA = {"NUM_FRAMES": 4, "TRAIN_CROP_SIZE": 64, "SAMPLING_RATE": 12, "TRAIN_JITTER_SCALES": [72, 90],
            "TEST_CROP_SIZE": 80}


def _cfg(**changes):
    return yaml.safe_dump({"DATA": {**_SF_DATA, **changes}})


# Every field a file can set, wrong in each way a file can be wrong: one line naming the field, before the
# value sizes anything (a 100,000-frame clip took 22 GB before the OOM killer stepped in).
BAD_METADATA = {
    "config a list": (lambda t: _native_with(t, config="[1, 2]"), "x3dnet.config metadata (must be an object"),
    "config null": (lambda t: _native_with(t, config="null"), "must be an object of fields, not NoneType"),
    "config a string": (lambda t: _native_with(t, config='"x3d_m"'), "must be an object of fields, not str"),
    "frames 0": (lambda t: _native_with(t, config=_config_json(frames=0)), "frames: must be an integer from 1"),
    "crop -5": (lambda t: _native_with(t, config=_config_json(train_crop=-5)), "train_crop: must be an integer"),
    "frames four": (lambda t: _native_with(t, config=_config_json(frames="four")), "frames: must be an integer"),
    "dropout 5": (lambda t: _native_with(t, config=_config_json(dropout=5)), "dropout: must be a number from 0 to 1"),
    "classes 3 vs 10": (lambda t: _native_with(t, config=_config_json(num_classes=3)),
                        "its metadata says num_classes=3, but its tensors have 10"),
    "widths vs tensors": (lambda t: _native_with(t, config=_config_json(head_width=4096)),
                          "its metadata says head_width=4096, but its tensors have"),
    "target_fps 0": (lambda t: _native_with(t, recipe=json.dumps({**Recipe(4, 12, 64, 72, 80).to_dict(),
                                                                  "target_fps": 0})), "target_fps: must be a number"),
    "std 0": (lambda t: _native_with(t, recipe=json.dumps({**Recipe(4, 12, 64, 72, 80).to_dict(), "std": [0, 0, 0]})),
              "std[0]: must be a number from 0.001"),
    "recipe deep": (lambda t: _native_with(t, recipe="[" * 50_000 + "]" * 50_000), "x3dnet.recipe metadata"),
    "cfg NUM_FRAMES 100000": (lambda t: _slowfast_with(t, _cfg(NUM_FRAMES=100000)),
                              "cfg DATA.NUM_FRAMES: must be an integer from 1 to 256, not 100000"),
    "cfg STD 0": (lambda t: _slowfast_with(t, _cfg(STD=[0.0, 0.0, 0.0])), "cfg DATA.STD[0]: must be a number"),
    "cfg MEAN nan": (lambda t: _slowfast_with(t, _cfg(MEAN=[float("nan")] * 3)), "cfg DATA.MEAN[0]: must be a number"),
    "cfg crop a string": (lambda t: _slowfast_with(t, _cfg(TEST_CROP_SIZE="big")), "cfg DATA.TEST_CROP_SIZE: must be"),
    "cfg fps 0": (lambda t: _slowfast_with(t, _cfg(TARGET_FPS=0)), "cfg DATA.TARGET_FPS: must be a number above 0"),
    "cfg nested 50,000 deep": (lambda t: _slowfast_with(t, "a: " + "[" * 50_000 + "]" * 50_000),
                               "cfg: nested too deeply"),
    "cfg of 50 MB": (lambda t: _slowfast_with(t, "# " + "x" * 50_000_000), "characters, far more than a SlowFast"),
    "NaN weights": (lambda t: _native_with(t, tensors={"fc1.weight": torch.full((32, 64), float("nan"))}),
                    "the weights are not finite: 1 tensor holds NaN or Inf (fc1.weight)"),
    "Inf weights, SlowFast names": (lambda t: _poison(_slowfast_with(t, _cfg())),
                                    "the weights are not finite: 1 tensor holds NaN or Inf (head.lin_5.weight)"),
}


def _poison(path):
    obj = torch.load(path, weights_only=True)
    obj["model_state"]["head.lin_5.weight"][0, 0] = float("inf")
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_what_a_file_says_is_validated_before_it_sizes_anything(tmp_path, case):
    make, message = BAD_METADATA[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)


@pytest.mark.parametrize("verb", ["inspect", "predict", "convert"])
@pytest.mark.parametrize("case", ["config null", "frames four", "cfg NUM_FRAMES 100000", "NaN weights"])
def test_bad_metadata_is_one_line_in_every_verb(tmp_path, capsys, verb, case):
    path = BAD_METADATA[case][0](tmp_path)
    args = {"inspect": ["inspect", path], "predict": ["predict", tmp_path / "none.mp4", "--weights", path],
            "convert": ["convert", path, tmp_path / "out.safetensors", "--model", "x3d_xs"]}[verb]
    assert_one_line_error_here(capsys, args, f"{path}: ")
