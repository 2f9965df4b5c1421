"""loopalign.io: atomic writes keep the user's umask: files 0644 and folders 0755 under umask 022 (tempfile alone
would give 0600 / 0700, unreadable to a teammate on shared storage). And file_lock, the build lock, with real
processes: a second builder waits saying for whom, gives up naming the holder, a killed holder does not block,
and no lock file is left behind."""

import fcntl
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from loopalign.errors import LockTimeoutError
from loopalign.io import (
    atomic_save_safetensors,
    atomic_write_text,
    current_umask,
    ensure_built,
    file_lock,
    make_temp_dir,
)


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


# --- file_lock (the build lock of ensure_built: organisms, GGUF conversions), with real processes ---

REPO = Path(__file__).resolve().parents[1]

_LOCKER = textwrap.dedent(
    """
    import os, sys, time, types
    # loopalign.io and the two modules it imports (errors, log) need neither torch nor transformers: load them
    # without the package's __init__, which imports both (3-5 s a process); the module under test is the same file
    package = types.ModuleType("loopalign")
    package.__path__ = [os.path.join(os.environ["LOOPALIGN_REPO"], "loopalign")]
    sys.modules["loopalign"] = package
    from loopalign.io import file_lock
    from loopalign.log import enable_console

    enable_console()  # the waiter's messages on stdout
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "hold":  # hold the lock until the test closes stdin, then leave a mark and release
        with file_lock(path, 300, what="the holder's build", poll=0.05):
            print("HELD", flush=True)
            sys.stdin.read()
            open(sys.argv[3], "w").close()
    elif mode == "wait":  # wait for the holder; say whether it had finished when the lock came
        with file_lock(path, 300, what="the waiter's build", poll=0.05, report_every=2):
            print("HELD after the holder:", os.path.exists(sys.argv[3]), flush=True)
    elif mode == "contend":  # take the lock n times, writing in/out lines around each hold
        log, n = sys.argv[3], int(sys.argv[4])
        print("READY", flush=True)
        while not os.path.exists(log):
            time.sleep(0.01)
        for _ in range(n):
            with file_lock(path, 300, what="a contender's build", poll=0.002):
                with open(log, "a") as f:
                    f.write(f"in {os.getpid()}\\n")
                    f.flush()
                    time.sleep(0.002)
                    f.write(f"out {os.getpid()}\\n")
        print("DONE", flush=True)
    """
)


@pytest.fixture
def locker():
    """Start ``_LOCKER`` in another process (``locker(mode, *args)`` -> Popen, stdin/stdout pipes); every process
    still alive at the end (or after 600 s, so that a hang fails instead of blocking) is killed."""
    procs = []
    env = dict(os.environ, LOOPALIGN_REPO=str(REPO))

    def start(*args):
        proc = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, *map(str, args)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        return proc

    def kill_all():
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    watchdog = threading.Timer(600, kill_all)
    watchdog.start()
    try:
        yield start
    finally:
        watchdog.cancel()
        kill_all()
        for proc in procs:
            proc.wait()


def _read_until(proc, needle: str) -> list[str]:
    """The lines ``proc`` prints up to and including the first that contains ``needle`` (fails if it exits first)."""
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"the process ended (rc {proc.wait()}) before printing {needle!r}:\n" + "".join(lines)
        lines.append(line)
        if needle in line:
            return lines


def _holder_line(pid: int) -> str:
    return f"pid {pid} on {socket.gethostname()} since "


def test_file_lock_writes_its_holder_and_leaves_no_lock_file(tmp_path):
    path = tmp_path / "cache" / "organism-x.lock"
    with file_lock(path, timeout=5, what="a test build"):
        assert path.read_text().startswith(_holder_line(os.getpid()))
        assert _mode(path) == 0o666 & ~current_umask()  # a teammate's umask lets them read whom they wait for
    assert not path.exists()
    assert os.listdir(tmp_path / "cache") == []
    with file_lock(path, timeout=5, what="a test build"):  # and it can be taken again
        assert path.exists()
    assert os.listdir(tmp_path / "cache") == []


