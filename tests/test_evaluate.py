"""``x3dnet evaluate`` on a synthetic labelled dataset: scores against ``predict``, metrics by hand, the three
list formats, failures, determinism across workers, batches and processes, and resuming after a kill."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import checkpoint_path, tiny_config
from synth import damage, size_change_video, write_video
from test_cli import assert_one_line_error, assert_one_line_error_here, x3dnet
from test_predict import TINY_RECIPE

from x3dnet import X3D, load_weights, save_checkpoint
from x3dnet.backends import create_engine
from x3dnet.errors import X3DNetError
from x3dnet.evaluate import compute_metrics, evaluate
from x3dnet.paths import FolderLock
from x3dnet.predict import predict_video
from x3dnet.synthetic import PATTERNS, make_dataset
from x3dnet.views import view_recipe

USED = (1, 3, 4, 6, 7, 9)  # classes 0, 2, 5 and 8 have no videos: indices must not shift
TIMING = ("wall_time_s", "videos_per_s", "evaluated_now", "engine", "processes", "batch_size", "workers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """tiny_a's reference weights (10 classes) and a synthetic dataset of 6 of the 10 classes, 3 clips each."""
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    weights = save_checkpoint(model, tmp_path_factory.mktemp("w") / "tiny_a.safetensors", recipe=TINY_RECIPE)
    data = make_dataset(tmp_path_factory.mktemp("data"), used=USED, videos_per_class=3, seconds=1.5)
    return model.eval(), weights, data


def run(setup, out, **kw):
    _, weights, data = setup
    kw.setdefault("data", data.slowfast)
    kw = {"classes": data.classes, "weights": weights, "views": 10, "backend": "torch", "workers": 0,
          "progress": False, "log": lambda line: None, **kw}
    return evaluate(kw.pop("data"), out=out, **kw)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_results(a, b):
    """Identical metrics and top-5 classes; scores equal to fp32 noise (another batch size runs other kernels)."""
    assert {k: v for k, v in a[0].items() if k not in TIMING} == {k: v for k, v in b[0].items() if k not in TIMING}
    pa, pb = a[1], b[1]
    assert [(p["video"], p["label"], p["top5"]) for p in pa] == [(p["video"], p["label"], p["top5"]) for p in pb]
    np.testing.assert_allclose([p["scores"] for p in pa], [p["scores"] for p in pb], atol=1e-5, rtol=0)


