"""The launcher: CLI, recipe schema, planner, Ray driver, Slurm/Kubernetes rendering and submission.

Nothing here imports torch at module level: ``encdec-launch --help`` must answer in well under a second.
"""