def test_a_complete_build_tidies_a_lock_file_left_behind(tmp_path):
    """A lock file that a killed build or an earlier loopalign left beside a complete folder goes on the next
    ensure_built; one that someone holds stays, and ensure_built does not wait for it."""
    out, lock = tmp_path / "organism", tmp_path / "organism.lock"
    out.mkdir()
    lock.write_text("pid 4242 on somehost since 2026-11-28 09:00:00")

    def build(path):
        raise AssertionError("a complete folder is not built again")

    assert ensure_built(out, lambda p: True, build, what="a test build") == str(out)
    assert not lock.exists()
    with open(lock, "a+") as held:  # another process's lock (flock is per open file, so this one counts)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write("pid 4242 on somehost since 2026-11-28 09:00:00")
        held.flush()
        start = time.monotonic()
        ensure_built(out, lambda p: True, build, what="a test build", lock_timeout=60)
        assert time.monotonic() - start < 30 and lock.read_text().startswith("pid 4242 on somehost")


def test_a_second_process_waits_for_the_holder_then_proceeds(tmp_path, locker):
    path, done = tmp_path / "build.lock", tmp_path / "holder-finished"
    holder = locker("hold", path, done)
    _read_until(holder, "HELD")
    waiter = locker("wait", path, done)
    # the waiter says whom it waits for (the holder's pid, host and start time) and for what
    lines = _read_until(waiter, "waiting for")
    assert _holder_line(holder.pid) in lines[-1] and "the waiter's build" in lines[-1] and str(path) in lines[-1]
    assert path.exists()
    holder.stdin.close()  # the holder finishes
    lines = _read_until(waiter, "HELD")
    assert lines[-1].strip() == "HELD after the holder: True", lines
    assert any(f"got the lock {path} after waiting" in line for line in lines), lines
    assert holder.wait(300) == 0 and waiter.wait(300) == 0
    assert os.listdir(tmp_path) == [done.name]  # neither left its lock file


def test_waiting_gives_up_naming_the_holder(tmp_path, locker, caplog):
    path, done = tmp_path / "build.lock", tmp_path / "holder-finished"
    holder = locker("hold", path, done)
    _read_until(holder, "HELD")
    caplog.set_level(logging.INFO, logger="loopalign")
    start = time.monotonic()
    with pytest.raises(LockTimeoutError) as raised:
        with file_lock(path, timeout=3.0, what="a test build", poll=0.05, report_every=0.25):
            pytest.fail("the lock was taken while another process held it")
    assert time.monotonic() - start >= 3.0
    message = str(raised.value)
    assert isinstance(raised.value, TimeoutError)
    for part in ("gave up after", str(path), _holder_line(holder.pid), "a test build", "LOOPALIGN_LOCK_TIMEOUT"):
        assert part in message, (part, message)
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(waits) >= 2 and all(_holder_line(holder.pid) in w for w in waits), waits  # at once, then again
    assert path.read_text().startswith(_holder_line(holder.pid))  # the waiter left the holder's file alone
    holder.stdin.close()
    assert holder.wait(300) == 0
    assert not path.exists()


def test_a_killed_holder_does_not_block_the_next(tmp_path, locker, caplog):
    path, done = tmp_path / "build.lock", tmp_path / "holder-finished"
    holder = locker("hold", path, done)
    _read_until(holder, "HELD")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(300) == -signal.SIGKILL
    assert path.read_text().startswith(_holder_line(holder.pid))  # a killed holder leaves its file (only then)
    caplog.set_level(logging.INFO, logger="loopalign")
    with file_lock(path, timeout=60, what="a test build", poll=0.05):
        assert path.read_text().startswith(_holder_line(os.getpid()))
    assert not [r for r in caplog.records if "waiting for" in r.getMessage()]  # the kernel freed it: no wait
    assert not path.exists()  # and the next holder removed the file the killed one left


def test_removing_the_lock_file_keeps_the_lock_exclusive(tmp_path, locker):
    """Each release unlinks the file that waiters may have open: contenders that lock the old file must notice
    and meet the others on the new one. Three processes take the lock many times; no two holds overlap."""
    path, log, n = tmp_path / "build.lock", tmp_path / "holds.log", 150
    procs = [locker("contend", path, log, n) for _ in range(3)]
    for proc in procs:
        _read_until(proc, "READY")
    log.touch()  # go
    for proc in procs:
        _read_until(proc, "DONE")
        assert proc.wait(300) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * 3 * n
    for i in range(0, len(lines), 2):
        pid = lines[i].split()[1]
        assert lines[i : i + 2] == [f"in {pid}", f"out {pid}"], f"two holds overlap at line {i}: {lines[i : i + 4]}"
    assert sorted(os.listdir(tmp_path)) == [log.name]
