"""A Huginn-shaped model organism: the organism's tasks and data (:mod:`loopalign.organism`), trained from scratch
on a CPU with deep supervision over recurrence steps, so per-step SV / RR figures of the recurrent-depth family
can be read next to the Ouro organism's.

The recurrent block has the Ouro organism's shared layers and width (``OrganismConfig.num_layers``,
``hidden_size``), plus a prelude and a coda of one block each; it runs ``num_loops`` steps from the zero state.
Huginn has no exit gate, so the objective is the uniform mean of the per-step losses (every step's readout
supervised), with gradients through every step.

    loopalign organism --family huginn                      # build into the cache (or reuse it), print its card
    loopalign organism --family huginn --output_dir DIR     # ... into DIR
    loopalign eval-gap --model_name_or_path huginn_organism  # evaluate it (a named model, built on first use)

The build is written like the Ouro organism's: atomically (a temporary folder renamed into place), under a lock,
with ``organism.json`` (``"family": "huginn"``, the config, figures and the sha256 of every model and tokenizer
file, checked on load) and a short model card with the per-step gap table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from loopalign.log import get_logger
from loopalign.models.huginn import HuginnConfig, HuginnForCausalLM, tiny_huginn_config

from .build import ensure_cached_build, load_built, save_trained, write_build
from .cache import cache_root, check_build_files, is_organism
from .card import build_line
from .config import MARKER_FILE, OrganismConfig
from .evaluate import evaluate_organism, gap_table_rows
from .train import TrainResult, train_on_organism_data, weighted_part_loss

logger = get_logger(__name__)

__all__ = [
    "HUGINN_FAMILY",
    "build_huginn_organism",
    "ensure_huginn_organism",
    "huginn_organism_config",
    "huginn_organism_path",
    "is_huginn_organism",
    "load_huginn_organism",
    "train_huginn_organism",
]

#: ``organism.json``'s ``family`` for this organism (the Ouro organism's marker has none, or ``"ouro"``)
HUGINN_FAMILY = "huginn"
#: rebuilds the default Huginn organism in the default cache
REBUILD_COMMAND = "loopalign organism --family huginn --force"


def huginn_organism_config(config: OrganismConfig, vocab_size: int, prelude: int = 1, coda: int = 1) -> HuginnConfig:
    """The Huginn shape of the organism: prelude / ``config.num_layers`` recurrent layers / coda, its width and
    heads, ``config.num_loops`` steps by default, zero initial state."""
    return tiny_huginn_config(
        vocab_size=vocab_size,
        n_embd=config.hidden_size,
        n_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        n_layers_in_prelude=prelude,
        n_layers_in_recurrent_block=config.num_layers,
        n_layers_in_coda=coda,
        block_size=max(config.max_length, 256),
        mean_recurrence=config.num_loops,
        mean_backprop_depth=config.num_loops,
        init_scale=0.0,
    )


def train_huginn_organism(
    config: OrganismConfig | None = None, prelude: int = 1, coda: int = 1, progress: bool = True
) -> TrainResult:
    """Train a Huginn-shaped organism from scratch with ``config.num_threads`` threads (deterministic by
    ``config.seed`` on a given machine). ``loop_losses`` holds the per-step mean CE of every optimiser step."""
    config = config or OrganismConfig()
    return train_on_organism_data(
        config,
        lambda vocab_size: HuginnForCausalLM(huginn_organism_config(config, vocab_size, prelude, coda)),
        lambda model, part: weighted_part_loss(model, part, config.num_loops),  # uniform over steps: no exit gate
        desc="huginn organism",
        progress=progress,
    )


def huginn_organism_path(config: OrganismConfig | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/organism-huginn-v{version}-{hash}``: beside the Ouro organism of the same config."""
    config = config or OrganismConfig()
    return cache_root(cache_dir) / config.folder_name().replace("organism-", "organism-huginn-", 1)


def is_huginn_organism(path: str | os.PathLike, config: OrganismConfig | None = None) -> bool:
    """True when ``path`` holds a complete Huginn organism build (of ``config``, when given)."""
    if not is_organism(path, config):
        return False
    return json.loads((Path(path) / MARKER_FILE).read_text()).get("family") == HUGINN_FAMILY


