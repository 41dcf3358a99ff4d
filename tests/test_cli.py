"""The command line as a user meets it: output, exit codes, one-line errors without tracebacks."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import checkpoint_path
from test_model import PUBLISHED

from x3dnet import WEIGHTS, load_checkpoint


def x3dnet(*args, env=None):
    return subprocess.run([sys.executable, "-m", "x3dnet", *map(str, args)], capture_output=True, text=True, env=env)


def assert_one_line_error(result, message):
    assert result.returncode == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("x3dnet: error: ")
    assert message in result.stderr


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
def test_bad_input_is_one_line(args, message, tmp_path):
    paths = {"tiny_ptv": checkpoint_path("tiny_a", "pytorchvideo"), "tiny_sf": checkpoint_path("tiny_a", "slowfast"),
             "tmp": tmp_path}
    (tmp_path / "notes.pyth").write_text("not weights")
    assert_one_line_error(x3dnet(*(a.format(**paths) for a in args)), message)


def test_offline_download_is_one_line(monkeypatch, capsys):
    from x3dnet import cli, weights

    record = WEIGHTS["x3d_xs.slowfast"]
    monkeypatch.setitem(weights.WEIGHTS, record.name, dataclasses.replace(record, url="http://127.0.0.1:9/x.pyth"))
    assert cli.main(["weights", "download", "x3d_xs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x3d_xs.slowfast: cannot download http://127.0.0.1:9/x.pyth" in err
