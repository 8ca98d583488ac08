"""One writer per run folder: ``OUT/.raynas.lock`` names the process that writes ``OUT``.

Two runs on one output folder (a rerun started while the first still trains, a
second terminal, a resubmitted job) would interleave checkpoints, Parquet rows
and stage records, and each would resume from the other's half-written state.
So every recipe that writes a run folder takes this lock first:

- the lock file is created with ``O_CREAT | O_EXCL`` (atomic on local and NFS v3+
  file systems) and holds the holder's pid, host, boot id, process start time,
  command and start time as JSON;
- a second process is refused with one line naming the holder
  (``pid 123@host``, its command, since when) -> :class:`ConfigError`, exit 2;
- a stale lock is taken over with one line on stderr: on this host, its pid is
  gone, a zombie, or now another process (start time differs), or the machine
  rebooted since (boot id differs); from another host, where the pid cannot be
  checked, once its holder stopped refreshing it (the holder touches the file
  every :data:`HEARTBEAT_S`; a lock older than :data:`FOREIGN_STALE_S` is stale);
- it is released when the holder is done: ``with run_lock(out)``, an explicit
  :meth:`RunLock.release`, the :class:`RunLock` being garbage-collected, or the
  interpreter exiting (``weakref.finalize`` runs at exit).

A process may take the same folder's lock again (nested stages): the registry
counts holds per folder and removes the file when the last one is released.
Dry runs use :func:`check_run_lock`, which refuses like a run would but takes
nothing. Pure python: no Ray, no torch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raynas.errors import ConfigError

LOCK_NAME = ".raynas.lock"
HEARTBEAT_S = 60.0  # how often a holder refreshes its lock file's mtime
FOREIGN_STALE_S = 15 * 60.0  # another host's lock not refreshed for this long is stale
UNREADABLE_GRACE_S = 10.0  # an empty / unparsable lock younger than this is still being written


def _boot_id() -> str | None:
    """This boot of this machine (Linux): a pid recorded in another boot is dead whatever its number."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of ``pid`` from ``/proc`` (Linux), else None.

    The start time tells a reused pid from the holder; the state tells a zombie (a
    killed holder its parent has not reaped yet) from a live one.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return False
    return True


def _command() -> str:
    """What the holder runs, for the refusal message: ``raynas supernet --config ...`` (at most 100 chars)."""
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name or "python"
    text = " ".join(argv)
    return text if len(text) <= 100 else text[:97] + "..."


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago"


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder (``mtime``: its last refresh)."""

    path: Path
    pid: int
    host: str
    command: str
    started: float
    boot_id: str | None
    proc_start: str | None
    token: str
    mtime: float

    @property
    def holder(self) -> str:
        return f"pid {self.pid}@{self.host}" if self.pid > 0 else "an unknown process"

    def describe(self) -> str:
        """``pid 123@host (raynas supernet ...) since 2026-01-02 03:04:05 (5 min ago)``."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        what = f" ({self.command})" if self.command else ""
        return f"{self.holder}{what} since {when} ({_ago(time.time() - self.started)})"


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder).expanduser().resolve() / LOCK_NAME


def read_lock(folder: str | os.PathLike) -> LockInfo | None:
    """The lock of ``folder``, or None when there is none. An unreadable file gives pid -1 (judged by age)."""
    path = lock_path(folder)
    try:
        mtime = path.stat().st_mtime
        raw: Any = json.loads(path.read_text() or "null")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raw = None
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
    if not isinstance(raw, dict):
        return LockInfo(path, -1, "?", "", mtime, None, None, "", mtime)
    try:
        return LockInfo(path, int(raw.get("pid", -1)), str(raw.get("host", "?")), str(raw.get("command", "")),
                        float(raw.get("started", mtime)), raw.get("boot_id"), raw.get("proc_start"),
                        str(raw.get("token", "")), mtime)
    except (TypeError, ValueError):
        return LockInfo(path, -1, "?", "", mtime, None, None, "", mtime)


def stale_reason(info: LockInfo, now: float | None = None) -> str | None:
    """Why ``info``'s holder is certainly gone (the lock may be taken over), or None while it may still run."""
    now = time.time() if now is None else now
    if info.pid <= 0:
        if now - info.mtime < UNREADABLE_GRACE_S:
            return None  # being written by a process that just created it
        return "the lock file is unreadable"
    if info.host != socket.gethostname():
        if now - info.mtime > FOREIGN_STALE_S:
            return f"not refreshed for {_ago(now - info.mtime).removesuffix(' ago')}"
        return None
    boot = _boot_id()
    if info.boot_id and boot and info.boot_id != boot:
        return "this machine rebooted since"
    if not _pid_alive(info.pid):
        return f"pid {info.pid} is gone"
    stat = _proc_stat(info.pid)
    if stat is not None:
        if stat[0] in ("Z", "X"):
            return f"pid {info.pid} was killed (a zombie)"
        if info.proc_start and stat[1] != info.proc_start:
            return f"pid {info.pid} is now another process"
    return None


def refusal(folder: str | os.PathLike, info: LockInfo) -> str:
    """The one line a second process gets."""
    text = (f"out {Path(folder)} is in use by another raynas run: {info.describe()}; wait for it to end or use "
            "another out folder")
    if info.pid > 0 and info.host != socket.gethostname():
        text += (f" (a run on another host: raynas cannot check its pid; its lock counts as stale once not refreshed "
                 f"for {FOREIGN_STALE_S / 60:.0f} min; if that run is gone, delete {info.path})")
    elif info.pid <= 0:
        text += f" (the lock file {info.path} is being written; if this persists, delete it)"
    return text


