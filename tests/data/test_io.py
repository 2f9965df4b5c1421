import json

import pytest

from loopalign.data.candidates import controlled_candidates
from loopalign.data.io import SourceError, content_hash, load_build, read_jsonl, read_table, save_build
from loopalign.data.schema import RecordError
from loopalign.data.sources import generate_problems


def rows(seed=0, n=10):
    return controlled_candidates(generate_problems(n, seed=seed))


def test_roundtrip_and_hash(tmp_path):
    meta = save_build(rows(), tmp_path / "a", "verification", {"note": "x"})
    ds, got = load_build(tmp_path / "a")
    assert ds.to_list() == rows() and got == meta
    assert read_jsonl(tmp_path / "a" / "records.jsonl") == rows()
    again = save_build(rows(), tmp_path / "b", "verification", {"note": "x"})
    assert again["content_hash"] == meta["content_hash"] == content_hash(rows())
    assert save_build(rows(seed=1), tmp_path / "c", "verification")["content_hash"] != meta["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_existing_and_failed_writes_are_atomic(tmp_path):
    save_build(rows(), tmp_path / "a", "verification")
    with pytest.raises(FileExistsError):
        save_build(rows(), tmp_path / "a", "verification")
    bad = rows() + [dict(rows()[0], id="bad", label=3)]
    with pytest.raises(RecordError, match="'bad'.*'label'"):
        save_build(bad, tmp_path / "a", "verification", overwrite=True)
    assert load_build(tmp_path / "a")[1]["n_rows"] == 20  # old build untouched
    with pytest.raises(RecordError):
        save_build(bad, tmp_path / "new", "verification")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    meta = save_build(rows(seed=2), tmp_path / "a", "verification", overwrite=True)
    assert load_build(tmp_path / "a")[1]["content_hash"] == meta["content_hash"]


def test_skip_invalid_writes_rejected(tmp_path):
    bad = rows() + [dict(rows()[0], id="bad", meta="nope"), dict(rows()[1])]
    meta = save_build(bad, tmp_path / "a", "verification", skip_invalid=True)
    assert meta["n_rows"] == 20 and meta["n_rejected"] == 2
    rej = read_jsonl(tmp_path / "a" / "rejected.jsonl")
    assert [(r["id"], r["field"]) for r in rej] == [("bad", "meta"), (rows()[1]["id"], "id")]


def test_load_detects_tampering(tmp_path):
    save_build(rows(), tmp_path / "a", "verification")
    meta_path = tmp_path / "a" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["content_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SourceError, match="content hash"):
        load_build(tmp_path / "a")


def test_read_table_formats(tmp_path, fixtures):
    import datasets

    src = read_table(str(fixtures / "gsm8k" / "test.jsonl"))
    datasets.Dataset.from_list(src).to_parquet(str(tmp_path / "t.parquet"))
    assert read_table(str(tmp_path / "t.parquet")) == src
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SourceError, match="unknown file type"):
        read_table(str(tmp_path / "x.txt"))
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(SourceError, match="line 2"):
        read_table(str(tmp_path / "broken.jsonl"))
