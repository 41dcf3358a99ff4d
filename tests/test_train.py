"""x3dnet train: training clips, the run folder, resuming to the bit, data-parallel runs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import tiny_config
from test_cli import assert_one_line_error_here, tiny_native, x3dnet
from test_predict import TINY_RECIPE

from x3dnet import X3D, load_checkpoint, save_checkpoint
from x3dnet.datasets import read_dataset, training_classes
from x3dnet.errors import X3DNetError
from x3dnet.synthetic import PATTERNS, make_dataset
from x3dnet.train import SolverConfig, epoch_batches, initial_network, lr_at, read_train_log, solver_for, split_dataset
from x3dnet.views import TrainClip, train_clip

TINY_CLIP = TrainClip(frames=4, stride=12, crop=64, jitter=(73, 91))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """tiny_a at the original's initialisation (the reference fixture's random BN statistics make every SGD
    step chaotic) in x3dnet's format, 10 class names, 40 training and 20 validation videos."""
    root = tmp_path_factory.mktemp("train")
    _, classes = tiny_native(root)
    torch.manual_seed(0)
    weights = save_checkpoint(X3D(tiny_config("tiny_a")), root / "fresh.safetensors", recipe=TINY_RECIPE)
    train = make_dataset(root / "train", videos_per_class=4, seconds=1.0, seed=3)
    val = make_dataset(root / "val", videos_per_class=2, seconds=1.0, seed=4)
    return root, weights, classes, train, val


def train_args(setup, out, *extra, val=True):
    _, weights, _, train, val_set = setup
    return ["train", "--data", str(train.videos), *(["--val", str(val_set.videos)] if val else []),
            "--weights", str(weights), "--out", str(out), "--no-progress", "--batch-size", "8", "--workers", "1",
            *map(str, extra)]


def train_cli(setup, out, *extra, val=True):
    return [sys.executable, "-m", "x3dnet", *train_args(setup, out, *extra, val=val)]


def state_of(path):
    return safetensors.torch.load_file(str(path))


def test_training_clips_follow_the_recipe_and_the_seed(setup):
    _, _, _, train, _ = setup
    video = train.videos / "moving_sideways" / min(os.listdir(train.videos / "moving_sideways"))
    a, _ = train_clip(video, TINY_CLIP, np.random.default_rng([1, 2]))
    b, _ = train_clip(video, TINY_CLIP, np.random.default_rng([1, 2]))
    assert a.shape == (3, 4, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)  # a function of the generator's seed alone
    clips = [train_clip(video, TINY_CLIP, np.random.default_rng([1, k]))[0] for k in range(6)]
    assert len({c.sum().item() for c in clips}) == 6  # other seeds: other windows, sizes, crops, flips
    # A flip is a mirror image of the same clip: the same draws with the flip turned off.
    flipped = next(k for k in range(20) if np.random.default_rng([1, k]).uniform(size=5)[4] < 0.5)
    unflipped = next(k for k in range(20) if np.random.default_rng([1, k]).uniform(size=5)[4] >= 0.5)
    for k, mirrored in ((flipped, True), (unflipped, False)):
        on, _ = train_clip(video, TINY_CLIP, np.random.default_rng([1, k]))
        off, _ = train_clip(video, TrainClip(4, 12, 64, (73, 91), flip=False), np.random.default_rng([1, k]))
        assert torch.equal(on, off.flip(-1) if mirrored else off)
    # Normalised with the recipe's mean and std: values of a uint8 frame land in [-2, 2.45].
    assert -2.01 < a.min() and a.max() < 2.45


def test_epochs_deal_full_batches_in_a_seeded_order():
    one = epoch_batches(10, 4, seed=0, epoch=0)
    assert len(one) == 2 and all(len(b) == 4 for b in one) and len({i for b in one for i in b}) == 8
    assert one == epoch_batches(10, 4, seed=0, epoch=0)
    assert one != epoch_batches(10, 4, seed=0, epoch=1) and one != epoch_batches(10, 4, seed=1, epoch=0)


