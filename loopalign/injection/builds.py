"""Injection build folders: the file the concept vectors are saved under beside the ``trials/`` build, the check
that they are the vectors the trials were built with, and the command that rebuilds a build."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .vectors import ConceptVectors, load_concept_vectors, vectors_hash

__all__ = ["VECTORS_FILE", "check_vectors", "rebuild_command"]

#: the concept vectors' file in an injection build folder (beside ``trials/``)
VECTORS_FILE = "concept_vectors.safetensors"


def rebuild_command(meta: dict, out: str | os.PathLike) -> str:
    """The command that rebuilds the injection build ``out`` (from its trials' metadata)."""
    tail = f"--out {shlex.quote(str(out))} --overwrite"
    if meta.get("command"):
        return f"{meta['command']} {tail}"
    st = meta.get("settings", {})
    vm = meta.get("vector_metadata", {})
    parts = ["python -m data_builders.injection", f"--model {vm.get('model', 'MODEL')}"]
    if st.get("num_loops") is not None:
        parts.append(f"--loops {st['num_loops']}")
    for option, key in (
        ("--layers", "layers"),
        ("--extraction-loops", "extraction_loops"),
        ("--injection-loops", "injection_loops"),
    ):
        if st.get(key) is not None:
            parts.append(f"{option} {','.join(map(str, st[key]))}")
    if st.get("strengths"):
        parts.append(f"--strengths {','.join(f'{x:g}' for x in st['strengths'])}")
    if st.get("n_controls") is not None:
        parts.append(f"--n-controls {st['n_controls']}")
    if vm.get("concepts"):
        parts.append(f"--n-concepts {len(vm['concepts'])}")
    return " ".join([*parts, tail])


def check_vectors(trials_dir: str | os.PathLike, meta: dict) -> ConceptVectors:
    """The concept vectors beside an injection build's ``trials/`` folder, checked against the
    ``vectors_hash`` its metadata stores; a ValueError naming the file and the rebuild command when
    the file is missing or holds other vectors (e.g. a rebuild that stopped half-way)."""
    trials_dir = Path(trials_dir)
    out = trials_dir.parent
    path = out / meta.get("vectors", VECTORS_FILE)
    command = rebuild_command(meta, out)
    if not path.exists():
        raise ValueError(f"{path} is missing: the trials in {trials_dir} were built with it; rebuild with: {command}")
    try:
        cv = load_concept_vectors(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); rebuild with: {command}") from None
    got, want = vectors_hash(cv), meta["vectors_hash"]
    if got != want:
        raise ValueError(
            f"{path} does not hold the vectors the trials in {trials_dir} were built with (vectors_hash "
            f"{got[:12]}, trials' metadata {want[:12]}); rebuild with: {command}"
        )
    return cv
