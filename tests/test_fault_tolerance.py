"""Fault tolerance of ``raynas supernet`` on the shipped tiny config (slow: about 4 minutes on 2 CPUs).

1. Kill one Ray Train worker process mid-run: FailureConfig restarts the worker
   group from the last checkpoint and the run finishes.
2. Kill the driver (and its local Ray) mid-run: rerunning the same command
   resumes from the last checkpoint instead of step 0.

    python -m pytest -m slow tests/test_fault_tolerance.py -s
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.deepspeed]
ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 200, 40


def _start(out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recipes.supernet", "--config", "recipes/configs/supernet-tiny.yaml",
           f"out={out}", f"steps={STEPS}", f"checkpoint_every={EVERY}", f"eval_every={STEPS}", "max_failures=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    state = out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json"
    t0 = time.time()
    while not state.exists():
        assert proc.poll() is None, "training exited before its first checkpoint"
        assert time.time() - t0 < timeout, f"no checkpoint {state} after {timeout} s"
        time.sleep(1)
    # A checkpoint counts once Ray's controller has taken the report (it polls every 2 s); a worker killed
    # before that loses it and the run restarts from the one before. Give it a few polls.
    time.sleep(8)


def _worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _checkpointed_steps(out: Path) -> list[int]:
    """Steps whose checkpoint folder is complete (its state file written last)."""
    folders = (out / "checkpoints").glob("step-*/trainer_state.json")
    return sorted(int(p.parent.name.split("-")[1]) for p in folders)


def _assert_resumed(text: str, metrics: dict, latest: int) -> int:
    """One resume, from the last checkpoint Ray had taken when the run was killed: ``latest`` (the newest
    folder on disk then) or, if Ray had not taken that one's report yet, the one before it."""
    resumed = {int(s) for s in re.findall(r"resumed from step (\d+)", text)}  # rank 0's line
    assert len(resumed) == 1, (resumed, text[-3000:])
    (step,) = resumed
    assert step in {latest, latest - EVERY} and step >= EVERY and step % EVERY == 0, (step, latest)
    assert metrics["step"] == STEPS and metrics["start_step"] == step
    return step


def _final_metrics(log: str) -> dict:
    blob = log[log.rindex("{\n"): log.rindex("}") + 1]  # the recipe prints the last metrics as indented JSON
    return json.loads(blob)


def test_killed_worker_resumes_from_checkpoint(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(out, log)
    try:
        _wait_for_checkpoint(out, EVERY, proc)
        pids = _worker_pids()
        assert pids, "no Ray Train worker process found"
        latest = _checkpointed_steps(out)[-1]
        os.kill(pids[-1], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    metrics = _final_metrics(text)
    step = _assert_resumed(text, metrics, latest)
    assert (out / "supernet" / "supernet.json").exists()
    print(f"worker killed after step {latest}: resumed from step {step}, finished at {metrics['step']}")


def test_killed_driver_rerun_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(out, log)
    try:
        _wait_for_checkpoint(out, EVERY, proc)
        latest = _checkpointed_steps(out)[-1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    time.sleep(5)
    log2 = tmp_path / "log2.txt"
    rerun = _start(out, log2)
    assert rerun.wait(timeout=600) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    step = _assert_resumed(text, _final_metrics(text), latest)
    print(f"driver killed after step {latest}: the rerun resumed from step {step}")
