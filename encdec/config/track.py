"""The ``track:`` recipe section: where a run's metrics go besides ``metrics.jsonl`` (TensorBoard, MLflow, W&B).

Credentials never live here: a tracking server's user, password or token and W&B's API key come from the
environment of the process that launches the run (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` /
``MLFLOW_TRACKING_TOKEN``, ``WANDB_API_KEY``), so they never reach recipes, run directories, logs or rendered
sbatch scripts. A URI with a user or password in it is refused for that reason.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MlflowConfig", "TrackConfig", "WandbConfig", "object_store_rule"]

_SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MlflowConfig(_Strict):
    """An MLflow tracking store: a server (``http(s)://...``, ``databricks``) or, without a URI, a local one."""

    tracking_uri: str | None = Field(
        None, description="Tracking server URI, e.g. http://mlflow.internal:5000. null = an embedded store in the "
        "run directory (<run_dir>/mlflow/mlflow.db, artifacts beside it); needs run storage on a local or shared "
        "disk. Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN in the environment, never from here.")
    experiment: str | None = Field(None, description="Experiment name (created when missing); null = run.name.")
    run_name: str | None = Field(None, description="MLflow run name; null = the run directory's name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on the MLflow run (team, dataset...).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.username or parts.password or any(w in parts.query.lower() for w in _SECRET_WORDS):
            raise ValueError("must not contain credentials (they would be written to the run's recipe and logs); "
                             "give the URI without them and export MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the launching shell")
        return v

    @field_validator("tags")
    @classmethod
    def _no_secret_tags(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if any(w in k.lower() for w in _SECRET_WORDS)]
        if bad:
            raise ValueError(f"tag(s) {bad} look like credentials; keep secrets in the environment, not in recipes")
        return v


class WandbConfig(_Strict):
    """A Weights & Biases project. ``WANDB_API_KEY`` comes from the environment (online mode only)."""

    project: str = Field(description="W&B project name.")
    entity: str | None = Field(None, description="W&B entity (user or team); null = the API key's default.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files only, in <run_dir>/wandb (upload later with `wandb sync`); "
        "online: stream to the W&B server (needs WANDB_API_KEY in the environment).")


class TrackConfig(_Strict):
    """Experiment tracking. The driver logs what rank 0 reports; a tracking backend that is down or misconfigured
    is reported once and never stops or slows training (a bounded queue flushed by a background thread)."""

    tensorboard: bool | str = Field(
        False, description="true = TensorBoard event files in <run_dir>/tensorboard; a path = event files there "
        "(a per-run subfolder). Every metric, learning rate, throughput, data-wait and peak memory; the resolved "
        "recipe as text; the metrics plot at the end.")
    mlflow: MlflowConfig | None = Field(
        None, description="MLflow: the recipe flattened into params, every metric with its step, the recipe, "
        "versions, plot, metrics.csv and the exported model as artifacts. A resumed run continues the same "
        "MLflow run.")
    wandb: WandbConfig | None = Field(None, description="Weights & Biases: the same content as MLflow.")
    queue_size: int = Field(
        10000, ge=10, le=1_000_000, description="Reports held for a slow backend before the oldest are dropped "
        "(and counted in the run's summary).")
    flush_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="How long the end of a run waits for the backends to take what is queued.")

    @property
    def enabled(self) -> bool:
        """Whether any backend is configured."""
        return bool(self.tensorboard) or self.mlflow is not None or self.wandb is not None


def object_store_rule(track: TrackConfig | None, storage: str) -> str | None:
    """Why this tracking set-up cannot work with run storage ``storage`` (None when it can).

    The embedded MLflow store is an SQLite file, which needs a POSIX filesystem: on an object store
    (``s3://``, ``gs://``...) a tracking server is required.
    """
    if track is None or track.mlflow is None or track.mlflow.tracking_uri:
        return None
    if "://" in storage and not storage.startswith("file://"):
        return (f"the embedded MLflow store is a SQLite file inside the run directory, which cannot live on the "
                f"object store {storage!r} (cluster.storage)")
    return None