def test_recipes_scale_with_the_batch_and_the_run():
    original = solver_for("original", epochs=300, batch_size=128)
    assert (original.base_lr, original.warmup_epochs, original.warmup_start_lr) == (0.1, 35.0, 0.01)
    small = solver_for("original", epochs=30, batch_size=8)
    assert small.base_lr == pytest.approx(0.1 * 8 / 128) and small.warmup_epochs == pytest.approx(3.5)
    tuned = solver_for("finetune", epochs=30, batch_size=16, lr=0.02)
    assert (tuned.base_lr, tuned.warmup_epochs, tuned.warmup_start_lr) == (0.02, 1.0, 0.002)


def test_classes_come_from_folders_or_the_lists_labels(setup, tmp_path):
    _, _, _, train, _ = setup
    assert training_classes(train.videos) == sorted(p.replace(" ", "_") for p in PATTERNS)
    (tmp_path / "l.txt").write_text("a.mp4 2\nb.mp4 0\n")
    assert training_classes(tmp_path / "l.txt") == ["0", "1", "2"]
    (tmp_path / "n.txt").write_text("a.mp4 walking\nb.mp4 Running\n")
    assert training_classes(tmp_path / "n.txt") == ["Running", "walking"]
    data = read_dataset(train.videos, classes=training_classes(train.videos))
    kept, held = split_dataset(data, 0.25, seed=0)
    assert len(held) == 10 and len(kept) == 30  # one of each class's four
    assert {s.label for s in held.samples} == set(range(10))
    assert not {s.path for s in held.samples} & {s.path for s in kept.samples}
    assert split_dataset(data, 0.25, seed=0)[1] == held and split_dataset(data, 0.25, seed=1)[1] != held


