"""Kubernetes (``--k8s``): the run becomes a KubeRay RayJob manifest in the run directory; ``kubectl`` follows it.

The launch writes ``RUN_DIR/rayjob.yaml`` and records the RayJob's name; applying it stays the user's step
(``kubectl apply -f``), as the cluster's credentials are theirs. ``status|logs|stop`` call ``kubectl``: the
RayJob's ``status.jobStatus``, the logs of its submitter Job (KubeRay names it after the RayJob), and deleting
the RayJob (checkpoints already committed to the shared storage stay).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from encdec.launcher.backends.base import Entry, Run
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["Kubernetes"]


def _kubectl(argv: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if shutil.which("kubectl") is None:
        raise LaunchError("kubectl not found: install it and point it at the cluster the RayJob was applied to")
    try:
        proc = subprocess.run(["kubectl", *argv], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise LaunchError(f"kubectl {' '.join(argv)} did not answer within {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise LaunchError(f"kubectl {' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Kubernetes:
    """A KubeRay RayJob: the entry's command is the RayJob's entrypoint on the head pod."""

    mode = "k8s"
    runs_here = False
    writes_synthetic_here = False
    strict_data = False   # the pods read the data, not this machine

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.args = args

    def where(self) -> str:
        return "Kubernetes"

    @staticmethod
    def _render(entry: Entry, run_dir: Path) -> tuple[str, list[str]]:
        """The manifest, and what would stop it from running (placeholder image, paths on no mounted volume)."""
        from encdec.launcher.backends import k8s

        argv = entry.argv(run_dir, f"{k8s.RECIPE_MOUNT}/recipe.yaml")
        argv += ["--address", "auto"] if entry.needs_ray_address else []
        rec = entry.recipe.to_yaml_dict()
        cluster = rec.get("cluster") or {}
        memory = None
        if entry.plan is not None:
            memory = k8s.worker_memory_gib(entry.plan, int(cluster.get("workers_per_node") or 1))
        text = k8s.render_rayjob(rec, run_dir=run_dir, entrypoint=argv, worker_memory=memory)
        problems = k8s.unmounted_paths(text, rec)
        image = cluster.get("image") or k8s.PLACEHOLDER_IMAGE
        if k8s.is_placeholder_image(image):
            problems.insert(0, f"cluster.image={cluster.get('image')!r}: the pods would run the template's placeholder "
                            f"image {k8s.PLACEHOLDER_IMAGE!r}, which no registry serves; fix: build an image with "
                            "encdec-launch installed (cluster/README.md), push it and set cluster.image: "
                            "REGISTRY/encdec-launch:TAG (or --set cluster.image=...)")
        return text, problems

    def preview(self, entry: Entry, run_dir: Path) -> str:
        """The manifest (for stdout alone); what would stop it from running is written to stderr."""
        text, problems = self._render(entry, run_dir)
        for problem in problems:
            print(f"warning (--k8s refuses this): {problem}", file=sys.stderr)
        return text

    def submit(self, entry: Entry, make_run_dir: Callable[[], Path], console: Any) -> int:
        from encdec.launcher.rundir import update_launch

        # checked before the run directory exists: the paths do not depend on it (it is under cluster.storage)
        storage = Path(str(entry.recipe.cluster.storage))
        _, problems = self._render(entry, storage / "run")
        if problems:
            raise LaunchError("the RayJob cannot run as rendered:\n  " + "\n  ".join(problems))
        run_dir = make_run_dir()
        manifest = run_dir / "rayjob.yaml"
        manifest.write_text(self._render(entry, run_dir)[0])
        (job,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d.get("kind") == "RayJob"]
        meta = job["metadata"]
        update_launch(run_dir, mode=self.mode, k8s_rayjob=meta["name"], k8s_namespace=meta.get("namespace"))
        console.print(f"wrote {manifest}; start it with `kubectl apply -f {manifest}`")
        return 0

    def _ref(self, run: Run) -> list[str]:
        name = run.launch.get("k8s_rayjob")
        if not name:
            raise LaunchError(f"{run.run_dir}: launch.json names no RayJob (k8s_rayjob); was it launched with --k8s?")
        ns = run.launch.get("k8s_namespace")
        return [str(name), *(["--namespace", str(ns)] if ns else [])]

    def status(self, run: Run) -> str:
        name, *ns = self._ref(run)
        out = _kubectl(["get", "rayjob", name, *ns, "-o",
                        "jsonpath={.status.jobDeploymentStatus} {.status.jobStatus}"]).stdout.split()
        deployment, job = [*out, "", ""][:2]
        return f"RayJob {name}: {job or 'PENDING'}" + (f" (deployment {deployment})" if deployment else "")

    def logs(self, run: Run, *, tail: int | None, follow: bool, out: IO[str]) -> None:
        name, *ns = self._ref(run)
        argv = ["logs", f"job/{name}", *ns, *(["--tail", str(tail)] if tail else []), *(["--follow"] if follow else [])]
        if not follow:
            out.write(_kubectl(argv).stdout)
            return
        if shutil.which("kubectl") is None:
            _kubectl(argv)   # raises the "not found" error
        with subprocess.Popen(["kubectl", *argv], stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:   # kubectl ends the stream when the submitter pod ends
                out.write(line)
                out.flush()
        if proc.returncode != 0:
            raise LaunchError(f"kubectl {' '.join(argv)} exited with {proc.returncode}")

    def stop(self, run: Run) -> str:
        name, *ns = self._ref(run)
        _kubectl(["delete", "rayjob", name, *ns], timeout=300)
        return f"deleted RayJob {name} (its Ray cluster and pods); checkpoints on the shared storage stay"
