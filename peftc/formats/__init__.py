"""On-disk formats: PEFT adapter checkpoints."""
