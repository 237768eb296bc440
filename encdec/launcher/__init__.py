"""The launcher: from a recipe file to a run on some cluster, and back to its results.

Grouped by what it does:

- ``recipe/``     YAML loading with line numbers, ``--set`` overrides, cross-section rules and their errors
                  (the section types themselves live in ``encdec.config``).
- ``preflight/``  what is checked before anything expensive starts: registry names, the meta-device build,
                  activation tracing, the memory model, ``init_from``; and how the plan is shown.
- ``ray/``        the Ray runtime: the driver (``TorchTrainer.fit``), the worker loop, the local cluster, auth,
                  the Jobs client.
- ``backends/``   where a run goes: one ``Backend`` (submit / status / logs(follow) / stop) per target: local Ray,
                  an existing cluster, a Ray Job, Slurm, Kubernetes. A command is an ``Entry``; every target
                  takes any entry.
- ``commands/``   the CLI glue, one module per command; ``cli.py`` parses and dispatches.
- ``rundir.py``, ``report.py``, ``failures.py``: the run directory and what a run leaves in it.

Nothing here imports torch at module level: ``encdec-launch --help`` must answer in well under a second.
"""
