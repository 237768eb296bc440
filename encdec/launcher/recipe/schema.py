"""The recipe: one YAML file describing a fine-tuning run, validated by pydantic v2 with ``extra="forbid"``.

Section names are the shared contract of ``shared/RECIPE.md``; each section is a typed model defined once in
``encdec.config`` (re-exported here), and the engine, data and Slurm code receive those objects. ``task`` sits
beside ``model`` as in TerraTorch, and ``model`` is exactly ``build_model``'s keyword arguments so a TerraTorch
``model_args`` block pastes in unchanged.

Loading (``encdec.launcher.recipe.validate.load_recipe``) collects every problem - YAML syntax, unknown keys, bad values, ``--set`` overrides,
cross-field rules - into one :class:`~encdec.launcher.recipe.errors.RecipeError`. Registry names and the model build are
checked later by the planner (they need torch). Nothing here imports torch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import Field, PrivateAttr, field_validator

from encdec.config import (
    HLS_BANDS,
    MODEL_PREFIXES,
    TASKS,
    AugmentSection,
    AuxDecoderSpec,
    ClusterSection,
    DataSection,
    DataSource,
    LossSection,
    ModelSection,
    NeckSpec,
    OptimSection,
    PeftSection,
    ReaderSection,
    RunSection,
    Section,
    SlurmSection,
    SyntheticSpec,
    TrainSection,
)
from encdec.config.names import TaskName
from encdec.config.track import TrackConfig
from encdec.config.tune import TuneConfig

__all__ = [
    "HLS_BANDS",
    "MODEL_PREFIXES",
    "TASKS",
    "AugmentSection",
    "AuxDecoderSpec",
    "ClusterSection",
    "DataSection",
    "DataSource",
    "LossSection",
    "ModelSection",
    "NeckSpec",
    "OptimSection",
    "PeftSection",
    "ReaderSection",
    "Recipe",
    "RunSection",
    "Section",
    "SlurmSection",
    "SyntheticSpec",
    "TrainSection",
    "json_schema",
    "recipe_dict",
]

# --------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    """A fine-tuning run: task + model (factory kwargs) + loss + data + optim + train + cluster."""

    task: TaskName = Field(
        description="segmentation | regression (pixel-wise) | classification | scalar_regression."
    )
    run: RunSection = Field(default_factory=RunSection, description="Run identity (name, seed, init, export).")  # type: ignore[arg-type]
    model: ModelSection = Field(description="build_model's keyword arguments (TerraTorch model_args).")
    loss: LossSection = Field(default_factory=LossSection, description="The loss.")  # type: ignore[arg-type]
    data: DataSection = Field(description="Data sources, bands, statistics, batch and augmentation.")
    optim: OptimSection = Field(default_factory=OptimSection, description="Optimizer and schedule.")  # type: ignore[arg-type]
    train: TrainSection = Field(description="Length, precision, strategy, intervals, fault tolerance.")
    cluster: ClusterSection = Field(default_factory=ClusterSection, description="Nodes, workers, resources, storage.")  # type: ignore[arg-type]
    track: TrackConfig | None = Field(None, description="Experiment tracking: TensorBoard, MLflow, W&B.")
    tune: TuneConfig | None = Field(None, description="Hyperparameter search (encdec-launch tune).")
    # where each key was written (file line or --set), so later checks (registry names, the build) can say it too
    _origin: Any = PrivateAttr(default=None)

    def error(self, issues: list[Any]) -> Any:
        """A RecipeError for ``issues`` found after loading, with the lines/sources of the recipe file."""
        from encdec.launcher.recipe.errors import RecipeError

        lines, source = self._origin if self._origin else (None, None)
        return RecipeError(lines.attach(issues) if lines is not None else issues, source)

    @field_validator("task", mode="before")
    @classmethod
    def _task_lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved recipe as YAML-ready data (written into each run directory)."""
        out = self.model_dump(mode="json", exclude={"model"})
        out["model"] = _jsonable(self.model.factory_kwargs())
        order = ["task", "run", "model", "loss", "data", "optim", "train", "cluster"]
        extra = [k for k in ("track", "tune") if out.get(k) is not None]  # optional sections, when set
        return {k: out[k] for k in order + extra}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- entry points
def json_schema() -> dict[str, Any]:
    """The recipe's JSON schema (``encdec-launch recipe --schema``)."""
    return Recipe.model_json_schema()


def recipe_dict(recipe: Any) -> dict[str, Any]:
    """A recipe as plain data (a deep copy: the caller may change it), from a mapping or a ``Recipe``."""
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe))
    dump = getattr(recipe, "model_dump", None)
    if callable(dump):
        return dict(dump())
    raise TypeError(f"recipe must be a mapping or a pydantic Recipe, got {type(recipe).__name__}")
