"""The data pipeline's configuration error. The ``data:`` section itself is ``encdec.config.DataSection``: the
pipeline receives that typed object (``build_iterator``) and never re-parses a dict."""

from __future__ import annotations

__all__ = ["DataConfigError"]


class DataConfigError(ValueError):
    """A ``data:`` setting that cannot work; the message names the field, the value, what is allowed and the fix."""
