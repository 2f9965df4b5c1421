"""Build an organism into its cache folder (atomically, under a lock), and load it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from loopalign.io import atomic_folder, ensure_built
from loopalign.loading import load_pretrained, load_tokenizer
from loopalign.log import get_logger

from .cache import file_records, is_organism, organism_path, verify_organism
from .card import model_card
from .config import MARKER_FILE, OrganismConfig
from .evaluate import card_records, evaluate_organism, gap_table_rows, organism_properties, organism_slices
from .train import expected_build_seconds, train_organism

logger = get_logger(__name__)


def ensure_organism(
    config: OrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    build_if_missing: bool = True,
    progress: bool = True,
    force: bool = False,
    lock_timeout: float | None = None,
) -> Path:
    """The organism's folder in the cache, built first when missing (or with ``force``), under a lock.

    Two processes asking at once build it once: the second waits for the lock (saying for whom),
    then finds it built; it gives up after ``lock_timeout`` seconds (default
    ``$LOOPALIGN_LOCK_TIMEOUT``, else :data:`loopalign.io.DEFAULT_LOCK_TIMEOUT`) with a ``TimeoutError``.
    A cached organism is checked first (:func:`verify_organism`): a damaged one raises
    :class:`CorruptOrganismError` (``force`` rebuilds it).
    """
    config = config or OrganismConfig()
    path = organism_path(config, cache_dir)
    if is_organism(path, config) and not force:
        verify_organism(path, config)
        return path
    if not build_if_missing and not force:
        raise FileNotFoundError(
            f"no organism at {path}; build it with `python recipes/pretrain_organism.py` "
            "or load_organism(build_if_missing=True)"
        )
    if lock_timeout is not None and not float(lock_timeout) > 0:
        raise ValueError(f"ensure_organism: lock_timeout must be > 0 seconds, got {lock_timeout!r}")
    ensure_built(
        path,
        lambda p: is_organism(p, config),
        lambda p: build_organism(config, p, progress=progress),
        what=f"the organism {path}",
        force=force,
        lock_timeout=lock_timeout,
        prefix=f".tmp-{path.name}-",
    )
    return path


def load_organism(
    cache_dir: str | os.PathLike | None = None,
    build_if_missing: bool = True,
    config: OrganismConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
):
    """-> (model in eval mode, tokenizer) of the organism, built into the cache first when missing.

    ``cache_dir``: the cache root (default :func:`organism_cache_dir`); ``config``: another organism
    (default ``OrganismConfig()``); ``device``: where the model goes (default CPU). The files are
    checked against the checksums of the build first (:func:`verify_organism`, via
    :func:`ensure_organism`): a damaged cache raises :class:`CorruptOrganismError`.
    """
    path = ensure_organism(config, cache_dir, build_if_missing=build_if_missing, progress=progress)
    model = load_pretrained(str(path), dtype=torch.float32)
    tokenizer = load_tokenizer(str(path))
    return model.to(device or "cpu").eval(), tokenizer


def build_organism(
    config: OrganismConfig | None = None,
    out_dir: str | os.PathLike = "",
    progress: bool = True,
) -> Path:
    """Train, save (model + tokenizer), evaluate and write the model card into ``out_dir``, atomically.

    Everything is written into a temporary folder next to ``out_dir`` and renamed into place at the
    end, so an interrupted build leaves no half model. An existing ``out_dir`` is replaced. -> ``out_dir``.
    """
    config = config or OrganismConfig()
    if not str(out_dir):
        raise ValueError("build_organism: out_dir is required")
    out = Path(out_dir).expanduser().resolve()
    with atomic_folder(out, prefix=f".tmp-{out.name}-") as tmp_dir:  # renamed into place when whole
        tmp = Path(tmp_dir)
        t0 = time.perf_counter()
        threads = config.num_threads
        logger.info(
            f"building the organism {out}: {config.steps} steps with {threads} torch thread(s), expected about "
            f"{expected_build_seconds(config) / 60:.1f} min on an unloaded 2-core machine (longer under load)",
        )
        trained = train_organism(config, progress=progress)
        model, tokenizer = trained.model, trained.tokenizer
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = file_records(tmp)  # size and sha256 of the model and tokenizer files, checked on load
        t1 = time.perf_counter()
        result = evaluate_organism(model, tokenizer, config, out_dir=tmp / "eval")
        slices = organism_slices(result, card_records(config, tokenizer), config.sycophantic_items)
        props = organism_properties(result, config.num_loops, slices=slices)
        meta = {
            "recipe_version": config.recipe_version,
            "config_hash": config.config_hash(),
            "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_threads": threads,
            "train_seconds": round(trained.seconds, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
            "build": config.kernel_path(),  # the kernel path (part of config_hash): another one is another model
            "final_loss": trained.losses[-1],
            "loss_first_50": sum(trained.losses[:50]) / max(1, len(trained.losses[:50])),
            "loss_last_50": sum(trained.losses[-50:]) / max(1, len(trained.losses[-50:])),
            "final_loop_losses": trained.loop_losses[-1],
            "final_exit_probs": trained.exit_probs[-1],
            "eval": {
                "n_records": result.meta["n_records"],
                "table": gap_table_rows(result),
                "tp": [{"loop": r["loop"], "accuracy": r["accuracy"], "n": r["n"]} for r in (result.tp or [])],
                "auroc": [{k: row[k] for k in ("loop", "sv_auroc", "rr_auroc", "gap_auroc")} for row in result.table],
                "slices": slices,
            },
            "properties": props,
            "files": files,
        }
        (tmp / "README.md").write_text(model_card(config, meta, result, props), encoding="utf-8")
        (tmp / "losses.json").write_text(
            json.dumps({"loss": trained.losses, "loop_losses": trained.loop_losses, "exit_probs": trained.exit_probs})
        )
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks a complete organism
    return out
