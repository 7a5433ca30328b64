"""Export for inference: training checkpoints (any ZeRO stage, full or LoRA) or in-memory models to
Hugging Face directories in upstream Ouro's layout."""

from ouro_train.export.checkpoints import ExportError, TrainingRun
from ouro_train.export.export import MODES, export_model, export_run, serving_note

__all__ = ["MODES", "ExportError", "TrainingRun", "export_model", "export_run", "serving_note"]
