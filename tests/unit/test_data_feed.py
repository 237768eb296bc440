"""The reader feed end to end on real tiles: exact-once per epoch, resume exactness at other world sizes,
determinism, val padding, bad tiles skipped and counted, the ceiling error, config errors."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from encdec.config import DataSection
from encdec.data import DataConfigError, TooManyBadTilesError, build_iterator
from encdec.data.synthetic import write_raster, write_tiles

N = 10
SIZE = 32


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("tiles"), N, img_size=SIZE, seed=3, cog=False)


def _cfg(tiles, **kw):
    cfg = {"train": {"tiles": str(tiles)}, "val": {"tiles": str(tiles)}, "img_size": SIZE, "global_batch_size": 4,
           "augment": {"hflip": True, "vflip": True, "rot90": True}, "reader": {"threads": 2, "prefetch_batches": 2}}
    cfg.update(kw)
    return DataSection.model_validate(cfg)


def _stream(cfg, world_size, micro_steps, *, grad_accum=1, seed=0, state=None, keep_images=False):
    """Run every rank for ``micro_steps`` and return the global stream of ids in plan order (and images by id)."""
    iters = [build_iterator(cfg, rank=r, world_size=world_size, grad_accum=grad_accum, seed=seed)
             for r in range(world_size)]
    if state is not None:
        for it in iters:
            it.load_state_dict(state)
    ids, images = [], {}
    for _ in range(micro_steps):
        for it in iters:  # rank order within a micro-step = stream order
            b = next(it)
            ids.extend(b["sample_id"].tolist())
            if keep_images:
                for i, sid in enumerate(b["sample_id"].tolist()):
                    images.setdefault(len(ids) - len(b["sample_id"]) + i, (sid, b["image"][i].clone()))
    states = [it.state_dict() for it in iters]
    for it in iters:
        it.close()
    assert all(s == states[0] for s in states), states
    return ids, states[0], images


def test_each_sample_once_per_epoch_across_two_ranks(tiles):
    ids, state, _ = _stream(_cfg(tiles), 2, 5)  # 5 global steps x 4 = 20 samples = 2 epochs
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N:]) == list(range(N))
    assert ids[:N] != ids[N:]  # a new permutation each epoch
    assert state == {"epoch": 2, "samples_consumed": 0, "seed": 0}


def test_same_seed_same_batches_other_seed_other_order(tiles):
    a, _, ia = _stream(_cfg(tiles), 1, 3, keep_images=True)
    b, _, ib = _stream(_cfg(tiles), 1, 3, keep_images=True)
    c, _, _ = _stream(_cfg(tiles), 1, 3, seed=1)
    assert a == b and a != c
    assert all(torch.equal(ia[k][1], ib[k][1]) for k in ia)


@pytest.mark.parametrize(("resume_world", "resume_accum"), [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_mid_epoch_resume_repeats_and_skips_nothing(tiles, resume_world, resume_accum):
    cfg = _cfg(tiles)
    full, _, full_images = _stream(cfg, 2, 6, keep_images=True)  # 24 samples: epochs 0, 1 and part of 2
    head, state, _ = _stream(cfg, 2, 3)  # stop mid-epoch 1 (12 samples)
    assert state == {"epoch": 1, "samples_consumed": 2, "seed": 0}
    micro = 3 * resume_accum
    tail, end_state, tail_images = _stream(cfg, resume_world, micro, grad_accum=resume_accum, state=state,
                                           keep_images=True)
    assert head + tail == full
    assert end_state == {"epoch": 2, "samples_consumed": 4, "seed": 0}
    counts = collections.Counter(head + tail)
    assert set(counts.values()) <= {2, 3} and sum(counts.values()) == 24
    # Augmentations depend on (seed, epoch, sample), not on rank or world size: resumed pixels are identical.
    for pos, (sid, img) in tail_images.items():
        assert full_images[len(head) + pos][0] == sid
        assert torch.equal(full_images[len(head) + pos][1], img)


def test_resume_off_a_micro_batch_boundary_is_a_clear_error(tiles):
    it = build_iterator(_cfg(tiles), world_size=2, grad_accum=2)
    with pytest.raises(DataConfigError, match="micro-batch boundary"):
        it.load_state_dict({"epoch": 0, "samples_consumed": 1, "seed": 0})
    with pytest.raises(DataConfigError, match="same tile set"):
        it.load_state_dict({"epoch": 0, "samples_consumed": N + 4, "seed": 0})


def test_val_is_one_ordered_padded_pass_with_equal_batches_per_rank(tiles):
    cfg = _cfg(tiles, global_batch_size=8)  # micro 4 per rank, 8 per step: 10 samples -> 2 steps, 6 pads
    iters = [build_iterator(cfg, split="val", rank=r, world_size=2) for r in range(2)]
    seen = []
    for it in iters:
        batches = list(it)
        assert len(batches) == len(it) == 2
        for b in batches:
            pad = b["sample_id"] == -1
            assert (b["mask"][pad] == -1).all() and (b["image"][pad] == 0).all()
            seen.extend(b["sample_id"][~pad].tolist())
        assert len(list(it)) == 2  # a second pass restarts
    assert sorted(seen) == list(range(N))


def test_batch_layout_and_normalisation(tiles):
    it = build_iterator(_cfg(tiles, augment={}), split="val")
    b = next(it)
    assert b["image"].shape == (4, 6, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (4, SIZE, SIZE) and b["mask"].dtype == torch.int64
    assert set(b["mask"].unique().tolist()) <= {-1, 0, 1}
    valid = b["mask"] >= 0
    assert abs(b["image"].permute(1, 0, 2, 3)[:, valid].mean().item()) < 1.5  # HLS stats put values near 0
    it.close()


def test_prefetch_is_bounded(tiles):
    it = build_iterator(_cfg(tiles, reader={"threads": 2, "prefetch_batches": 3}))
    for _ in range(5):
        next(it)
        assert len(it._pending) <= 3 + 1
    it.close()


def _bad_set(tmp_path):
    root = write_tiles(tmp_path / "bad", 8, img_size=SIZE, seed=5, cog=False)
    (root / "tile_00000_img.tif").write_bytes(b"garbage")  # unreadable
    write_raster(root / "tile_00001_img.tif", np.ones((4, SIZE, SIZE), np.int16))  # band count/names
    write_raster(root / "tile_00002_img.tif", np.ones((6, 16, 16), np.int16),
                 descriptions=("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"))  # too small
    (root / "tile_00003_mask.tif").unlink()  # mask missing
    write_raster(root / "tile_00004_img.tif", np.full((6, SIZE, SIZE), -9999, np.int16), nodata=-9999,
                 descriptions=("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"))  # all nodata
    return root


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_each_kind_of_bad_tile_is_skipped_and_counted(tmp_path, caplog):
    root = _bad_set(tmp_path)
    cfg = _cfg(root, max_bad_fraction=0.7, global_batch_size=8)
    it = build_iterator(cfg, split="val")
    with caplog.at_level("WARNING", logger="encdec.data"):
        ids = [sid for b in it for sid in b["sample_id"].tolist()]
    assert sorted(i for i in ids if i >= 0) == [5, 6, 7]
    # the all-nodata tile is empty, not bad: listed, but not counted against max_bad_fraction
    assert it.bad_tiles == {"unreadable": 2, "band-name": 1, "size": 1, "all-nodata": 1, "total": 4, "empty": 1}
    assert "tile_00000_img.tif" in caplog.text and "tile_00003_mask.tif" in caplog.text
    train = build_iterator(cfg, run_dir=str(tmp_path))
    for _ in range(4):  # two epochs: each bad tile counted once, slot ignored
        b = next(train)
        assert (b["mask"][b["sample_id"] == -1] == -1).all()
    assert train.bad_tiles["total"] == 4 and train.bad_tiles["empty"] == 1
    train.close()
    with open(tmp_path / "skipped_tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5  # each skipped tile once, with its reason, rank and step
    by_file = {Path(r["file"]).name: r for r in rows}
    assert by_file["tile_00004_img.tif"]["reason"] == "all-nodata"
    assert by_file["tile_00003_mask.tif"]["reason"] == "unreadable"
    assert {r["rank"] for r in rows} == {"0"} and all(r["step"] in ("0", "1") for r in rows)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_empty_tiles_do_not_count_against_max_bad_fraction(tmp_path):
    root = write_tiles(tmp_path / "e", 8, img_size=SIZE, seed=5, cog=False)
    for i in (1, 4):
        write_raster(root / f"tile_0000{i}_img.tif", np.full((6, SIZE, SIZE), -9999, np.int16), nodata=-9999,
                     descriptions=("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"))
    it = build_iterator(_cfg(root, max_bad_fraction=0.0, global_batch_size=8), split="val")
    ids = [sid for b in it for sid in b["sample_id"].tolist()]
    assert sorted(i for i in ids if i >= 0) == [0, 2, 3, 5, 6, 7]
    assert it.bad_tiles == {"all-nodata": 2, "total": 0, "empty": 2}
    # a chip with less valid data than data.min_valid_fraction is empty too
    half = np.ones((6, SIZE, SIZE), np.int16)
    half[:, : SIZE // 2 + 1] = -9999
    write_raster(root / "tile_00002_img.tif", half, nodata=-9999,
                 descriptions=("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"))
    it = build_iterator(_cfg(root, max_bad_fraction=0.0, global_batch_size=8, min_valid_fraction=0.5), split="val")
    assert sorted(i for b in it for i in b["sample_id"].tolist() if i >= 0) == [0, 3, 5, 6, 7]
    assert it.bad_tiles == {"all-nodata": 2, "nearly-empty": 1, "total": 0, "empty": 3}


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_too_many_bad_tiles_stops_with_a_clear_error(tmp_path):
    root = _bad_set(tmp_path)
    it = build_iterator(_cfg(root, max_bad_fraction=0.25, global_batch_size=8), split="val")
    with pytest.raises(TooManyBadTilesError, match=r"max_bad_fraction=0\.25.*Fix"):
        list(it)


def test_config_errors_name_the_field(tiles):
    with pytest.raises(DataConfigError, match=r"global_batch_size=6 .* 4"):
        build_iterator(_cfg(tiles, global_batch_size=6), world_size=2, grad_accum=2)
    with pytest.raises(DataConfigError, match=r"data\.test is not set"):
        build_iterator(_cfg(tiles), split="test")
    with pytest.raises(DataConfigError, match=r"data\.means/data\.stds are missing"):
        build_iterator(_cfg(tiles, bands=["RED"]))
    with pytest.raises(DataConfigError, match=r"data.train.tiles=.*matches no files"):
        build_iterator(_cfg(tiles, train={"tiles": str(tiles / "nothing-*.tif")}))
    with pytest.raises(DataConfigError, match="feed='spark'"):
        build_iterator(_cfg(tiles), feed="spark")


def test_manifest_gives_temporal_and_location_coords(tmp_path):
    root = write_tiles(tmp_path / "mt", 4, img_size=SIZE, seed=2, num_frames=2, cog=False, manifest=True)
    cfg = _cfg(root, train={"manifest": str(root / "manifest.csv")}, num_frames=2)
    b = next(build_iterator(cfg))
    assert b["image"].shape == (4, 6, 2, SIZE, SIZE)
    years, days = b["temporal_coords"][..., 0], b["temporal_coords"][..., 1]
    assert ((years >= 2019) & (years <= 2023)).all() and ((days >= 1) & (days <= 366)).all()
    assert b["location_coords"].shape == (4, 2) and (b["location_coords"][:, 0].abs() < 90).all()
