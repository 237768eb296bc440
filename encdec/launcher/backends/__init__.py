"""Where a run goes: one ``Backend`` per launch target (local Ray, a Ray cluster, a Ray Job, Slurm, Kubernetes)."""
