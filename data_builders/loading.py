"""Tokenizer and model loading for the CLIs: ``local`` / ``tiny`` need no network."""

from __future__ import annotations

import torch

__all__ = ["load_tokenizer", "load_model"]


def load_tokenizer(name: str = "local"):
    """``"local"``: the project's local tokenizer; else a hub name or folder via ``AutoTokenizer``."""
    if name == "local":
        from loopalign.tokenizer import local_tokenizer

        return local_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"cannot load tokenizer {name!r} ({type(e).__name__}: {e}); offline? use a local folder"
        ) from e


def load_model(name: str, tokenizer=None, seed: int = 0, device: str = "cpu"):
    """(model, tokenizer): ``"tiny"`` = a random tiny Ouro (seeded) with the local tokenizer; else a hub
    name or folder (Ouro loads through loopalign's registration), tokenizer from the same place."""
    import loopalign  # noqa: F401  (registers Ouro with the Auto classes)

    if name == "tiny":
        from loopalign import OuroForCausalLM, tiny_config

        tok = tokenizer if tokenizer is not None else load_tokenizer("local")
        torch.manual_seed(seed)
        model = OuroForCausalLM(tiny_config(vocab_size=len(tok)))
        model.config._name_or_path = "tiny"
        return model.to(device).eval(), tok
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot load model {name!r} ({type(e).__name__}: {e}); offline? use a local folder") from e
    tok = tokenizer if tokenizer is not None else load_tokenizer(name)
    return model.to(device).eval(), tok
