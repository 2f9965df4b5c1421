"""Reward functions (TRL signature) for loop-aware RL."""

from .introspection import (
    DEFAULT_REWARD_WEIGHTS,
    REWARD_KEYS,
    combined_reward,
    completion_text,
    detection_reward,
    false_positive_penalty,
    format_reward,
    grade_completions,
    identification_reward,
    make_reward_funcs,
)

__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "REWARD_KEYS",
    "combined_reward",
    "completion_text",
    "detection_reward",
    "false_positive_penalty",
    "format_reward",
    "grade_completions",
    "identification_reward",
    "make_reward_funcs",
]
