"""The one training recipe and its pieces.

``loop.train`` (the recipe every worker runs, top to bottom), ``loop_parts`` (the ``train:`` section, seeding, the
trainable set, lock-step validation), ``losses``, ``metrics`` (exact across ranks), ``optim`` (optimizer and
warmup + cosine schedule), ``precision`` (auto/bf16/fp16/fp32), ``checkpoint`` (atomic checkpoints, last-k + best,
consolidated export). Importing this package imports nothing heavy; import the modules you need.
"""
