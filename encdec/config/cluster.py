"""The ``cluster:`` section: nodes, workers, resources, storage, and the Slurm settings."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from encdec.config.base import Section

__all__ = ["ClusterSection", "SlurmSection"]


class SlurmSection(Section):
    """``#SBATCH`` settings used with ``--slurm`` (CLI flags override them)."""

    partition: str | None = Field(None, description="Slurm partition (-p).")
    account: str | None = Field(None, description="Slurm account (-A).")
    time: str | None = Field("24:00:00", description="Time limit (HH:MM:SS or D-HH:MM:SS).")
    qos: str | None = Field(None, description="Quality of service.")
    constraint: str | None = Field(None, description="Node features (-C).")
    signal_grace_s: int = Field(
        120, ge=10, description="Seconds before the time limit at which USR1 asks the run to checkpoint and requeue."
    )
    requeue: bool = Field(True, description="Requeue the job after preemption/time limit and resume.")
    extra: list[str] = Field(default_factory=list, description="Extra '#SBATCH ...' lines passed through verbatim.")


class ClusterSection(Section):
    """Where and how wide the run goes."""

    nodes: int = Field(1, ge=1, le=4096, description="Nodes (machines); `--nodes N` overrides.")
    workers_per_node: int = Field(1, ge=1, le=64, description="Training workers per node (usually GPUs per node).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="Ray CPUs per worker; leave CPU over for the data feed (0.5 on a 2-core laptop)."
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per worker; 0 = CPU training; null = 1 when the cluster has a GPU per worker, "
        "else 0 (decided at launch, recorded in the run's recipe)."
    )
    device_memory_gb: float | None = Field(
        None, gt=0, description="Memory per worker for the plan's fit check (GPU memory, or RAM share on CPU); "
        "null = detect on this machine."
    )
    storage: str = Field(
        "runs", description="Run storage root; must be reachable from every node (shared FS) when nodes > 1."
    )
    image: str | None = Field(
        None, description="Container image with encdec-launch installed, for --k8s (every pod of the RayJob runs it), "
        "e.g. registry.example.com/team/encdec-launch:0.1.0 built FROM rayproject/ray with `pip install .`. "
        "null = cluster/rayjob.yaml's placeholder, which `--k8s --dry-run` shows and `--k8s` refuses.",
    )
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env for --address/--submit (working_dir, pip, env_vars)."
    )
    malloc_mmap_threshold: int | None = Field(
        131072, ge=0, le=33554432,
        description="CPU workers start with MALLOC_MMAP_THRESHOLD_=this (bytes): glibc then serves larger blocks "
        "with mmap and returns them to the OS when freed, instead of raising the threshold and keeping freed heap "
        "(FSDP2 full fine-tune on CPU: 0.56x DDP's peak memory with it, 0.73x without; benchmarks/README.md). "
        "null = glibc's default. A value in runtime_env.env_vars or the launching shell wins. GPU workers: unset.",
    )
    slurm: SlurmSection = Field(default_factory=SlurmSection, description="Slurm settings for --slurm.")  # type: ignore[arg-type]

    @property
    def world_size(self) -> int:
        """Total training workers."""
        return self.nodes * self.workers_per_node


