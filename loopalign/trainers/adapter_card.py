"""Describe a gap-SFT run's adapters in their folder (``README.md``: a model card with the verdict).

Loading them with their loop routing is :func:`loopalign.loading.load_gap_model`.
"""

from __future__ import annotations

import json
import os

from loopalign.io import atomic_write_text
from loopalign.loading import GAP_CONFIG_FILE

__all__ = ["write_adapter_card"]


def write_adapter_card(
    path: str | os.PathLike, verdict_markdown: str | None = None, base_model: str | None = None
) -> str:
    """Replace PEFT's empty README template in an adapter folder with what the run is and how to load
    it (routing included), plus the before/after verdict when given. A full fine-tune (no ``adapter_config.json``:
    the folder is the whole model) gets a model card instead (``base_model``: what it was trained from).
    Written atomically. -> path of the card."""
    path = os.fspath(path)
    with open(os.path.join(path, GAP_CONFIG_FILE)) as f:
        settings = json.load(f)
    adapter_file = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_file):
        with open(adapter_file) as f:
            lines = _adapter_card_lines(settings, json.load(f))
    else:
        lines = _full_model_card_lines(settings, base_model)
    if verdict_markdown:
        lines += ["## Before / after (held-out records)", "", verdict_markdown.strip(), ""]
    target = os.path.join(path, "README.md")
    atomic_write_text(target, "\n".join(lines))
    return target


def _objective_lines(settings: dict) -> list[str]:
    """The card's lines on the training objective and the verdict tokens (adapters and full fine-tunes alike)."""
    weights = {k: v for k, v in settings.get("loss_weights", {}).items() if v}
    return [
        f"- objective: {', '.join(f'{k} {v:g}' for k, v in weights.items())}; loop weighting "
        f"{settings.get('loop_weighting')}",
        f"- verdict tokens: {settings.get('verdict_tokens')}",
    ]


def _adapter_card_lines(settings: dict, adapter: dict) -> list[str]:
    return [
        "---",
        "library_name: peft",
        f"base_model: {adapter.get('base_model_name_or_path')}",
        "tags: [loopalign, gap-sft, looped-transformer]",
        "---",
        "",
        "# loopalign gap-SFT adapters",
        "",
        f"LoRA adapters (r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}) trained by loopalign's "
        f"`GapSFTTrainer` on `{adapter.get('base_model_name_or_path')}` so that the verbal verdict (SV) "
        "catches up with what a probe reads from the hidden states (RR), per loop.",
        "",
        f"- loops per forward: {settings.get('num_loops')}; adapters active on loops: "
        f"`{settings.get('lora_loops')}` (0-based)",
        *_objective_lines(settings),
        "",
        "## Load it (the loop routing is part of the model)",
        "",
        "```python",
        "from loopalign.loading import load_gap_model",
        'model, tokenizer = load_gap_model("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "or `loopalign eval-gap --model_name_or_path PATH/TO/THIS/FOLDER ...`. A plain "
        "`PeftModel.from_pretrained` loads the adapters without the routing"
        + (
            f" (here `{settings.get('lora_loops')}`): on the other loops it would apply them too, a different model."
            if settings.get("lora_loops", "all") != "all"
            else "; this run used all loops, so it gives the same model."
        ),
        "",
    ]


def _full_model_card_lines(settings: dict, base_model: str | None) -> list[str]:
    return [
        "---",
        "library_name: transformers",
        *([f"base_model: {base_model}"] if base_model else []),
        "tags: [loopalign, gap-sft, looped-transformer]",
        "---",
        "",
        "# loopalign gap-SFT model (full fine-tune)",
        "",
        "All weights trained by loopalign's `GapSFTTrainer`"
        + (f" from `{base_model}`" if base_model else "")
        + " so that the verbal verdict (SV) catches up with what a probe reads from the hidden states (RR), per loop.",
        "",
        f"- loops per forward: {settings.get('num_loops')}",
        *_objective_lines(settings),
        "",
        "## Load it",
        "",
        "```python",
        "from loopalign.loading import load_pretrained, load_tokenizer",
        'model, tokenizer = load_pretrained("PATH/TO/THIS/FOLDER"), load_tokenizer("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "or `AutoModelForCausalLM.from_pretrained` after `import loopalign`, or "
        "`loopalign eval-gap --model_name_or_path PATH/TO/THIS/FOLDER ...`.",
        "",
    ]
