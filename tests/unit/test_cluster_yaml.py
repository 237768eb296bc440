"""cluster/: the Ray cluster-launcher config (Ray's own validation) and the KubeRay RayJob (KubeRay's CRD fields).

The RayJob is validated with jsonschema against tests/unit/golden/kuberay_rayjob_v1.schema.json, derived from
KubeRay v1.7.0's CRD by tests/unit/golden/make_kuberay_schema.py and made strict (unknown fields fail).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml

from encdec.launcher.backends.k8s import PLACEHOLDER_IMAGE, render_rayjob, unmounted_paths, worker_memory_gib
from encdec.launcher.recipe.errors import LaunchError

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "ray-cluster.yaml"
RAYJOB_YAML = ROOT / "cluster" / "rayjob.yaml"
SCHEMA = json.loads((Path(__file__).parent / "golden" / "kuberay_rayjob_v1.schema.json").read_text())


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before touching a machine: fill defaults for the provider, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_cluster_yaml_passes_rays_validation() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    prepared = _ray_validate(config)
    assert prepared["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])


def test_ray_cluster_yaml_runs_this_package() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["file_mounts"]["~/encdec-launch"] == "."           # this checkout, to every node
    assert any("pip install" in c and "~/encdec-launch" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head and "--dashboard-host=127.0.0.1" in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "~/encdec-venv/bin/ray start" in start
    assert "~/.ray/auth_token" in config["file_mounts"]                # a token file, never a value in here
    assert "RAY_AUTH_TOKEN=" not in CLUSTER_YAML.read_text()


def test_ray_validation_is_real() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["setup_command"] = config.pop("setup_commands")            # a misspelt key
    with pytest.raises(jsonschema.ValidationError, match="'setup_command' was unexpected"):
        _ray_validate(config)


def _recipe(**cluster: Any) -> dict[str, Any]:
    return {
        "task": "segmentation",
        "run": {"name": "Prithvi_LoRA floods", "seed": 0},
        "model": {"backbone": "prithvi_eo_v2_300", "decoder": "UperNetDecoder", "num_classes": 2},
        "train": {"max_steps": 5000, "strategy": "fsdp"},
        "cluster": {"nodes": 8, "workers_per_node": 8, "cpus_per_worker": 8, "gpus_per_worker": 1,
                    "storage": "/shared/runs", **cluster},
    }


def _docs(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all(text))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return cm, job


def test_template_matches_kuberay_fields() -> None:
    _, job = _docs(RAYJOB_YAML.read_text())
    jsonschema.validate(job, SCHEMA)


@pytest.mark.parametrize("gpus", [1, 0])
def test_rendered_rayjob(gpus: int) -> None:
    recipe = _recipe(gpus_per_worker=gpus, nodes=3, workers_per_node=4, cpus_per_worker=2.5)
    text = render_rayjob(recipe, recipe_path="/shared/runs/floods-20260101/recipe.yaml",
                         image="registry.example/encdec:1", claim_name="team-runs")
    cm, job = _docs(text)
    jsonschema.validate(job, SCHEMA)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"] == "encdec-prithvi-lora-floods"

    # the entrypoint: encdec-launch on the recipe the ConfigMap mounts, the run dir, the cluster it runs in
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv == ["encdec-launch", "/etc/encdec/recipe.yaml", "--run-dir", "/shared/runs/floods-20260101",
                    "--address", "auto", "--no-progress"]
    assert yaml.safe_load(cm["data"]["recipe.yaml"]) == recipe

    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    worker = group["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == "10"
    assert limits.get("nvidia.com/gpu") == ("4" if gpus else None)
    head = spec["headGroupSpec"]["template"]["spec"]
    for pod in (head, worker):
        assert pod["containers"][0]["image"] == "registry.example/encdec:1"
        assert {"name": "runs", "mountPath": "/shared/runs"} in pod["containers"][0]["volumeMounts"]
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": "team-runs"}} in pod["volumes"]
    assert {"name": "recipe", "configMap": {"name": cm["metadata"]["name"]}} in head["volumes"]
    assert "token" not in cm["data"]["recipe.yaml"].lower()


def test_kuberay_schema_is_strict() -> None:
    _, job = _docs(render_rayjob(_recipe(), recipe_path="/shared/runs/x/recipe.yaml"))
    job["spec"]["rayClusterSpec"]["workerGroupSpec"] = job["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(job, SCHEMA)
    _, job = _docs(render_rayjob(_recipe(), recipe_path="/shared/runs/x/recipe.yaml"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        jsonschema.validate(job, SCHEMA)


def test_relative_storage_is_refused() -> None:
    with pytest.raises(LaunchError, match=r"cluster.storage='runs'.*absolute path"):
        render_rayjob(_recipe(storage="runs"))


def test_accepts_a_pydantic_style_model() -> None:
    class Model:
        def model_dump(self) -> dict[str, Any]:
            return _recipe()

    assert render_rayjob(Model(), recipe_path="/shared/runs/x/recipe.yaml") == render_rayjob(
        _recipe(), recipe_path="/shared/runs/x/recipe.yaml")


def test_template_image_is_the_placeholder() -> None:
    _, job = _docs(RAYJOB_YAML.read_text())
    spec = job["spec"]["rayClusterSpec"]
    images = {c["image"] for pod in (spec["headGroupSpec"], *spec["workerGroupSpecs"])
              for c in pod["template"]["spec"]["containers"]}
    assert images == {PLACEHOLDER_IMAGE}


def test_image_and_memory_come_from_the_recipe_and_plan() -> None:
    text = render_rayjob(_recipe(image="registry.example/encdec:2"), recipe_path="/shared/runs/x/recipe.yaml",
                         worker_memory=37)
    _, job = _docs(text)
    jsonschema.validate(job, SCHEMA)
    spec = job["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["memory"] == res["requests"]["memory"] == "37Gi"
    assert {c["image"] for pod in (spec["headGroupSpec"], group) for c in pod["template"]["spec"]["containers"]} == {
        "registry.example/encdec:2"}
    # the plan's estimate per worker (host memory on CPU; the fp32 model on the host on GPU) + 4 GiB, x workers
    cpu_plan = SimpleNamespace(on_gpu=False, total_params=10**6, chosen_total=lambda: 3 * 2**30)
    gpu_plan = SimpleNamespace(on_gpu=True, total_params=300 * 10**6, chosen_total=lambda: 60 * 2**30)
    assert worker_memory_gib(cpu_plan, 2) == 14
    assert worker_memory_gib(gpu_plan, 8) == 8 * 4 + 9  # ceil(8 * (1.12 + 4))


def test_paths_on_no_mounted_volume_are_reported() -> None:
    recipe = _recipe()
    recipe["data"] = {"train": {"tiles": "/shared/runs/data/train"}, "val": {"tiles": "/scratch/val"},
                      "test": {"scenes": ["s3://bucket/a.tif", "/vsis3/bucket/b.tif", "rel/c.tif"]}}
    text = render_rayjob(recipe, recipe_path="/shared/runs/x/recipe.yaml",
                         entrypoint=["encdec-launch", "predict", "/shared/runs/x/export", "/data/scene.tif",
                                     "--output", "/shared/runs/preds"])
    problems = unmounted_paths(text, recipe)
    assert len(problems) == 3, problems
    assert problems[0].startswith("data.val.tiles='/scratch/val' is on no volume the pods mount (/etc/encdec, "
                                  "/shared/runs); fix: put it under cluster.storage (/shared/runs)")
    assert problems[1].startswith("data.test.scenes[2]='rel/c.tif'")
    assert problems[2].startswith("entrypoint argument='/data/scene.tif'")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "encdec.launcher.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600, check=False)


def test_k8s_dry_run_prints_only_the_manifest_on_stdout(tmp_path: Path) -> None:
    """`encdec-launch RECIPE --k8s --dry-run | kubectl apply -f -`: stdout is YAML documents KubeRay accepts."""
    storage = tmp_path / "shared"
    out = _cli(str(ROOT / "recipes" / "quickstart.yaml"), "--k8s", "--dry-run", "--storage", str(storage),
               "--set", "cluster.image=registry.example/encdec:1", "--set", f"data.train.tiles={storage}/train",
               "--set", f"data.val.tiles={tmp_path}/elsewhere/val", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"], out.stdout[:500]
    cm, job = docs
    jsonschema.validate(job, SCHEMA)
    assert cm["apiVersion"] == "v1" and isinstance(cm["data"]["recipe.yaml"], str)
    spec = job["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    memory = int(re.fullmatch(r"(\d+)Gi", limits["memory"]).group(1))  # type: ignore[union-attr]
    assert 8 <= memory <= 16 and limits["cpu"] == "1"  # 2 workers x (the plan's estimate + 4 GiB); 2 x 0.5 CPU
    assert group["template"]["spec"]["containers"][0]["image"] == "registry.example/encdec:1"
    # the plan and the warnings went to stderr
    assert "parameters" in out.stderr and "parameters" not in out.stdout
    assert f"data.val.tiles='{tmp_path}/elsewhere/val' is on no volume the pods mount" in out.stderr
    assert "data.train.tiles" not in out.stderr


def test_k8s_launch_refuses_the_placeholder_image(tmp_path: Path) -> None:
    from encdec.launcher.backends.base import Entry
    from encdec.launcher.backends.k8s_backend import Kubernetes
    from encdec.launcher.recipe.validate import load_recipe

    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    doc["cluster"]["storage"] = str(tmp_path / "shared")
    for split in ("train", "val"):
        doc["data"][split]["tiles"] = str(tmp_path / "shared" / split)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    recipe = load_recipe(tmp_path / "r.yaml")
    made: list[Path] = []

    def make_run_dir() -> Path:
        made.append(tmp_path / "shared" / "run")
        made[-1].mkdir(parents=True)
        (made[-1] / "launch.json").write_text("{}")
        return made[-1]

    entry = Entry(name="probe", recipe=recipe, argv=lambda run_dir, rp: ["encdec-launch", "recipe", rp],
                  run_here=lambda *a: 0, needs_ray_address=False)
    with pytest.raises(LaunchError, match=r"cluster.image=None: the pods would run the template's placeholder image "
                       r"'ghcr.io/your-org/encdec-launch:0.1.0'.*fix: .*set cluster.image: REGISTRY/"):
        Kubernetes().submit(entry, make_run_dir, SimpleNamespace(print=lambda *a: None))
    assert made == []  # nothing was created
    recipe.cluster.image = "registry.example/encdec:1"
    assert Kubernetes().submit(entry, make_run_dir, SimpleNamespace(print=lambda *a: None)) == 0
    _, job = _docs((made[0] / "rayjob.yaml").read_text())
    jsonschema.validate(job, SCHEMA)
