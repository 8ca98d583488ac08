"""One writer per run folder (issue 14, point 4): OUT/.raynas.lock, refusal, stale takeover, release.

No Ray: the holders are plain subprocesses, so each test takes about a second.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raynas import run_lock as rl
from raynas.errors import ConfigError
from raynas.run_lock import LOCK_NAME, RunLock, check_run_lock, read_lock, run_lock
from raynas.stages import StageRun

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
TINY_TRAIN = str(ROOT / "recipes" / "configs" / "supernet-tiny.yaml")
HOLD = ("import sys; from raynas.run_lock import run_lock; lock = run_lock(sys.argv[1]).acquire(); "
        "print('held', flush=True); sys.stdin.readline()")


def holder(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until its stdin is closed (then exits normally)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def finish(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def fake_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": 999_999, "host": HOST, "command": "raynas supernet", "started": time.time() - 60,
              "boot_id": rl._boot_id(), "proc_start": None, "token": "t", **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def test_the_lock_names_its_holder_and_goes_with_the_block(tmp_path):
    out = tmp_path / "run"
    with run_lock(out) as lock:
        info = read_lock(out)
        assert lock.held and info is not None and (info.pid, info.host) == (os.getpid(), HOST)
        assert info.command and info.started <= time.time()
        with run_lock(out):  # nested stages of one process: the same folder again is fine
            pass
        assert (out / LOCK_NAME).is_file()  # the outer hold still stands
    assert not (out / LOCK_NAME).exists()


def test_a_lock_nobody_references_is_released(tmp_path):
    RunLock(tmp_path).acquire()  # dropped at once: collected, released
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_process_is_refused_naming_the_first_and_dry_runs_take_nothing(tmp_path):
    out = tmp_path / "run"
    proc = holder(out)
    try:
        with pytest.raises(ConfigError) as refused:
            run_lock(out).acquire()
        line = str(refused.value)
        assert f"pid {proc.pid}@{HOST}" in line and "in use by another raynas run" in line and "\n" not in line
        with pytest.raises(ConfigError, match=f"pid {proc.pid}@"):
            check_run_lock(out)  # what a dry run does: the same refusal
        stages = StageRun(out, ["a"])  # a StageRun recipe: its dry run (status) and its run are refused
        with pytest.raises(ConfigError, match=f"pid {proc.pid}@"):
            stages.status()
        with pytest.raises(ConfigError, match=f"pid {proc.pid}@"):
            stages.run("a", {"x": 1}, lambda: 1)
        assert not (out / "stages.json").exists()
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # still the first's
    finally:
        finish(proc)
    assert not (out / LOCK_NAME).exists()  # released when the holder exited
    assert StageRun(out, ["a"]).run("a", {"x": 1}, lambda: 1) == 1


def test_the_cli_refuses_a_held_folder_with_one_line_and_exit_2(tmp_path, capsys):
    from raynas.cli import main

    out = tmp_path / "run"
    proc = holder(out)
    try:
        assert main(["supernet", "--config", TINY_TRAIN, f"out={out}", "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another raynas run: pid {proc.pid}@{HOST}" in err[0]
    finally:
        finish(proc)


def test_the_stale_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "run"
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)  # no atexit, no finalizer: the lock stays
    proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    notes: list[str] = []
    with run_lock(out, say=notes.append):
        assert read_lock(out).pid == os.getpid()
    assert len(notes) == 1 and f"taking over a stale lock of pid {proc.pid}@{HOST}" in notes[0]
    assert f"pid {proc.pid} is gone" in notes[0]


@pytest.mark.parametrize("fields, reason", [
    ({"pid": os.getppid(), "proc_start": "1"}, "is now another process"),  # a reused pid
    ({"pid": os.getppid(), "boot_id": "another-boot"}, "rebooted"),
    ({"pid": 999_999}, "is gone"),
])
def test_reused_pids_and_reboots_are_stale(tmp_path, fields, reason):
    if reason == "is now another process" and rl._proc_stat(os.getppid()) is None:
        pytest.skip("no /proc: start times cannot be compared")
    if reason == "rebooted" and rl._boot_id() is None:
        pytest.skip("no boot id on this system")
    fake_lock(tmp_path, **fields)
    notes: list[str] = []
    with run_lock(tmp_path, say=notes.append):
        pass
    assert len(notes) == 1 and reason in notes[0]


def test_a_live_holder_on_this_host_is_respected(tmp_path):
    stat = rl._proc_stat(os.getppid())
    fake_lock(tmp_path, pid=os.getppid(), proc_start=stat[1] if stat else None)
    with pytest.raises(ConfigError, match=f"pid {os.getppid()}@{HOST}"):
        run_lock(tmp_path).acquire()


def test_another_hosts_lock_is_respected_until_it_stops_being_refreshed(tmp_path):
    path = fake_lock(tmp_path, host="node-7", pid=4242)
    with pytest.raises(ConfigError) as refused:
        run_lock(tmp_path).acquire()
    assert "pid 4242@node-7" in str(refused.value) and f"delete {path}" in str(refused.value)
    old = time.time() - rl.FOREIGN_STALE_S - 60
    os.utime(path, (old, old))
    notes: list[str] = []
    with run_lock(tmp_path, say=notes.append):
        pass
    assert len(notes) == 1 and "pid 4242@node-7" in notes[0] and "not refreshed for" in notes[0]


def test_an_unreadable_lock_is_waited_for_briefly_then_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")  # a holder between its create and its write
    with pytest.raises(ConfigError, match="being written"):
        run_lock(tmp_path).acquire()
    old = time.time() - rl.UNREADABLE_GRACE_S - 5
    os.utime(path, (old, old))
    notes: list[str] = []
    with run_lock(tmp_path, say=notes.append):
        pass
    assert len(notes) == 1 and "unreadable" in notes[0]


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "HEARTBEAT_S", 0.05)
    with run_lock(tmp_path) as lock:
        os.utime(lock.path, (0, 0))
        rl._WAKE.set()
        deadline = time.time() + 5
        while lock.path.stat().st_mtime == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.path.stat().st_mtime < 10


def test_a_folder_made_only_for_the_lock_goes_with_it(tmp_path):
    """Bad input found while the lock is held (a missing corpus file) leaves nothing behind; written work stays."""
    from raynas.run_lock import run_lock

    with run_lock(tmp_path / "a" / "out"):
        assert (tmp_path / "a" / "out" / ".raynas.lock").is_file()
    assert list(tmp_path.iterdir()) == []
    with run_lock(tmp_path / "b"):
        (tmp_path / "b" / "result.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["result.json"]
