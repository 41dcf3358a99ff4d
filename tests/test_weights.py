"""The published weights table, the cache and downloads (from a server on loopback)."""

import dataclasses
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from x3dnet import VARIANTS, WEIGHTS, X3D, CheckpointError, DownloadError, create_model, download_weights, get_weights
from x3dnet.checkpoint import write_checkpoint
from x3dnet.layouts import LAYOUTS
from x3dnet.recipe import RECIPES
from x3dnet.weights import cache_dir, cached_path


def test_the_table_has_every_published_checkpoint():
    expected = {f"x3d_{s}.{src}" for s in ("xs", "s", "m", "l") for src in ("slowfast", "pytorchvideo")}
    assert set(WEIGHTS) == expected | {"x3d_s.mmaction2", "x3d_m.mmaction2"}
    files = [r.file_name.lower() for r in WEIGHTS.values()]
    assert len(set(files)) == len(files)  # X3D_M.pyth and x3d_m.pyth must not share a cache entry
    for name, record in WEIGHTS.items():
        assert name == record.name and name.startswith(record.model + ".")
        assert record.model in VARIANTS and not VARIANTS[record.model].derived
        assert record.recipe == RECIPES[record.model]
        assert record.layout in LAYOUTS and record.url.startswith("https://")
        assert record.reported and all(r.views in ("10x1", "10x3") for r in record.reported)
        assert all(r.head_pooling == ("global" if record.layout == "mmaction2" else "window") for r in record.reported)
    assert WEIGHTS["x3d_m.mmaction2"].sha256 == WEIGHTS["x3d_m.mmaction2"].url.rsplit("-", 1)[1].split(".")[0]


def test_names_resolve_to_records():
    assert get_weights("x3d_m") is WEIGHTS["x3d_m.slowfast"]
    assert get_weights("X3D-L") is WEIGHTS["x3d_l.slowfast"]
    with pytest.raises(CheckpointError, match="x3d_xl: no published weights of that name"):
        create_model("x3d_xl", pretrained=True)
    with pytest.raises(CheckpointError, match="missing.pth: no such file, and no published weights of that name"):
        create_model("x3d_m", weights="missing.pth")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("X3DNET_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("X3DNET_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "x3dnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "x3dnet"


class _Server:
    """A loopback HTTP server for files the test puts in ``files``; counts requests."""

    def __init__(self):
        self.files, self.requests, self.short = {}, 0, False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if server.short else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def record(self, path, data, **changes):
        self.files[path] = data
        return dataclasses.replace(WEIGHTS["x3d_xs.slowfast"], url=self.url + path, **changes)


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def checkpoint_bytes(tmp_path, name, layout="slowfast"):
    config = VARIANTS[name]
    path = write_checkpoint(X3D(config).state_dict(), tmp_path / f"{name}.bin", layout=layout, config=config,
                            recipe=RECIPES[name])
    return path.read_bytes()


def leftovers():
    return sorted(p.name for p in cache_dir().iterdir()) if cache_dir().exists() else []


def test_download_checks_the_file_and_caches_it(server, tmp_path):
    record = server.record("/x3d_xs.pyth", checkpoint_bytes(tmp_path, "x3d_xs"))
    path = download_weights(record, progress=False)
    assert path == cache_dir() / "x3d_xs.slowfast.pyth" and leftovers() == ["x3d_xs.slowfast.pyth"]
    assert download_weights(record, progress=False) == path and server.requests == 1  # cached
    download_weights(record, progress=False, force=True)
    assert server.requests == 2
    model = create_model("x3d_xs", pretrained=True)  # from the cache, no network
    assert torch.equal(model.fc2.weight, torch.load(path, weights_only=True)["model_state"]["head.projection.weight"])
    assert create_model("x3d_xs", weights="x3d_xs.slowfast").config == VARIANTS["x3d_xs"]


def test_bad_downloads_leave_nothing_in_the_cache(server, tmp_path):
    cases = [
        (server.record("/text.pyth", b"<html>not found</html>"), r"is not x3d_xs: .*not a checkpoint"),
        (server.record("/l.pyth", checkpoint_bytes(tmp_path, "x3d_l")), "is not x3d_xs: .*the file looks like x3d_l"),
        (server.record("/m.pyth", checkpoint_bytes(tmp_path, "x3d_m")), "is not x3d_xs: .*trained as x3d_m"),
        (server.record("/h.pyth", checkpoint_bytes(tmp_path, "x3d_xs"), sha256="deadbeef"), "expected deadbeef"),
        (dataclasses.replace(WEIGHTS["x3d_xs.slowfast"], url=server.url + "/missing.pyth"),
         r"cannot download http://127\.0\.0\.1:\d+/missing\.pyth \(HTTP 404 Not Found\)$"),
    ]
    for record, message in cases:
        with pytest.raises(DownloadError, match=message):
            download_weights(record, progress=False)
        assert leftovers() == []
    server.short = True
    with pytest.raises(DownloadError, match=r"cut\.pyth stopped after \d+ of \d+ bytes$"):
        download_weights(server.record("/cut.pyth", checkpoint_bytes(tmp_path, "x3d_xs")), progress=False)
    assert leftovers() == []


def test_offline_download_is_one_clear_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    record = dataclasses.replace(WEIGHTS["x3d_m.pytorchvideo"], url=f"http://127.0.0.1:{port}/X3D_M.pyth")
    with pytest.raises(DownloadError) as e:
        download_weights(record, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith("x3d_m.pytorchvideo: cannot download http://127.0.0.1")
    assert f"offline? Put the file at {cached_path(record)} or pass its path as weights" in message
    assert leftovers() == []
