"""``build_iterator``: the recipe's ``data:`` section -> this rank's iterator (either feed)."""

from __future__ import annotations

import logging
import os
from typing import Any

from encdec.config import DataSection
from encdec.data.badtiles import BadTileError, BadTileTracker
from encdec.data.batch import BatchLayout, SampleLoader
from encdec.data.config import DataConfigError
from encdec.data.feed import TileIterator
from encdec.data.plan import FeedPlan
from encdec.data.preprocess import make_normalizer
from encdec.data.readers import GDAL_OPTIONS, TileReader
from encdec.data.sources import Sample, describe, list_samples

LOG = logging.getLogger("encdec.data")
FEEDS = ("reader", "ray")
SKIPPED_CSV = "skipped_tiles.csv"  # in the run directory: file,reason,rank,step,detail of every skipped tile


def _probe(samples: list[Sample], reader: TileReader, where: str) -> str:
    """Find the target kind from the first readable sample; a config mistake fails here, before training."""
    for sample in samples[:8]:
        try:
            return reader.probe_target(sample)
        except BadTileError:
            continue
    raise DataConfigError(
        f"none of the first {min(8, len(samples))} samples of {where} can be opened (first: {samples[0].images[0]}). "
        f"Fix: check the paths and file permissions."
    )


def make_reader(spec: DataSection, target: str = "none") -> TileReader:
    """The tile reader the recipe describes: bands, statistics and the pixel layout (``data.dataset_bands``,
    ``constant_scale``, ``no_data_replace``, ``no_label_replace``, ``min_valid_fraction``)."""
    px = spec.pixels
    try:
        normalizer = make_normalizer(spec)
    except ValueError as err:
        raise DataConfigError(str(err)) from None
    return TileReader(bands=tuple(spec.bands), normalizer=normalizer, img_size=spec.img_size,
                      num_frames=spec.num_frames, target=target, location_coords=spec.location_coords,
                      dataset_bands=px.dataset_bands, no_label_replace=px.no_label_replace,
                      min_valid_fraction=px.min_valid_fraction)


def make_loader(spec: DataSection, samples: list[Sample], *, split: str, plan: FeedPlan,
                run_dir: str | None = None) -> SampleLoader:
    """The per-sample reader of one split on one rank (shared by both feeds); skips are listed in
    ``<run_dir>/skipped_tiles.csv`` when ``run_dir`` is given."""
    for key, value in GDAL_OPTIONS.items():
        os.environ.setdefault(key, value)  # GDAL falls back to the environment for config options
    where = f"data.{split}"
    reader = make_reader(spec)
    reader.target = _probe(samples, reader, where)
    labels = [s.label for s in samples if s.label is not None]
    layout = BatchLayout(
        size=plan.micro_batch,
        channels=len(spec.bands),
        img_size=spec.img_size,
        num_frames=spec.num_frames,
        target=reader.target,
        label_dtype="int64" if all(float(v).is_integer() for v in labels) else "float32",
        temporal=all(s.times is not None for s in samples),
        location=spec.location_coords or all(s.location is not None for s in samples),
    )
    reads = plan.num_samples // plan.world_size if plan.train else -(-plan.num_samples // plan.world_size)
    csv_path = None if run_dir is None else os.path.join(run_dir, SKIPPED_CSV)
    tracker = BadTileTracker(reads, spec.max_bad_fraction, split, rank=plan.rank, skipped_csv=csv_path)
    augment = spec.augment if plan.train and spec.augment.any else None
    return SampleLoader(samples, reader, layout, augment, plan.seed, tracker)


def build_iterator(data: DataSection, *, split: str = "train", rank: int = 0, world_size: int = 1,
                   grad_accum: int = 1, seed: int = 0, feed: str | None = None, run_dir: str | None = None) -> Any:
    """Build this rank's micro-batch iterator over one split.

    Args:
        data: The recipe's ``data:`` section.
        split: ``train`` (endless, shuffled, augmented) or ``val``/``test`` (one ordered pass, no augmentation).
        rank: This worker's rank.
        world_size: Number of training workers.
        grad_accum: Micro-steps per optimizer step; micro-batch = global_batch_size // (world_size * grad_accum).
        seed: Run seed (permutations and augmentations derive from it).
        feed: ``reader`` (prefetching threads in this process, exact) or ``ray`` (Ray Data decode tasks, exact;
            see ``encdec.data.ray_feed``); None: ``data.feed``.
        run_dir: The run directory: skipped tiles are appended to its ``skipped_tiles.csv`` (``None``: no file).

    Returns:
        A ``TileIterator`` (or ``RayTileIterator``) with ``state_dict``/``load_state_dict``/``close``.

    Raises:
        DataConfigError: A setting that cannot work, naming the field and the fix.
    """
    feed = feed or data.feed
    if feed not in FEEDS:
        raise DataConfigError(f"feed={feed!r} is not valid: allowed {list(FEEDS)}. Fix: use 'reader' or 'ray'.")
    spec = data
    source = spec.split(split)
    if source is None:
        given = [name for name in ("train", "val", "test") if spec.split(name) is not None]
        raise DataConfigError(
            f"data.{split} is not set (splits given: {given}). Fix: add data.{split}: {{tiles: DIR}}."
        )
    samples = list_samples(source, img_size=spec.img_size, where=f"data.{split}", split=split)
    plan = FeedPlan(num_samples=len(samples), global_batch_size=spec.global_batch_size, world_size=world_size,
                    rank=rank, grad_accum=grad_accum, seed=seed, train=split == "train")
    loader = make_loader(spec, samples, split=split, plan=plan, run_dir=run_dir)
    LOG.info("data.%s rank %d/%d: %s, micro-batch %d, feed %s", split, rank, world_size, describe(samples),
             plan.micro_batch, feed)
    if feed == "ray":
        from encdec.data.ray_feed import RayTileIterator

        return RayTileIterator(plan, loader, cpus_per_task=spec.reader.ray_cpus_per_task,
                               prefetch_batches=spec.reader.ray_prefetch_batches)
    return TileIterator(plan, loader, threads=spec.reader.threads, prefetch_batches=spec.reader.prefetch_batches)
