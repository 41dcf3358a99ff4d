"""The banded form of X3D (what the OpenVINO engine compiles) against the original's outputs and the model."""

from __future__ import annotations

import pytest
import torch
from conftest import checkpoint_path, reference_io, tiny_config

from x3dnet import X3D, banding, create_model, load_weights
from x3dnet.backends import create_engine, export_model, installed
from x3dnet.banding import BandedBlock, BandedX3D

# Two fp32 computations of one function in another order: the original's own output is 5.7e-7 from fp64
# on tiny_a, and oneDNN picks other kernels on other CPUs (the banded form measured 1.4e-6 on a Xeon with
# AMX, 1e-6 or less elsewhere). A band short of one halo row is off by more than 1e-3.
FP32_FLOOR = 1e-5


@pytest.fixture
def tiny_a() -> X3D:
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    return model.eval()


@pytest.fixture
def small_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Band every block of a tiny model, in bands of two or three rows."""
    monkeypatch.setattr(banding, "BAND_BYTES", {2: 2**10, 1: 2**10})


def plans(model: BandedX3D) -> list[list[tuple[int, int]]]:
    return [[(first, stop) for first, stop, *_ in layer.plan] for layer in model.layers
            if isinstance(layer, BandedBlock)]


def test_untouched_when_no_tensor_is_wide(tiny_a):
    banded = BandedX3D(tiny_a, (4, 64, 64))
    assert banded.banded == 0  # a tiny model's tensors all fit a band: only BN is folded


@pytest.mark.parametrize("crop", ["train", "test"])
def test_banded_matches_the_original(tiny_a, small_bands, crop):
    io = reference_io("tiny_a")
    x, expected = io[f"x_{crop}"].float(), io[f"probs_{crop}"]
    banded = BandedX3D(tiny_a, tuple(x.shape[2:])).eval()
    layers = [layer for layer in banded.layers if isinstance(layer, BandedBlock)]
    assert layers[0].stem_plan  # the stem, then blocks with and without SE, at stride 2 and 1
    assert {(layer.stride, layer.se is not None) for layer in layers} == {(2, True), (1, False)}
    first, stem_rows = plans(banded)[0], (x.shape[3] - 1) // 2 + 1
    assert len(first) >= 4 and first[0][0] == 0 and first[-1][1] == (stem_rows - 1) // 2 + 1  # res2.0's rows
    with torch.inference_mode():
        torch.testing.assert_close(banded(x).softmax(1), expected, atol=FP32_FLOOR, rtol=0)


@pytest.mark.parametrize("shape", [(4, 67, 53), (3, 45, 90), (5, 36, 36)])
def test_banded_matches_the_model_at_odd_sizes(tiny_a, small_bands, shape):
    # Rows that do not split evenly, odd rows at stride 2, width != height; global pooling takes any size.
    model = X3D(tiny_a.config.replace(head_pooling="global")).eval()
    model.load_state_dict(tiny_a.state_dict())
    x = torch.randn(2, 3, *shape)
    banded = BandedX3D(model, shape).eval()
    assert banded.banded > 0
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(banded(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_x3d_m_bands_at_its_own_size():
    # The plan the OpenVINO engine runs for X3D-M's training clip: the stem and res2's first block in
    # seven bands, the wide blocks after it in four or two; BN statistics drawn so that folding matters.
    model = create_model("x3d_m").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    banded = BandedX3D(model, (16, 224, 224)).eval()
    assert [len(p) for p in plans(banded)] == [7, 4, 4, 4, 2]
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(banded(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.skipif(not installed("openvino"), reason="needs openvino")
def test_openvino_runs_the_banded_graph_like_the_original(tiny_a, small_bands):
    # The banded graph through ONNX and OpenVINO's own fusions, batch > 1 run clip by clip.
    io = reference_io("tiny_a")
    x, expected = io["x_test"].float(), io["probs_test"]
    engine = create_engine(tiny_a, backend="openvino", input_shape=tuple(x.shape[2:]))
    torch.testing.assert_close(engine(x).softmax(1), expected, atol=1e-5, rtol=0)
    assert engine(x[:0]).shape == (0, tiny_a.config.num_classes)


@pytest.mark.skipif(not installed("onnxruntime"), reason="needs onnxruntime")
def test_banded_export_has_the_bands_and_a_dynamic_batch(tiny_a, small_bands, tmp_path):
    import onnx
    import onnxruntime as ort

    io = reference_io("tiny_a")
    x, expected = io["x_test"].float(), io["probs_test"]
    shape = tuple(x.shape[2:])
    plain, diff_plain = export_model(tiny_a, tmp_path / "plain.onnx", format="onnx", input_shape=shape)
    banded, diff = export_model(tiny_a, tmp_path / "banded.onnx", format="onnx", input_shape=shape, banded=True)
    assert diff <= 1e-5 and diff_plain <= 1e-5

    def convs(path):
        return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)

    assert convs(banded) > 2 * convs(plain)  # every band has its own convs
    clips = torch.cat([x, x[:1]])  # 3 clips: a batch size the export never saw
    scores = ort.InferenceSession(str(banded)).run(None, {"clips": clips.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(scores).softmax(1), torch.cat([expected, expected[:1]]),
                               atol=1e-5, rtol=0)
