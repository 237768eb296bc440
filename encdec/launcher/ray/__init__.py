"""The Ray runtime: the driver (``TorchTrainer.fit``), the worker loop, the local cluster, auth and the Jobs client.

Nothing here imports ray at module level.
"""
