"""The converters against the reference's own files: the same weights in three published layouts."""

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import checkpoint_path, tiny_config

from x3dnet import X3D, CheckpointError, load_weights, save_checkpoint
from x3dnet.checkpoint import write_checkpoint
from x3dnet.layouts import BN_EPS, detect_layout, foreign_name, from_native, to_native

NAMES = ["tiny_a", "tiny_b", "x3d_xs"]


def state(name, layout):
    obj = torch.load(checkpoint_path(name, layout), weights_only=True)
    return obj["state_dict" if layout == "mmaction2" else "model_state"]


def assert_same(ours, theirs, atol=0.0):
    assert list(ours) == list(theirs)  # same keys, in the order the original modules register them
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_slowfast_and_mmaction2_are_exact_renames(name):
    slowfast = state(name, "slowfast")
    native = to_native(slowfast, "slowfast")
    assert_same(from_native(native, "slowfast"), slowfast)
    assert_same(from_native(native, "mmaction2"), state(name, "mmaction2"))
    assert_same(to_native(state(name, "mmaction2"), "mmaction2"), native)


@pytest.mark.parametrize("name", NAMES)
def test_pytorchvideo_folds_the_res2_shortcut_bn_as_the_reference_did(name):
    native = to_native(state(name, "slowfast"), "slowfast")
    ptv = state(name, "pytorchvideo")
    # Folding changes two tensors by float rounding only; every other tensor is renamed untouched.
    assert_same(from_native(native, "pytorchvideo"), ptv, atol=1e-6)
    assert "res2.0.shortcut_bn.weight" in native and "res3.0.shortcut_bn.weight" in native
    back = to_native(ptv, "pytorchvideo")
    assert list(back) == list(native)
    torch.testing.assert_close(back["res2.0.shortcut_bn.weight"], torch.ones_like(native["res2.0.shortcut_bn.weight"]))
    identity_var = torch.full_like(back["res2.0.shortcut_bn.bias"], 1 - BN_EPS)
    torch.testing.assert_close(back["res2.0.shortcut_bn.running_var"], identity_var)
    assert back["res2.0.shortcut_bn.bias"].abs().max() == 0 == back["res2.0.shortcut_bn.running_mean"].abs().max()
    torch.testing.assert_close(back["res3.0.shortcut_bn.running_var"], native["res3.0.shortcut_bn.running_var"])


def test_layouts_are_told_from_keys_with_any_wrapper_prefix():
    ptv = state("tiny_a", "pytorchvideo")
    assert detect_layout(ptv) == ("pytorchvideo", "")
    assert detect_layout({f"module.model.{k}": v for k, v in ptv.items()}) == ("pytorchvideo", "module.model.")
    assert detect_layout({f"module.{k}": v for k, v in state("tiny_a", "slowfast").items()}) == ("slowfast", "module.")
    assert detect_layout({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize("layout", ["slowfast", "pytorchvideo", "mmaction2", "native"])
def test_a_renamed_key_is_named_not_the_whole_file_refused(layout, tmp_path):
    # Renaming the key each layout was once recognised by must not turn the file into "not an X3D":
    # the layout is the one that names most keys, and the renamed key is reported in the file's names.
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    stem = foreign_name("stem.conv_spatial.weight", layout)
    inner = foreign_name("res3.0.conv_a.weight", layout)
    path = write_checkpoint(model.state_dict(), tmp_path / "a.pth", layout=layout, config=model.config)
    if layout == "native":
        path = save_checkpoint(model, tmp_path / "a.safetensors")
        tensors = safetensors.torch.load_file(path)
        metadata = safetensors.safe_open(str(path), "pt").metadata()
    else:
        obj = torch.load(path, weights_only=True)
        tensors = obj["model_state" if layout != "mmaction2" else "state_dict"]
    for key in (stem, inner):
        tensors[key + "_x"] = tensors.pop(key)
    if layout == "native":
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    else:
        torch.save(obj, path)
    assert detect_layout(tensors) == (layout, "")
    with pytest.raises(CheckpointError) as caught:
        load_weights(X3D(tiny_config("tiny_a")), path)
    message = str(caught.value)
    assert f"2 missing: {stem}, {inner}" in message or f"2 missing: {inner}, {stem}" in message
    assert f"{stem}_x" in message and f"{inner}_x" in message and "2 unexpected" in message


def test_foreign_names_for_messages():
    ptv = "blocks.3.res_blocks.3.branch2.norm_b.1.block.0.weight"
    assert foreign_name("res4.3.se.fc1.weight", "pytorchvideo") == ptv
    assert foreign_name("res2.0.shortcut_bn.bias", "mmaction2") == "backbone.layer1.0.downsample.bn.bias"
    assert foreign_name("fc1.weight", "slowfast") == "head.lin_5.weight"
    assert foreign_name("fc1.weight", "native") == "fc1.weight"
