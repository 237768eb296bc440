"""A driver for the sbatch script's own tests: proves the Ray-on-Slurm mechanics without training.

    python ray_probe.py --address HOST:PORT --out RESULT.json [--token-copy FILE] [--count-to N]

Joins the job's Ray cluster, runs one task pinned to each Ray node (each reports the Slurm node it runs on),
and writes RESULT.json. ``--token-copy`` copies the job's Ray token (from RAY_AUTH_TOKEN_PATH) so a test can
check that it appears in no log. ``--count-to N`` then counts one step a second in a state file beside RESULT,
continuing from it on a restart; SIGINT saves and exits 0, as the training driver does: the preemption path of
the script (signal, requeue, resume) is then tested on its own, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
def where() -> tuple[str | None, str]:
    return os.environ.get("SLURMD_NODENAME"), ray.get_runtime_context().get_node_id()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--token-copy", type=Path)
    parser.add_argument("--count-to", type=int, default=0)
    args = parser.parse_args()

    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))

    ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
    alive = [n for n in ray.nodes() if n["Alive"]]
    refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in alive]
    placed = ray.get(refs, timeout=120)
    if args.token_copy:
        shutil.copyfile(os.environ["RAY_AUTH_TOKEN_PATH"], args.token_copy)
    result = {
        "ray_nodes": len(alive),
        "slurm_nodes": sorted(str(name) for name, _ in placed),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "token_env": "RAY_AUTH_TOKEN" in os.environ,
        "pid": os.getpid(),
    }
    args.out.write_text(json.dumps(result))
    ray.shutdown()

    state = args.out.with_suffix(".count")
    step = int(state.read_text()) if state.exists() else 0
    start = step
    while step < args.count_to and not stop["now"]:
        time.sleep(1.0)
        step += 1
        state.write_text(str(step))
    with args.out.with_suffix(".events").open("a") as f:
        f.write(json.dumps({"restart": result["restart"], "from": start, "to": step, "stopped": stop["now"]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
