"""Training: `ouro-train`, a Hydra main over recipes/ driving a DeepSpeed engine."""
