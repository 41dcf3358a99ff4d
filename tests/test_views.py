"""Which frames and pixels become views: against the original's recorded choices and the spec's formulas."""

from __future__ import annotations

import math
from fractions import Fraction

import av
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, SHARED
from synth import MEAN, STD, decoded_pts, index_of, write_video

from x3dnet import RECIPES, create_model
from x3dnet import video as video_module
from x3dnet.video import output_size
from x3dnet.views import ViewRecipe, crop_offsets, make_views, view_recipe

FIXTURE_VIDEO = FIXTURES / "videos" / "synth_320x240_30fps_10s.mp4"
PRESETS = {"30": 30, "10": 10, "1": 1}


@pytest.fixture(scope="module")
def video_refs() -> dict:
    refs = torch.load(FIXTURES / "x3d_xs_video_refs_one.pt", weights_only=True)
    return refs["refs"][FIXTURE_VIDEO.name]


@pytest.mark.parametrize("preset", PRESETS)
def test_frames_sizes_and_order_match_the_original(video_refs, preset):
    ref = video_refs[preset]
    views = make_views(FIXTURE_VIDEO, view_recipe(RECIPES["x3d_xs"], PRESETS[preset], resize="bilinear"))
    crops = views.recipe.crops
    assert len(views) == ref["n_views"]
    assert [views.pts[i // crops] for i in range(len(views))] == [list(map(int, p)) for p in ref["pts"]]
    assert [i // crops for i in range(len(views))] == list(ref["temporal_index"])
    assert views.size == tuple(ref["resized_hw"][0])
    assert views.decoded == ["window"] * views.recipe.clips
    assert views.tensor().shape == (ref["n_views"], 3, 4, views.recipe.crop, views.recipe.crop)


@pytest.mark.parametrize("preset", PRESETS)
def test_probabilities_match_the_original(video_refs, preset):
    weights = SHARED / "x3d_xs_slowfast.pyth"
    if not weights.exists():
        pytest.skip(f"{SHARED} is absent: the X3D-XS checkpoint lives there")
    ref = video_refs[preset]
    model = create_model("x3d_xs", weights=weights).eval()
    views = make_views(FIXTURE_VIDEO, view_recipe(RECIPES["x3d_xs"], PRESETS[preset], resize="bilinear"))
    with torch.inference_mode():
        probs = model(views.tensor()).softmax(1)
    torch.testing.assert_close(probs, ref["probs"], atol=1e-5, rtol=0)
    assert probs.mean(0).topk(5).indices.tolist() == list(ref["top5"])


def reference_pts(path, recipe: ViewRecipe) -> list[list[int]]:
    """Spec 4.3 written out over every decoded frame: each clip's pts window (plus the next frame), then
    linspace inside it, clamped and truncated; slowfast or co3d clip starts."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fps, frames, duration = float(s.average_rate), s.frames, s.duration
    every = decoded_pts(path)
    span = recipe.frames * recipe.stride * fps / 30
    n = recipe.clips
    if recipe.placement == "slowfast":
        starts = [max(frames - span, 0) * i / n for i in range(n)]
    else:
        starts = [max(0, (i + 0.5) * frames / n - span / 2) for i in range(n)]
    out = []
    for start in starts:
        lo, hi = int(start * duration / frames), int((start + span - 1) * duration / frames)
        segment = [p for p in every if lo <= p <= hi] + [p for p in every if p > hi][:1]
        picks = torch.linspace(0, span - 1, recipe.frames).clamp(0, len(segment) - 1).long()
        out.append([segment[i] for i in picks])
    return out


def assert_views_follow(path, recipe: ViewRecipe) -> None:
    views = make_views(path, recipe)
    expected = reference_pts(path, recipe)
    assert views.pts == expected
    every = decoded_pts(path)
    for i in range(len(views)):
        shown = [index_of(frame) for frame in views.view(i).unbind(1)]
        assert shown == [every.index(p) for p in expected[i // recipe.crops]]


def small_recipe(clips: int, crops: int, placement: str, **kw) -> ViewRecipe:
    kw = {"frames": 4, "stride": 12, "short_side": 32, "crop": 32 if crops == 3 else 28, **kw}
    return ViewRecipe(clips=clips, crops=crops, placement=placement, **kw)


@pytest.mark.parametrize("placement", ["slowfast", "co3d"])
@pytest.mark.parametrize("fps", [25, 30, 60])
@pytest.mark.parametrize("size", [(64, 48), (48, 64)], ids=["landscape", "portrait"])
def test_clip_frames_follow_the_spec(tmp_path, placement, fps, size):
    path = write_video(tmp_path / "v.mp4", 4 * fps, fps=fps, width=size[0], height=size[1])
    for clips, crops in [(10, 3), (10, 1), (1, 1)]:
        assert_views_follow(path, small_recipe(clips, crops, placement))


def test_worked_example_of_the_spec(tmp_path):
    # Spec 4.3 step 4: XS, 30 fps, 300 frames, 10 clips; clip 1 is [25, 40, 56, 72] by the decode-everything
    # formula; decoding its pts window first shifts it to start at frame 26 (the fixture shows the same).
    path = write_video(tmp_path / "v.mp4", 300)
    views = make_views(path, view_recipe(RECIPES["x3d_xs"], 10))
    clip1 = [index_of(f) for f in views.view(1).unbind(1)]
    assert clip1 == [26, 41, 57, 73]
    assert [index_of(f) for f in views.view(0).unbind(1)] == [0, 15, 31, 47]


def test_a_video_shorter_than_a_clip_repeats_its_last_frame(tmp_path):
    path = write_video(tmp_path / "short.mp4", 20)  # XS spans 48 frames at 30 fps
    for views in (1, 10):
        v = make_views(path, view_recipe(RECIPES["x3d_xs"], views))
        for i in range(len(v)):
            assert [index_of(f) for f in v.view(i).unbind(1)] == [0, 15, 19, 19]
    assert_views_follow(path, small_recipe(10, 3, "co3d"))


def test_variable_frame_rate(tmp_path):
    pts, t = [], 0
    for i in range(150):
        pts.append(t)
        t += 20 if i % 3 else 60  # 20, 20, 60 ms: 30 fps on average
    path = write_video(tmp_path / "vfr.mp4", 150, pts=pts, time_base=Fraction(1, 1000))
    for placement in ("slowfast", "co3d"):
        assert_views_follow(path, small_recipe(10, 3, placement))


def test_odd_frame_size(tmp_path):
    path = write_video(tmp_path / "odd.mp4", 60, width=67, height=45, pix_fmt="yuv444p")
    recipe = small_recipe(10, 3, "slowfast", short_side=33, crop=33)
    assert_views_follow(path, recipe)
    v = make_views(path, recipe)
    assert v.size == (33, 49)  # 67 * 33 / 45 = 49.13
    assert v.offsets == [(0, 0), (0, 8), (0, 16)]


def test_a_long_video_is_decoded_only_around_its_clips(tmp_path, monkeypatch):
    # 120 s with a key frame every 3 s: a seek lands up to 3 s before its window, more than the gap
    # that makes x3dnet seek at all, so it must not seek again for the same window.
    path = write_video(tmp_path / "long.mp4", 3600, width=32, height=24, gop=90,
                       options={"x264-params": "scenecut=0"})  # solid colours would otherwise all be key frames
    decoded = []
    real = video_module._decode

    def counting(*args):
        for frame in real(*args):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video_module, "_decode", counting)
    recipe = small_recipe(10, 1, "slowfast", short_side=24, crop=24)
    views = make_views(path, recipe)
    assert views.pts == reference_pts(path, recipe)
    assert len(decoded) < 3600 / 2, "seeking should skip most of the video"


def test_a_header_without_duration_places_clips_on_all_frames(tmp_path):
    path = write_video(tmp_path / "v.mkv", 100)  # Matroska written this way records no frame count
    recipe = small_recipe(10, 3, "slowfast")
    views = make_views(path, recipe)
    assert views.decoded == ["whole"] * 10
    span, n = 48, 100
    for i in range(len(views)):
        start = (n - span) * (i // 3) / 10  # spec 4.3 steps 1-2 on the decoded frame count
        expected = torch.linspace(start, start + span - 1, 4).clamp(0, n - 1).long().tolist()
        assert [index_of(f) for f in views.view(i).unbind(1)] == expected


def test_crop_offsets():
    # slowfast: along the long side at 0, ceil((long - S) / 2), long - S; one crop centred with ceil
    assert crop_offsets(182, 243, 182, 3, "slowfast") == [(0, 0), (0, 31), (0, 61)]
    assert crop_offsets(243, 182, 182, 3, "slowfast") == [(0, 0), (31, 0), (61, 0)]
    assert crop_offsets(182, 182, 182, 3, "slowfast") == [(0, 0), (0, 0), (0, 0)]
    assert crop_offsets(182, 241, 160, 1, "slowfast") == [(11, 41)]
    # co3d: Python round (half to even), and always left / centre / right
    assert crop_offsets(182, 241, 160, 1, "co3d") == [(11, 40)]
    assert crop_offsets(160, 213, 160, 3, "co3d") == [(0, 0), (0, 26), (0, 53)]
    assert crop_offsets(213, 160, 160, 3, "co3d") == [(26, 0), (26, 0), (26, 0)]


def test_short_side_sizes():
    assert output_size(240, 320, 182, "bilinear") == (182, 242)  # floor(320 / 240 * 182) = floor(242.67)
    assert output_size(240, 320, 182, "area") == (182, 243)  # rounded, as the original's reader does
    assert output_size(320, 240, 182, "area") == (243, 182)
    assert output_size(1080, 1920, 256, "area") == (256, 455)  # 455.1
    assert output_size(1080, 1920, 256, "bilinear") == (256, 455)
    assert output_size(182, 300, 182, "area") == (182, 300)  # already at scale: untouched


@pytest.mark.parametrize("resize", ["area", "bilinear"])
def test_pixels_are_resized_cropped_and_normalised_as_specified(tmp_path, resize):
    path = write_video(tmp_path / "v.mp4", 60, width=80, height=60, noise=True)
    recipe = small_recipe(10, 3, "slowfast", short_side=45, crop=45, resize=resize)
    views = make_views(path, recipe)
    h, w = output_size(60, 80, 45, resize)
    offsets = [(0, 0), (0, math.ceil((w - 45) / 2)), (0, w - 45)]
    with av.open(str(path)) as c:
        frames = {f.pts: f for f in c.decode(video=0)}
    for i in range(len(views)):
        clip = []
        for p in views.pts[i // 3]:
            if resize == "area":
                rgb = frames[p].reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                x = (torch.from_numpy(rgb).float() / 255 - MEAN) / STD
                x = x.permute(2, 0, 1)
            else:  # normalise, then bilinear without antialiasing, as the original's PyAV path
                x = (torch.from_numpy(frames[p].to_ndarray(format="rgb24")).float() / 255 - MEAN) / STD
                x = F.interpolate(x.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            y0, x0 = offsets[i % 3]
            clip.append(x[:, y0:y0 + 45, x0:x0 + 45])
        torch.testing.assert_close(views.view(i), torch.stack(clip, 1), atol=1e-6, rtol=0)
