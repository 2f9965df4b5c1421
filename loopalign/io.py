"""Atomic file writes: a temporary file in the target's folder, then ``os.replace`` into place,
so a reader (or a resumed run) never sees a half-written file; atomic folder builds
(:func:`atomic_folder`: a temporary sibling folder renamed into place at the end). And two locks, each on
``flock`` (released by the kernel when its holder dies) and each removing its lock file on release:
:func:`folder_lock`, which keeps two writers out of one output folder (each file would be whole, but
the folder a mix of both runs), and :func:`file_lock` (on :mod:`filelock`), which makes a second builder
wait for the first (the organism caches, GGUF conversions).

``tempfile`` creates its files 0600 and its folders 0700 whatever the umask; what lands here gets
the modes an ordinary ``open`` / ``mkdir`` would give (0644 / 0755 under the usual umask 022), so a
teammate on shared storage can read a run or the organism cache."""

from __future__ import annotations

import contextlib
import fcntl  # POSIX: the locks use flock
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import filelock

from loopalign.errors import LockError, LockTimeoutError
from loopalign.log import get_logger

logger = get_logger(__name__)

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_save_safetensors",
    "current_umask",
    "make_temp_dir",
    "apply_umask",
    "apply_umask_tree",
    "folder_lock",
    "FolderLockedError",
    "FOLDER_LOCK_NAME",
    "DEFAULT_LOCK_TIMEOUT",
    "atomic_folder",
    "file_lock",
    "lock_timeout_from_env",
    "swap_into_place",
    "remove_stale_builds",
    "ensure_built",
]


