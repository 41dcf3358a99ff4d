"""Streaming X3D against co3d's CoX3D (its step-by-step outputs on the tiny fixture model) and against the
offline networks it must equal: the clip network with no temporal padding on the last receptive field,
and with left padding only on every frame so far (spec: streaming.md, "Exact equivalences")."""

from __future__ import annotations

import http.server
import json
import threading
from functools import partial

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, SHARED, tiny_config
from synth import damage
from test_cli import assert_one_line_error, x3dnet
from test_predict import TINY_RECIPE, tiny  # noqa: F401 (module-scoped fixture)

from x3dnet import X3D, get_config, load_weights
from x3dnet.backends import installed
from x3dnet.errors import BackendError, ConfigError
from x3dnet.streaming import ClipScorer, StreamingX3D, _OpenVinoStep, _partition, check_stream, warmup_frames
from x3dnet.synthetic import make_dataset
from x3dnet.views import ViewRecipe, make_views

CO3D = SHARED / "stream" / "stream_tiny_a.pt"
CASES = [f"se={se},fill={fill},window={w}" for w in (4, 64) for se in ("frame", "clip") for fill in ("zeros", "replicate")]


@pytest.fixture(scope="module")
def tiny_a() -> X3D:
    model = X3D(tiny_config("tiny_a")).eval()
    load_weights(model, FIXTURES / "tiny_a_slowfast.pyth")
    return model


@pytest.fixture(scope="module")
def co3d() -> dict:
    if not CO3D.exists():
        pytest.skip(f"{CO3D} is absent: co3d's streaming references live there")
    return torch.load(CO3D, weights_only=True)


