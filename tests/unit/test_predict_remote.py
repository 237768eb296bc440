"""Remote scenes through GDAL's /vsicurl/: a local HTTP server that answers Range requests (Python's plain
``http.server`` ignores Range, so GDAL would fetch whole files or fail)."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import rasterio

import encdec
from tests.unit._predict_models import TinyFCN, random_scene, write_scene


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET with ``Range: bytes=a-b`` -> 206 and only those bytes; records every range served."""

    ranges: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m is None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data)
            return
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
        type(self).ranges.append(f"{start}-{end}")
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start: end + 1])


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.ranges = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_vsicurl_scene_predicts_like_the_local_file(server: tuple[str, Path], tmp_path: Path) -> None:
    url, root = server
    data = random_scene(3, 300, 200, seed=9)
    local = write_scene(root / "remote_scene.tif", data, blocksize=64)
    kw = {"tiled": {"crop": 32, "stride": 24, "delta": 4, "batch_size": 8}, "quicklook": False}
    remote = encdec.predict(TinyFCN(), [f"/vsicurl/{url}/remote_scene.tif"], tmp_path / "remote", **kw)
    assert not remote.failed, remote.failed
    assert RangeHandler.ranges, "GDAL did not use Range requests"
    here = encdec.predict(TinyFCN(), [local], tmp_path / "local", **kw)
    with rasterio.open(tmp_path / "remote" / "remote_scene.tif") as a, \
            rasterio.open(tmp_path / "local" / "remote_scene.tif") as b:
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
        assert np.array_equal(a.read(), b.read())
    assert here.windows == remote.windows