def current_umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, folder: bool | None = None, umask: int | None = None) -> None:
    """Give ``path`` the mode a plain ``open`` (0666) or ``mkdir`` (0777) would, less the umask
    (``umask``: the process umask when None)."""
    folder = os.path.isdir(path) if folder is None else folder
    umask = current_umask() if umask is None else umask
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def apply_umask_tree(root: str | os.PathLike) -> None:
    """:func:`apply_umask` on ``root`` and everything under it (links are left alone). For folders
    that other libraries wrote into: transformers' ``save_pretrained`` writes its safetensors 0600."""
    umask = current_umask()
    apply_umask(root, folder=True, umask=umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                apply_umask(path, folder=name in dirs, umask=umask)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> str:
    """``tempfile.mkdtemp`` in ``parent`` (for a build renamed into place later), with the umask's mode."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    apply_umask(tmp, folder=True)
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (same suffix), then move it into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp, folder=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """Save ``{name: tensor}`` as safetensors atomically (tensors are copied to contiguous CPU memory)."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))


#: the lock file :func:`folder_lock` keeps inside the folder it guards
FOLDER_LOCK_NAME = ".loopalign-write.lock"


class FolderLockedError(LockError):
    """Another writer (process, or thread of this process) holds the folder's :func:`folder_lock`."""


#: folders this process holds: real path -> [owning thread id, nesting depth]
_HELD_FOLDERS: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "a writer") -> Iterator[str]:
    """An exclusive lock on the output folder ``folder`` (created if missing) while the body writes
    into it: ``fcntl.flock`` on ``folder/.loopalign-write.lock`` (the kernel releases it if the holder
    dies, so no stale lock outlives a killed run). The holder writes its pid, host, start time and
    ``what`` into the file. A second writer fails at once with :class:`FolderLockedError` naming the
    folder and the holder; it does not wait (the two would write the same files: the last one wins).
    Re-entrant within one thread (``evaluate_gap`` holds it while ``save_gap`` takes it again).
    -> the folder's absolute path."""
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    key, me = os.path.realpath(folder), threading.get_ident()
    with _HELD_GUARD:
        held = _HELD_FOLDERS.get(key)
        if held is not None and held[0] != me:
            raise FolderLockedError(
                f"the output folder {folder} is being written by another thread of this process "
                f"(pid {os.getpid()}); choose another output folder"
            )
        if held is not None:
            held[1] += 1
    if held is not None:  # re-entered by the holder
        try:
            yield folder
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    path = os.path.join(folder, FOLDER_LOCK_NAME)
    with _open_locked(path, folder) as f:
        with _HELD_GUARD:
            _HELD_FOLDERS[key] = [me, 1]
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({what})")
            f.flush()
            yield folder
        finally:
            with _HELD_GUARD:
                _HELD_FOLDERS.pop(key, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # no lock file is left behind; a waiter on the old inode retries (_open_locked)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _open_locked(path: str, folder: str):
    """The lock file at ``path``, opened and exclusively flocked (not waiting): FolderLockedError naming the holder
    when another writer has it. A file the holder unlinked on release while this one was locking it is not the
    lock any more (another writer may have made a new one), so it is opened again."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FolderLockedError(
                f"the output folder {folder} is being written by {holder} (lock {path}): two runs writing one "
                "folder overwrite each other's files. Wait for that run to finish, or choose another output "
                "folder; a killed run releases the lock by itself."
            ) from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()


def swap_into_place(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` to ``out``, replacing an existing ``out`` (restored if the rename fails)."""
    tmp, out = os.fspath(tmp), os.fspath(out)
    if os.path.exists(out):
        old = make_temp_dir(os.path.dirname(os.path.abspath(out)), prefix=f".{os.path.basename(out)}.old-")
        os.rename(out, os.path.join(old, "previous"))
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(os.path.join(old, "previous"), out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, prefix: str | None = None) -> Iterator[str]:
    """Build the folder ``out`` atomically: the body writes into the yielded temporary sibling folder, which
    replaces ``out`` when the body returns (umask modes applied to the tree) and is removed if it raises, so an
    interrupted build leaves neither a half folder nor a damaged old one. ``prefix``: the temporary folder's name
    prefix (default ``.<name>.tmp-``), so a later build can find and remove the leftovers of a killed one."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, prefix=prefix or f".{os.path.basename(out)}.tmp-")
    try:
        yield tmp
        apply_umask_tree(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_builds(out: str | os.PathLike, prefix: str | None = None) -> None:
    """Remove the temporary sibling folders that killed :func:`atomic_folder` builds of ``out`` left (``prefix``:
    the one the builds used; call it while holding the build's lock, so no live build is removed)."""
    out = os.path.abspath(os.fspath(out))
    prefix = prefix or f".{os.path.basename(out)}.tmp-"
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        return
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


#: seconds a process waits for another's build before giving up (``$LOOPALIGN_LOCK_TIMEOUT``)
DEFAULT_LOCK_TIMEOUT = 3600.0


def lock_timeout_from_env() -> float:
    """``$LOOPALIGN_LOCK_TIMEOUT`` (seconds, > 0) when set, else :data:`DEFAULT_LOCK_TIMEOUT`."""
    value = os.environ.get("LOOPALIGN_LOCK_TIMEOUT")
    if value is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"LOOPALIGN_LOCK_TIMEOUT must be a number of seconds > 0, got {value!r}")
    return timeout


def _read_holder(path: str) -> str:
    """Who holds the lock file ``path``, as its holder wrote it ("pid N on HOST since T"), else "another process"."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "another process"
    except OSError:  # released (and removed) since, or unreadable
        return "another process"


def _write_holder(path: str) -> tuple[int, int] | None:
    """Write this process's pid, host and the time into the lock file ``path`` (which it holds)
    -> the file's (device, inode), so that the release removes that file and no other."""
    try:
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
            st = os.fstat(f.fileno())
    except OSError:  # the holder information is for messages only; the lock holds without it
        return None
    return st.st_dev, st.st_ino


def _remove_lock_file(path: str, identity: tuple[int, int] | None) -> None:
    """Unlink the lock file ``path`` if it is still the file this holder wrote (``identity``: device, inode)."""
    if identity is None:
        return
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)


