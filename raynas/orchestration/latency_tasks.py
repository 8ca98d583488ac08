"""Latency measurements as Ray tasks, on the node type a model will be deployed to.

A latency predictor is only as good as the hardware it was measured on: on a
cluster, the chunks of :func:`raynas.search.latency_data.run_job` must run on
the node type users deploy to, not wherever the driver happens to be. Two ways
to say which, usable together:

* ``resources={"inference_node": 1}``: a Ray custom resource that only those
  nodes declare (``ray start --resources='{"inference_node": 4}'``);
* ``label_selector={"ray.io/node-group": "cpu-inference"}``: node labels
  (Ray >= 2.49, ``ray start --labels=...`` or KubeRay's ``labels``; Ray sets
  defaults such as ``ray.io/node-id``, ``ray.io/accelerator-type``). Values may
  be operators as Ray's label selector allows (``"in(a,b)"``, ``"!x"``).

Each task asks for ``num_cpus = threads`` (the timing uses that many torch
threads), and at most ``concurrency`` tasks are in flight (default 1: two
measurements on one small machine would time each other's contention). This
module is the thin adapter: the measuring itself is pure torch.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence

import ray

from raynas.search.latency_data import LatencyConfig, MeasureJob, Row, Runner, run_job


@ray.remote(max_retries=2)
def _measure_chunk(job: MeasureJob) -> list[Row]:
    """One chunk, timed in a Ray worker on the node the options chose."""
    return run_job(job)


def ensure_ray() -> None:
    """A local Ray, or the cluster at ``RAY_ADDRESS`` (``ray job submit`` sets it), unless one is running
    (:func:`raynas.orchestration.cluster.connect`: a dead address is one line, not a hang)."""
    from raynas.orchestration.cluster import connect

    connect(log_to_driver=True)


def task_options(threads: int, resources: dict[str, float] | None = None,
                 label_selector: dict[str, str] | None = None) -> dict[str, Any]:
    """``.options(...)`` for a measurement task: CPUs for its threads, and where it may run."""
    options: dict[str, Any] = {"num_cpus": threads}
    if resources:
        options["resources"] = dict(resources)
    if label_selector:
        options["label_selector"] = dict(label_selector)
    return options


def _warn_unknown_resources(resources: dict[str, float] | None) -> None:
    """A resource no node has makes the task wait forever on a fixed cluster; say so instead of hanging silently."""
    missing = sorted(set(resources or {}) - set(ray.cluster_resources()))
    if missing:
        print(f"latency: warning: no node has resource(s) {missing} yet; tasks wait until one joins "
              f"(autoscaler) — check resources in the config", file=sys.stderr, flush=True)


def ray_runner(threads: int = 1, concurrency: int = 1, resources: dict[str, float] | None = None,
               label_selector: dict[str, str] | None = None) -> Runner:
    """A ``runner`` for :func:`build_latency_predictor`: each job a Ray task, results yielded as they finish.

    Ray is started (or joined) on the first call, not here, so every check of
    the inputs happens before Ray starts.
    """
    options = task_options(threads, resources, label_selector)

    def run(jobs: Sequence[MeasureJob]) -> Iterator[tuple[MeasureJob, list[Row]]]:
        if not jobs:
            return
        ensure_ray()
        _warn_unknown_resources(resources)
        remote = _measure_chunk.options(**options)
        queue, pending = list(jobs), {}
        while queue or pending:
            while queue and len(pending) < concurrency:
                job = queue.pop(0)
                pending[remote.remote(job)] = job
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])

    return run


def runner_from_config(cfg: LatencyConfig) -> Runner:
    """The Ray runner a :class:`LatencyConfig` describes (threads, concurrency, resources, label selector)."""
    return ray_runner(cfg.threads, cfg.concurrency, cfg.resources, cfg.label_selector)
