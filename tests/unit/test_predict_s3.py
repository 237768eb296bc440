"""Remote scenes through GDAL's ``/vsis3/`` (and ``s3://``) against a local S3-compatible server (moto's server
mode, started by the test): the endpoint and keys reach GDAL through ``predict(gdal_options=...)`` only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio

import encdec
from tests.unit._predict_models import TinyFCN, random_scene, write_scene

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) serves the local S3")
boto3 = pytest.importorskip("boto3")

KEY, SECRET, BUCKET = "testing-key", "testing-secret", "scenes"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, client
    finally:
        server.stop()


def test_vsis3_and_s3_scenes_predict_like_the_local_file(s3: tuple[str, object], tmp_path: Path) -> None:
    endpoint, client = s3
    local = write_scene(tmp_path / "scene.tif", random_scene(3, 120, 90, seed=4), blocksize=32)
    client.upload_file(str(local), BUCKET, "a/scene.tif")  # type: ignore[attr-defined]
    client.upload_file(str(local), BUCKET, "b/scene_b.tif")  # type: ignore[attr-defined]
    environ = dict(os.environ)
    gdal = {"AWS_S3_ENDPOINT": endpoint, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
            "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
            "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    kw = {"tiled": {"crop": 32, "stride": 24, "delta": 4, "batch_size": 8}, "quicklook": False}
    ref = encdec.predict(TinyFCN(), [local], tmp_path / "local", **kw)
    remote = encdec.predict(TinyFCN(), [f"/vsis3/{BUCKET}/a/scene.tif", f"s3://{BUCKET}/b/scene_b.tif"],
                            tmp_path / "remote", gdal_options=gdal, **kw)
    assert not remote.failed and not ref.failed, (remote.failed, ref.failed)
    assert dict(os.environ) == environ  # the options went through rasterio.Env, not the process environment
    with rasterio.open(tmp_path / "local" / "scene.tif") as a:
        want, crs, transform = a.read(), a.crs, a.transform
    for name in ("scene", "scene_b"):
        with rasterio.open(tmp_path / "remote" / f"{name}.tif") as b:
            assert (b.crs, b.transform) == (crs, transform)
            np.testing.assert_array_equal(b.read(), want)

    # a key that is not in the bucket: listed as failed with the path and the fix, the good scene still written
    res = encdec.predict(TinyFCN(), [f"/vsis3/{BUCKET}/a/missing.tif", f"/vsis3/{BUCKET}/a/scene.tif"],
                         tmp_path / "partial", gdal_options=gdal, **kw)
    assert list(res.failed) == [f"/vsis3/{BUCKET}/a/missing.tif"]
    assert "AWS_" in res.failed[f"/vsis3/{BUCKET}/a/missing.tif"] and (tmp_path / "partial" / "scene.tif").exists()


def test_gdal_flag_pairs_and_a_malformed_one() -> None:
    from encdec.launcher.commands.predict_cmd import gdal_options
    from encdec.launcher.recipe.errors import LaunchError

    assert gdal_options(["AWS_S3_ENDPOINT=localhost:9000", "AWS_HTTPS=NO", "X=a=b"]) == {
        "AWS_S3_ENDPOINT": "localhost:9000", "AWS_HTTPS": "NO", "X": "a=b"}
    with pytest.raises(LaunchError, match="expected KEY=VALUE"):
        gdal_options(["AWS_HTTPS"])
