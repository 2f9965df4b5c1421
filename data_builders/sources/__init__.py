"""Sources: readers that turn public formats into problems (task + gold) or verification records.

- :mod:`.gsm8k`: GSM8K problems (``question``, ``answer`` ending ``#### N``) and OpenAI's
  ``example_model_solutions.jsonl`` (real model answers with ``is_correct``).
- :mod:`.math`: MATH problems (``problem``, ``solution`` with ``\\boxed{...}``).
- :mod:`.safety`: (prompt, response, is_safe) records with a declared :class:`FieldMap`
  (BeaverTails, PKU-SafeRLHF), prompt-only safe/unsafe sets and XSTest model completions.
- :mod:`.synthetic`: seeded multi-step arithmetic word problems at difficulty levels 1..6.
"""

from .base import Problem, SourceResult, convert_rows
from .gsm8k import SOLUTION_MODELS, load_gsm8k, load_gsm8k_solutions
from .math import load_math
from .safety import BEAVERTAILS, PKU_SAFERLHF, FieldMap, load_safety_pairs, load_safety_prompts, load_xstest_completions
from .synthetic import SyntheticConfig, generate_problems

__all__ = [
    "Problem",
    "SourceResult",
    "convert_rows",
    "SOLUTION_MODELS",
    "load_gsm8k",
    "load_gsm8k_solutions",
    "load_math",
    "FieldMap",
    "BEAVERTAILS",
    "PKU_SAFERLHF",
    "load_safety_pairs",
    "load_safety_prompts",
    "load_xstest_completions",
    "SyntheticConfig",
    "generate_problems",
]