def moving_frames(n: int, size: int = 64, *, seed: int = 0) -> torch.Tensor:
    """(1, 3, n, size, size): a random smooth picture sliding diagonally, with a square crossing it."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(1, 3, size // 8, size // 8, generator=g), size=(2 * size, 2 * size),
                         mode="bilinear", align_corners=False)[0]
    frames = []
    for t in range(n):
        frame = base[:, 3 * t % size:3 * t % size + size, 2 * t % size:2 * t % size + size].clone()
        frame[:, 10:26, (4 * t) % (size - 16):(4 * t) % (size - 16) + 16] = 2.0
        frames.append(frame)
    return torch.stack(frames, 1)[None]


def steps(stream: StreamingX3D, frames: torch.Tensor) -> list:
    stream.reset()
    return [stream.step(frames[:, :, t]) for t in range(frames.shape[2])]


@pytest.mark.parametrize("case", CASES)
def test_every_step_matches_co3d(tiny_a, co3d, case):
    se, fill, window = (part.split("=")[1] for part in case.split(","))
    ref = co3d["cases"][case]
    stream = StreamingX3D(tiny_a, pool_frames=int(window), se=se, fill=fill)
    assert (stream.delay, stream.receptive_field) == (ref["delay"], ref["receptive_field"])
    clips = [video["frames"][video["index"][:ref["n_steps"]]].transpose(0, 1)[None]  # (1, 3, N, H, W)
             for video in co3d["videos"].values()]
    # Step by step (one video: the other differs only in its frames) ...
    got = steps(stream, clips[0])
    assert [g is None for g in got] == ref["returned_none"].tolist()
    probs = torch.cat([g.softmax(1) for g in got if g is not None])
    torch.testing.assert_close(probs, ref["probs"]["demo"][ref["delay"]:], atol=1e-5, rtol=0)
    # ... and both videos as one batch of two streams, all frames at once: the same numbers.
    stream.reset()
    both = stream.forward_steps(torch.cat(clips)).softmax(2)
    expected = torch.stack([ref["probs"][name][ref["delay"]:] for name in co3d["videos"]])
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("se,fill", [("frame", "zeros"), ("clip", "replicate")])
def test_cuda_steps_are_the_cpus(tiny_a, se, fill):
    frames = moving_frames(40)
    cpu = steps(StreamingX3D(tiny_a, pool_frames=3, se=se, fill=fill), frames)
    gpu = steps(StreamingX3D(tiny_a, pool_frames=3, se=se, fill=fill, device="cuda"), frames)
    assert [g is None for g in gpu] == [c is None for c in cpu] and cpu[-1] is not None
    for c, g in zip(cpu, gpu, strict=True):
        if c is not None:
            torch.testing.assert_close(g.cpu().softmax(1), c.softmax(1), atol=1e-5, rtol=0)


# co3d's delay / receptive field for frame SE pool T, clip SE pool T, frame SE pool 64, clip SE pool 64.
CO3D_TABLE = {
    "x3d_xs": [(31, 60), (76, 105), (91, 120), (1036, 1065)],
    "x3d_s": [(40, 69), (220, 249), (91, 120), (1036, 1065)],
    "x3d_m": [(43, 72), (268, 297), (91, 120), (1036, 1065)],
    "x3d_l": [(72, 130), (507, 565), (120, 178), (1947, 2005)],
}


@pytest.mark.parametrize("name", CO3D_TABLE)
def test_delay_and_receptive_field_are_co3d_s(name):
    model = X3D(get_config(name, num_classes=2)).eval()
    got = [(s.delay, s.receptive_field) for s in (StreamingX3D(model, pool_frames=pool, se=se)
                                                  for pool in (None, 64) for se in ("frame", "clip"))]
    assert got == CO3D_TABLE[name]


def oracle(model: X3D, frames: torch.Tensor, *, se: str, pool: int, fill: str, left_pad: bool) -> torch.Tensor:
    """The clip network (unfolded BN, whole clips, no state) with every temporal padding removed, or kept on
    the left only and filled; SE over each frame or a stride-1 window of ``pool`` frames; the head a stride-1
    average over ``pool`` frames. (1, 3, N, H, W) -> scores (1, outputs, classes)."""
    def temporal(x, conv, pad):
        if left_pad:
            first = x[:, :, :1].expand(-1, -1, pad, -1, -1)
            x = torch.cat((first if fill == "replicate" else torch.zeros_like(first), x), 2)
        return F.conv3d(x, conv.weight, None, (1, *conv.stride[1:]), (0, *conv.padding[1:]), 1, conv.groups)

    m = model
    x = F.relu(m.stem.bn(temporal(m.stem.conv_spatial(frames), m.stem.conv_temporal, 2)))
    for block in [*m.res2, *m.res3, *m.res4, *m.res5]:
        y = block.bn_b(temporal(F.relu(block.bn_a(block.conv_a(x))), block.conv_b, 1))
        if block.se is not None:
            pooled = y.mean((3, 4))
            if se == "clip":  # frame j gated by frames j .. j + pool - 1
                pooled = F.avg_pool1d(pooled, pool, 1)
                y = y[:, :, :pooled.shape[2]]
            gate = block.se.fc2(F.relu(block.se.fc1(pooled.transpose(1, 2)))).sigmoid()
            y = y * gate.transpose(1, 2)[..., None, None]
        y = block.bn_c(block.conv_c(F.silu(y)))
        shortcut = x if block.shortcut is None else block.shortcut_bn(block.shortcut(x))
        start = 0 if left_pad else 1  # the frame the conv's window is centred on
        x = F.relu(shortcut[:, :, start:start + y.shape[2]] + y)
    x = F.relu(m.conv5_bn(m.conv5(x)))
    v = F.avg_pool1d(x.mean((3, 4)), pool, 1)
    return m.fc2(F.relu(m.fc1(v.transpose(1, 2))))


@pytest.mark.parametrize("se,fill,pool", [("frame", "zeros", 4), ("frame", "replicate", 3), ("clip", "zeros", 3),
                                          ("clip", "replicate", 4)])
def test_steps_equal_the_offline_networks_on_moving_video(tiny_a, se, fill, pool):
    stream = StreamingX3D(tiny_a, pool_frames=pool, se=se, fill=fill)
    frames = moving_frames(stream.receptive_field + 6)
    got = steps(stream, frames)
    first = next(t for t, g in enumerate(got) if g is not None)
    assert first == stream.delay and all(g is not None for g in got[first:])
    with torch.inference_mode():
        # From the first output: left padding only, with the fill, over every frame so far (it is causal).
        padded = oracle(tiny_a, frames, se=se, pool=pool, fill=fill, left_pad=True)[0].softmax(1)
        torch.testing.assert_close(torch.cat(got[first:]).softmax(1), padded, atol=1e-5, rtol=0)
        # Once the receptive field has filled: no padding at all, on the last receptive_field frames.
        rf = stream.receptive_field
        for t in range(rf - 1, frames.shape[2]):
            valid = oracle(tiny_a, frames[:, :, t - rf + 1:t + 1], se=se, pool=pool, fill=fill, left_pad=False)
            assert valid.shape[1] == 1
            torch.testing.assert_close(got[t].softmax(1), valid[:, 0].softmax(1), atol=1e-5, rtol=0)
    # The fill matters before the receptive field has filled, and only then.
    other = steps(StreamingX3D(tiny_a, pool_frames=pool, se=se, fill="zeros" if fill == "replicate" else "replicate"),
                  frames)
    assert (got[first].softmax(1) - other[first].softmax(1)).abs().max() > 1e-4
    torch.testing.assert_close(got[-1], other[-1], atol=1e-6, rtol=0)


def test_forward_steps_in_any_chunks_equals_steps(tiny_a):
    stream = StreamingX3D(tiny_a, pool_frames=3, se="clip", fill="replicate")
    frames = torch.cat([moving_frames(30, seed=1), moving_frames(30, seed=2)])  # a batch of two streams
    one_by_one = torch.stack([s for s in steps(stream, frames) if s is not None], 1)
    stream.reset()
    bounds = ((0, 5), (5, 6), (6, 19), (19, 19), (19, 30))  # the delay (17) passes inside the third
    chunks = [stream.forward_steps(frames[:, :, a:b]) for a, b in bounds]
    assert [c.shape[1] for c in chunks] == [max(0, b - max(a, stream.delay)) for a, b in bounds] == [0, 0, 2, 0, 11]
    torch.testing.assert_close(torch.cat(chunks, 1), one_by_one, atol=1e-5, rtol=0)


def test_bad_frames_and_options_are_refused(tiny_a):
    stream = StreamingX3D(tiny_a)
    for bad in (torch.zeros(1, 3, 32, 32), torch.zeros(3, 64, 64), torch.zeros(1, 1, 64, 64)):
        with pytest.raises(ConfigError, match="takes frames"):
            stream.step(bad)
    with pytest.raises(ConfigError, match="takes frames"):
        stream.forward_steps(torch.zeros(1, 3, 64, 64))
    for options, message in (({"pool_frames": 0}, "pool_frames"), ({"se": "space"}, "se must"),
                             ({"fill": "reflect"}, "fill must")):
        with pytest.raises(ConfigError, match=message):
            StreamingX3D(tiny_a, **options)
    with pytest.raises(BackendError, match="runs on torch or openvino"):
        StreamingX3D(tiny_a, backend="onnxruntime")


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_openvino_steps_equal_eager_and_hand_back_their_state(tiny_a, monkeypatch):
    frames = moving_frames(40)
    eager = StreamingX3D(tiny_a, pool_frames=3, se="clip", fill="zeros")
    compiled = StreamingX3D(tiny_a, pool_frames=3, se="clip", fill="zeros", backend="openvino")
    assert compiled.parity < 1e-5
    for _ in range(2):  # and again after a reset
        expected, got = steps(eager, frames[:, :, :30]), steps(compiled, frames[:, :, :30])
        assert [g is None for g in got] == [e is None for e in expected]
        torch.testing.assert_close(torch.cat([g for g in got if g is not None]).softmax(1),
                                   torch.cat([e for e in expected if e is not None]).softmax(1), atol=1e-5, rtol=0)
    # forward_steps after engine steps continues from the engine's state.
    torch.testing.assert_close(compiled.forward_steps(frames[:, :, 30:]).softmax(2),
                               eager.forward_steps(frames[:, :, 30:]).softmax(2), atol=1e-5, rtol=0)
    # An engine that computes something else is refused when built.
    monkeypatch.setattr(_OpenVinoStep, "__call__", lambda self, frame: torch.zeros(1, 10))
    with pytest.raises(BackendError, match="disagrees with eager"):
        check_stream(compiled)  # what the constructor runs


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
@pytest.mark.parametrize("stages", [2, 3])
def test_openvino_in_overlapped_stages_equals_eager(tiny_a, stages):
    """The network cut into parts that ``run`` overlaps on consecutive frames: every result is eager's, in
    order, by ``step`` and by ``run``; a consumer that stops early leaves a state that has seen exactly the
    frames taken; a source that fails mid-way gets the results of the frames it gave, then its error."""
    frames = moving_frames(46)
    eager = StreamingX3D(tiny_a, pool_frames=3, se="clip", fill="zeros")
    staged = StreamingX3D(tiny_a, pool_frames=3, se="clip", fill="zeros", backend="openvino", stages=stages)
    assert staged.parity < 1e-5 and len(staged.engine.parts) == stages
    cuts = staged.engine.cuts
    assert cuts[0] == 0 and cuts[-1] == len(staged.net.res2) + len(staged.net.res3) + len(staged.net.res4) + \
        len(staged.net.res5) + 2 and all(a < b for a, b in zip(cuts, cuts[1:]))
    assert f"{stages} overlapped stages" in staged.describe()
    expected = steps(eager, frames)

    def close(got, want):
        assert [g is None for g in got] == [w is None for w in want]
        torch.testing.assert_close(torch.cat([g for g in got if g is not None]).softmax(1),
                                   torch.cat([w for w in want if w is not None]).softmax(1), atol=1e-5, rtol=0)

    close(steps(staged, frames), expected)
    staged.reset()
    close(list(staged.run(frames[:, :, t] for t in range(46))), expected)
    # Stop after 30 results: the frames in flight were taken, so the state has seen them; step() goes on.
    staged.reset()
    taken = []

    def source():
        for t in range(46):
            taken.append(t)
            yield frames[:, :, t]

    run = staged.run(source())
    got = [next(run) for _ in range(30)]
    run.close()
    assert len(taken) == 30 + stages - 1 and staged.steps == len(taken)
    close(got + [staged.step(frames[:, :, t]) for t in range(len(taken), 46)], expected[:30] + expected[len(taken):])

    def failing():
        yield from (frames[:, :, t] for t in range(40))
        raise OSError("the camera went away")

    staged.reset()
    got = []
    with pytest.raises(OSError, match="camera went away"):
        for scores in staged.run(failing()):
            got.append(scores)
    close(got, expected[:40])
    with pytest.raises(ConfigError, match="only the openvino stream"):
        StreamingX3D(tiny_a, stages=2)
    with pytest.raises(ConfigError, match="stages must be"):
        StreamingX3D(tiny_a, backend="openvino", stages=0)


def test_stages_are_cut_where_the_slowest_is_fastest():
    """``_partition`` against every way to cut a few costs into contiguous runs."""
    from itertools import combinations

    rng = np.random.default_rng(0)
    for n, parts in ((6, 1), (7, 2), (9, 3), (8, 4), (5, 5)):
        costs = rng.uniform(0.1, 5.0, n).round(3).tolist()
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *c), (*c, n)))
                   for c in combinations(range(1, n), parts - 1))
        cuts = _partition(costs, parts)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == parts + 1 and all(a < b for a, b in zip(cuts, cuts[1:]))
        assert max(sum(costs[a:b]) for a, b in zip(cuts, cuts[1:])) == pytest.approx(best)


# --- the command and the evaluation protocol -------------------------------------------------------------

@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """A 12 s synthetic video: 30 steps at tiny_a's stride of 12 frames."""
    data = make_dataset(tmp_path_factory.mktemp("s"), videos_per_class=1, seconds=12, size=(96, 72), seed=3)
    return next(p for p in sorted(data.videos.rglob("*.mp4")) if "moving_up" in str(p))


