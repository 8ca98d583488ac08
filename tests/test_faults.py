"""The fault suite: each fault done for real to a real recipe, and what the recipe did about it (slow).

    python -m pytest -m slow tests/test_faults.py -s

Every test appends one row (fault, recipe, what happened, rows lost, rows duplicated,
time to detect) to ``$RAYNAS_FAULT_TABLE`` (default: a file in pytest's temp dir) and
prints it, so one run of this file gives the table of the reliability issue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import size_limited_tmpfs
from test_finetune import _bert_dir, _write_sst2

from raynas.training.checkpoints import checkpoint_bytes

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]


def record(fault: str, recipe: str, happened: str, lost: int | str, duplicated: int | str, detect_s: float | None,
           tmp_path_factory: pytest.TempPathFactory) -> None:
    row = {"fault": fault, "recipe": recipe, "what happened": happened, "rows lost": lost,
           "rows duplicated": duplicated, "time to detect": None if detect_s is None else round(detect_s, 1)}
    path = Path(os.environ.get("RAYNAS_FAULT_TABLE") or tmp_path_factory.getbasetemp() / "faults.jsonl")
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"\nFAULT ROW {json.dumps(row)}")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


# ---------------------------------------------------------------- a killed evaluate sweep


def _evaluate(tmp: Path, out: Path, log: Path) -> subprocess.Popen:
    """The same command for the same ``tmp`` every time (its models and data are made once)."""
    models = [tmp / f"m{i}" for i in range(2)]
    if not (tmp / "glue").is_dir():
        models = [_bert_dir(m, hidden=16, layers=1, seed=i) for i, m in enumerate(models)]
        _write_sst2(tmp / "glue", train=192, dev=32)
    models, data = [str(m) for m in models], tmp / "glue"
    cmd = [sys.executable, "-m", "recipes.evaluate", "--models", *models, "--tasks", "sst2", "--data-dir", str(data),
           "--out", str(out), "search.lr=[1.0e-3, 3.0e-3]", "search.seed=[1, 2]", "fixed.epochs=2",
           "fixed.batch_size=8", "fixed.max_seq_len=32", "latency.repeats=2", "latency.seq_len=32", "cpus_per_trial=1"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)


def _finished_trials(out: Path) -> int:
    """Trials whose last reported result carries ``final`` (Tune's per-trial result.json, one JSON per line)."""
    n = 0
    for path in (out / "ray_results").glob("finetune-sst2/*/result.json"):
        lines = path.read_text().strip().splitlines()
        n += bool(lines) and json.loads(lines[-1]).get("final") == 1
    return n


def test_a_killed_evaluate_sweep_reruns_into_its_finished_trials(tmp_path, tmp_path_factory):
    full_out, full_log = tmp_path / "full", tmp_path / "full.log"
    t0 = time.perf_counter()
    full = _evaluate(tmp_path / "a", full_out, full_log)
    assert full.wait(timeout=900) == 0, full_log.read_text()[-3000:]
    full_s = time.perf_counter() - t0

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _evaluate(tmp_path / "b", out, log)
    try:
        t0 = time.time()
        while _finished_trials(out) < 4:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 900, "no 4 finished trials"
            time.sleep(0.5)
        time.sleep(12)  # Tune saves its experiment state at least every 10 s: a trial it has not saved runs again
        finished = _finished_trials(out)  # 4 saved for sure; any finished during the wait maybe not
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert not (out / "trials.parquet").exists()
    time.sleep(5)
    log2 = tmp_path / "rerun.log"
    t0 = time.perf_counter()
    rerun = _evaluate(tmp_path / "b", out, log2)
    assert rerun.wait(timeout=900) == 0, log2.read_text()[-3000:]
    rerun_s = time.perf_counter() - t0
    text = log2.read_text()
    kept = int(text.split(" trial(s) finished earlier")[0].rsplit(" ", 1)[-1])
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 8 and trials["trial_id"].is_unique and set(trials["status"]) == {"ok"}
    assert 4 <= kept <= finished, (kept, finished)
    record("driver killed (SIGKILL, with its local Ray) after 4 of 8 trials", "raynas evaluate",
           f"rerun restored Tune's experiment: {kept} finished trial(s) kept, {8 - kept} run; 8 rows, each once; "
           f"rerun {rerun_s:.0f} s vs {full_s:.0f} s for the full sweep", 0, 0, None, tmp_path_factory)


# ---------------------------------------------------------------- raynas supernet: checkpoints, two writers, dead clusters


TINY = "recipes/configs/supernet-tiny.yaml"


def _supernet(out: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recipes.supernet", "--config", TINY, f"out={out}", "num_workers=1",
           "checkpoint_every=10", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env or _env(),
                            start_new_session=True)


def _wait_for(log: Path, needle: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    """Seconds until ``needle`` shows in ``log`` (or the process ended without it: a failure)."""
    t0 = time.perf_counter()
    while needle not in log.read_text(errors="replace"):
        assert proc.poll() is None or needle in log.read_text(errors="replace"), log.read_text()[-3000:]
        assert time.perf_counter() - t0 < timeout, f"no {needle!r} after {timeout} s"
        time.sleep(0.2)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny supernet run of 20 steps with checkpoints at 10 and 20 (and the size of one checkpoint)."""
    root = tmp_path_factory.mktemp("finished")
    out, log = root / "run", root / "log.txt"
    proc = _supernet(out, log, "steps=20", "eval_every=20")
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return out, checkpoint_bytes(out / "checkpoints" / "step-00000020")


def test_a_truncated_latest_checkpoint_resumes_from_the_previous(finished_run, tmp_path, tmp_path_factory):
    out, _ = finished_run
    student = out / "checkpoints" / "step-00000020" / "student.pt"
    with student.open("r+b") as f:
        f.truncate(student.stat().st_size // 2)
    log = tmp_path / "rerun.txt"
    proc = _supernet(out, log, "steps=30", "eval_every=30")
    detect = _wait_for(log, "incomplete or corrupt", proc)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resumed from step 10" in text and "resumed from step 20" not in text
    warning = next(line for line in text.splitlines() if "incomplete or corrupt" in line)
    assert "step-00000020" in warning and "resuming from step-00000010" in warning
    record("latest checkpoint truncated (student.pt of step 20 cut in half)", "raynas supernet (rerun, steps=30)",
           "one warning naming step-20 and its manifest; resumed from step 10, finished at 30; step-20 rewritten",
           "–", "–", detect, tmp_path_factory)


def test_a_full_disk_stops_the_run_with_the_previous_checkpoint_intact(finished_run, tmp_path, tmp_path_factory):
    _, size = finished_run
    out = tmp_path / "run"
    with size_limited_tmpfs(out / "checkpoints", size + 3 * 2**19) as ckpts:
        log = tmp_path / "log.txt"
        t0 = time.perf_counter()
        proc = _supernet(out, log, "steps=20", "eval_every=20", "max_failures=0")
        code = proc.wait(timeout=900)
        detect = time.perf_counter() - t0
        text = log.read_text()
        assert code == 2, text[-3000:]
        ours = [ln for ln in text.splitlines() if ln.startswith("raynas supernet: error:")]  # Ray logs its workers'
        assert len(ours) == 1, text[-3000:]  # tracebacks beside it; the command itself says one line, exit 2
        last = ours[0]
        assert "disk full writing checkpoint step-00000020" in last and "step-00000010 intact" in last, last
        assert sorted(p.name for p in ckpts.glob("*step-*")) == ["step-00000010"]
        assert (ckpts / "step-00000010" / "manifest.json").is_file()
    record("disk full while writing a checkpoint (OUT/checkpoints on a tmpfs with room for one)",
           "raynas supernet", f"exit 2, one line: {last.split('error: ')[-1]}; no step-20 or temp folder left",
           "–", "–", detect, tmp_path_factory)


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    first = _supernet(out, tmp_path / "first.txt", "steps=200", "eval_every=200")
    try:
        t0 = time.time()
        while not (out / ".raynas.lock").is_file():
            assert first.poll() is None and time.time() - t0 < 300, (tmp_path / "first.txt").read_text()[-3000:]
            time.sleep(0.2)
        log = tmp_path / "second.txt"
        t1 = time.perf_counter()
        second = _supernet(out, log, "steps=200", "eval_every=200")
        code = second.wait(timeout=300)
        detect = time.perf_counter() - t1
        lines = [ln for ln in log.read_text().strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "is in use by another raynas run" in lines[0], lines
        assert f"pid {first.pid}" in lines[0] or str(first.pid) in lines[0], (first.pid, lines[0])
        assert first.poll() is None  # the first run goes on untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    record("a second run started on the same out while the first runs", "raynas supernet",
           f"exit 2, one line naming the holder: {lines[0].split('error: ')[-1][:140]}", "–", "–", detect,
           tmp_path_factory)


def test_a_dead_cluster_address_is_one_line_in_seconds(tmp_path, tmp_path_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "log.txt"
    t0 = time.perf_counter()
    proc = _supernet(tmp_path / "run", log, "steps=20", env={**_env(), "RAY_ADDRESS": f"127.0.0.1:{port}"})
    code = proc.wait(timeout=300)
    detect = time.perf_counter() - t0
    lines = [ln for ln in log.read_text().strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], lines
    assert not (tmp_path / "run" / "corpus").exists()  # stopped before tokenizing
    record("RAY_ADDRESS names a cluster that is not there", "raynas supernet",
           f"exit 2, one line: {lines[0].split('error: ')[-1][:160]}", "–", "–", detect, tmp_path_factory)


def test_a_killed_ray_start_head_leaves_a_stale_address_that_costs_seconds(tmp_path, tmp_path_factory):
    import shutil
    import tempfile

    from test_cluster_connection import _pids_using, closed_port

    if not Path("/proc").is_dir() or shutil.which("ray") is None:
        pytest.skip("needs /proc and the ray CLI")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rn14f-", dir="/tmp"))  # its own address file: no other Ray touched
    env = {**_env(), "RAY_TMPDIR": str(ray_tmp)}
    port = closed_port()
    try:
        start = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stderr[-2000:]
    finally:
        for pid in _pids_using(str(ray_tmp)):  # kill -9, as an OOM kill would: no `ray stop`
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(3)
    log = tmp_path / "auto.txt"
    t0 = time.perf_counter()
    proc = _supernet(tmp_path / "a", log, "steps=2", env={**env, "RAY_ADDRESS": "auto"})
    code = proc.wait(timeout=300)
    detect = time.perf_counter() - t0
    lines = [ln for ln in log.read_text().strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "ray stop" in lines[0], lines
    record("`ray start --head` killed -9, then RAY_ADDRESS=auto (Ray's address file is stale)", "raynas supernet",
           f"exit 2, one line: {lines[0].split('error: ')[-1][:160]}", "–", "–", detect, tmp_path_factory)

    log = tmp_path / "local.txt"
    t0 = time.perf_counter()
    proc = _supernet(tmp_path / "b", log, "steps=2", "checkpoint_every=2", "eval_every=2", env=env)
    detect = _wait_for(log, "local Ray", proc)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    note = next(ln for ln in log.read_text().splitlines() if "local Ray" in ln)
    record("the same stale address file, no RAY_ADDRESS (a local run)", "raynas supernet",
           f"one note ({note.strip()[:120]}), then trained to the end on a local Ray", "–", "–", detect,
           tmp_path_factory)
    shutil.rmtree(ray_tmp, ignore_errors=True)