def test_scores_are_predict_scores_and_metrics_add_up(setup, tmp_path):
    model, weights, data = setup
    metrics = run(setup, tmp_path / "run", views=30, batch_size=7, save_scores=True)
    predictions = lines(tmp_path / "run" / "predictions.jsonl")
    assert [p["video"] for p in predictions] == data.slowfast.read_text().split()[::2]
    assert [p["label"] for p in predictions] == list(data.labels) == [c for c in USED for _ in range(3)]

    # Each video's scores are what predict gives it alone: the mean of its 30 views' probabilities.
    engine = create_engine(model, backend="torch")
    recipe = view_recipe(TINY_RECIPE, 30)
    scores = np.load(tmp_path / "run" / "scores.npy")
    assert scores.shape == (18, 10) and scores.dtype == np.float32
    right = top5 = 0
    per_class = {}
    for p, row in zip(predictions, scores, strict=True):
        alone = predict_video(engine, data.videos / p["video"], recipe).scores
        best, order = alone.topk(5)
        assert p["top5"] == order.tolist()
        np.testing.assert_allclose(p["scores"], best.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(row, alone.numpy(), atol=1e-6, rtol=0)
        right += order[0] == p["label"]
        top5 += p["label"] in order.tolist()
        per_class.setdefault(p["label"], []).append(bool(order[0] == p["label"]))
    assert metrics["top1"] == pytest.approx(100 * right / 18)
    assert metrics["top5"] == pytest.approx(100 * top5 / 18)
    assert metrics["mean_class_accuracy"] == pytest.approx(np.mean([100 * np.mean(v) for v in per_class.values()]))
    assert [(c["index"], c["name"], c["videos"]) for c in metrics["per_class"]] == [(c, PATTERNS[c], 3) for c in USED]
    assert 0 < metrics["top5"] < 100  # random weights: the sums above are not trivially all or nothing
    assert (metrics["videos"], metrics["failed"], metrics["listed"], metrics["views"]) == (18, 0, 18, 30)
    assert metrics["model"] == "tiny_a"
    assert metrics["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metrics["recipe"]["clips"] == 10 and metrics["recipe"]["crops"] == 3 and metrics["recipe"]["crop"] == 80
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_metrics_by_hand():
    records = [
        {"label": 0, "top5": [0, 1, 2, 3, 4]}, {"label": 0, "top5": [1, 0, 2, 3, 4]},
        {"label": 0, "top5": [1, 2, 3, 4, 5]}, {"label": 2, "top5": [2, 0, 1, 3, 4]},
    ]
    m = compute_metrics(records, 6)
    assert m["top1"] == 50.0 and m["top5"] == 75.0
    assert m["mean_class_accuracy"] == pytest.approx((100 / 3 + 100) / 2)  # classes 1, 3-5 have no videos
    assert m["per_class"] == [{"index": 0, "videos": 3, "top1": pytest.approx(100 / 3)},
                              {"index": 2, "videos": 1, "top1": 100.0}]


def test_the_three_list_formats_agree(setup, tmp_path):
    _, _, data = setup
    listed = run(setup, tmp_path / "list")
    csv = run(setup, tmp_path / "csv", data=data.kinetics_csv, root=data.videos)
    tree = run(setup, tmp_path / "tree", data=data.videos)
    assert (csv["data_format"], tree["data_format"]) == ("kinetics-csv", "folders")
    strip = ("data", "data_format", "data_sha256", *TIMING)
    for other in (csv, tree):
        assert {k: v for k, v in other.items() if k not in strip} == {k: v for k, v in listed.items() if k not in strip}
    def results(name):  # sorted: the tree lists each class folder's files by name
        return sorted((p["video"], p["label"], p["top5"]) for p in lines(tmp_path / name / "predictions.jsonl"))

    assert results("csv") == results("tree") == results("list")


def test_missing_and_broken_videos_are_counted_and_listed(setup, tmp_path):
    _, _, data = setup
    (data.videos / "broken.mp4").write_bytes((data.videos / data.slowfast.read_text().split()[0]).read_bytes()[:900])
    listing = tmp_path / "val.txt"
    listing.write_text(data.slowfast.read_text() + "gone.mp4 3\nbroken.mp4 1\n")
    metrics = run(setup, tmp_path / "run", data=listing, root=data.videos)
    assert (metrics["videos"], metrics["failed"], metrics["listed"]) == (18, 2, 20)
    failed = {f["video"]: f["error"] for f in metrics["failed_videos"]}
    assert set(failed) == {"gone.mp4", "broken.mp4"}
    assert "gone.mp4: no such file" in failed["gone.mp4"]
    assert failed["broken.mp4"].startswith(str(data.videos / "broken.mp4"))
    clean = run(setup, tmp_path / "clean")
    assert metrics["top1"] == clean["top1"] and metrics["per_class"] == clean["per_class"]  # failures are not guessed
    assert len(lines(tmp_path / "run" / "predictions.jsonl")) == 18
    # Resuming a finished run tries the two failed videos again, and only those.
    before = lines(tmp_path / "run" / "predictions.jsonl")
    (data.videos / "gone.mp4").write_bytes((data.videos / data.slowfast.read_text().split()[0]).read_bytes())
    again = run(setup, tmp_path / "run", data=listing, root=data.videos, resume=True)
    (data.videos / "gone.mp4").unlink()
    assert (again["videos"], again["failed"], again["evaluated_now"], again["failed_now"]) == (19, 1, 1, 1)
    assert [f["video"] for f in again["failed_videos"]] == ["broken.mp4"]
    after = lines(tmp_path / "run" / "predictions.jsonl")
    assert after[:18] == before and after[18]["video"] == "gone.mp4" and after[18]["top5"] == before[0]["top5"]


def test_same_results_across_workers_batches_and_processes(setup, tmp_path):
    _, weights, data = setup
    results = []
    for i, kw in enumerate([{"workers": 0, "batch_size": 8}, {"workers": 2, "batch_size": 1},
                            {"workers": 1, "batch_size": 7}]):
        metrics = run(setup, tmp_path / str(i), **kw)
        results.append((metrics, lines(tmp_path / str(i) / "predictions.jsonl")))
    for other in results[1:]:
        same_results(results[0], other)
    # Two processes under torchrun (gloo): each takes every other video, rank 0 gathers.
    out = tmp_path / "torchrun"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "x3dnet",
         "evaluate", "--data", data.slowfast, "--classes", data.classes, "--weights", weights, "--views", "10",
         "--backend", "torch", "--workers", "1", "--out", out, "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and not list(out.glob("predictions.rank*.jsonl"))
    same_results(results[0], (metrics, lines(out / "predictions.jsonl")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_results(setup, tmp_path):
    cpu = run(setup, tmp_path / "cpu", workers=2)
    for backend in ("torch", "torch-opt"):
        gpu = run(setup, tmp_path / backend, workers=2, device="cuda", backend=backend)
        assert gpu["engine"] == f"{backend} fp32 on cuda"
        same_results((cpu, lines(tmp_path / "cpu" / "predictions.jsonl")),
                     (gpu, lines(tmp_path / backend / "predictions.jsonl")))


def evaluate_cli(setup, out, *extra):
    _, weights, data = setup
    return [sys.executable, "-m", "x3dnet", "evaluate", "--data", data.slowfast, "--classes", data.classes,
            "--weights", weights, "--views", "30", "--backend", "torch", "--workers", "0", "--batch-size", "1",
            "--out", out, "--no-progress", "--save-scores", *extra]


def interrupt(command, log, sig, after=3):
    """Start ``command``, send ``sig`` once ``log`` holds ``after`` lines; the number of lines it left."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_text().count("\n") >= after:
            process.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = process.communicate(timeout=120)
    return process.returncode, err, log.read_text().count("\n")


def test_resume_after_a_kill_equals_an_uninterrupted_run(setup, tmp_path):
    whole = subprocess.run(evaluate_cli(setup, tmp_path / "whole"), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    code, _, kept = interrupt(evaluate_cli(setup, out), out / "predictions.jsonl", signal.SIGKILL)
    assert code == -signal.SIGKILL and 3 <= kept < 18
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"index": 5, "video": "cut sho')  # a line the kill cut short
    again = subprocess.run(evaluate_cli(setup, out), capture_output=True, text=True)
    assert_one_line_error(again, f"{out}: holds an evaluation already; add --resume to continue it")
    resumed = subprocess.run(evaluate_cli(setup, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} done earlier, {18 - kept} to go" in resumed.stderr
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "killed"))
    assert b["evaluated_now"] == 18 - kept
    same_results((a, lines(tmp_path / "whole" / "predictions.jsonl")), (b, lines(out / "predictions.jsonl")))
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(tmp_path / "whole" / "scores.npy"), atol=1e-6)
    # Resuming a finished run changes nothing; its probabilities come back from scores.npy.
    before = (out / "scores.npy").read_bytes(), (out / "predictions.jsonl").read_text()
    finished = subprocess.run(evaluate_cli(setup, out, "--resume"), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "18 done earlier, 0 to go" in finished.stderr
    assert ((out / "scores.npy").read_bytes(), (out / "predictions.jsonl").read_text()) == before


def test_a_corrupt_record_inside_a_log_is_named(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, views=1)
    text = (out / "predictions.jsonl").read_text().splitlines()
    text[4] = text[4][:30]
    (out / "predictions.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(X3DNetError, match=rf"{out / 'predictions.jsonl'}:5: corrupt record; remove that line"):
        run(setup, out, views=1, resume=True)


def test_ctrl_c_keeps_the_work_and_says_how_to_go_on(setup, tmp_path):
    out = tmp_path / "run"
    code, err, kept = interrupt(evaluate_cli(setup, out), out / "predictions.jsonl", signal.SIGINT)
    assert code == 130 and "Traceback" not in err
    assert err.rstrip().endswith("the same command with --resume goes on from there\nx3dnet: interrupted")
    assert kept >= 3
    saved = lines(out / "predictions.jsonl")
    probs = np.frombuffer(base64.b64decode(saved[0]["probs"]), "<f4")
    assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-5 and probs.argsort()[::-1][0] == saved[0]["top5"][0]


def test_a_resumed_run_must_be_the_same_evaluation(setup, tmp_path):
    model, weights, data = setup
    run(setup, tmp_path / "run", views=1)
    other = save_checkpoint(X3D(tiny_config("tiny_a")), tmp_path / "other.safetensors", recipe=TINY_RECIPE)
    result = x3dnet("evaluate", "--data", data.slowfast, "--classes", data.classes, "--weights", other,
                    "--views", "1", "--backend", "torch", "--out", tmp_path / "run", "--resume")
    assert_one_line_error(result, "the run there differs in weights_sha256; resume it with the same list")
    result = x3dnet("evaluate", "--data", data.slowfast, "--classes", data.classes, "--weights", weights,
                    "--views", "10", "--backend", "torch", "--out", tmp_path / "run", "--resume")
    assert_one_line_error(result, "the run there differs in recipe")


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    _, weights, data = setup
    (tmp_path / "bad.txt").write_text("a.mp4 1\nb.mp4 moving sideways\n")
    base = ("--classes", data.classes, "--weights", weights, "--out", tmp_path / "o", "--backend", "torch")
    assert_one_line_error_here(capsys, ["evaluate", "--data", tmp_path / "bad.txt", *base],
                               f"{tmp_path / 'bad.txt'}:2: unknown label 'sideways'")
    assert_one_line_error_here(capsys, ["evaluate", "--data", data.slowfast, "--weights", weights, "--out", tmp_path / "o"],
                               "the model has 10 classes, not Kinetics-400's 400: name them with --classes FILE")
    (tmp_path / "five.txt").write_text("a\nb\nc\nd\ne\n")
    assert_one_line_error_here(capsys, ["evaluate", "--data", data.slowfast, "--classes", tmp_path / "five.txt",
                                        "--weights", weights, "--out", tmp_path / "o"],
                               "five.txt: 5 class names for a model with 10 classes")
    (tmp_path / "file").write_text("")
    assert_one_line_error_here(capsys, ["evaluate", "--data", data.slowfast, *base[:4], "--out", tmp_path / "file"],
                               "file: exists and is not a folder")
    result = x3dnet("evaluate", "--data", data.slowfast, *base[:4], "--workers", "-1")
    assert result.returncode == 2 and "expected 0 or a positive integer, not '-1'" in result.stderr


def test_synthesize_writes_every_list_format(tmp_path):
    result = x3dnet("synthesize", tmp_path / "d", "--videos-per-class", "1", "--seconds", "0.5", "--size", "64", "48")
    assert result.returncode == 0, result.stderr
    assert "wrote 10 videos of 10 classes" in result.stdout
    assert len((tmp_path / "d" / "videos" / "slowfast.txt").read_text().splitlines()) == 10
    assert (tmp_path / "d" / "kinetics_val.csv").read_text().startswith("label,youtube_id,time_start,time_end,split\n")
    assert sorted(p.name for p in (tmp_path / "d" / "videos").iterdir() if p.is_dir()) == sorted(
        name.replace(" ", "_") for name in PATTERNS)


def test_patterns_are_motion(tmp_path):
    """Each class is its pattern: the square moves along its class's direction or the mirror image of it,
    blinks, stays, grows, shrinks or changes colour (and nothing else changes)."""
    import av

    from x3dnet.synthetic import DIRECTIONS

    data = make_dataset(tmp_path, videos_per_class=3, seconds=0.6, seed=1)
    for line in data.slowfast.read_text().splitlines():
        video, label = line.split()
        with av.open(str(data.videos / video)) as c:
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).float() for f in c.decode(video=0)]
        squares = []  # (centre x, centre y, area, mean colour) of the square, or None where it is not shown
        for f in frames[:16]:
            ys, xs = torch.nonzero(f.max(2).values > 130, as_tuple=True)  # the background stays below 96
            squares.append((xs.float().mean().item(), ys.float().mean().item(), len(xs), f[ys, xs].mean(0))
                           if len(xs) else None)
        first, last = squares[0], squares[15]
        pattern = PATTERNS[int(label)]
        moved = math.hypot(last[0] - first[0], last[1] - first[1]) if first and last else None
        if pattern == "blinking":
            assert first is not None and squares[5] is None and squares[10] is not None, pattern
            continue
        assert first is not None and last is not None, pattern
        if pattern in DIRECTIONS:
            assert moved > 3, (pattern, moved)  # half a second at 1/8 to 1/4 of the short side per second
            angle = math.degrees(math.atan2(-(last[1] - first[1]), abs(last[0] - first[0])))  # mirrored to the right
            assert abs(angle - DIRECTIONS[pattern]) < 20, (pattern, angle)
        else:
            assert moved < 1, (pattern, moved)
            grown = last[2] / first[2]
            assert (grown > 1.2 if pattern == "growing" else grown < 0.85 if pattern == "shrinking" else
                    0.95 < grown < 1.05), (pattern, grown)
            recoloured = (last[3] - first[3]).abs().max().item()
            assert (recoloured > 40) == (pattern == "changing colour"), (pattern, recoloured)


def test_a_run_folder_belongs_to_one_process(setup, tmp_path):
    # Two evaluations on one --out mixed their records; run.json described one and the metrics the other.
    _, weights, data = setup
    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(out)  # what a running evaluation holds
    try:
        result = x3dnet("evaluate", "--data", data.slowfast, "--classes", data.classes, "--weights", weights,
                        "--views", "1", "--backend", "torch", "--out", out, "--no-progress")
        assert_one_line_error(result, f"{out}: another x3dnet process (pid {os.getpid()}) is using this run folder")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        lock.release()
    run(setup, out, views=1)  # released (as when the process ends, or is killed): the folder is usable
    assert (out / "metrics.json").exists()


@pytest.mark.parametrize("line", ['[1, 2]', '{"index": "2", "video": "a.mp4", "label": 1, "top5": [1]}',
                                  '{"index": 2, "video": "a.mp4", "label": 1}', '"text"', 'null'])
def test_a_log_line_of_the_wrong_shape_is_a_corrupt_record(setup, tmp_path, line):
    out = tmp_path / "run"
    run(setup, out, views=1)
    text = (out / "predictions.jsonl").read_text().splitlines()
    text[2] = line
    (out / "predictions.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(X3DNetError, match=rf"{out / 'predictions.jsonl'}:3: corrupt record; remove that line"):
        run(setup, out, views=1, resume=True)


def test_a_run_json_of_the_wrong_shape_is_named(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, views=1)
    (out / "run.json").write_text("[]\n")
    with pytest.raises(X3DNetError, match=rf"{out / 'run.json'}: corrupt"):
        run(setup, out, views=1, resume=True)


def test_no_video_evaluated_is_a_failure(setup, tmp_path):
    _, weights, data = setup
    listing = tmp_path / "gone.txt"
    listing.write_text("a.mp4 1\nb.mp4 3\n")
    result = x3dnet("evaluate", "--data", listing, "--classes", data.classes, "--weights", weights, "--views", "1",
                    "--backend", "torch", "--out", tmp_path / "run", "--no-progress", "--workers", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"x3dnet: error: no video could be evaluated: all 2 failed (their reasons are in {tmp_path / 'run'}"
        "/metrics.json)")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["videos"], metrics["failed"], metrics["top1"], metrics["videos_per_s"]) == (0, 2, None, 0.0)


def test_resuming_with_another_root_is_refused(setup, tmp_path):
    _, _, data = setup
    run(setup, tmp_path / "run", views=1, root=data.videos)
    copy = tmp_path / "copy"
    shutil.copytree(data.videos, copy)
    with pytest.raises(X3DNetError, match="the run there differs in root"):
        run(setup, tmp_path / "run", views=1, root=copy, resume=True)
    run(setup, tmp_path / "run", views=1, root=data.videos / ".", resume=True)  # the same folder, spelt otherwise


def test_one_file_listed_under_two_spellings_is_a_duplicate(setup, tmp_path):
    _, _, data = setup
    first = data.slowfast.read_text().split()[0]
    listing = tmp_path / "twice.txt"
    folder, name = first.split("/")
    listing.write_text(f"{first} 1\n{folder}/../{folder}/{name} 1\n")
    with pytest.raises(X3DNetError, match=rf"twice.txt:2: {folder}/../{folder}/{name} is listed twice \(as {first}\)"):
        run(setup, tmp_path / "run", data=listing, root=data.videos)


def test_corrupt_frames_are_counted(setup, tmp_path):
    clean = write_video(tmp_path / "noisy.mp4", 90, width=96, height=72, noise=True)
    damage(clean, tmp_path / "damaged.mp4")
    listing = tmp_path / "list.txt"
    listing.write_text("noisy.mp4 1\ndamaged.mp4 1\n")
    metrics = run(setup, tmp_path / "run", data=listing, views=1)
    assert metrics["videos_with_corrupt_frames"] == 1
    assert [v["video"] for v in metrics["corrupt_videos"]] == ["damaged.mp4"]
    saved = {p["video"]: p["corrupt_frames"] for p in lines(tmp_path / "run" / "predictions.jsonl")}
    assert saved["noisy.mp4"] == 0 and saved["damaged.mp4"] >= 1


def test_a_video_whose_frame_size_changes_fails_alone(setup, tmp_path):
    _, _, data = setup
    size_change_video(tmp_path / "change.mkv", [(128, 48), (64, 48)])
    first = data.slowfast.read_text().split()[0]
    shutil.copy(data.videos / first, tmp_path / "ok.mp4")
    listing = tmp_path / "list.txt"
    listing.write_text("change.mkv 1\nok.mp4 1\n")
    metrics = run(setup, tmp_path / "run", data=listing, views=1, workers=1)
    assert (metrics["videos"], metrics["failed"]) == (1, 1)
    assert "the frame size changes within the video" in metrics["failed_videos"][0]["error"]


def test_a_fifo_in_a_list_fails_alone_without_a_hang(setup, tmp_path):
    _, weights, data = setup
    os.mkfifo(tmp_path / "pipe.mp4")
    shutil.copy(data.videos / data.slowfast.read_text().split()[0], tmp_path / "ok.mp4")
    listing = tmp_path / "list.txt"
    listing.write_text("pipe.mp4 1\nok.mp4 1\n")
    result = subprocess.run([sys.executable, "-m", "x3dnet", "evaluate", "--data", listing, "--classes", data.classes,
                             "--weights", weights, "--views", "1", "--backend", "torch", "--out", tmp_path / "run",
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pipe.mp4: is a FIFO (named pipe), not a video file" in result.stderr


def test_a_forked_worker_does_not_keep_the_lock(tmp_path):
    # DataLoader workers are forked while the lock is held; a flock lasts while any copy of its descriptor is
    # open, so a run killed with lingering workers would keep its folder locked. Workers close their copies.
    lock = FolderLock(tmp_path)
    ready, started = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that outlives its parent's lock by a while
        os.write(started, b"1")  # the fork handlers have run by now
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        lock.release()
        FolderLock(tmp_path).release()  # free at once, though the child still runs
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)