@pytest.fixture(scope="module")
def json_steps(tiny, long_video):  # noqa: F811
    """``x3dnet stream --json`` on the long video, eager."""
    done = x3dnet("stream", long_video, "--weights", tiny[1], "--json", "--backend", "torch")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_stream_command_steps_are_the_python_stream_of_the_video(tiny, long_video, json_steps):  # noqa: F811
    """One JSON line per step from the first output: StreamingX3D fed the video's every 12th frame (tiny_a's
    stride at 30 fps), resized as co3d does; the same on the OpenVINO engine."""
    model, weights = tiny
    rows = [json.loads(line) for line in json_steps.splitlines()]
    stream = StreamingX3D(model)
    assert [r["step"] for r in rows] == list(range(stream.delay, 30))
    assert [r["frame"] for r in rows] == [12 * r["step"] for r in rows]
    assert rows[0]["time"] == pytest.approx(12 * stream.delay / 30, abs=1e-3)
    for r in rows:
        assert [t["index"] for t in r["top5"]] == list(np.argsort(r["scores"])[::-1][:5])
    with av.open(str(long_video)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][::12]
    x = (torch.from_numpy(np.stack(decoded)).float() / 255 - 0.45) / 0.225  # (N, H, W, 3)
    x = F.interpolate(x.permute(0, 3, 1, 2), size=(64, 85), mode="bilinear", align_corners=False)[..., 11:75]
    expected = stream.forward_steps(x.transpose(0, 1)[None])[0].softmax(1)
    assert np.abs(np.array([r["scores"] for r in rows]) - expected.numpy()).max() < 1e-5
    if installed("openvino"):
        done = x3dnet("stream", long_video, "--weights", weights, "--json")  # auto: OpenVINO
        assert done.returncode == 0, done.stderr
        compiled = np.array([json.loads(line)["scores"] for line in done.stdout.splitlines()])
        assert compiled.shape == (len(rows), 10)
        assert np.abs(compiled - expected.numpy()).max() < 1e-4


