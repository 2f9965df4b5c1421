"""Where organisms live (``$LOOPALIGN_CACHE``, else ``~/.cache/loopalign``), and the checks that a cached one is whole."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
from pathlib import Path

from loopalign.errors import ModelError
from loopalign.log import get_logger

from .config import MARKER_FILE, OrganismConfig

logger = get_logger(__name__)


def organism_cache_dir() -> Path:
    """The cache root: ``$LOOPALIGN_CACHE`` when set, else ``~/.cache/loopalign``."""
    env = os.environ.get("LOOPALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loopalign"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder every organism's build lives in: ``cache_dir`` when given, else :func:`organism_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else organism_cache_dir()


def organism_path(config: OrganismConfig | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the organism of ``config`` lives: ``<cache root>/organism-v{version}-{hash}``."""
    return cache_root(cache_dir) / (config or OrganismConfig()).folder_name()


def is_organism(
    path: str | os.PathLike, config=None, required: tuple[str, ...] = ("config.json", "tokenizer.json", "README.md")
) -> bool:
    """True when ``path`` holds a complete organism build: its marker, the ``required`` files, and (with ``config``,
    anything with a ``config_hash()``) that config's hash."""
    marker = Path(path) / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if config is not None and meta.get("config_hash") != config.config_hash():
        return False
    return all((Path(path) / name).is_file() for name in required)


class CorruptOrganismError(ModelError):
    """A cached organism's file does not match the size / sha256 recorded in its ``organism.json``."""


#: the command that rebuilds the default organism in the default cache
REBUILD_COMMAND = "python recipes/pretrain_organism.py --force"
#: organism folders already reported as built before the file checksums (one line per process each)
_UNVERIFIED_REPORTED: set[str] = set()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the files directly in ``folder`` (the saved model and tokenizer)."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _file_sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()
    }


def rebuild_command(path: Path, config: OrganismConfig | None) -> str:
    """The ``pretrain_organism.py --force`` command line that rebuilds the organism at ``path``."""
    parts = [REBUILD_COMMAND]
    if config is not None:
        default = OrganismConfig()
        for f in dataclasses.fields(OrganismConfig):
            value = getattr(config, f.name)
            if f.name == "recipe_version" or value == getattr(default, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, tuple):
                parts.append(" ".join([flag, *(shlex.quote(str(x)) for x in value)]))
            else:  # the recipe's TrlParser reads a bool as true / false
                parts.append(f"{flag} {shlex.quote(str(value).lower() if isinstance(value, bool) else str(value))}")
    if config is not None and path.name != config.folder_name():
        parts.append(f"--output-dir {shlex.quote(str(path))}")
    elif path.parent.resolve() != organism_cache_dir().resolve():
        parts.append(f"--cache-dir {shlex.quote(str(path.parent))}")
    return " ".join(parts)


def check_files(path: str | os.PathLike, files: dict, rebuild: str, what: str = "organism") -> None:
    """Each file of ``files`` (name -> {bytes, sha256}, recorded at build time) in the folder ``path``: present,
    of its size and sha256; else :class:`CorruptOrganismError` naming the file and the ``rebuild`` command."""
    path = Path(path)
    for name, want in files.items():
        file = path / name
        problem = None
        if not file.is_file():
            problem = "is missing"
        else:
            size = file.stat().st_size
            if size < want["bytes"]:
                problem = f"is truncated: {size} bytes of the {want['bytes']} written at build time"
            elif size != want["bytes"]:
                problem = f"has changed: {size} bytes, {want['bytes']} written at build time"
            elif _file_sha256(file) != want["sha256"]:
                problem = "is corrupted: its sha256 differs from the one recorded at build time"
        if problem:
            raise CorruptOrganismError(
                f"the cached {what}'s file {file} {problem} (organism.json holds the checksums); the cache is "
                f"damaged, so the {what} is not loaded. Rebuild it with `{rebuild}`"
            )


def check_build_files(path: str | os.PathLike, rebuild: str, what: str = "organism") -> None:
    """A built organism's model and tokenizer files against the sizes and sha256 sums its ``organism.json``
    recorded (:func:`check_files`)."""
    meta = json.loads((Path(path) / MARKER_FILE).read_text())
    check_files(path, meta["files"], rebuild, what=what)


def verify_organism(path: str | os.PathLike, config: OrganismConfig | None = None) -> bool:
    """Check the organism's model and tokenizer files against the sizes and sha256 sums recorded in its
    ``organism.json`` at build time. -> True when checked; False for an organism built before the
    checksums (it says so in one line, once per process, and loads as before). Raises
    :class:`CorruptOrganismError` naming the file and the rebuild command on a missing, truncated or
    changed file."""
    path = Path(path)
    marker = path / MARKER_FILE
    meta = json.loads(marker.read_text())
    if config is None and isinstance(meta.get("config"), dict):
        with contextlib.suppress(TypeError, ValueError):
            config = OrganismConfig.from_dict(meta["config"])
    if not isinstance(meta.get("files"), dict):
        if str(path) not in _UNVERIFIED_REPORTED:
            _UNVERIFIED_REPORTED.add(str(path))
            logger.warning(
                f"organism {path} was built before loopalign recorded file checksums: loading it unchecked "
                f"(`{rebuild_command(path, config)}` rebuilds it with them)",
            )
        return False
    before = marker.stat().st_mtime_ns
    try:
        check_files(path, meta["files"], rebuild_command(path, config))
    except CorruptOrganismError:
        # a rebuild (--force) renamed a new organism into place while we read: check that one
        if not marker.is_file() or marker.stat().st_mtime_ns == before:
            raise
        return verify_organism(path, config)
    return True


#: the named models that are gap organisms (their data: the organism's digit tasks)
ORGANISM_MODELS = ("organism", "huginn_organism")


def is_organism_model(model_name: str | os.PathLike) -> bool:
    """True for a gap organism: a named one (:data:`ORGANISM_MODELS`) or a folder whose ``organism.json`` holds an
    :class:`OrganismConfig` (any family); False for anything else (the introspection organism included)."""
    if str(model_name) in ORGANISM_MODELS:
        return True
    marker = Path(str(model_name)) / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        OrganismConfig.from_dict(json.loads(marker.read_text())["config"])
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return True


def organism_config_for(model_name: str | os.PathLike) -> OrganismConfig:
    """The :class:`OrganismConfig` behind a model name: the default for ``"organism"``, the recorded
    one for an organism folder (its ``organism.json``), else the default (for data in its format)."""
    marker = Path(str(model_name)) / MARKER_FILE
    if str(model_name) not in ORGANISM_MODELS and marker.is_file():
        return OrganismConfig.from_dict(json.loads(marker.read_text())["config"])
    return OrganismConfig()
