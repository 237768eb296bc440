"""The Ray Data feed on the session's shared local Ray cluster (``ray_driver``): exactness equal to the reader feed
(once per epoch, exact resume at another world size, identical pixels), bad tiles counted on the rank."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.data.synthetic import write_tiles

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
N = 10
SIZE = 32


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    root = write_tiles(tmp_path_factory.mktemp("ray_tiles"), N, img_size=SIZE, seed=11, cog=False)
    (root / "tile_00004_img.tif").write_bytes(b"broken")  # one bad tile
    return root


def _cfg(tiles):
    return DataSection.model_validate({"train": {"tiles": str(tiles)}, "val": {"tiles": str(tiles)}, "img_size": SIZE, "global_batch_size": 4,
            "augment": {"hflip": True, "rot90": True}, "max_bad_fraction": 0.5,
            "reader": {"threads": 2, "ray_cpus_per_task": 0.5}})


def _run(cfg, feed, world_size, micro_steps, state=None):
    iters = [build_iterator(cfg, rank=r, world_size=world_size, feed=feed) for r in range(world_size)]
    if state is not None:
        for it in iters:
            it.load_state_dict(state)
    ids, images = [], []
    for _ in range(micro_steps):
        for it in iters:
            b = next(it)
            assert b["image"].shape == (it.micro_batch_size, 6, SIZE, SIZE) and b["mask"].dtype == torch.int64
            ids.extend(b["sample_id"].tolist())
            images.extend(b["image"])
    states = [it.state_dict() for it in iters]
    bad = [it.bad_tiles for it in iters]
    for it in iters:
        it.close()
    return ids, images, states[0], bad


def test_ray_feed_is_exact_and_matches_the_reader_feed(ray_driver, tiles):
    cfg = _cfg(tiles)
    ray_ids, ray_images, _, bad = _run(cfg, "ray", 2, 5)  # 20 samples = 2 epochs over 2 ranks
    ref_ids, ref_images, _, _ = _run(cfg, "reader", 2, 5)
    assert ray_ids == ref_ids
    assert all(torch.equal(a, b) for a, b in zip(ray_images, ref_images))
    for epoch in (ray_ids[:N], ray_ids[N:]):  # once per epoch; the bad tile's slot is an ignored -1
        assert sorted(epoch) == sorted([-1] + [i for i in range(N) if i != 4])
    # Counted on each rank that met it (once per rank, however many epochs), with the other reasons at zero.
    assert [b["total"] for b in bad] == [b.get("unreadable", 0) for b in bad] and sum(b["total"] for b in bad) >= 1
    assert all(b["total"] <= 1 for b in bad)


def test_ray_feed_resumes_exactly_at_another_world_size(ray_driver, tiles):
    cfg = _cfg(tiles)
    full, _, _, _ = _run(cfg, "reader", 2, 6)
    head, _, state, _ = _run(cfg, "ray", 2, 2)
    assert state == {"epoch": 0, "samples_consumed": 8, "seed": 0}
    tail, _, end, _ = _run(cfg, "ray", 1, 4, state=state)
    assert head + tail == full and end == {"epoch": 2, "samples_consumed": 4, "seed": 0}
    counts = collections.Counter(i for i in head + tail if i >= 0)
    assert set(counts.values()) <= {2, 3}


def test_ray_feed_val_pass(ray_driver, tiles):
    it = build_iterator(_cfg(tiles), split="val", world_size=1, feed="ray")
    ids = [i for b in it for i in b["sample_id"].tolist()]
    assert ids == [0, 1, 2, 3, -1, 5, 6, 7, 8, 9, -1, -1]  # padded to 3 batches of 4; tile 4 is bad
    assert np.array_equal(ids, [i for b in it for i in b["sample_id"].tolist()])  # a second pass
