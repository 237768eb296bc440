"""Opening a scene's pixels: one file, or one file per date (multi-temporal, as training's ``a.tif|b.tif``
manifest rows), under the GDAL options the caller gave (``/vsis3/`` endpoint and keys, ...).

GDAL options are applied with ``rasterio.Env`` around each open and read, never written to ``os.environ``: a
notebook's or a worker's environment is left as it was, and two calls with different endpoints do not interfere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from encdec.data.sources import FRAME_SEPARATOR  # training manifests' separator of per-date files

__all__ = ["FRAME_SEPARATOR", "FrameStack", "frames_of", "gdal_env", "open_raster"]


def frames_of(path: str) -> list[str]:
    """The per-date files of a scene path (one element for a single-file scene)."""
    return [p for p in path.split(FRAME_SEPARATOR) if p]


#: Credentials rasterio refuses as plain ``Env`` options (it wants a session object for them).
_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def gdal_env(options: Mapping[str, Any] | None = None, **extra: Any) -> Any:
    """A ``rasterio.Env`` with the caller's GDAL config options (``AWS_S3_ENDPOINT``, ``AWS_HTTPS``, ...).

    AWS keys go in through a rasterio ``Session`` holding exactly the given values (rasterio refuses them as
    plain options and would otherwise need boto3): they are set for the context and removed on exit like the rest.
    """
    import rasterio
    from rasterio.session import Session

    opts = {**{str(k): v for k, v in (options or {}).items()}, **extra}
    secrets = {k: str(opts.pop(k)) for k in _SECRETS if k in opts}
    if not secrets:
        return rasterio.Env(**opts)

    class _GivenCredentials(Session):
        """The caller's AWS keys as GDAL options (no boto3, no lookup in the environment or ~/.aws)."""

        @classmethod
        def hascreds(cls, config: Mapping[str, Any]) -> bool:
            return all(k in config for k in secrets)

        def get_credential_options(self) -> dict[str, str]:
            return dict(secrets)

    return rasterio.Env(session=_GivenCredentials(), **opts)


class FrameStack:
    """Several co-registered files read as one dataset whose bands are the files' bands, date after date (the
    band-group layout ``encdec.data.preprocess`` splits into ``num_frames`` frames)."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)
        self.owner: list[tuple[int, int]] = [(f, b) for f, ds in enumerate(self.datasets)
                                             for b in range(1, ds.count + 1)]
        first = self.datasets[0]
        self.height, self.width, self.count = first.height, first.width, len(self.owner)

    def read(self, indexes: Sequence[int] | None = None, window: Any = None) -> np.ndarray:
        """Bands ``indexes`` (1-based over all frames) of ``window``: ``[len(indexes), h, w]``."""
        wanted = [self.owner[i - 1] for i in (indexes or range(1, self.count + 1))]
        per_frame: dict[int, dict[int, np.ndarray]] = {}
        for f, ds in enumerate(self.datasets):
            bands = sorted({b for ff, b in wanted if ff == f})
            if bands:
                per_frame[f] = dict(zip(bands, ds.read(bands, window=window), strict=True))
        return np.stack([per_frame[f][b] for f, b in wanted])


@contextlib.contextmanager
def open_raster(path: str) -> Iterator[Any]:
    """The scene's pixels: a rasterio dataset, or a :class:`FrameStack` of its per-date files."""
    import rasterio

    frames = frames_of(path)
    if len(frames) == 1:
        with rasterio.open(frames[0]) as src:
            yield src
        return
    with contextlib.ExitStack() as stack:
        yield FrameStack([stack.enter_context(rasterio.open(f)) for f in frames])
