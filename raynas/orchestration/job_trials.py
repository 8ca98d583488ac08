"""Independent jobs as Ray Tune trials: one grid point per job, its own CPUs/GPUs, errors collected per job.

``raynas prune`` (one trial per pruning target) and ``raynas quantize`` (one trial
per compression variant) both hand Tune a list of JSON-able job configs and a
trial function that runs one job in plain torch. Tune gives what a cluster needs:
trials placed by resources, run in parallel, a failed trial recorded while the
others go on. Skipping finished jobs is the caller's (each job knows its own
record), so a killed run resumes with only the unfinished ones.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable


def trial_resources(job: dict[str, Any], cpus: float, gpu_ids: list[Any]) -> dict[str, Any]:
    """The job's train fields with the device and thread count of the trial's own resources."""
    from raynas.orchestration.finetune_sweep import trial_device

    train = dict(job.get("train", {}))
    train["device"] = trial_device(train.get("device", "auto"), gpu_ids)
    train["threads"] = train.get("threads") or max(1, int(cpus))
    return {**job, "train": train}


def run_job_trials(name: str, trial: Callable[[dict[str, Any]], None], pending: list[dict[str, Any]],
                   out: Path, cpus_per_trial: float, gpus_per_trial: float,
                   max_concurrent_trials: int | None) -> dict[str, str]:
    """Run ``trial({"job": job, "cpus": cpus_per_trial})`` for every job; job name -> last error line of failures."""
    from ray import tune

    from raynas.orchestration.cluster import connect

    if not pending:
        return {}
    connect(log_to_driver=False)
    trainable = tune.with_resources(trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    space = {"job": tune.grid_search(pending), "cpus": cpus_per_trial}
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials),
                       run_config=tune.RunConfig(name=name, storage_path=str((out / "ray_results").resolve()),
                                                 verbose=1))
    errors = {}
    for result in tuner.fit():
        if result.error is not None:
            job_name = (result.config or {}).get("job", {}).get("name", "?")
            errors[job_name] = (str(result.error).strip().splitlines() or [""])[-1][:500]
    for job_name, line in errors.items():
        print(f"{name}: job {job_name} failed: {line}", file=sys.stderr, flush=True)
    return errors
