"""Kubernetes: render ``cluster/rayjob.yaml`` (a KubeRay RayJob plus the ConfigMap holding the recipe).

The template is a complete, commented manifest; rendering fills in what comes from the recipe: names, the
resolved recipe (mounted at /etc/encdec/recipe.yaml on the head, where the driver runs), the entrypoint with
the run directory, one worker pod per node with the node's CPUs and GPUs, and the storage mount at the
recipe's ``cluster.storage``. Everything else (image, memory, the PersistentVolumeClaim) comes from the
template or the arguments.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from encdec.launcher.recipe.errors import LaunchError
from encdec.launcher.recipe.schema import recipe_dict

__all__ = ["RECIPE_MOUNT", "rayjob_template_path", "render_rayjob"]

RECIPE_MOUNT = "/etc/encdec"


def rayjob_template_path() -> Path:
    """``cluster/rayjob.yaml`` of this checkout.

    Raises:
        LaunchError: when it cannot be found.
    """
    path = Path(__file__).resolve().parents[3] / "cluster" / "rayjob.yaml"
    if not path.is_file():
        raise LaunchError(f"RayJob template {path} not found; fix: run from a checkout of encdec-launch "
                          "(pip install -e .)")
    return path


def _k8s_name(text: str) -> str:
    """A DNS-1123 label (lower case alphanumerics and '-', at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or "run"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the recipe in the ConfigMap) as ``|`` blocks, readable in ``kubectl get -o yaml``."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def render_rayjob(
    recipe: Any,
    *,
    recipe_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    image: str | None = None,
    claim_name: str | None = None,
    template: str | Path | None = None,
    entrypoint: Sequence[str] | None = None,
) -> str:
    """The RayJob manifest (with its recipe ConfigMap) that runs ``recipe`` on Kubernetes.

    Args:
        recipe: the resolved recipe (a mapping or the pydantic Recipe).
        recipe_path: the run's ``recipe.yaml``; its directory is the run directory (``--run-dir`` of the driver)
            unless ``run_dir`` is given. Default: ``<cluster.storage>/<run.name>``.
        run_dir: the run directory on the shared storage, as the pods see it.
        image: the container image with encdec-launch installed (default: the template's).
        claim_name: the PersistentVolumeClaim mounted at ``cluster.storage`` (default: the template's).
        template: another RayJob template (default :func:`rayjob_template_path`).
        entrypoint: the command the driver pod runs (default: train the mounted recipe in ``run_dir``).

    Raises:
        LaunchError: ``cluster.storage`` is not an absolute path (every pod mounts it at that path).
    """
    rec = recipe_dict(recipe)
    cluster = dict(rec.get("cluster") or {})
    storage = str(cluster.get("storage") or "")
    if not storage.startswith("/"):
        raise LaunchError(f"cluster.storage={storage!r}: on Kubernetes every pod mounts the run storage at that "
                          "path; fix: an absolute path such as /shared/runs (backed by a ReadWriteMany volume)")
    name = str((rec.get("run") or {}).get("name") or "run")
    if run_dir is None:
        run_dir = Path(recipe_path).parent if recipe_path else Path(storage) / name
    nodes = int(cluster.get("nodes") or 1)
    per_node = int(cluster.get("workers_per_node") or 1)
    cpus = float(cluster.get("cpus_per_worker") or 1) * per_node
    gpus = math.ceil(float(cluster.get("gpus_per_worker") or 0) * per_node)

    docs = list(yaml.safe_load_all(Path(template or rayjob_template_path()).read_text()))
    (config_map,) = [d for d in docs if d.get("kind") == "ConfigMap"]
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    job_name = _k8s_name(f"encdec-{name}")
    config_map["metadata"]["name"] = f"{job_name}-recipe"[:63]
    config_map["data"] = {"recipe.yaml": yaml.safe_dump(rec, sort_keys=False)}
    job["metadata"]["name"] = job_name

    spec = job["spec"]
    spec["entrypoint"] = shlex.join(entrypoint or ["encdec-launch", f"{RECIPE_MOUNT}/recipe.yaml", "--run-dir",
                                                   str(run_dir), "--address", "auto", "--no-progress"])
    cluster_spec = spec["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    (group,) = cluster_spec["workerGroupSpecs"]
    group["groupName"] = "gpu-workers" if gpus else "cpu-workers"
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = nodes
    worker = group["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    for kind in ("limits", "requests"):
        resources[kind]["cpu"] = _quantity(cpus)
        if gpus:
            resources[kind]["nvidia.com/gpu"] = str(gpus)
        else:
            resources[kind].pop("nvidia.com/gpu", None)

    for pod in (head, worker):
        for container in pod["containers"]:
            if image:
                container["image"] = image
            for mount in container.get("volumeMounts", []):
                if mount["name"] == "runs":
                    mount["mountPath"] = storage
        for volume in pod.get("volumes", []):
            if volume["name"] == "runs" and claim_name:
                volume["persistentVolumeClaim"]["claimName"] = claim_name
            if volume["name"] == "recipe":
                volume["configMap"]["name"] = config_map["metadata"]["name"]

    header = (f"# KubeRay RayJob for run {name!r}, rendered by encdec-launch from cluster/rayjob.yaml "
              "(see the comments there). Apply with: kubectl apply -f THIS_FILE\n")
    return header + yaml.dump_all([config_map, job], Dumper=_Dumper, sort_keys=False)
