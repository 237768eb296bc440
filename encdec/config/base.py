"""The base of every recipe section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @classmethod
    def written_or_default(cls, section: Mapping[str, Any], name: str) -> Any:
        """``section[name]`` as a recipe file wrote it, else this field's one default (for code that reads a
        section before it is validated, e.g. the Slurm renderer of a plain recipe dict)."""
        return section[name] if name in section else cls.model_fields[name].get_default(call_default_factory=True)
