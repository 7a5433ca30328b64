"""ouro-train: fine-tuning pipeline for Ouro looped language models.

Importing the package registers the Ouro model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads an Ouro checkpoint directory without
``trust_remote_code``.
"""

from ouro_train.model import OuroConfig, OuroForCausalLM, OuroModel  # noqa: F401  (registers Auto classes)

__version__ = "0.1.0"
