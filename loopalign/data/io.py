"""Reading and writing builds: JSONL, content hashes, and atomic ``save_to_disk`` outputs.

A build folder holds::

    dataset/         datasets.Dataset.save_to_disk
    records.jsonl    the same rows, one JSON object per line
    metadata.json    build settings, counts and ``content_hash`` (sha256 of the rows)
    rejected.jsonl   rows rejected by validation (only with skip_invalid and rejects)
    dropped.jsonl    valid rows left out on purpose (--balance, --dedupe, ...), each with its reason

It is built in a temporary sibling folder and renamed into place, so a reader never sees half a build.
A build that ends with no rows writes nothing at ``out``; what was rejected or dropped on the way
goes to the sibling folder ``<out>.failed/`` (``rejected.jsonl``, ``dropped.jsonl``,
``report.json``), which the next successful build of ``out`` removes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import datasets

from loopalign.errors import DataError
from loopalign.injection.builds import check_vectors
from loopalign.io import apply_umask, make_temp_dir, swap_into_place

from .schema import RENDERED_FIELDS, TRIAL_FIELDS, VERIFICATION_FIELDS, Dropped, Rejected, validate_records

__all__ = [
    "SourceError",
    "SKIPPED",
    "read_entries",
    "read_jsonl",
    "write_jsonl",
    "read_csv",
    "read_table",
    "content_hash",
    "features_for",
    "save_build",
    "load_build",
    "failed_folder",
    "write_failed_report",
    "swap_into_place",
]


class SourceError(DataError, RuntimeError):
    """A source could not be read (missing file, unknown format, hub unavailable offline)."""


class _Skipped:
    """The place of a source entry that could not be read (skipped with ``skip_invalid``)."""

    def __repr__(self) -> str:
        return "<skipped entry>"


#: stands in :func:`read_entries`' rows for an entry that was skipped (and returned as rejected)
SKIPPED = _Skipped()

_SKIP_HINT = "(--skip-invalid skips such lines and records them in rejected.jsonl)"


def _bad_line(path, n: int, what: str, raw: bytes, skip_invalid: bool, rejected: list) -> None:
    if not skip_invalid:
        raise SourceError(f"{path}: line {n} is {what} {_SKIP_HINT}")
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    rejected.append(Rejected(f"{Path(path).name}:{n}", "<line>", what, text, unit="entry", line=n))


def _jsonl_entries(path, limit: int | None, skip_invalid: bool) -> tuple[list, list[Rejected]]:
    rows: list = []
    rejected: list[Rejected] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad_line(path, n, f"not valid UTF-8 (byte {e.start}: {e.reason})", raw, skip_invalid, rejected)
                rows.append(SKIPPED)
                continue
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                _bad_line(path, n, f"not valid JSON ({e})", raw, skip_invalid, rejected)
                rows.append(SKIPPED)
    return rows, rejected


def _utf8_or_fail(data: bytes, path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SourceError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def _has_bad_bytes(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: bytes that were not UTF-8
        return True
    return False


def _csv_entries(path, limit: int | None, skip_invalid: bool) -> tuple[list, list[Rejected]]:
    """CSV rows (multi-line quoted fields allowed); a row with bytes that are not UTF-8 raises naming its
    first line, or with ``skip_invalid`` is skipped and rejected."""
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if any(_has_bad_bytes(k) for k in reader.fieldnames or ()):
        raise SourceError(f"{path}: line 1 (the header) is not valid UTF-8")
    rows: list = []
    rejected: list[Rejected] = []
    start = reader.line_num + 1
    for row in reader:
        if limit is not None and len(rows) >= limit:
            break
        if any(_has_bad_bytes(v) for v in row.values()):
            fixed = {
                k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
                for k, v in row.items()
            }
            lines = f"line {start}" if reader.line_num == start else f"lines {start}-{reader.line_num}"
            if not skip_invalid:
                raise SourceError(f"{path}: {lines}: not valid UTF-8 {_SKIP_HINT}")
            what = f"not valid UTF-8 ({lines})"
            rejected.append(Rejected(f"{Path(path).name}:{start}", "<line>", what, fixed, unit="entry", line=start))
            rows.append(SKIPPED)
        else:
            rows.append(row)
        start = reader.line_num + 1
    return rows, rejected


def read_entries(
    path_or_name: str, split: str = "test", config: str | None = None, limit: int | None = None, skip_invalid=False
) -> tuple[list, list[Rejected]]:
    """The first ``limit`` entries of a source (see :func:`read_table`) and the rejected ones.

    A JSONL line (or CSV row) that is not UTF-8, or a JSONL line that is not JSON, raises
    :class:`SourceError` naming the file and line; with ``skip_invalid`` it counts as an entry, is
    left out (:data:`SKIPPED` stands at its place, so the other entries keep their index) and is
    returned as a :class:`~loopalign.data.schema.Rejected` (unit "entry", with its line number).
    """
    p = Path(path_or_name)
    if p.is_file():
        suffix = "".join(p.suffixes[-1:]).lower()
        if suffix == ".jsonl":
            return _jsonl_entries(p, limit, skip_invalid)
        if suffix == ".csv":
            return _csv_entries(p, limit, skip_invalid)
    rows = read_table(path_or_name, split=split, config=config)
    return (rows if limit is None else rows[:limit]), []


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a bad line (not UTF-8, not JSON) raises naming the file and line number."""
    return _jsonl_entries(path, None, False)[0]


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
    return _csv_entries(path, None, False)[0]


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
            try:
                data = json.loads(_utf8_or_fail(p.read_bytes(), p))
            except json.JSONDecodeError as e:
                raise SourceError(f"{p}: line {e.lineno} is not valid JSON ({e})") from None
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


