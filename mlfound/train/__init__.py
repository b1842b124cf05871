"""Training: DeepSpeed engine, the pretraining loop, validation, checkpoints."""
