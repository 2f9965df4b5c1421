"""Build an organism into its cache folder (atomically, under a lock), and load it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loopalign.io import atomic_folder, ensure_built
from loopalign.loading import load_pretrained, load_tokenizer
from loopalign.log import get_logger

from .cache import file_records, is_organism, organism_path, rebuild_command, verify_organism
from .card import model_card
from .config import MARKER_FILE, OrganismConfig
from .evaluate import card_records, evaluate_organism, gap_table_rows, organism_properties, organism_slices
from .train import expected_build_seconds, train_organism

logger = get_logger(__name__)


def ensure_cached_build(
    path: Path,
    is_complete: Callable[[Path], bool],
    build: Callable[[Path], object],
    verify: Callable[[Path], object],
    what: str,
    rebuild: str,
    build_if_missing: bool = True,
    force: bool = False,
    lock_timeout: float | None = None,
) -> Path:
    """The one build-under-lock of every organism: ``path`` when ``is_complete`` (checked by ``verify``, which
    raises on a damaged build), else built with ``build(path)`` (atomically: :func:`write_build`) under a lock
    beside it (:func:`loopalign.io.ensure_built`: two processes build once, the second waits, saying for whom, and
    gives up after ``lock_timeout`` seconds, default ``$LOOPALIGN_LOCK_TIMEOUT``). ``force`` rebuilds; without
    ``build_if_missing`` a missing build is a ``FileNotFoundError`` naming ``rebuild``."""
    if not build_if_missing and not force and not is_complete(path):
        raise FileNotFoundError(f"no {what} at {path}; build it with `{rebuild}` (or load it with build_if_missing)")
    ensure_built(  # a complete build is returned at once (a stale lock file beside it removed); lock_timeout checked
        path,
        lambda p: is_complete(Path(p)),
        lambda p: build(Path(p)),
        what=f"the {what} {path}",
        force=force,
        lock_timeout=lock_timeout,
        prefix=f".tmp-{path.name}-",
    )
    verify(path)
    return path


def write_build(out_dir: str | os.PathLike, what: str, write: Callable[[Path], dict]) -> Path:
    """The one atomic build of every organism: ``write(tmp)`` trains and saves into a temporary folder beside
    ``out_dir`` (:func:`save_trained` first, so the recorded checksums cover the model and tokenizer) and returns
    the build's ``organism.json``; it is written last (it marks a complete build) and the folder renamed into
    place, replacing ``out_dir``. An interrupted build leaves no half model. -> ``out_dir`` (resolved)."""
    if not str(out_dir):
        raise ValueError(f"building the {what}: out_dir is required")
    out = Path(out_dir).expanduser().resolve()
    with atomic_folder(out, prefix=f".tmp-{out.name}-") as tmp_dir:  # renamed into place when whole
        tmp = Path(tmp_dir)
        meta = write(tmp)
        if not isinstance(meta.get("files"), dict):
            raise ValueError(f"building the {what}: its organism.json must record the saved files (save_trained)")
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks a complete build
    return out


def save_trained(folder: Path, model, tokenizer) -> dict:
    """Save the model and tokenizer into ``folder``. -> the size and sha256 of each file (checked on load)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return file_records(folder)


def load_built(path: Path, device: str | torch.device | None = None):
    """-> (model in float32 and eval mode on ``device``, default CPU; tokenizer) of a built organism folder."""
    model = load_pretrained(str(path), dtype=torch.float32)
    return model.to(device or "cpu").eval(), load_tokenizer(str(path))


def ensure_organism(
    config: OrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    build_if_missing: bool = True,
    progress: bool = True,
    force: bool = False,
    lock_timeout: float | None = None,
) -> Path:
    """The organism's folder in the cache, built first when missing (or with ``force``), under a lock
    (:func:`ensure_cached_build`).

    Two processes asking at once build it once: the second waits for the lock (saying for whom),
    then finds it built; it gives up after ``lock_timeout`` seconds (default
    ``$LOOPALIGN_LOCK_TIMEOUT``, else :data:`loopalign.io.DEFAULT_LOCK_TIMEOUT`) with a ``TimeoutError``.
    A cached organism is checked first (:func:`verify_organism`): a damaged one raises
    :class:`CorruptOrganismError` (``force`` rebuilds it).
    """
    config = config or OrganismConfig()
    path = organism_path(config, cache_dir)
    return ensure_cached_build(
        path,
        lambda p: is_organism(p, config),
        lambda p: build_organism(config, p, progress=progress),
        lambda p: verify_organism(p, config),
        what="organism",
        rebuild=rebuild_command(path, config),
        build_if_missing=build_if_missing,
        force=force,
        lock_timeout=lock_timeout,
    )


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
    return load_built(ensure_organism(config, cache_dir, build_if_missing=build_if_missing, progress=progress), device)


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

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        threads = config.num_threads
        logger.info(
            f"building the organism {out_dir}: {config.steps} steps with {threads} torch thread(s), expected about "
            f"{expected_build_seconds(config) / 60:.1f} min on an unloaded 2-core machine (longer under load)",
        )
        trained = train_organism(config, progress=progress)
        model, tokenizer = trained.model, trained.tokenizer
        files = save_trained(tmp, model, tokenizer)
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
        return meta

    return write_build(out_dir, "organism", write)
