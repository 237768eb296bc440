"""Streaming multi-band tiles: sources, windowed rasterio reads, exact per-rank feeds, synthetic HLS-like data.

``build_iterator(data, split=..., rank=..., world_size=..., grad_accum=..., seed=..., feed=...)`` gives the
iterator the training loop consumes. Importing this package imports neither rasterio nor ray; they load on the
first read / when the Ray feed is chosen.
"""

from encdec.data.badtiles import BadTileError, TooManyBadTilesError
from encdec.data.build import build_iterator
from encdec.data.config import DataConfigError
from encdec.data.feed import TileIterator

__all__ = [
    "BadTileError",
    "DataConfigError",
    "TileIterator",
    "TooManyBadTilesError",
    "build_iterator",
]
