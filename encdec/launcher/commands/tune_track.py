"""The search's parent MLflow run (``track.mlflow`` set): one per search, each trial's MLflow run its child.

The parent holds the search's settings and space as params and, once the search ends, the best trial's metric,
``best.yaml``, ``results.csv`` and ``trials.png``. Each trial's run is made by the trial's own tracker (the
usual ``MlflowSink``) with the tag ``mlflow.parentRunId`` - the tag MLflow's UI and ``nested=True`` use - so
the trials show nested under the search. Without ``tracking_uri`` the store is embedded in the search directory
(``SEARCH_DIR/mlflow/mlflow.db``), shared by the parent and every trial, instead of one store per trial.

The parent's id is kept in ``SEARCH_DIR/tracking.json``: rerunning the search (or ``--resume``) continues the
same parent, and a restored trial continues its own child run (its ``tracking.json``). A tracking server that is
down is reported once; the search goes on without a parent (the trials' trackers report their own problems).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["PARENT_TAG", "SearchParent", "child_track"]

PARENT_TAG = "mlflow.parentRunId"


def child_track(track: dict[str, Any], parent: Mapping[str, str], trial_id: str) -> dict[str, Any]:
    """A trial's ``track`` section (data) with its MLflow run made a child of the search's ``parent``."""
    mlflow = dict(track.get("mlflow") or {})
    mlflow["tracking_uri"] = parent["tracking_uri"]
    mlflow["experiment"] = parent["experiment"]
    mlflow["run_name"] = f"{mlflow.get('run_name') or 'trial'}-{trial_id}"
    mlflow["tags"] = {**(mlflow.get("tags") or {}), PARENT_TAG: parent["run_id"]}
    return {**track, "mlflow": mlflow}


class SearchParent:
    """The parent MLflow run of a search. Every call is best-effort: a failure is reported once, then ignored."""

    def __init__(self, cfg: Any, search_dir: Path, name: str, report: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.search_dir = search_dir
        self.name = name
        self.report = report
        self.client: Any = None
        self.run_id: str | None = None
        from encdec.track.mlflow_sink import embedded_uri

        self.uri = cfg.tracking_uri or embedded_uri(search_dir)
        self.experiment = cfg.experiment or name
        self.failed = False

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as err:  # a tracking server down must not stop the search
            self.failed = True
            self.report(f"mlflow parent run: {what} failed ({type(err).__name__}: {err}); the search continues "
                        "without it")
            return None

    def open(self, spec: Mapping[str, Any]) -> dict[str, str] | None:
        """Create or continue the parent run; what each trial needs to be its child (None when it failed)."""
        return self._guard("open", lambda: self._open(spec))

    def _open(self, spec: Mapping[str, Any]) -> dict[str, str]:
        from encdec.track.common import flatten, read_state, recipe_text, update_state
        from encdec.track.mlflow_sink import continue_run, experiment_id, open_client

        # the trial sinks' client: bounded HTTP retries (a server that does not answer must not hang the search)
        self.client, _ = open_client(self.cfg.tracking_uri, self.search_dir)
        previous = read_state(self.search_dir).get("mlflow", {})
        if previous.get("run_id") and previous.get("tracking_uri") == self.uri:
            self.run_id = str(previous["run_id"])
            continue_run(self.client, self.run_id)
            return self.trial_parent()
        exp_id = experiment_id(self.client, self.experiment, self.search_dir, self.cfg.tracking_uri is None)
        tags = {**self.cfg.tags, "encdec.search_dir": str(self.search_dir), "encdec.kind": "search"}
        run = self.client.create_run(exp_id, run_name=self.cfg.run_name or self.search_dir.name, tags=tags)
        self.run_id = run.info.run_id
        update_state(self.search_dir, "mlflow", {"run_id": self.run_id, "experiment_id": exp_id,
                                                 "tracking_uri": self.uri})
        from mlflow.entities import Param

        settings = {k: spec[k] for k in ("trials", "metric", "mode", "scheduler", "search", "seed") if k in spec}
        params = {**flatten({"tune": settings}), **{f"space.{k}": str(v) for k, v in spec["space"].items()}}
        self.client.log_batch(self.run_id, params=[Param(k[:250], v[:6000]) for k, v in params.items()])
        self.client.log_text(self.run_id, recipe_text(spec["recipe"]), "recipe.yaml")
        return self.trial_parent()

    def trial_parent(self) -> dict[str, str]:
        assert self.run_id is not None
        return {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}

    def finish(self, best: Mapping[str, Any] | None, metric: str, files: list[Path]) -> None:
        """The best trial's metric and the result files; the parent ends FINISHED (FAILED without a best)."""
        if self.run_id is None:
            return

        def _finish() -> None:
            from encdec.track.common import read_state

            if best is not None:
                seen = {m.step for m in self.client.get_metric_history(self.run_id, metric)}
                if int(best["steps"]) not in seen:  # a rerun of a finished search logs nothing twice
                        self.client.log_metric(self.run_id, metric, float(best["best"]), step=int(best["steps"]))
                self.client.set_tag(self.run_id, "encdec.best_run_dir", str(best["run_dir"]))
                child = read_state(Path(best["run_dir"])).get("mlflow", {}).get("run_id")
                if child:
                    self.client.set_tag(self.run_id, "encdec.best_run_id", str(child))
            for path in files:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, status="FINISHED" if best is not None else "FAILED")

        self._guard("finish", _finish)
