"""loopalign: loop-aware fine-tuning of looped transformers (Ouro LoopLM first).

Importing the package registers Ouro with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained("ByteDance/Ouro-1.4B")`` (or a local folder) loads
loopalign's own implementation, without ``trust_remote_code``; and it imports the organism wing
(:mod:`loopalign.organism`), which registers the named models ``"organism"``, ``"huginn_organism"`` and
``"introspection_organism"`` with :func:`loopalign.loading.load_model` (the one registry edge: the loader,
on the lowest floor, names nothing above it).
"""

from .loops import exit_distribution, loop_logits, threshold_exit_index
from .models.ouro import OuroConfig, OuroForCausalLM, OuroModel, tiny_config

__version__ = "0.1.0"

__all__ = [
    "OuroConfig",
    "OuroForCausalLM",
    "OuroModel",
    "exit_distribution",
    "loop_logits",
    "threshold_exit_index",
    "tiny_config",
    "__version__",
]

#: submodules reachable as attributes after a plain ``import loopalign`` (imported on first use, so
#: the package import stays light): ``loopalign.tokenizer.local_tokenizer()`` works as written
_LAZY_SUBMODULES = (
    "compat",
    "eval",
    "hooks",
    "io",
    "lora",
    "objectives",
    "rewards",
    "speed",
    "tokenizer",
    "trainers",
)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'loopalign' has no attribute {name!r}")


# the one registry edge (last, once the names above exist): the organism wing registers its named models
from . import organism as organism  # noqa: E402
