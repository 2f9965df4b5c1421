"""Ouro LoopLM, registered with transformers' Auto classes for ``model_type="ouro"``."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ouro import EXIT_MODES, OuroConfig
from .modeling_ouro import OuroForCausalLM, OuroLoopCache, OuroModel, OuroPreTrainedModel
from .tiny import tiny_config

AutoConfig.register("ouro", OuroConfig, exist_ok=True)
AutoModel.register(OuroConfig, OuroModel, exist_ok=True)
AutoModelForCausalLM.register(OuroConfig, OuroForCausalLM, exist_ok=True)

__all__ = [
    "EXIT_MODES",
    "OuroConfig",
    "OuroForCausalLM",
    "OuroLoopCache",
    "OuroModel",
    "OuroPreTrainedModel",
    "tiny_config",
]
