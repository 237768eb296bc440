"""Derive the strict RayJob schema the tests check cluster/rayjob.yaml against, from KubeRay's own CRD.

    python tests/unit/golden/make_kuberay_schema.py path/to/ray.io_rayjobs.yaml > tests/unit/golden/kuberay_rayjob_v1.schema.json

Input: ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` of github.com/ray-project/kuberay (the stored schema
was made from tag v1.7.0, commit 9c13e71). The CRD is 1.4 MB, nearly all of it Kubernetes' PodSpec repeated per pod
template, so the derived schema keeps every RayJob / RayCluster field as KubeRay documents it (names, types,
enums, required) but only the PodSpec and Container fields listed below. It is made strict: an object with
declared properties accepts no other key (``kubectl apply --validate=strict`` rejects unknown fields the same way;
the API server would otherwise prune them silently), so a misspelt field fails the test.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

POD_SPEC_FIELDS = {"containers", "volumes", "nodeSelector", "tolerations", "restartPolicy", "serviceAccountName",
                   "terminationGracePeriodSeconds", "imagePullSecrets"}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "resources",
                    "volumeMounts", "workingDir"}
VOLUME_FIELDS = {"name", "persistentVolumeClaim", "emptyDir", "configMap", "secret", "hostPath"}
DROPPED = {"submitterPodTemplate"}   # not used by encdec-launch; another whole PodTemplateSpec


def _keep(props: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in props.items() if k in names}


def prune(node: Any, path: tuple[str, ...] = ()) -> Any:
    """The schema with pod templates cut down and every declared object made closed."""
    if isinstance(node, list):
        return [prune(n, path) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    props = node.get("properties")
    if isinstance(props, dict):
        if path[-2:] == ("template", "spec"):
            props = _keep(props, POD_SPEC_FIELDS)
        if path and path[-1] in {"containers", "initContainers"}:
            props = _keep(props, CONTAINER_FIELDS)
        if path and path[-1] == "volumes":
            props = _keep(props, VOLUME_FIELDS)
        props = {k: v for k, v in props.items() if k not in DROPPED}
        node["properties"] = {k: prune(v, (*path, k)) for k, v in props.items()}
        if "required" in node:
            node["required"] = [r for r in node["required"] if r in node["properties"]]
        if node.get("type") == "object" and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = prune(node[key], path)
    # `metadata: {type: object}` and similar free-form objects stay open
    return node


def main(crd_path: str) -> None:
    crd = yaml.safe_load(open(crd_path))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = prune(version["schema"]["openAPIV3Schema"])
    schema["$comment"] = ("derived by tests/unit/golden/make_kuberay_schema.py from KubeRay's ray.io_rayjobs.yaml "
                          "(v1.7.0); PodSpec/Container fields limited to those listed there")
    json.dump(schema, sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
