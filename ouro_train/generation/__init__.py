"""Generation from exported Ouro models, with compute-saving early exit during cached decoding."""

from ouro_train.generation.chat import Completion, GenerationSettings, complete_chats, load_model, prompt_ids
from ouro_train.generation.early_exit import KV_FILLS, EarlyExitOutput, ExitKVCache, generate_early_exit

__all__ = [
    "KV_FILLS",
    "Completion",
    "EarlyExitOutput",
    "ExitKVCache",
    "GenerationSettings",
    "complete_chats",
    "generate_early_exit",
    "load_model",
    "prompt_ids",
]