def _card(config: OrganismConfig, meta: dict, gap_markdown: str) -> str:
    shape = meta["shape"]
    return "\n".join(
        [
            f"# loopalign Huginn-shaped model organism (recipe v{config.recipe_version}, `{config.config_hash()}`)",
            "",
            f"A tiny recurrent-depth model (prelude {shape['prelude']} / recurrent block {shape['recurrent']} / "
            f"coda {shape['coda']} blocks, hidden {config.hidden_size}, {meta['parameters'] / 1e6:.2f}M parameters, "
            f"{config.num_loops} steps from the zero state) trained from scratch by loopalign on a CPU "
            f"({meta['train_seconds']:.0f} s, {config.num_threads} threads) on the Ouro organism's tasks and data, "
            "with the uniform mean of the per-step losses (Huginn has no exit gate). Built by "
            "`loopalign.organism.huginn.build_huginn_organism`; load it with `load_huginn_organism()` or "
            "`AutoModelForCausalLM.from_pretrained(folder)` after `import loopalign`.",
            "",
            build_line(meta),
            "",
            f"Final per-step training losses: {meta['final_loop_losses']}.",
            "",
            "## Per-step SV / RR / gap on held-out records",
            "",
            gap_markdown,
            "",
            "One seed; see docs/families.md for how these figures compare with the Ouro organism's.",
            "",
        ]
    )


def build_huginn_organism(
    config: OrganismConfig | None = None,
    out_dir: str | os.PathLike = "",
    prelude: int = 1,
    coda: int = 1,
    progress: bool = True,
) -> Path:
    """Train, save (model + tokenizer), evaluate (``eval/``) and write the card and ``organism.json`` into
    ``out_dir``, atomically (an interrupted build leaves no half model; an existing ``out_dir`` is replaced)."""
    config = config or OrganismConfig()

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        logger.info(f"building the Huginn organism {out_dir}: {config.steps} steps, {config.num_threads} thread(s)")
        trained = train_huginn_organism(config, prelude=prelude, coda=coda, progress=progress)
        files = save_trained(tmp, trained.model, trained.tokenizer)
        t1 = time.perf_counter()
        result = evaluate_organism(trained.model, trained.tokenizer, config, out_dir=tmp / "eval")
        meta = {
            "family": HUGINN_FAMILY,
            "recipe_version": config.recipe_version,
            "config_hash": config.config_hash(),
            "config": config.to_dict(),
            "shape": {"prelude": prelude, "recurrent": config.num_layers, "coda": coda},
            "parameters": sum(p.numel() for p in trained.model.parameters()),
            "num_threads": config.num_threads,
            "train_seconds": round(trained.seconds, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
            "build": config.kernel_path(),  # the kernel path (part of config_hash): another one is another model
            "final_loss": trained.losses[-1],
            "final_loop_losses": trained.loop_losses[-1],
            "eval": {
                "n_records": result.meta["n_records"],
                "table": gap_table_rows(result),
            },
            "files": files,
        }
        (tmp / "README.md").write_text(_card(config, meta, result.markdown()), encoding="utf-8")
        (tmp / "losses.json").write_text(json.dumps({"loss": trained.losses, "loop_losses": trained.loop_losses}))
        return meta

    return write_build(out_dir, "Huginn organism", write)


def ensure_huginn_organism(
    config: OrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    lock_timeout: float | None = None,
) -> Path:
    """The Huginn organism's folder in the cache, built first when missing (or with ``force``) under a lock
    (:func:`loopalign.organism.build.ensure_cached_build`); its files are checked against the checksums of the
    build (a damaged one raises ``CorruptOrganismError``)."""
    config = config or OrganismConfig()
    return ensure_cached_build(
        huginn_organism_path(config, cache_dir),
        lambda p: is_huginn_organism(p, config),
        lambda p: build_huginn_organism(config, p, progress=progress),
        lambda p: check_build_files(p, REBUILD_COMMAND, what="Huginn organism"),
        what="Huginn organism",
        rebuild=REBUILD_COMMAND,
        force=force,
        lock_timeout=lock_timeout,
    )


def load_huginn_organism(
    config: OrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
):
    """-> (model in eval mode, tokenizer) of the Huginn organism, built into the cache first when missing."""
    return load_built(ensure_huginn_organism(config, cache_dir), device)
