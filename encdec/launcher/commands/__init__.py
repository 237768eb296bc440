"""The CLI glue, one module per command (train/launch, status/logs/stop, export, convert-terratorch, predict)."""
