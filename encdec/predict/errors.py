"""Errors of predict/evaluate that the user can fix (the message names the setting, the value and the fix)."""

from __future__ import annotations

__all__ = ["PredictError"]


class PredictError(ValueError):
    """A predict setting that cannot work (e.g. more GPU workers than the Ray cluster has GPUs)."""
