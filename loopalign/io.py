"""Atomic file writes: a temporary file in the target's folder, then ``os.replace`` into place,
so a reader (or a resumed run) never sees a half-written file.

``tempfile`` creates its files 0600 and its folders 0700 whatever the umask; what lands here gets
the modes an ordinary ``open`` / ``mkdir`` would give (0644 / 0755 under the usual umask 022), so a
teammate on shared storage can read a run or the organism cache."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_save_safetensors",
    "current_umask",
    "make_temp_dir",
    "apply_umask",
    "apply_umask_tree",
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
