"""The one training recipe (loop.py) and its pieces: losses, metrics, optimizer/schedule, precision, checkpoints."""
