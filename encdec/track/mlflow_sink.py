"""MLflow: the recipe as params, every metric with its step, the recipe/versions/plot/metrics.csv/model as artifacts.

Without ``tracking_uri`` the store is embedded in the run directory (``<run_dir>/mlflow/mlflow.db``, artifacts in
``<run_dir>/mlflow/artifacts``): no server, and ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow/mlflow.db``
shows it. The MLflow run id is kept in ``<run_dir>/tracking.json`` so a resumed run continues the same MLflow run.
Only ``MlflowClient`` is used (no fluent API, no process-global active run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from encdec.config.track import MlflowConfig
from encdec.track.common import flatten, read_state, recipe_text, update_state
from encdec.track.hub import RunInfo

__all__ = ["MlflowSink", "continue_run", "embedded_uri", "experiment_id", "open_client"]

# A tracking server that does not answer must not hold the background thread for minutes per call (MLflow's
# defaults: 7 retries with exponential backoff, 120 s timeout); the user's own settings win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_STATUS = {"finished": "FINISHED", "early-stopped": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def embedded_uri(run_dir: Path) -> str:
    """The embedded store of a run: an SQLite file in its directory."""
    return f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"


def open_client(tracking_uri: str | None, root: Path) -> tuple[Any, str]:
    """An MLflow client of ``tracking_uri``, or of the embedded store under ``root`` when it is None, and its URI.
    MLflow's HTTP retries are bounded first (:data:`_HTTP_DEFAULTS`)."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    if tracking_uri is None:
        (root / "mlflow").mkdir(parents=True, exist_ok=True)
    uri = embedded_uri(root) if tracking_uri is None else str(tracking_uri)
    return MlflowClient(tracking_uri=uri), uri


def experiment_id(client: Any, name: str, root: Path, embedded: bool) -> str:
    """The id of experiment ``name``, created when missing (its artifacts under ``root`` in the embedded store)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = (root / "mlflow" / "artifacts").resolve().as_uri() if embedded else None
    return str(client.create_experiment(name, artifact_location=location))


def continue_run(client: Any, run_id: str) -> None:
    """Mark a run recorded by an earlier launch as running again (a resume continues it, no new run)."""
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "encdec.resumed", time.strftime("%Y-%m-%dT%H:%M:%S"))


class MlflowSink:
    """One MLflow run per encdec run (continued on resume)."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig) -> None:
        self.cfg = cfg
        self.client: Any = None
        self.run_id: str | None = None

    def open(self, info: RunInfo) -> None:
        embedded = self.cfg.tracking_uri is None
        self.client, uri = open_client(self.cfg.tracking_uri, info.run_dir)
        previous = read_state(info.run_dir).get("mlflow", {})
        if previous.get("run_id") and previous.get("tracking_uri") == (None if embedded else uri):
            self.run_id = str(previous["run_id"])
            continue_run(self.client, self.run_id)
            return
        name = self.cfg.experiment or str(info.recipe.get("run", {}).get("name") or "encdec")
        exp_id = experiment_id(self.client, name, info.run_dir, embedded)
        tags = {**self.cfg.tags, "encdec.run_dir": str(info.run_dir),
                **{f"encdec.version.{k}": v for k, v in info.versions.items()}}
        run = self.client.create_run(exp_id, run_name=self.cfg.run_name or info.run_name, tags=tags)
        self.run_id = run.info.run_id
        # recorded before anything else is sent: a crash from here on still resumes into this run
        update_state(info.run_dir, "mlflow", {"run_id": self.run_id, "experiment_id": exp_id,
                                              "tracking_uri": None if embedded else uri})
        from mlflow.entities import Param

        params = [Param(k[:250], v[:6000]) for k, v in flatten(info.recipe).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, recipe_text(info.recipe), "recipe.yaml")
        self.client.log_dict(self.run_id, info.versions, "versions.json")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str, files: Mapping[str, Path]) -> None:
        for key in ("plot", "metrics_csv"):
            if key in files:
                self.client.log_artifact(self.run_id, str(files[key]))
        if "model" in files:
            self.client.log_artifacts(self.run_id, str(files["model"]), artifact_path="model")
        self.client.set_tag(self.run_id, "encdec.status", status)
        self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FINISHED"))
