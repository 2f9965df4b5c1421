"""Two evaluations writing one output folder (issue [hardening]): the folder is locked while a run writes
it, and a second writer fails at once naming the folder and the holder, instead of the last writer winning."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from datasets import Dataset

from loopalign.eval import GapConfig, ReadoutConfig, evaluate_gap
from loopalign.eval.report import save_gap
from loopalign.io import FOLDER_LOCK_NAME, FolderLockedError, folder_lock

REPO = Path(__file__).resolve().parents[2]


class _Result:
    """What save_gap reads of a GapResult (plots off)."""

    def __init__(self, tag: str):
        self.tag = tag

    def to_json(self) -> str:
        return f'{{"tag": "{self.tag}"}}'

    def markdown(self) -> str:
        return f"# {self.tag}\n"


_HOLDER = textwrap.dedent(
    """
    import sys
    from loopalign.io import folder_lock
    with folder_lock(sys.argv[1], "evaluate_gap"):
        print("HELD", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    """
)


@pytest.fixture
def held_by_another_process(tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "HELD", proc.stdout.read()
        yield out, proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_writer_fails_at_once_naming_the_folder_and_the_holder(
    held_by_another_process, tiny_model, tok, synthetic_rows, monkeypatch
):
    out, proc = held_by_another_process
    holder = rf"pid {proc.pid} on {socket.gethostname()} since .* \(evaluate_gap\)"
    start = time.monotonic()
    with pytest.raises(FolderLockedError, match=rf"output folder {out} is being written by {holder}"):
        save_gap(_Result("second"), str(out), plots=False)
    assert time.monotonic() - start < 5  # at once: no waiting
    assert not (out / "gap.json").exists()

    # evaluate_gap fails before any model work, not after the whole evaluation
    import loopalign.eval.api as api

    def no_work(*args, **kwargs):
        raise AssertionError("evaluate_gap ran the model although its out_dir was taken")

    monkeypatch.setattr(api, "extract_features", no_work)
    with pytest.raises(FolderLockedError, match=rf"{out} is being written by {holder}"):
        evaluate_gap(tiny_model, tok, Dataset.from_list(synthetic_rows), loops="1", out_dir=str(out))

    # released (the holder exits; a killed holder releases it too): writing works again
    proc.stdin.close()
    proc.wait(timeout=60)
    save_gap(_Result("after"), str(out), plots=False)
    assert (out / "gap.json").read_text() == '{"tag": "after"}'
    assert not (out / FOLDER_LOCK_NAME).exists()  # released: no lock file is left in the output folder


def test_a_killed_holder_releases_the_folder(tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "HELD"
    proc.kill()
    proc.wait(timeout=60)
    save_gap(_Result("after a crash"), str(out), plots=False)
    assert "after a crash" in (out / "gap.md").read_text()


def test_evaluate_gap_writes_under_its_own_lock_and_other_threads_are_kept_out(
    tiny_model, tok, synthetic_rows, tmp_path
):
    out = tmp_path / "eval"
    cfg = GapConfig(verdict_tokens=("Yes", "No"), n_boot=20, controls=False, readout=ReadoutConfig(l2_grid=(1.0,)))
    # the lock is re-entrant within a thread: evaluate_gap holds it while save_gap takes it again
    evaluate_gap(tiny_model, tok, Dataset.from_list(synthetic_rows[:24]), loops="1", config=cfg, out_dir=str(out))
    assert {"gap.json", "gap.md", "probes.json", "probes.safetensors"} <= set(os.listdir(out))

    errors = []
    with folder_lock(out, "a test"):
        save_gap(_Result("same thread"), str(out), plots=False)  # re-entered: fine

        def other_thread():
            try:
                save_gap(_Result("other thread"), str(out), plots=False)
            except FolderLockedError as e:
                errors.append(str(e))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(timeout=30)
    assert len(errors) == 1 and f"{out} is being written by another thread of this process" in errors[0]
    assert (out / "gap.json").read_text() == '{"tag": "same thread"}'
    save_gap(_Result("later"), str(out), plots=False)  # released on exit
