"""Atomic writes keep the user's umask: files 0644 and folders 0755 under umask 022 (tempfile alone
would give 0600 / 0700, unreadable to a teammate on shared storage)."""

import os
import stat

import pytest

from loopalign.io import atomic_save_safetensors, atomic_write_text, current_umask, make_temp_dir


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_writes_and_temp_dirs_follow_the_umask(tmp_path, umask):
    import torch

    text = atomic_write_text(tmp_path / "a.json", "{}")
    tensors = atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "p.safetensors")
    folder = make_temp_dir(tmp_path, prefix=".tmp-build-")
    assert _mode(text) == _mode(tensors) == 0o666 & ~umask
    assert _mode(folder) == 0o777 & ~umask
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-") and p != os.path.basename(folder)]


def test_dataset_builds_follow_the_umask(tmp_path, umask):
    from loopalign.data.io import write_jsonl

    write_jsonl([{"a": 1}], tmp_path / "rows.jsonl")
    assert _mode(tmp_path / "rows.jsonl") == 0o666 & ~umask
