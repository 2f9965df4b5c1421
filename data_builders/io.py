"""Reading and writing builds: JSONL, content hashes, and atomic ``save_to_disk`` outputs.

A build folder holds::

    dataset/         datasets.Dataset.save_to_disk
    records.jsonl    the same rows, one JSON object per line
    metadata.json    build settings, counts and ``content_hash`` (sha256 of the rows)
    rejected.jsonl   rows rejected by validation (only with skip_invalid and rejects)

It is built in a temporary sibling folder and renamed into place, so a reader never sees half a build.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import datasets

from loopalign.io import apply_umask, make_temp_dir

from .schema import RENDERED_FIELDS, TRIAL_FIELDS, VERIFICATION_FIELDS, Rejected, validate_records

__all__ = [
    "SourceError",
    "read_jsonl",
    "write_jsonl",
    "read_csv",
    "read_table",
    "content_hash",
    "features_for",
    "save_build",
    "load_build",
]


class SourceError(RuntimeError):
    """A source could not be read (missing file, unknown format, hub unavailable offline)."""


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a bad line raises naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}: line {n} is not valid JSON ({e})") from None
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        apply_umask(tmp, folder=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV file with a header (multi-line quoted fields allowed)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_table(path_or_name: str, split: str = "test", config: str | None = None) -> list[dict]:
    """Rows from a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, or a hub dataset ``split``.

    A name that is not an existing file is loaded with ``datasets.load_dataset``; offline (or on any
    hub failure) this raises :class:`SourceError` saying so and suggesting a local file.
    """
    p = Path(path_or_name)
    if p.exists():
        suffix = "".join(p.suffixes[-1:]).lower()
        if suffix == ".jsonl":
            return read_jsonl(p)
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise SourceError(f"{p}: a .json source must hold a list of objects")
            return data
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(p)).to_list()
        if suffix == ".csv":
            return read_csv(p)
        raise SourceError(f"{p}: unknown file type {suffix!r} (expected .jsonl, .json, .parquet or .csv)")
    looks_like_path = path_or_name.startswith((".", "/", "~")) or path_or_name.endswith((".jsonl", ".parquet", ".csv"))
    if looks_like_path:
        raise SourceError(f"source file not found: {path_or_name}")
    if _hub_offline():
        raise SourceError(
            f"cannot load hub dataset {path_or_name!r}: the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); "
            "pass a local .jsonl/.parquet file instead"
        )
    try:
        ds = datasets.load_dataset(path_or_name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise SourceError(
            f"cannot load hub dataset {path_or_name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Offline? Pass a local .jsonl/.parquet file instead"
        ) from e
    return ds.to_list()


def content_hash(rows: Iterable[dict]) -> str:
    """sha256 (hex) of the rows in order, each as canonical JSON (sorted keys)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def features_for(kind: str) -> datasets.Features:
    """Explicit ``datasets`` features for "verification", "rendered" or "trial" rows."""
    fields = {"verification": VERIFICATION_FIELDS, "rendered": RENDERED_FIELDS, "trial": TRIAL_FIELDS}
    if kind not in fields:
        raise ValueError(f"kind must be one of {sorted(fields)}, got {kind!r}")
    dtypes = {str: "string", int: "int64", float: "float64", bool: "bool"}
    feats = {}
    for name, typ in fields[kind].items():
        feats[name] = datasets.List(datasets.Value("int64")) if typ is list else datasets.Value(dtypes[typ])
    return datasets.Features(feats)


def save_build(
    rows: list[dict],
    out: str | os.PathLike,
    kind: str,
    metadata: dict | None = None,
    rejected: list[Rejected] | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
) -> dict:
    """Validate ``rows`` and write the build folder ``out`` atomically; returns the metadata written.

    ``kind``: "verification", "rendered" or "trial". A bad row raises (naming id and field) unless
    ``skip_invalid``, which drops it and writes it to ``rejected.jsonl`` (with earlier ``rejected``).
    The metadata gets ``kind``, ``n_rows``, ``n_rejected`` and ``content_hash``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass overwrite=True (--overwrite) to replace it")
    checked = validate_records(rows, kind=kind, skip_invalid=skip_invalid)
    rejected = list(rejected or []) + checked.rejected
    meta = dict(metadata or {})
    meta.update(kind=kind, n_rows=len(checked.rows), n_rejected=len(rejected), content_hash=content_hash(checked.rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out.parent, prefix=f".{out.name}.tmp-"))
    try:
        ds = datasets.Dataset.from_list(checked.rows, features=features_for(kind))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            ds.save_to_disk(str(tmp / "dataset"))
        finally:
            if bars:
                datasets.enable_progress_bars()
        write_jsonl(checked.rows, tmp / "records.jsonl")
        if rejected:
            write_jsonl([r.to_dict() for r in rejected], tmp / "rejected.jsonl")
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def load_build(out: str | os.PathLike, validate: bool = True) -> tuple[datasets.Dataset, dict]:
    """Load a build folder: (Dataset, metadata). ``validate`` re-checks every row and the content hash."""
    out = Path(out)
    if not (out / "metadata.json").exists():
        raise SourceError(f"{out} is not a build folder (no metadata.json)")
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    ds = datasets.load_from_disk(str(out / "dataset"))
    if validate:
        rows = ds.to_list()
        validate_records(rows, kind=meta["kind"])
        got = content_hash(rows)
        if got != meta["content_hash"]:
            raise SourceError(f"{out}: content hash {got[:12]} does not match metadata {meta['content_hash'][:12]}")
    return ds, meta
