"""Kubernetes: render ``cluster/rayjob.yaml`` (a KubeRay RayJob plus the ConfigMap holding the recipe).

The template is a complete, commented manifest; rendering fills in what comes from the recipe: names, the
resolved recipe (mounted at /etc/encdec/recipe.yaml on the head, where the driver runs), the entrypoint with
the run directory, one worker pod per node with the node's CPUs, GPUs and memory (the plan's estimate), the image
(``cluster.image``) and the storage mount at the recipe's ``cluster.storage``. The PersistentVolumeClaim and the
head pod's size come from the template or the arguments. :func:`unmounted_paths` lists the paths the job reads
or writes that no volume of the pods holds.
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

__all__ = ["PLACEHOLDER_IMAGE", "RECIPE_MOUNT", "is_placeholder_image", "rayjob_template_path", "render_rayjob",
           "unmounted_paths", "worker_memory_gib"]

RECIPE_MOUNT = "/etc/encdec"
#: the template's image: an example name that no registry serves; ``cluster.image`` replaces it
PLACEHOLDER_IMAGE = "ghcr.io/your-org/encdec-launch:0.1.0"
GiB = 2**30
# per training worker, beside what the plan counts: torch/CUDA libraries, the data feed's reader threads and
# GDAL's block cache, and Ray's per-worker share of the object store (GiB)
_WORKER_OVERHEAD_GIB = 4


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


def is_placeholder_image(image: str) -> bool:
    """Whether ``image`` is the template's example image (no registry serves it)."""
    return image == PLACEHOLDER_IMAGE or "your-org" in image


def worker_memory_gib(plan: Any, workers_per_node: int) -> int:
    """Memory for one worker pod (``workers_per_node`` training workers), in whole GiB, from the plan.

    Host memory per worker: on CPU the plan's estimate for the recipe's strategy (it is host memory there); on GPU
    each rank still builds the model in fp32 on the host before moving/sharding it (4 bytes per parameter). Plus
    ``_WORKER_OVERHEAD_GIB`` per worker for the libraries, the data feed and the object store.
    """
    per_worker = plan.chosen_total() if not plan.on_gpu else 4 * plan.total_params
    return math.ceil(workers_per_node * (per_worker / GiB + _WORKER_OVERHEAD_GIB))


def _under(path: str, mounts: Sequence[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _recipe_paths(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, path)`` of the files and folders a run reads, as the recipe names them."""
    out: list[tuple[str, str]] = []
    data = rec.get("data") or {}
    for split in ("train", "val", "test"):
        src = data.get(split) or {}
        for key in ("tiles", "scenes", "manifest", "image_root", "label_root", "split_file"):
            values = src.get(key)
            for i, v in enumerate(values if isinstance(values, list) else [values]):
                if isinstance(v, str):
                    out.append((f"data.{split}.{key}" + (f"[{i}]" if isinstance(values, list) else ""), v))
    if isinstance((rec.get("run") or {}).get("init_from"), str):
        out.append(("run.init_from", rec["run"]["init_from"]))
    if isinstance((rec.get("model") or {}).get("backbone_ckpt_path"), str):
        out.append(("model.backbone_ckpt_path", rec["model"]["backbone_ckpt_path"]))
    return out


def unmounted_paths(manifest: str, recipe: Any) -> list[str]:
    """The local paths the job reads or writes (the recipe's data and checkpoint paths, the entrypoint's
    arguments) that are on no volume mounted in the pods: each a line naming it, the mounts and the fix.

    URLs (``s3://``, ``/vsis3/``...) are read over the network and are not listed.
    """
    rec = recipe_dict(recipe)
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    # a path must be on a volume of every pod: the driver (head) and the training workers both read it
    mounts = [[m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])] for pod in pods]
    storage = str((rec.get("cluster") or {}).get("storage") or "")
    items = _recipe_paths(rec) + [("entrypoint argument", a) for a in shlex.split(job["spec"]["entrypoint"])
                                  if a.startswith("/") and not a.startswith(("/vsi", RECIPE_MOUNT))]
    problems = []
    for where, path in items:
        if "://" in path or path.startswith("/vsi"):
            continue
        missing = [i for i, m in enumerate(mounts) if not _under(path, m)]
        if missing:
            seen = sorted({m for ms in mounts for m in ms if m != "/dev/shm"})
            problems.append(f"{where}={path!r} is on no volume the pods mount ({', '.join(seen)}); fix: put it "
                            f"under cluster.storage ({storage}) or add a volume for it to cluster/rayjob.yaml")
    return problems


def render_rayjob(
    recipe: Any,
    *,
    recipe_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    image: str | None = None,
    claim_name: str | None = None,
    template: str | Path | None = None,
    entrypoint: Sequence[str] | None = None,
    worker_memory: int | None = None,
) -> str:
    """The RayJob manifest (with its recipe ConfigMap) that runs ``recipe`` on Kubernetes.

    Args:
        recipe: the resolved recipe (a mapping or the pydantic Recipe).
        recipe_path: the run's ``recipe.yaml``; its directory is the run directory (``--run-dir`` of the driver)
            unless ``run_dir`` is given. Default: ``<cluster.storage>/<run.name>``.
        run_dir: the run directory on the shared storage, as the pods see it.
        image: the container image with encdec-launch installed (default: ``cluster.image``, else the template's
            placeholder).
        claim_name: the PersistentVolumeClaim mounted at ``cluster.storage`` (default: the template's).
        template: another RayJob template (default :func:`rayjob_template_path`).
        entrypoint: the command the driver pod runs (default: train the mounted recipe in ``run_dir``).
        worker_memory: memory of a worker pod in GiB (see :func:`worker_memory_gib`); default: the template's.

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

    from encdec.config.yaml_load import safe_load_all  # a key given twice in an edited template is refused

    tpl = Path(template or rayjob_template_path())
    try:
        docs = list(safe_load_all(tpl.read_text()))
    except yaml.YAMLError as err:
        raise LaunchError(f"RayJob template {tpl} is not valid YAML: {' '.join(str(err).split())}") from None
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
        if worker_memory:
            resources[kind]["memory"] = f"{int(worker_memory)}Gi"
        if gpus:
            resources[kind]["nvidia.com/gpu"] = str(gpus)
        else:
            resources[kind].pop("nvidia.com/gpu", None)

    image = image or cluster.get("image")
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
