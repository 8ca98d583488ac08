"""Atomic writes: build under a temporary name beside the target, then rename.

A crash, a full disk or Ctrl-C never leaves a half-written model folder,
supernet or table where a finished one is expected, so a rerun is always safe.
The written bytes are fsync'd before the rename and the rename itself after it
(``durable``, the default): without that a power cut or a kernel crash soon
after a "finished" write can leave the new name pointing at an empty or short
file on ext4 / xfs, which is exactly the truncated checkpoint a resume must
not load.

``tempfile`` creates its folders 0700 and files 0600 (private while being built);
the renamed result gets the modes a plain ``mkdir`` / ``open`` would have given
under the process umask, so on a shared cluster filesystem others can load it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from raynas.errors import ConfigError


def check_writable(path: str | os.PathLike, field: str = "out") -> Path:
    """Refuse, with one line naming ``field``, an output location that cannot be created; create nothing.

    Every recipe calls this before any work (tokenizing a corpus, training), so a
    typo'd or read-only ``out`` costs a second, not an hour, and leaves nothing
    half-written: the first existing ancestor must be a folder this process can write in.
    """
    out = Path(path).expanduser()
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == out else "is inside"
        raise ConfigError(f"{field}: {out} {where} a file ({probe}), not a folder")
    if out.exists() and out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: cannot write to {out} (permission denied or read-only)")
    if not out.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: cannot create {out}: {probe} is not writable (permission denied or read-only)")
    try:  # access() says yes to root and on some read-only file systems (sysfs): try, and take it back at once
        os.rmdir(tempfile.mkdtemp(prefix=".raynas-probe-", dir=probe))
    except OSError as exc:
        what = f"write to {out}" if probe == out else f"create {out}"
        raise ConfigError(f"{field}: cannot {what}: {exc.strerror or exc} in {probe}") from None
    return out


def umask_modes() -> tuple[int, int]:
    """(folder mode, file mode) that ``mkdir`` / ``open`` give under the current umask (e.g. 0o755, 0o644)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask, 0o666 & ~mask


def publish_dir(tmp: Path) -> None:
    """Give a ``mkdtemp`` folder, and everything written into it, the umask-based modes of ordinary files.

    Before it is renamed into place. Not only the folder: safetensors writes ``model.safetensors`` 0600
    whatever the umask, so on a shared file system nobody else could load an exported model.
    """
    folder_mode, file_mode = umask_modes()
    for root, _, files in os.walk(tmp):
        os.chmod(root, folder_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, file_mode | (folder_mode & 0o111 if executable else 0))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file's or folder's data and metadata to the device (a folder: its entries, i.e. renames).

    Works on a read-only descriptor, so it also flushes files other code wrote (torch, DeepSpeed, safetensors).
    """
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file, then every folder (deepest first), under ``root``, ``root`` last."""
    folders = []
    for here, _, files in os.walk(root):
        folders.append(here)
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                fsync_path(path)
    for here in reversed(folders):
        fsync_path(here)


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or replaced atomically), fsync'd and its rename fsync'd."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path``, on failure it is removed.

    ``durable``: fsync the folder's files before the rename and the parent after it.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists (use --overwrite / overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp)
        if durable:
            fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        if durable:
            fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path``.

    ``durable``: fsync the file before the rename and the folder after it.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_modes()[1])
        if durable:
            fsync_path(tmp)
        os.replace(tmp, out)
        if durable:
            fsync_path(out.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
