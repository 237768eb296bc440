"""Launching onto an existing cluster (--address) that is too small: a clear error before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from launcher_testlib import launch, quick_args

pytestmark = [pytest.mark.ray]


def test_more_nodes_than_the_cluster_has_fails_before_anything_starts(ray_cluster: object, quick_tiles: Path,
                                                                      tmp_path: Path) -> None:
    out = launch(quick_args(quick_tiles, tmp_path, "--address", ray_cluster.gcs_address,  # type: ignore[attr-defined]
                            "--nodes", "3", "--workers-per-node", "1", "--set", "data.global_batch_size=15"),
                 timeout=300)
    assert out.returncode == 3, out.stdout + out.stderr
    for text in ("asks for 3 nodes", "has 2", "--dry-run", "--address", "--slurm", "--simulate-nodes"):
        assert text in out.stderr, f"{text!r} not in {out.stderr}"
    assert not list((tmp_path).glob("*/checkpoints"))
