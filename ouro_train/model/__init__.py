"""Our own implementation of the Ouro LoopLM, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ouro_train.model.cache import LoopSlots, OuroCache
from ouro_train.model.checkpointing import CHECKPOINT_GRANULARITIES
from ouro_train.model.configuration import OuroConfig
from ouro_train.model.modeling import (
    OuroCausalLMOutput,
    OuroForCausalLM,
    OuroModel,
    OuroModelOutput,
    exit_entropy,
    exit_pdf,
    mixture_logits,
    threshold_exit_steps,
)

AutoConfig.register(OuroConfig.model_type, OuroConfig, exist_ok=True)
AutoModel.register(OuroConfig, OuroModel, exist_ok=True)
AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)

__all__ = [
    "CHECKPOINT_GRANULARITIES",
    "LoopSlots",
    "OuroCache",
    "OuroCausalLMOutput",
    "OuroConfig",
    "OuroForCausalLM",
    "OuroModel",
    "OuroModelOutput",
    "exit_entropy",
    "exit_pdf",
    "mixture_logits",
    "threshold_exit_steps",
]
