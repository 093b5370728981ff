"""On-disk formats: PEFT adapter checkpoints (peft), merged-graph exports (export) and their
verification (verify)."""