def check_run_lock(folder: str | os.PathLike) -> None:
    """Refuse, as a run would, a folder another live process holds; take nothing (dry runs, early checks)."""
    path = lock_path(folder)
    held = _HELD.get(path)
    if held is not None and held.pid == os.getpid():
        return
    info = read_lock(folder)
    if info is not None and stale_reason(info) is None:
        raise ConfigError(refusal(folder, info))


# ---------------------------------------------------------------- the holds of this process


@dataclass
class _Held:
    pid: int  # the process that took it (a forked child inherits the registry, not the lock)
    token: str
    count: int
    created: Path | None = None  # the topmost folder the lock had to create (removed again if left empty)


_HELD: dict[Path, _Held] = {}
_GUARD = threading.Lock()
_WAKE = threading.Event()
_heartbeat: threading.Thread | None = None


def _beat() -> None:
    """Refresh the mtime of every lock this process holds, so other hosts can tell a live holder from a dead one."""
    while True:
        _WAKE.wait(HEARTBEAT_S)
        _WAKE.clear()
        with _GUARD:
            paths = [p for p, h in _HELD.items() if h.pid == os.getpid()]
        for path in paths:
            try:
                os.utime(path)
            except OSError:
                pass


def _start_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is None or not _heartbeat.is_alive():
        _heartbeat = threading.Thread(target=_beat, name="raynas-run-lock-heartbeat", daemon=True)
        _heartbeat.start()


def _create(path: Path, token: str) -> bool:
    """Create the lock file atomically; False when one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    stat = _proc_stat(os.getpid())
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "started": time.time(),
              "boot_id": _boot_id(), "proc_start": stat[1] if stat else None, "token": token}
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(path: Path, info: LockInfo, reason: str, say: Any) -> None:
    """Remove the stale lock ``info`` unless another process replaced it meanwhile (a takeover mutex orders them)."""
    mutex = path.with_name(LOCK_NAME + ".takeover")
    deadline = time.time() + 30
    while True:
        try:
            os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            try:
                if time.time() - mutex.stat().st_mtime > 30:  # its taker died mid-takeover (milliseconds of work)
                    mutex.unlink(missing_ok=True)
                    continue
            except OSError:
                continue
            if time.time() > deadline:
                raise ConfigError(f"{mutex}: another process is taking over {path}; retry, or delete both files "
                                  "if no raynas run uses the folder") from None
            time.sleep(0.1)
    try:
        now = read_lock(path.parent)
        if now is not None and now.token == info.token and now.pid == info.pid and stale_reason(now) is not None:
            path.unlink(missing_ok=True)
            say(f"raynas: {path}: taking over a stale lock of {info.describe()}: {reason}")
    finally:
        mutex.unlink(missing_ok=True)


def _release(path: Path, pid: int) -> None:
    """Drop one hold of ``path`` by process ``pid``; the last one removes the file if it is still ours."""
    with _GUARD:
        held = _HELD.get(path)
        if held is None or held.pid != pid or os.getpid() != pid:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[path]
    info = read_lock(path.parent)
    if info is not None and info.token == held.token:
        try:
            path.unlink()
        except OSError:
            pass
    folder = path.parent  # a run stopped by bad input before writing: the folders made for the lock go again
    while held.created is not None and folder.is_relative_to(held.created):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break
        folder = folder.parent


class RunLock:
    """A hold of ``OUT/.raynas.lock``: ``with RunLock(out):`` or ``acquire()`` / ``release()``.

    Released at the latest when the object is collected or the interpreter exits,
    so a recipe that stores it (a :class:`~raynas.stages.StageRun`) holds the
    folder exactly as long as it can write there.
    """

    def __init__(self, folder: str | os.PathLike, say: Any = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.path = self.folder / LOCK_NAME
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> RunLock:
        """Take the lock (again, if this process holds it already); :class:`ConfigError` naming a live holder."""
        if self.held:
            return self
        pid = os.getpid()
        with _GUARD:
            held = _HELD.get(self.path)
            if held is not None and held.pid == pid:
                held.count += 1
                self._finalizer = weakref.finalize(self, _release, self.path, pid)
                return self
        created = None
        probe = self.folder
        while not probe.exists() and probe.parent != probe:
            created, probe = probe, probe.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        for _ in range(20):
            if _create(self.path, token):
                with _GUARD:
                    _HELD[self.path] = _Held(pid, token, 1, created)
                self._finalizer = weakref.finalize(self, _release, self.path, pid)
                _start_heartbeat()
                return self
            info = read_lock(self.folder)
            if info is None:
                continue  # released between our create and our read: try again
            reason = stale_reason(info)
            if reason is None:
                raise ConfigError(refusal(self.folder, info))
            _take_over(self.path, info, reason, self.say)
        raise ConfigError(f"{self.path}: the lock kept changing hands; retry, or check which processes use "
                          f"{self.folder}")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _release once; later calls (and collection, exit) do nothing

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_lock(folder: str | os.PathLike, say: Any = None) -> RunLock:
    """``with run_lock(out):`` -- hold ``out``'s lock for the block (see the module docstring)."""
    return RunLock(folder, say)