def test_a_run_trains_writes_its_folder_and_its_checkpoints_name_the_classes(setup, tmp_path):
    _, _, _, train, val = setup
    out = tmp_path / "run"
    done = subprocess.run(train_cli(setup, out, "--epochs", "2", "--plot", out / "curves.png"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "epoch 2/2" in done.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] == training_classes(train.videos) and run["recipe"] == "finetune" and run["epochs"] == 2
    records = read_train_log(out / "train_log.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(steps) == 2 * 5 and len(epochs) == 2  # 40 videos / batch 8
    assert [r["lr"] for r in steps] == [lr_at(SolverConfig(**run["solver"]), k / 5) for k in range(10)]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert [r["precise_bn_batches"] for r in epochs] == [5, 5]
    assert epochs[-1]["best_val_top1"] == max(r["val_top1"] for r in epochs)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_checkpoint(out / "best.safetensors")
    assert best.classes == tuple(run["classes"]) and best.config.num_classes == 10 and best.recipe.train_crop == 64
    # predict and evaluate name the classes from the file, without --labels or --classes.
    video = min((val.videos / "moving_up").iterdir())
    shown = x3dnet("predict", video, "--weights", out / "best.safetensors", "--views", "1", "--top", "10")
    assert shown.returncode == 0, shown.stderr
    assert "moving_up" in shown.stdout and "changing_colour" in shown.stdout
    evaluated = x3dnet("evaluate", "--data", val.videos, "--weights", out / "best.safetensors", "--views", "1",
                       "--backend", "torch", "--out", tmp_path / "eval", "--no-progress", "--workers", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["videos"] == 20
    # The best epoch's validation is what evaluate measures with the same views on the same weights.
    best_epoch = max(epochs, key=lambda r: r["val_top1"])
    assert metrics["top1"] == pytest.approx(best_epoch["val_top1"])


def test_resume_after_a_kill_ends_with_the_same_weights_bit_for_bit(setup, tmp_path, capsys):
    # Dropout on: its masks must come back the same too. Checkpoints after every step (10 s of 0.0001 min).
    args = ("--epochs", "2", "--lr", "0.02", "--checkpoint-minutes", "0.0001", "--precise-bn-batches", "2")
    whole = subprocess.run(train_cli(setup, tmp_path / "whole", *args, val=False), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cli(setup, out, *args, val=False), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    log = out / "train_log.jsonl"
    while time.monotonic() < deadline:  # kill it part-way through the second epoch
        if log.exists() and log.read_text().count('"type": "step"') >= 7:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(log, "a") as f:
        f.write('{"type": "step", "epo')  # a line torn by the kill
    saved = json.loads(safetensors.safe_open(str(out / "state.safetensors"), "pt").metadata()["x3dnet.train_state"])
    assert saved["epoch"] == 1 and 0 < saved["step"] < 5  # a checkpoint within the second epoch
    assert_one_line_error_here(capsys, train_args(setup, out, *args, val=False),
                               "holds a training run already; add --resume")
    resumed = subprocess.run(train_cli(setup, out, *args, "--resume", val=False), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at epoch 2, step {saved['step']}" in resumed.stderr
    a, b = state_of(tmp_path / "whole" / "last.safetensors"), state_of(out / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (read_train_log(out / "train_log.jsonl") == read_train_log(tmp_path / "whole" / "train_log.jsonl")
            or _same_but_timing(out, tmp_path / "whole"))
    assert_one_line_error_here(capsys, train_args(setup, out, *args, "--epochs", "3", "--resume", val=False),
                               "differs in solver, epochs")


def test_ctrl_c_stops_the_run_and_its_workers_and_says_how_to_go_on(setup, tmp_path):
    out = tmp_path / "run"
    args = ("--epochs", "2", "--precise-bn-batches", "2", "--workers", "2")
    proc = subprocess.Popen(train_cli(setup, out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # as a terminal does: the whole group
        if (out / "train_log.jsonl").exists() and '"type": "epoch"' in (out / "train_log.jsonl").read_text():
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.rstrip().endswith("the same command with --resume goes on from its last checkpoint\nx3dnet: interrupted")
    for _ in range(100):  # the run's DataLoader workers end with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("a process of the interrupted run is still alive")
    resumed = subprocess.run(train_cli(setup, out, *args, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr  # from its checkpoint, or afresh if none was written yet
    assert [r["epoch"] for r in read_train_log(out / "train_log.jsonl") if r["type"] == "epoch"] == [1, 2]


def test_the_initial_weights_are_the_seeds(setup, tmp_path):
    """From scratch, and a new classifier when fine-tuning: drawn from --seed, not from the process (torch
    seeds every process differently), so the same command gives the same run and a run killed before its
    first checkpoint resumes into it."""
    before = torch.random.get_rng_state()
    a, b, c = (initial_network("x3d_xs", None, 7, 0.5, seed=s)[0].state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)  # the process's generator is left alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"]) and not torch.equal(a["fc2.weight"], c["fc2.weight"])
    # In fresh processes, from weights whose classifier (10 classes) is replaced by a 3-class one.
    _, weights, _, _, _ = setup
    data = make_dataset(tmp_path / "data", used=[0, 1, 2], videos_per_class=4, seconds=1.0, seed=5)
    runs = []
    for name in ("one", "two"):
        command = [sys.executable, "-m", "x3dnet", "train", "--data", str(data.videos), "--weights", str(weights),
                   "--out", str(tmp_path / name), "--no-progress", "--batch-size", "4", "--workers", "0",
                   "--epochs", "1", "--precise-bn-batches", "1"]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs.append(state_of(tmp_path / name / "last.safetensors"))
    one, two = runs
    assert one["fc2.weight"].shape[0] == 3
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_channels_last_is_the_same_run_in_another_layout(setup, tmp_path, monkeypatch):
    """Channels-last 3-D weights and clips (the CPU's default: faster there), the same training as the
    contiguous layout up to fp32 rounding; run.json records it and a resumed run must keep it."""
    import x3dnet.train as train_module

    _, weights, _, train_set, _ = setup
    nets, real = [], train_module.initial_network

    def kept(*args, **kwargs):
        nets.append(real(*args, **kwargs))
        return nets[-1]

    monkeypatch.setattr(train_module, "initial_network", kept)
    common = dict(weights=weights, epochs=1, lr=0.02, dropout=0.0, workers=0, precise_bn_batches=2, progress=False,
                  log=lambda line: None)
    train_module.train(train_set.videos, out=tmp_path / "contiguous", channels_last=False, **common)
    train_module.train(train_set.videos, out=tmp_path / "cl", **common)
    weight = [n[0].stem.conv_spatial.weight for n in nets]  # the very tensors trained
    assert weight[1].is_contiguous(memory_format=torch.channels_last_3d) and not weight[1].is_contiguous()
    assert weight[0].is_contiguous()
    a, b = state_of(tmp_path / "contiguous" / "last.safetensors"), state_of(tmp_path / "cl" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-3)  # zero-initialised BNs' biases have moved by 1e-9 only
        assert (a[k] - b[k]).abs().max().item() <= 2e-5 * scale, k  # measured 4.2e-6 on the AMD EPYC
    assert json.loads((tmp_path / "cl" / "run.json").read_text())["channels_last"] is True
    with pytest.raises(X3DNetError, match="differs in channels_last"):
        train_module.train(train_set.videos, out=tmp_path / "cl", resume=True, channels_last=False, **common)


def _same_but_timing(a, b) -> bool:
    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("clips_per_s", "time_s")} for r in records]

    return strip(read_train_log(a / "train_log.jsonl")) == strip(read_train_log(b / "train_log.jsonl"))


# The bound, 1e-5, in either layout: measured 3.6e-7 contiguous and 3.7e-7 channels-last on the AMD
# EPYC (2.2e-5 channels-last while torch's own BN kernel summed its channels row by row).
@pytest.mark.parametrize("layout", ["--no-channels-last", "--channels-last"])
def test_two_processes_with_sync_bn_give_one_process_weights(setup, tmp_path, layout):
    args = ("--epochs", "1", "--lr", "0.01", "--dropout", "0", "--sync-bn", layout)
    one = subprocess.run(train_cli(setup, tmp_path / "one", *args, val=False), capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *train_cli(setup, tmp_path / "two", *args, val=False)[1:]],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr
    assert "over 2 processes" in two.stderr
    a, b = state_of(tmp_path / "one" / "last.safetensors"), state_of(tmp_path / "two" / "last.safetensors")
    start = load_checkpoint(setup[1]).state_dict
    moved = 0.0
    for k in a:
        if a[k].is_floating_point():
            scale = a[k].abs().max().clamp_min(1e-3)
            assert ((a[k] - b[k]).abs().max() / scale).item() <= 1e-5, k
            if k in start:
                moved = max(moved, ((a[k] - start[k]).abs().max() / scale).item())
    assert moved > 1e-3  # the steps moved the weights far more than the tolerance


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _largest_gap(a: dict, b: dict) -> tuple[float, str]:
    """The largest difference between two state dicts' floating tensors, relative to each tensor's scale."""
    gaps = {k: ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-3)).item()
            for k in a if a[k].is_floating_point()}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


@CUDA
def test_cuda_trains_as_the_cpu_does_in_fp32_and_near_it_in_bf16_and_fp16(setup, tmp_path):
    """On CUDA, fp32 (TF32 off, contiguous, torch's backward) is the CPU's run to fp32 rounding. bf16 and fp16
    (with a grad scaler) runs of the CLI, with workers (pinned clips), precise BN and validation, end near it;
    evaluate and predict on the GPU read their checkpoints, and evaluate measures what validation did."""
    from x3dnet.train import train

    _, weights, _, train_set, val_set = setup
    common = dict(weights=weights, epochs=1, lr=0.02, dropout=0.0, workers=0, precise_bn_batches=2, progress=False,
                  log=lambda line: None)
    train(train_set.videos, out=tmp_path / "cpu", channels_last=False, **common)
    train(train_set.videos, out=tmp_path / "cuda", device="cuda", **common)
    cpu = state_of(tmp_path / "cpu" / "last.safetensors")
    start = load_checkpoint(weights).state_dict
    moved, _ = _largest_gap({k: cpu[k] for k in start}, start)
    gap, name = _largest_gap(cpu, state_of(tmp_path / "cuda" / "last.safetensors"))
    print(f"\nCUDA fp32 against the CPU after an epoch: {gap:.2e} ({name}); the steps moved the weights {moved:.2e}")
    assert moved > 1e-3 and gap <= 1e-4, (gap, name)  # measured 4.9e-7 on an H200
    for precision in ("bf16", "fp16"):
        out = tmp_path / precision
        done = subprocess.run(train_cli(setup, out, "--device", "cuda", "--precision", precision, "--epochs", "1",
                                        "--lr", "0.02", "--dropout", "0", "--precise-bn-batches", "2", "--workers", "2"),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        run = json.loads((out / "run.json").read_text())
        assert run["precision"] == precision and run["channels_last"] is False
        (epoch,) = [r for r in read_train_log(out / "train_log.jsonl") if r["type"] == "epoch"]
        assert np.isfinite(epoch["train_loss"]) and epoch["precise_bn_batches"] == 2
        # The whole update, not each tensor: the zero-initialised final BNs' weights have only begun to move.
        half = state_of(out / "last.safetensors")
        moved = [k for k in cpu if cpu[k].is_floating_point() and "running" not in k and not torch.equal(cpu[k], start[k])]
        update = torch.cat([(cpu[k] - start[k]).flatten() for k in moved])
        error = torch.cat([(half[k] - cpu[k]).flatten() for k in moved])
        ratio = (error.norm() / update.norm()).item()
        print(f"CUDA {precision} against the CPU's fp32: {ratio:.2e} of the update")
        assert len(moved) > 20 and 0 < ratio < 0.1, (precision, ratio)  # H200: bf16 0.054, fp16 0.014
        evaluated = x3dnet("evaluate", "--data", val_set.videos, "--weights", out / "best.safetensors", "--views", "1",
                           "--backend", "torch", "--device", "cuda", "--out", out / "eval", "--no-progress",
                           "--workers", "0")
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads((out / "eval" / "metrics.json").read_text())["top1"] == pytest.approx(epoch["val_top1"])
    video = min((val_set.videos / "moving_up").iterdir())
    shown = x3dnet("predict", video, "--weights", tmp_path / "fp16" / "best.safetensors", "--device", "cuda",
                   "--views", "1", "--top", "10")
    assert shown.returncode == 0, shown.stderr
    assert "moving_up" in shown.stdout and "changing_colour" in shown.stdout


@CUDA
def test_the_cuda_process_group_carries_trains_cpu_and_cuda_tensors(tmp_path):
    """torchrun on CUDA: nccl carries DDP's and synchronised BN's CUDA tensors and gloo the CPU tensors of
    train's bookkeeping (nccl alone refuses those, as the second half shows: a multi-GPU run would have
    stopped at its first step's loss; none was made, one GPU was lent)."""
    import torch.distributed as dist

    from x3dnet.evaluate import _broadcast, process_group_backend
    from x3dnet.train import _reduce

    dist.init_process_group(process_group_backend(True), init_method=f"file://{tmp_path / 'a'}", rank=0, world_size=1)
    try:
        assert _reduce(np.array([6.0, 3.0, 4.0]), 2) == (1.5, 75.0)  # world 2: the collective runs (on one rank)
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert _broadcast({"error": None}, 2) == {"error": None}
    finally:
        dist.destroy_process_group()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'b'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError):
            _reduce(np.array([6.0, 3.0, 4.0]), 2)
    finally:
        dist.destroy_process_group()


def test_failing_videos_are_skipped_counted_and_never_replaced(setup, tmp_path):
    _, weights, classes, train, _ = setup
    lines = train.slowfast.read_text().splitlines()
    lines[3] = "missing/clip.mp4 3"
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    done = x3dnet("train", "--data", tmp_path / "list.txt", "--root", train.videos, "--classes", classes, "--weights",
                  weights, "--epochs", "1", "--workers", "0", "--precise-bn-batches", "1", "--out", tmp_path / "run",
                  "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped (not decodable)") == 1 and "missing/clip.mp4" in done.stderr
    epoch = next(r for r in read_train_log(tmp_path / "run" / "train_log.jsonl") if r["type"] == "epoch")
    assert epoch["skipped_videos"] == 1
    steps = [r for r in read_train_log(tmp_path / "run" / "train_log.jsonl") if r["type"] == "step"]
    assert sorted(r["clips"] for r in steps) == [7, 8, 8, 8, 8]  # its batch went on one clip short, not refilled
    # A list that is mostly unreadable stops with one line.
    (tmp_path / "bad.txt").write_text("".join(f"nothing/{i}.mp4 {i % 10}\n" for i in range(20)))
    bad = x3dnet("train", "--data", tmp_path / "bad.txt", "--classes", classes, "--weights", weights, "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--out", tmp_path / "bad", "--no-progress")
    assert bad.stderr.count("skipped (not decodable)") < 20  # it stopped early, not after every video
    assert bad.returncode == 1 and "could not be decoded" in bad.stderr and "Traceback" not in bad.stderr


def test_freezing_keeps_what_it_says(setup, tmp_path):
    from x3dnet.train import train

    _, weights, _, train_set, _ = setup
    start = load_checkpoint(weights).state_dict
    for freeze in ("bn", "backbone"):
        out = tmp_path / freeze
        train(train_set.videos, weights=weights, epochs=1, batch_size=8, lr=0.05, workers=0, freeze=freeze, out=out,
              precise_bn_batches=2, progress=False, log=lambda line: None)
        end = load_checkpoint(out / "last.safetensors").state_dict
        for k, v in start.items():
            same = torch.equal(end[k], v)
            if freeze == "backbone":
                assert same == (not k.startswith("fc2.")), k
            elif "bn" in k:
                assert same, k  # statistics and affine parameters alike
        assert freeze == "bn" or not torch.equal(end["fc2.weight"], start["fc2.weight"])


@pytest.mark.parametrize("args, message", [
    (["--epochs", "1"], "train needs --weights (to fine-tune) or --model"),
    (["--model", "x3d_xs", "--val", "V", "--val-split", "0.1"], "give --val or --val-split, not both"),
    (["--model", "x3d_xs", "--batch-size", "1000"], "fewer than one batch of 1000"),
    (["--model", "x3d_q"], "unknown model 'x3d_q'"),
    (["--model", "x3d_xs", "--precision", "fp16"], "fp16 training runs on CUDA only"),
    (["--model", "x3d_xs", "--device", "cuda:7"], "device cuda:7"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, args, message):
    _, _, _, train_set, _ = setup
    assert_one_line_error_here(capsys, ["train", "--data", train_set.videos, "--out", tmp_path / "r", "--no-progress",
                                        *args], message)


@pytest.mark.parametrize("bf16_units, amx, refused", [
    (False, False, "bf16 training on this CPU: it has no bf16 units"),
    (True, True, "bf16 training on this CPU: on a CPU with AMX"),
    (True, False, None),
])
def test_cpu_bf16_training_where_the_cpu_has_bf16_units_and_no_amx(setup, tmp_path, capsys, monkeypatch, bf16_units,
                                                                   amx, refused):
    """--precision bf16 on the CPU (torch's probes faked: both branches run on any CPU): refused in one line
    without bf16 units or with AMX (where it crashed); else the run trains in bf16 autocast, every step a
    little off the fp32 run's and the whole update the fp32 run's to bf16's precision."""
    import x3dnet.train as train_module

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    _, weights, _, train_set, _ = setup
    if refused:
        assert_one_line_error_here(capsys, ["train", "--data", train_set.videos, "--out", tmp_path / "r",
                                            "--no-progress", "--model", "x3d_xs", "--precision", "bf16"], refused)
        return
    common = dict(weights=weights, epochs=1, lr=0.02, dropout=0.0, workers=0, precise_bn_batches=0, progress=False,
                  log=lambda line: None)
    train_module.train(train_set.videos, out=tmp_path / "fp32", **common)
    train_module.train(train_set.videos, out=tmp_path / "bf16", precision="bf16", **common)
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["precision"] == "bf16"
    start = state_of(weights)
    a, b = state_of(tmp_path / "fp32" / "last.safetensors"), state_of(tmp_path / "bf16" / "last.safetensors")
    moved = [k for k in a if a[k].is_floating_point() and "running" not in k and not torch.equal(a[k], start[k])]
    assert len(moved) > 20
    assert any(not torch.equal(a[k], b[k]) for k in moved)  # autocast was on
    update = torch.cat([(a[k] - start[k]).flatten() for k in moved])
    error = torch.cat([(b[k] - a[k]).flatten() for k in moved])
    assert (error.norm() / update.norm()).item() < 0.1  # measured 0.050 (fp32 in the other layout: 3.9e-6)


def test_it_learns(tmp_path):
    """The short version of benchmarks/bench_train.py --learn: from the original's initialisation, on
    held-out videos, well above chance (50%) within a few epochs."""
    from x3dnet.train import train

    torch.manual_seed(0)
    weights = save_checkpoint(X3D(tiny_config("tiny_a").replace(num_classes=2)), tmp_path / "w.safetensors",
                              recipe=TINY_RECIPE)
    used = [PATTERNS.index("blinking"), PATTERNS.index("still")]
    train_set = make_dataset(tmp_path / "train", used=used, videos_per_class=8, seconds=1.0, seed=3)
    val_set = make_dataset(tmp_path / "val", used=used, videos_per_class=6, seconds=1.0, seed=4)
    summary = train(train_set.videos, val=val_set.videos, weights=weights, recipe="original", epochs=12, lr=0.05,
                    dropout=0.0, workers=0, precise_bn_batches=2, out=tmp_path / "run", progress=False,
                    log=lambda line: None)
    epochs = [r for r in read_train_log(tmp_path / "run" / "train_log.jsonl") if r["type"] == "epoch"]
    assert epochs[0]["val_top1"] <= 67  # it starts near chance (50%) ...
    assert summary["best_val_top1"] >= 83  # ... and learns: 10 of the 12 held-out videos or more


def test_freed_memory_is_kept_where_the_c_library_is_glibc(monkeypatch):
    import platform

    from x3dnet.train import keep_freed_memory, release_freed_memory

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    assert keep_freed_memory(Libc()) and calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX 0, M_TRIM_THRESHOLD
    release_freed_memory(Libc())  # before DataLoader workers fork: all of it
    assert calls[-1] == ("trim", 0)
    assert not keep_freed_memory(type("Refusing", (), {"mallopt": lambda self, param, value: 0})())
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory()  # this C library takes both settings
        release_freed_memory()
    monkeypatch.setattr(platform, "libc_ver", lambda *args: ("", ""))  # musl, or another C library
    assert not keep_freed_memory()
    release_freed_memory()  # nothing to do, and no error
