"""Huginn / raven recurrent-depth LM, registered with transformers' Auto classes for ``model_type="huginn_raven"``
(no remote code)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_huginn import BLOCK_TYPES, ROPE_PAIRS, HuginnConfig
from .modeling_huginn import (
    HuginnBlock,
    HuginnCausalLMOutput,
    HuginnForCausalLM,
    HuginnLoopCache,
    HuginnPreTrainedModel,
    HuginnRecurrentBlock,
    current_loop,
    resolve_num_steps,
    sample_num_steps,
)
from .tiny import tiny_huginn_config

AutoConfig.register("huginn_raven", HuginnConfig, exist_ok=True)
AutoModelForCausalLM.register(HuginnConfig, HuginnForCausalLM, exist_ok=True)

__all__ = [
    "BLOCK_TYPES",
    "ROPE_PAIRS",
    "HuginnBlock",
    "HuginnCausalLMOutput",
    "HuginnConfig",
    "HuginnForCausalLM",
    "HuginnLoopCache",
    "HuginnPreTrainedModel",
    "HuginnRecurrentBlock",
    "current_loop",
    "resolve_num_steps",
    "sample_num_steps",
    "tiny_huginn_config",
]
