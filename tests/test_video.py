"""What ``video.py`` makes of unusual files: names FFmpeg would read as protocols, FIFOs, frame sizes that
change, streams that start late, damaged data, still images and rotated video."""

from __future__ import annotations

import os
import re
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image
from synth import damage, index_of, rotate_mp4, size_change_video, write_video

from x3dnet.errors import X3DNetError
from x3dnet.paths import PathError
from x3dnet.recipe import Recipe
from x3dnet.video import _decode, probe
from x3dnet.views import make_views, view_recipe

RECIPE = view_recipe(Recipe(frames=4, stride=6, train_crop=32, test_short_side=40, test_crop=40), 10)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 60, width=64, height=48)


def frame_indices(views) -> list[list[int]]:
    """The index each clip's frames carry (``synth.colour``), clip by clip."""
    return [[index_of(frame) for frame in clip] for clip in views.clips]


@pytest.mark.parametrize("name", ["file:x.mp4", "a:b.mp4", "rtmp:c.mp4", "-i.mp4"])
def test_local_names_are_files_not_protocols(video, tmp_path, monkeypatch, name):
    # FFmpeg reads "file:x.mp4" as the file x.mp4 and "a:b.mp4" as protocol "a": a local path is always a file.
    decoy = write_video(tmp_path / "x.mp4", 60, width=96, height=48)  # what "file:x.mp4" used to decode
    assert decoy.exists()
    shutil.copy(video, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    views = make_views(name, RECIPE)
    assert views.size == make_views(video, RECIPE).size and frame_indices(views) == frame_indices(
        make_views(video, RECIPE))


@pytest.mark.parametrize("kind", ["fifo", "loop", "empty", "directory", "missing", "device"])
def test_what_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path, kind):
    path = {"fifo": tmp_path / "x.mp4", "loop": tmp_path / "loop.mp4", "empty": "", "directory": tmp_path,
            "missing": tmp_path / "gone.mp4", "device": "/dev/zero"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    if kind == "loop":
        os.symlink(tmp_path / "loop.mp4", path)
    expected = {"fifo": "is a FIFO (named pipe), not a video file", "loop": "a symbolic link loop",
                "empty": "an empty string was given as the video's path", "directory": "is a directory, not a video",
                "missing": "no such file", "device": "is a device, not a video file"}[kind]
    with pytest.raises(PathError, match=re.escape(expected)):
        probe(path)


@pytest.mark.parametrize("sizes", [[(128, 48), (64, 48)], [(64, 48), (128, 48)]])
def test_a_frame_size_change_fails_the_video(tmp_path, sizes):
    # Larger first: views.stack used to crash the whole run; smaller first: later clips were cut at offsets
    # computed for the first size, silently.
    path = size_change_video(tmp_path / "change.mkv", sizes)
    (a, b), (c, d) = sizes
    with pytest.raises(X3DNetError, match=rf"the frame size changes within the video \(from {a}x{b} to {c}x{d} at "):
        make_views(path, RECIPE)


def test_a_stream_that_starts_late_gives_the_same_clips(video, tmp_path):
    # Same frames, pts from 5 s on: clip windows count from the stream's start, so the same frames are picked.
    # (The original counts from pts 0: its clips of such a stream would move; x3dnet deviates on purpose.)
    late = write_video(tmp_path / "late.mp4", 60, width=64, height=48, pts=[150 + i for i in range(60)],
                       time_base=Fraction(1, 30))
    info = probe(late)
    assert float(info.start * info.time_base) == pytest.approx(5.0, abs=0.05)
    assert frame_indices(make_views(late, RECIPE)) == frame_indices(make_views(video, RECIPE))


def test_corrupt_frames_are_reported(tmp_path):
    clean = write_video(tmp_path / "noisy.mp4", 90, width=96, height=72, noise=True)
    damaged = damage(clean, tmp_path / "damaged.mp4")
    assert make_views(clean, RECIPE).corrupt == []
    corrupt = make_views(damaged, RECIPE).corrupt
    assert len(corrupt) >= 1 and all(0 < t < 3 for t in corrupt)


@pytest.mark.parametrize("kind", ["png", "jpeg", "png named .mp4", "one-frame video"])
def test_still_images_are_refused_unless_asked_for(tmp_path, kind):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = 200
    if kind == "one-frame video":
        path = write_video(tmp_path / "one.mp4", 1, width=64, height=48)
    else:
        path = tmp_path / {"png": "x.png", "jpeg": "x.jpg", "png named .mp4": "x.mp4"}[kind]
        Image.fromarray(image).save(path, format="JPEG" if kind == "jpeg" else "PNG")
    with pytest.raises(X3DNetError, match="still image"):
        make_views(path, RECIPE)
    views = make_views(path, RECIPE, stills=True)  # asked for: every clip repeats the one frame
    assert len(views) == 10 and all(torch.equal(clip[0], clip[-1]) for clip in views.clips)


def test_rotated_video_is_turned_upright(tmp_path):
    # A frame whose left half is bright, tagged "turn a quarter clockwise": shown upright, the top half is bright.
    path = tmp_path / "wide.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0"}
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, :32] = 200
        for _ in range(30):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    rotated = rotate_mp4(path, tmp_path / "rotated.mp4")
    for resize in ("area", "bilinear"):
        recipe = view_recipe(Recipe(frames=4, stride=6, train_crop=32, test_short_side=40, test_crop=40), 10,
                             resize=resize)
        plain, turned = make_views(path, recipe), make_views(rotated, recipe)
        assert plain.size == (40, 53) and turned.size == (53, 40)
        frame = turned.clips[0][0].float() if resize == "area" else turned.clips[0][:, 0].permute(1, 2, 0)
        rows = frame.mean((1, 2))
        assert rows[:20].mean() > rows[-20:].mean() + 1  # bright on top: turned clockwise, as players show it
        expected = plain.clips[0].rot90(-1, (1, 2)) if resize == "area" else plain.clips[0].rot90(-1, (2, 3))
        torch.testing.assert_close(turned.clips[0].float(), expected.float(), atol=2, rtol=0)


def test_ctrl_c_while_decoding_is_an_interrupt_not_a_broken_video():
    # PyAV's interrupt callback ends an FFmpeg call with ExitError when a signal comes; taken for a decoding
    # error, Ctrl-C during evaluate marked the video failed and the run went on (a flaky CI failure).
    class Interrupted:
        def demux(self, stream):
            raise av.ExitError(-1414092869, "Immediate exit requested")

    with pytest.raises(KeyboardInterrupt):
        list(_decode("clip.mp4", Interrupted(), None))