def _remove_stale_lock_file(path: str) -> None:
    """Remove the lock file ``path`` that a killed holder (or an earlier loopalign, whose lock kept its file) left
    beside a complete build, if no one holds it (one try, no wait); a held lock, or one this process may not
    open, stays."""
    if not os.path.exists(path):
        return
    lock = filelock.FileLock(path, fallback_to_soft=False)
    try:
        lock.acquire(blocking=False)
    except (filelock.Timeout, OSError):
        return
    try:
        st = os.stat(path)
        _remove_lock_file(path, (st.st_dev, st.st_ino))
    except OSError:
        pass
    finally:
        lock.release()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float, what: str, poll: float = 0.5, report_every: float = 60.0):
    """An exclusive lock on the file ``path`` that waits: :class:`filelock.FileLock` (``fcntl.flock``; the kernel
    releases it if the holder dies, so a killed build never leaves a lock that blocks). The holder writes its pid,
    host and start time into the file; a waiter prints whom it waits for and for what (``what``), at once and again
    every ``report_every`` seconds (trying every ``poll`` seconds), and raises
    :class:`~loopalign.errors.LockTimeoutError` (a ``TimeoutError``) naming the lock and its holder after
    ``timeout`` seconds.

    No lock file is left behind: the holder removes it on release, before it unlocks (filelock's own release keeps
    it). That is safe for a waiter that opened the old file and locks it once released: filelock checks that the
    file it locked still has a name (``st_nlink`` > 0) and else opens the path again, so all contenders meet on
    one file (every contender must check this; filelock >= 3.30 does). Only a holder killed with SIGKILL leaves
    the file, with its pid in it; it does not block, and the next holder removes it."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # fallback_to_soft=False: on a file system without flock, fail (OSError) rather than fall back to a lock
    # file whose mere existence is the lock, which a killed holder would leave blocking
    lock = filelock.FileLock(path, fallback_to_soft=False)
    start = time.monotonic()
    next_report = 0.0
    waited_for = None
    while True:
        waited = time.monotonic() - start
        try:  # wait until the next report is due (or the timeout); the first try does not wait
            lock.acquire(timeout=max(0.0, min(next_report, timeout) - waited), poll_interval=poll)
            break
        except filelock.Timeout:
            waited = time.monotonic() - start
            holder = _read_holder(path)
            if waited >= timeout:
                raise LockTimeoutError(
                    f"gave up after {waited:.0f} s waiting for the lock {path}, held by {holder}, while it "
                    f"builds {what}. Wait longer with LOOPALIGN_LOCK_TIMEOUT=<seconds> (or lock_timeout=), "
                    "or stop that process; a killed build releases the lock by itself."
                ) from None
            if waited >= next_report:
                logger.info(
                    f"waiting for {holder} to finish building {what} (lock {path}; waited {waited:.0f} s, "
                    f"giving up after {timeout:g} s)",
                )
                waited_for = holder
                while next_report <= waited:
                    next_report += max(report_every, poll, 0.01)
    try:
        if waited_for is not None:
            logger.info(f"got the lock {path} after waiting {time.monotonic() - start:.0f} s for {waited_for}")
        identity = _write_holder(path)
        try:
            yield
        finally:
            _remove_lock_file(path, identity)  # before unlocking: see above
    finally:
        lock.release()


def ensure_built(
    path: str | os.PathLike,
    is_complete: Callable[[str], bool],
    build: Callable[[str], object],
    what: str,
    force: bool = False,
    lock_timeout: float | None = None,
    prefix: str | None = None,
) -> str:
    """The folder ``path``, built with ``build(path)`` first when ``is_complete(path)`` is False (or ``force``),
    under a lock beside it (:func:`file_lock` on ``<path>.lock``, which it removes on release): two processes
    asking at once build it once, the second waits (saying for whom), then finds it complete. ``build`` must write
    atomically (:func:`atomic_folder` with ``prefix``, whose leftovers from killed builds are removed first).
    Waiting gives up after ``lock_timeout`` seconds (default ``$LOOPALIGN_LOCK_TIMEOUT``) with a ``TimeoutError``.
    -> ``path``."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if is_complete(path) and not force:
        _remove_stale_lock_file(f"{path}.lock")
        return path
    timeout = lock_timeout_from_env() if lock_timeout is None else float(lock_timeout)
    if not timeout > 0:
        raise ValueError(f"lock_timeout must be > 0 seconds, got {lock_timeout!r}")
    with file_lock(f"{path}.lock", timeout, what=what):
        if force or not is_complete(path):  # another process may have built it while we waited
            remove_stale_builds(path, prefix=prefix)
            build(path)
    return path
