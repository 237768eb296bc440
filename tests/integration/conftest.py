"""Integration fixtures: ONE local Ray cluster (two raylets) shared by every launcher test, and quickstart tiles.

Each ``fit`` costs 15-30 s of start-up on 2 cores, a cluster start as much again: the cluster is started once per
session, with its own short temp dir and free ports, and stopped (only its own processes) at the end.
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

    temp = f"/tmp/ray-l{os.getpid()}"
    cluster = LocalRayCluster(temp_dir=temp, num_nodes=2, num_cpus=2)
    cluster.start(timeout=600)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def quick_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's synthetic tiles (64 px), written once per session."""
    from encdec.data.synthetic import write_tiles

    root = tmp_path_factory.mktemp("quick_tiles")
    write_tiles(root / "train", 256, img_size=64, seed=0)
    write_tiles(root / "val", 48, img_size=64, seed=1)
    return root
