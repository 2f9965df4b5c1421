"""Load a gap-SFT run's adapters exactly as they were trained, and describe them in their folder.

A run trained with ``lora_loops`` other than "all" routes its adapters by loop with forward hooks
(:func:`loopalign.lora.route_lora_by_loop`). PEFT saves the adapter weights, not the hooks: a plain
``PeftModel.from_pretrained`` (or ``AutoModelForCausalLM.from_pretrained(final/)``) applies the
adapters on every loop, a different model. :func:`load_gap_model` reads ``gap_config.json`` next to
the adapters and re-applies the routing, so the loaded model is the trained one.
"""

from __future__ import annotations

import json
import os

from .gap_sft import GAP_CONFIG_FILE

__all__ = ["is_gap_run_folder", "load_gap_model", "write_adapter_card"]


def is_gap_run_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding PEFT adapters and a gap-SFT ``gap_config.json`` (``final/``, a checkpoint)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and os.path.isfile(
        os.path.join(path, GAP_CONFIG_FILE)
    )


def load_gap_model(path: str | os.PathLike, base=None, device: str | None = None, dtype: str = "auto"):
    """The trained model of a gap-SFT folder: the base model (``base``: a model or a name; default the
    adapter's ``base_model_name_or_path``), its adapters, and the loop routing of ``gap_config.json``.
    -> (PeftModel in eval mode, tokenizer: the folder's, else the base's)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loopalign  # noqa: F401  (registers Ouro)
    from loopalign.lora import route_lora_by_loop

    path = os.fspath(path)
    if not is_gap_run_folder(path):
        raise FileNotFoundError(
            f"{path}: not a gap-SFT adapter folder (needs adapter_config.json and {GAP_CONFIG_FILE}; "
            "sft_gap writes them to output_dir/final/)"
        )
    with open(os.path.join(path, GAP_CONFIG_FILE)) as f:
        settings = json.load(f)
    with open(os.path.join(path, "adapter_config.json")) as f:
        base_name = json.load(f).get("base_model_name_or_path")
    if base is None:
        if not base_name:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path: pass base=")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch_dtype)
    model = PeftModel.from_pretrained(base, path)
    lora_loops = settings.get("lora_loops", "all")
    if lora_loops != "all":
        route_lora_by_loop(model, lora_loops)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    tok_source = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base_name
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def write_adapter_card(path: str | os.PathLike, verdict_markdown: str | None = None) -> str:
    """Replace PEFT's empty README template in an adapter folder with what the run is and how to load
    it (routing included), plus the before/after verdict when given. Written atomically. -> path."""
    from loopalign.io import atomic_write_text

    path = os.fspath(path)
    with open(os.path.join(path, GAP_CONFIG_FILE)) as f:
        settings = json.load(f)
    with open(os.path.join(path, "adapter_config.json")) as f:
        adapter = json.load(f)
    weights = {k: v for k, v in settings.get("loss_weights", {}).items() if v}
    lines = [
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
        f"- objective: {', '.join(f'{k} {v:g}' for k, v in weights.items())}; loop weighting "
        f"{settings.get('loop_weighting')}",
        f"- verdict tokens: {settings.get('verdict_tokens')}",
        "",
        "## Load it (the loop routing is part of the model)",
        "",
        "```python",
        "from loopalign.trainers import load_gap_model",
        'model, tokenizer = load_gap_model("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "or `python recipes/eval_gap.py --model PATH/TO/THIS/FOLDER ...`. A plain "
        "`PeftModel.from_pretrained` loads the adapters without the routing"
        + (
            f" (here `{settings.get('lora_loops')}`): on the other loops it would apply them too, a different model."
            if settings.get("lora_loops", "all") != "all"
            else "; this run used all loops, so it gives the same model."
        ),
        "",
    ]
    if verdict_markdown:
        lines += ["## Before / after (held-out records)", "", verdict_markdown.strip(), ""]
    target = os.path.join(path, "README.md")
    atomic_write_text(target, "\n".join(lines))
    return target