def test_stream_command_writes_an_annotated_video(tiny, long_video, tmp_path):  # noqa: F811
    _, weights = tiny
    out = tmp_path / "annotated.mp4"
    done = x3dnet("stream", long_video, "--weights", weights, "--out", out, "--every", "5", "--backend", "torch")
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert len(printed) == 4 and " s  step    10  " in printed[0]  # steps 10, 15, 20, 25
    with av.open(str(out)) as c, av.open(str(long_video)) as source:
        written = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        original = [f.to_ndarray(format="rgb24") for f in source.decode(video=0)]
    assert len(written) == len(original) and written[0].shape == original[0].shape
    # The panel is drawn top left; the rest of the picture is the video's (up to the encoder's loss).
    assert np.abs(written[200][:20, :40].astype(int) - original[200][:20, :40]).mean() > 20
    assert np.abs(written[200][-4:].astype(int) - original[200][-4:]).mean() < 6  # under the panel


def test_stream_command_reads_a_live_http_source(tiny, long_video, json_steps):  # noqa: F811
    _, weights = tiny
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(long_video.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{long_video.name}"
        done = x3dnet("stream", url, "--weights", weights, "--json", "--backend", "torch")
        assert done.returncode == 0, done.stderr
        assert done.stdout == json_steps
        missing = x3dnet("stream", url + ".gone", "--weights", weights, "--backend", "torch", "--timeout", "5")
        assert_one_line_error(missing, "cannot be opened")
    finally:
        server.shutdown()


def run_here(capsys, *args) -> tuple[int, str, str]:
    """The command in this process (no interpreter start): status, stdout, stderr."""
    from x3dnet import cli

    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_stream_command_bad_input_is_one_line(tiny, long_video, tmp_path, capsys):  # noqa: F811
    weights = ("--weights", tiny[1], "--backend", "torch")
    (tmp_path / "text.mp4").write_text("not a video")
    for args, message in (((tmp_path / "none.mp4",), "no such file"), ((tmp_path / "text.mp4",), "not a readable video"),
                          ((long_video, "--out", tmp_path / "a.avi"), "name it FILE.mp4")):
        status, out, err = run_here(capsys, "stream", *args, *weights)
        assert status == 1 and out == "" and err.count("\n") == 1 and message in err, err
    short = make_dataset(tmp_path / "short", videos_per_class=1, used=[0], seconds=1, size=(96, 72)).videos
    status, out, err = run_here(capsys, "stream", next(short.rglob("*.mp4")), *weights)  # 30 frames: 3 steps
    assert status == 1 and out == "" and err.splitlines()[-1].endswith(
        "ended after 3 steps, before the first prediction (at step 10)")
    # A source that breaks mid-way: what came before is printed, then one line saying why; the annotated
    # video keeps the frames it had.
    broken = damage(long_video, tmp_path / "broken.mp4")
    status, out, err = run_here(capsys, "stream", broken, *weights, "--json", "--out", tmp_path / "b.mp4")
    assert status == 1 and out.count("\n") > 0 and "x3dnet: error: the stream stopped after" in err
    assert (tmp_path / "b.mp4").exists() and not (tmp_path / ".b.mp4.part").exists()


def test_evaluate_stream_scores_the_last_step_of_co3d_s_warm_up(tiny, tmp_path):  # noqa: F811
    from x3dnet.evaluate import evaluate

    model, weights = tiny
    data = make_dataset(tmp_path / "d", videos_per_class=1, seconds=4, size=(96, 72), seed=5)
    options = {"pool_frames": 4, "se": "clip", "fill": "replicate"}
    metrics = evaluate(data.slowfast, weights=weights, classes=data.classes, batch_size=3, workers=0,
                       out=tmp_path / "run", save_scores=True, progress=False, stream=options, log=lambda line: None)
    assert metrics["videos"] == 10 and metrics["recipe"]["frames"] == 23  # co3d: max(delay 22, int(0.7 x (14 + 4)) - 1) + 1
    scores = np.load(tmp_path / "run" / "scores.npy")
    stream = StreamingX3D(model, **options)
    assert warmup_frames(stream) == 22
    view_set = ViewRecipe(frames=23, stride=12, short_side=64, crop=64, clips=1, crops=1, resize="bilinear")
    for i, line in enumerate(data.slowfast.read_text().splitlines()):
        clip = make_views(data.videos / line.split()[0], view_set).tensor()  # (1, 3, 23, 64, 64): the last frame repeated
        got = steps(stream, clip)
        assert all(g is None for g in got[:22]) and got[22] is not None
        np.testing.assert_allclose(scores[i], got[22][0].softmax(0).numpy(), atol=1e-5)
    # The scorer feeds its clips in chunks; any chunk gives the same.
    clips = torch.randn(2, 3, 23, 64, 64)
    torch.testing.assert_close(ClipScorer(stream, chunk=5)(clips), ClipScorer(stream, chunk=23)(clips), atol=1e-5,
                               rtol=0)