def failed_folder(out: str | os.PathLike) -> Path:
    """``<out>.failed``: where a build that ended with no rows leaves its rejected and dropped rows."""
    out = Path(out)
    return out.with_name(out.name + ".failed")


def write_failed_report(
    out: str | os.PathLike, rejected: list[Rejected], dropped: list[Dropped] | None = None, report: dict | None = None
) -> Path | None:
    """Write ``rejected.jsonl``, ``dropped.jsonl`` and ``report.json`` into :func:`failed_folder` (replacing
    an older one); None (nothing written) when there is nothing to show."""
    dropped = list(dropped or [])
    if not rejected and not dropped:
        return None
    target = failed_folder(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(target.parent, prefix=f".{target.name}.tmp-"))
    try:
        if rejected:
            write_jsonl([r.to_dict() for r in rejected], tmp / "rejected.jsonl")
        if dropped:
            write_jsonl([d.to_dict() for d in dropped], tmp / "dropped.jsonl")
        (tmp / "report.json").write_text(json.dumps(report or {}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_build(
    rows: list[dict],
    out: str | os.PathLike,
    kind: str,
    metadata: dict | None = None,
    rejected: list[Rejected] | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    dropped: list[Dropped] | None = None,
) -> dict:
    """Validate ``rows`` and write the build folder ``out`` atomically; returns the metadata written.

    ``kind``: "verification", "rendered" or "trial". A bad row raises (naming id and field) unless
    ``skip_invalid``, which drops it and writes it to ``rejected.jsonl`` (with earlier ``rejected``).
    ``dropped`` rows (left out on purpose, with a reason) go to ``dropped.jsonl``.
    The metadata gets ``kind``, ``n_rows``, ``n_rejected`` / ``n_dropped`` (the lines of ``rejected.jsonl`` /
    ``dropped.jsonl``: whole source entries and single records, each line saying its ``unit``) and
    ``content_hash``.
    No valid rows: a ValueError, ``out`` untouched, the rejected and dropped rows in :func:`failed_folder`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass overwrite=True (--overwrite) to replace it")
    checked = validate_records(rows, kind=kind, skip_invalid=skip_invalid)
    rejected = list(rejected or []) + checked.rejected
    dropped = list(dropped or [])
    if not checked.rows:
        where = write_failed_report(out, rejected, dropped, metadata)
        raise ValueError(
            f"build {out}: no rows to write ({len(rows)} given, {len(rejected)} rejected, {len(dropped)} dropped)"
            + (f"; the rejected and dropped rows are in {where}" if where else "")
        )
    meta = dict(metadata or {})
    meta.update(
        kind=kind,
        n_rows=len(checked.rows),
        n_rejected=len(rejected),
        n_dropped=len(dropped),
        content_hash=content_hash(checked.rows),
    )
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
        if dropped:
            write_jsonl([d.to_dict() for d in dropped], tmp / "dropped.jsonl")
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(failed_folder(out), ignore_errors=True)  # an earlier failed attempt's report is stale now
    return meta


def load_build(out: str | os.PathLike, validate: bool = True) -> tuple[datasets.Dataset, dict]:
    """Load a build folder: (Dataset, metadata). ``validate`` re-checks every row and the content hash, and
    for injection trials that the concept vectors beside them are the ones they were built with."""
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
        if meta["kind"] == "trial" and meta.get("vectors_hash"):
            check_vectors(out, meta)
    return ds, meta
