"""The command line as a user meets it: output, exit codes, one-line errors without tracebacks."""

import dataclasses
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import checkpoint_path, tiny_config
from test_model import PUBLISHED

from x3dnet import WEIGHTS, X3D, Recipe, load_checkpoint, load_weights, save_checkpoint
from x3dnet.errors import X3DNetError
from x3dnet.profile import plot_path


def x3dnet(*args, env=None):
    return subprocess.run([sys.executable, "-m", "x3dnet", *map(str, args)], capture_output=True, text=True, env=env)


def assert_one_line_error(result, message):
    assert result.returncode == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("x3dnet: error: ")
    assert message in result.stderr


def assert_one_line_error_here(capsys, args, message):
    """``assert_one_line_error`` for a command run in this process (no interpreter start: fast)."""
    from x3dnet import cli

    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert status == 1 and out == "" and err.count("\n") == 1 and err.startswith("x3dnet: error: "), err
    assert message in err, err
    return err


def tiny_native(folder: Path) -> tuple[Path, Path]:
    """tiny_a's reference weights in x3dnet's format (which records the model and a recipe), and 10 class names."""
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    recipe = Recipe(frames=4, stride=12, train_crop=64, test_short_side=72, test_crop=80)
    (folder / "classes.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    return save_checkpoint(model, folder / "tiny_a.safetensors", recipe=recipe), folder / "classes.txt"


def test_models_prints_the_published_sizes():
    result = x3dnet("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    got = {r["model"].split()[0]: (r["params_m"], r["gmacs_train"], r["gmacs_test"]) for r in rows}
    assert got == {n: (round(p / 1e6, 3), g_train, g_test) for n, (p, _, g_train, g_test) in PUBLISHED.items()}


def test_weights_list():
    result = x3dnet("weights", "list")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(WEIGHTS) and lines[0].startswith("name")
    assert "x3d_m.slowfast       slowfast      16x5  224 / 256->224 / 256" in result.stdout
    assert "76.21 (10x3)" in result.stdout and "73.3 (10x3, global pool)" in result.stdout
    rows = [json.loads(line) for line in x3dnet("weights", "list", "--json").stdout.splitlines()]
    assert [r["name"] for r in rows] == list(WEIGHTS)
    assert rows[0]["recipe"]["test_crop"] == 182 and rows[0]["cached"] is False


def test_inspect_and_convert(tmp_path):
    source = checkpoint_path("tiny_a", "pytorchvideo")
    result = x3dnet("inspect", source, "--json")
    info = json.loads(result.stdout)
    assert (info["layout"], info["classes"], info["tensors"], info["config"]) == ("pytorchvideo", 10, 146, None)
    result = x3dnet("convert", checkpoint_path("tiny_a", "slowfast"), tmp_path / "a.pth", "--to", "mmaction2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'a.pth'}: mmaction2 layout, 146 tensors, from slowfast (an X3D")
    assert load_checkpoint(tmp_path / "a.pth").layout == "mmaction2"


@pytest.mark.parametrize("args,message", [
    (["inspect", "missing.pyth"], "missing.pyth: no such file"),
    (["convert", "{tmp}/notes.pyth", "{tmp}/out.safetensors"], "notes.pyth: not a checkpoint"),
    (["convert", "{tiny_ptv}", "{tmp}/x.safetensors"], "name it (--model)"),
    (["convert", "{tiny_sf}", "{tmp}/x.safetensors", "--model", "x3d_q"], "unknown model 'x3d_q'"),
    (["weights", "download", "x3d_q"], "x3d_q: no published weights of that name"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    paths = {"tiny_ptv": checkpoint_path("tiny_a", "pytorchvideo"), "tiny_sf": checkpoint_path("tiny_a", "slowfast"),
             "tmp": tmp_path}
    (tmp_path / "notes.pyth").write_text("not weights")
    assert_one_line_error_here(capsys, [a.format(**paths) for a in args], message)


def test_offline_download_is_one_line(monkeypatch, capsys):
    from x3dnet import cli, weights

    record = WEIGHTS["x3d_xs.slowfast"]
    monkeypatch.setitem(weights.WEIGHTS, record.name, dataclasses.replace(record, url="http://127.0.0.1:9/x.pyth"))
    assert cli.main(["weights", "download", "x3d_xs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x3d_xs.slowfast: cannot download http://127.0.0.1:9/x.pyth" in err


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("verb", ["convert", "evaluate", "download"])
def test_a_filesystem_that_refuses_writes_is_one_line(tmp_path, monkeypatch, capsys, code, verb):
    # As root a chmod does not stop a write, so the filesystem's refusal is played by the call that creates
    # every file x3dnet writes whole (and evaluate's run folder lock).
    from x3dnet import cli, paths

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "dst" / "file"))

    (tmp_path / "dst").mkdir()
    weights, classes = tiny_native(tmp_path)
    monkeypatch.setattr(paths.tempfile, "mkstemp", refuse)
    monkeypatch.setattr("x3dnet.runs.FolderLock", refuse)
    if verb == "convert":
        args = ["convert", str(checkpoint_path("tiny_a", "slowfast")), str(tmp_path / "dst" / "a.safetensors")]
    elif verb == "evaluate":
        (tmp_path / "list.txt").write_text("a.mp4 1\n")
        args = ["evaluate", "--data", str(tmp_path / "list.txt"), "--out", str(tmp_path / "dst" / "run"),
                "--weights", str(weights), "--classes", str(classes), "--backend", "torch"]
    else:
        monkeypatch.setenv("X3DNET_HOME", str(tmp_path / "dst"))
        args = ["weights", "download", "x3d_xs"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    words = {errno.EROFS: "read-only filesystem", errno.ENOSPC: "no space left on the device",
             errno.EACCES: "permission denied"}[code]
    assert err.count("\n") == 1 and err.startswith("x3dnet: error: ") and words in err, err
    assert [p for p in (tmp_path / "dst").rglob("*") if not p.is_dir()] == []  # nothing half-written left behind


@pytest.mark.parametrize("case", ["out under a file", "X3DNET_HOME a file", "synthesize into a file",
                                  "convert onto a folder", "profile --plot a folder"])
def test_paths_that_cannot_be_written_are_one_line(tmp_path, capsys, monkeypatch, case):
    plain = tmp_path / "plain"
    plain.write_text("a file\n")
    source = checkpoint_path("tiny_a", "slowfast")
    args, env, message = {
        "out under a file": (["evaluate", "--data", source, "--out", plain / "run"], None,
                             f"{plain / 'run'}: cannot be used as the run folder"),
        "X3DNET_HOME a file": (["weights", "download", "x3d_xs"], {"X3DNET_HOME": str(plain)},
                               f"the weights cache {plain} (X3DNET_HOME) cannot be made"),
        "synthesize into a file": (["synthesize", plain], None, f"{plain}: exists and is not a folder"),
        "convert onto a folder": (["convert", source, tmp_path], None, "is a directory; name the checkpoint"),
        "profile --plot a folder": (["profile", "--model", "x3d_xs", "--plot", tmp_path], None,
                                    f"{tmp_path}: is a folder; name the image file"),
    }[case]
    if case == "convert onto a folder":
        (tmp_path / "x.safetensors").mkdir()
        args = ["convert", source, tmp_path / "x.safetensors"]
    if case == "out under a file":  # the list and weights are read before the folder is made: real ones
        weights, classes = tiny_native(tmp_path)
        (tmp_path / "list.txt").write_text("a.mp4 1\n")
        args = ["evaluate", "--data", tmp_path / "list.txt", "--weights", weights, "--classes", classes,
                "--out", plain / "run", "--backend", "torch"]
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    assert_one_line_error_here(capsys, args, message)


def test_plot_paths():
    assert plot_path("profile") == Path("profile.png")  # matplotlib would add it silently
    assert plot_path("p.svg") == Path("p.svg")
    with pytest.raises(X3DNetError, match="its folder does not exist"):
        plot_path("/no/such/folder/p.png")


@pytest.mark.parametrize("device", ["nonsense", "meta", "mps", "cuda:7", ""])
@pytest.mark.parametrize("verb", ["predict torch", "predict auto", "profile", "evaluate"])
def test_devices_x3dnet_cannot_use_are_one_line(tmp_path, capsys, verb, device):
    weights = checkpoint_path("tiny_a", "slowfast")
    args = {"predict torch": ["predict", tmp_path / "a.mp4", "--weights", weights, "--model", "x3d_xs",
                              "--backend", "torch"],
            "predict auto": ["predict", tmp_path / "a.mp4", "--weights", weights, "--model", "x3d_xs"],
            "profile": ["profile", "--model", "x3d_xs", "--backend", "torch", "--runs", "1"],
            "evaluate": ["evaluate", "--data", tmp_path, "--weights", weights, "--model", "x3d_xs"]}[verb]
    expected = {"nonsense": "device 'nonsense': not a device; x3dnet runs on cpu or cuda[:N]",
                "meta": "device meta: x3dnet runs on cpu or cuda[:N], not meta",
                "mps": "device mps: x3dnet runs on cpu or cuda[:N], not mps",
                "cuda:7": "device cuda:7: ", "": "device '': not a device"}[device]
    err = assert_one_line_error_here(capsys, [*args, "--device", device], expected)
    assert "openvino" not in err.lower()


@pytest.mark.parametrize("flags,message", [
    (["--seconds", "nan"], "seconds: must be a number above 0 up to 3600, not nan"),
    (["--seconds", "inf"], "seconds: must be a number above 0 up to 3600, not inf"),
    (["--seconds", "0"], "seconds: must be a number above 0"),
    (["--seconds", "-1"], "seconds: must be a number above 0"),
    (["--seconds", "0.01"], "0.01 s at 30 fps is less than one frame"),
    (["--size", "1", "1"], "size: width and height must be even numbers from 16 to 4096, not 1x1"),
    (["--size", "33", "17"], "not 33x17"),
])
def test_synthesize_refuses_what_it_cannot_write(tmp_path, capsys, flags, message):
    assert_one_line_error_here(capsys, ["synthesize", tmp_path / "d", *flags], message)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_synthesize_twice_into_one_folder(tmp_path):
    base = ("--videos-per-class", "1", "--seconds", "0.2", "--size", "32", "32")
    assert x3dnet("synthesize", tmp_path / "d", *base, "--seed", "1").returncode == 0
    first = sorted(p.name for p in (tmp_path / "d" / "videos").rglob("*.mp4"))
    # The earlier videos would be listed with the new ones by the folder format: refused, or replaced with --force.
    assert_one_line_error(x3dnet("synthesize", tmp_path / "d", *base, "--seed", "2"), "is not empty")
    assert x3dnet("synthesize", tmp_path / "d", *base, "--seed", "2", "--force").returncode == 0
    second = sorted(p.name for p in (tmp_path / "d" / "videos").rglob("*.mp4"))
    assert len(second) == 10 and not set(first) & set(second)


def test_convert_never_overwrites_by_surprise(tmp_path, capsys):
    source = tmp_path / "a.pyth"
    shutil.copy(checkpoint_path("tiny_a", "slowfast"), source)
    original = source.read_bytes()
    assert_one_line_error_here(capsys, ["convert", source, source, "--to", "slowfast", "--force"],
                               f"{source}: is the source file")
    assert_one_line_error_here(capsys, ["convert", source, tmp_path / "a.pyth.safetensors.pyth"],
                               "a native checkpoint is a safetensors file: name it *.safetensors")
    assert_one_line_error_here(capsys, ["convert", source, tmp_path / "b.safetensors", "--to", "slowfast"],
                               "a slowfast checkpoint is a PyTorch file: name it *.pyth or *.pth or *.pt")
    assert source.read_bytes() == original
    (tmp_path / "b.safetensors").write_text("keep me\n")
    assert_one_line_error_here(capsys, ["convert", source, tmp_path / "b.safetensors"], "exists already; add --force")
    assert (tmp_path / "b.safetensors").read_text() == "keep me\n"
    old = os.umask(0o027)
    try:
        result = x3dnet("convert", source, tmp_path / "b.safetensors", "--force")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "b.safetensors").layout == "native"
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o640  # 0666 less the umask, not 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pyth", "b.safetensors"]


@pytest.mark.parametrize("kind", ["fifo", "loop", "empty"])
@pytest.mark.parametrize("verb", ["inspect", "predict", "convert"])
def test_what_is_not_a_file_is_one_line_and_never_a_hang(tmp_path, verb, kind):
    path = {"fifo": tmp_path / "x.pyth", "loop": tmp_path / "loop.pyth", "empty": ""}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "loop":
        os.symlink(path, path)
    weights, _ = tiny_native(tmp_path)
    args = {"inspect": ["inspect", path],
            "predict": ["predict", path, "--weights", weights, "--backend", "torch"],
            "convert": ["convert", path, tmp_path / "out.safetensors"]}[verb]
    what = "video" if verb == "predict" else "checkpoint"
    message = {"fifo": f"{path}: is a FIFO (named pipe), not a {what} file", "loop": f"{path}: a symbolic link loop",
               "empty": f"an empty string was given as the {what}'s path"}[kind]
    result = subprocess.run([sys.executable, "-m", "x3dnet", *map(str, args)], capture_output=True, text=True,
                            timeout=60)
    assert_one_line_error(result, message)
