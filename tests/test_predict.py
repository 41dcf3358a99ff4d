"""``x3dnet predict`` end to end: scores against views built by hand from the spec, labels, and bad input."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import checkpoint_path, tiny_config
from synth import MEAN, STD, damage, size_change_video, write_video
from test_cli import assert_one_line_error_here, x3dnet
from test_views import reference_pts

from x3dnet import X3D, Recipe, cli, load_weights, save_checkpoint
from x3dnet.predict import kinetics400_classes
from x3dnet.views import view_recipe

TINY_RECIPE = Recipe(frames=4, stride=12, train_crop=64, test_short_side=72, test_crop=80)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    """tiny_a's reference weights in x3dnet's format, which records the model and its recipe."""
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    path = save_checkpoint(model, tmp_path_factory.mktemp("w") / "tiny_a.safetensors", recipe=TINY_RECIPE)
    return model.eval(), path


@pytest.fixture(scope="module")
def clip_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 90, width=96, height=72, noise=True)


def hand_views(path, views: int) -> torch.Tensor:
    """Spec 4.3-4.4 without x3dnet's pipeline: decode every frame, pick by the pts rule, normalise, resize
    bilinear with the long side floored, crop at ceil offsets along the long side."""
    recipe = view_recipe(TINY_RECIPE, views, resize="bilinear")
    with av.open(str(path)) as c:
        frames = {f.pts: torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)}
    out = []
    for pts in reference_pts(path, recipe):
        clip = (torch.stack([frames[p] for p in pts]).float() / 255 - MEAN) / STD  # (T, H, W, 3)
        clip = clip.permute(3, 0, 1, 2)  # (3, T, H, W)
        h, w = clip.shape[2:]
        size = (recipe.short_side, math.floor(w / h * recipe.short_side))
        clip = F.interpolate(clip, size=size, mode="bilinear", align_corners=False)
        s, long = recipe.crop, size[1]
        xs = [0, math.ceil((long - s) / 2), long - s] if recipe.crops == 3 else [math.ceil((long - s) / 2)]
        y = math.ceil((size[0] - s) / 2)
        out += [clip[:, :, y:y + s, x:x + s] for x in xs]
    return torch.stack(out)


@pytest.mark.parametrize("views", [1, 10, 30])
def test_scores_are_the_mean_of_view_probabilities(tiny, clip_video, views):
    model, weights = tiny
    with torch.inference_mode():
        expected = model(hand_views(clip_video, views)).softmax(1).mean(0)
    result = x3dnet("predict", clip_video, "--weights", weights, "--views", views, "--resize", "bilinear",
                    "--top", 10, "--json", "--batch-size", 4, "--backend", "torch")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["video"], out["model"], out["views"]) == (str(clip_video), "tiny_a", views)
    scores = [p["score"] for p in out["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert [p["label"] for p in out["predictions"]] == [str(p["index"]) for p in out["predictions"]]
    got = torch.zeros(10)
    got[[p["index"] for p in out["predictions"]]] = torch.tensor(scores)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_labels_from_a_file_and_the_readable_table(tiny, clip_video, tmp_path):
    _, weights = tiny
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)))
    result = x3dnet("predict", clip_video, "--weights", weights, "--views", 1, "--labels", labels, "--top", 3)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{clip_video}  (tiny_a, 1 view)"
    assert len([line for line in lines if "%  class " in line]) == 3
    labels.write_text("a\nb\n")
    result = x3dnet("predict", clip_video, "--weights", weights, "--views", 1, "--labels", labels)
    assert result.returncode == 1 and "2 labels for a model with 10 classes" in result.stderr


def test_a_kinetics_model_prints_class_names(tmp_path, clip_video):
    torch.manual_seed(0)
    weights = save_checkpoint(X3D(tiny_config("tiny_a").replace(num_classes=400)).eval(), tmp_path / "k.safetensors",
                              recipe=TINY_RECIPE)
    result = x3dnet("predict", clip_video, "--weights", weights, "--views", 1, "--json")
    assert result.returncode == 0, result.stderr
    names = kinetics400_classes()
    assert len(names) == 400 and names[0] == "abseiling" and names[-1] == "zumba" and names == sorted(names)
    for p in json.loads(result.stdout)["predictions"]:
        assert p["label"] == names[p["index"]]


def bad_videos(tmp_path, good) -> dict:
    """Each way a file can fail, with the words its error must contain."""
    data = good.read_bytes()
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    faststart = write_video(tmp_path / "fs.mp4", 90, width=96, height=72, noise=True,
                            container_options={"movflags": "faststart"})
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    audio = tmp_path / "audio.m4a"
    zero = tmp_path / "zero.mkv"
    for path, with_video in ((audio, False), (zero, True)):
        with av.open(str(path), "w") as out:
            if with_video:
                v = out.add_stream("libx264", rate=30)
                v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
            a = out.add_stream("aac", rate=44100)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 44100
            for i in range(10):
                frame.pts = i * 1024
                for packet in a.encode(frame):
                    out.mux(packet)
            for packet in a.encode():
                out.mux(packet)
    codec = tmp_path / "codec.mp4"
    codec.write_bytes(data.replace(b"avc1", b"zzzz").replace(b"avcC", b"zzzC"))
    return {
        tmp_path / "missing.mp4": "no such file",
        tmp_path: "is a directory",
        text: "not a readable video",
        truncated: "cannot be decoded",
        audio: "has no video stream",
        zero: "has no frames",
        codec: "no decoder for its video codec",
    }


def test_bad_videos_get_one_line_each_and_the_others_are_predicted(tiny, clip_video, tmp_path):
    _, weights = tiny
    bad = bad_videos(tmp_path, clip_video)
    videos = [*bad, clip_video]
    result = x3dnet("predict", *videos, "--weights", weights, "--json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == len(bad)
    for line, (path, reason) in zip(errors, bad.items(), strict=True):
        assert line.startswith(f"x3dnet: error: {path}: ") and reason in line, line
    assert [json.loads(line)["video"] for line in result.stdout.splitlines()] == [str(clip_video)]


def test_bad_flags_and_weights(tiny, clip_video, tmp_path, capsys):
    _, weights = tiny
    assert_one_line_error_here(capsys, ["predict", clip_video, "--weights", tmp_path / "none.pyth"],
                               "no such file, and no published weights")
    assert_one_line_error_here(capsys, ["predict", clip_video, "--weights", checkpoint_path("tiny_a", "pytorchvideo")],
                               "name it with --model")
    if not torch.cuda.is_available():
        assert_one_line_error_here(capsys, ["predict", clip_video, "--weights", weights, "--device", "cuda"],
                                   "CUDA is not available")
    for flags, message in ((["--views", "5"], "invalid choice"), (["--top", "0"], "positive integer")):
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            cli.main(["predict", str(clip_video), "--weights", str(weights), *flags])
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_damaged_changing_and_still_inputs(tiny, clip_video, tmp_path):
    # One run over every kind: each gets its line, the good video is still predicted, and nothing is silent.
    _, weights = tiny
    damaged = damage(clip_video, tmp_path / "damaged.mp4")
    change = size_change_video(tmp_path / "change.mkv", [(128, 48), (64, 48)])
    still = write_video(tmp_path / "still.mp4", 1, width=96, height=72)
    result = x3dnet("predict", clip_video, damaged, change, still, "--weights", weights, "--json", "--views", 10)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    err = result.stderr.splitlines()
    assert err[0].startswith(f"x3dnet: warning: {damaged}: ") and "corrupt frame" in err[0]
    assert err[1].startswith(f"x3dnet: error: {change}: the frame size changes within the video")
    assert err[2].startswith(f"x3dnet: error: {still}: a still image (or a video of one frame), not a video; "
                             "predict --stills takes it")
    assert len(err) == 3
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["video"], o["corrupt_frames"] > 0) for o in out] == [(str(clip_video), False), (str(damaged), True)]
    stills = x3dnet("predict", still, "--weights", weights, "--json", "--views", 10, "--stills")
    assert stills.returncode == 0, stills.stderr
    assert json.loads(stills.stdout)["video"] == str(still)
