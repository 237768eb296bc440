"""Integration fixtures: ONE local Ray cluster (two raylets) shared by every Ray test, and quickstart tiles.

Each ``fit`` costs 15-30 s of start-up on 2 cores, a cluster start as much again: the cluster is started once per
session, with its own short temp dir and free ports, and stopped (only its own processes) at the end. Launches
reach it with ``--address``; tests that call Ray in this process join it as a driver (``ray_driver``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A 2-node local Ray cluster (head + one more raylet on this machine, distinct ports), 2 logical CPUs each."""
    from encdec.launcher.ray.ray_cluster import LocalRayCluster
    from encdec.launcher.recipe.errors import LaunchError

    temp = f"/tmp/ray-l{os.getpid()}"
    cluster = LocalRayCluster(temp_dir=temp, num_nodes=2, num_cpus=2)
    try:
        cluster.start(timeout=600)
    except LaunchError:
        # Ray gives a joining node a fixed 30 s to register with the GCS; on an overloaded machine that can pass.
        # Every Ray test shares this cluster, so one more try (start() stopped what it had started).
        shutil.rmtree(temp, ignore_errors=True)
        cluster = LocalRayCluster(temp_dir=temp, num_nodes=2, num_cpus=2)
        cluster.start(timeout=600)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_driver(ray_cluster: object) -> Iterator[None]:
    """This pytest process as a driver of the session cluster, for one test module (``ray.init(address=...)``
    with the cluster's token; disconnected at the end of the module, the cluster stays up)."""
    from encdec.launcher.ray.ray_auth import auth_env

    with pytest.MonkeyPatch.context() as mp:
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # restored afterwards: later subprocesses (Slurm
            mp.setenv(key, os.environ.get(key, ""))         # jobs) must make their own token, not inherit this one
        auth_env()  # the token file the cluster was started with; re-read by Ray if it is already imported
        import ray

        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def quick_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's synthetic tiles (64 px), written once per session."""
    from encdec.data.synthetic import write_tiles

    root = tmp_path_factory.mktemp("quick_tiles")
    write_tiles(root / "train", 256, img_size=64, seed=0)
    write_tiles(root / "val", 48, img_size=64, seed=1)
    return root
