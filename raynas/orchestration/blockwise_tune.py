"""Ray Tune adapter for NAS-BERT's block-wise training with bin-wise progressive shrinking.

The decisions are pure (:class:`raynas.blockwise.shrinking.ShrinkState`); this
module only runs them on Ray Tune:

- One Tune trial is one *stage of one block*: train block ``k`` up to the
  stage's step on its surviving paths (one random path per step), then score
  every survivor on the held-out teacher pairs and report the scores. Each
  trial is its own Ray actor with its own resources (``cpus_per_block``,
  ``gpus_per_block``, or per-block overrides), so the K blocks are K
  independent actor groups training concurrently.
- :class:`ShrinkingSearcher` (a ``ray.tune.search.Searcher``: only searchers
  create trials) is the progressive-shrinking schedule. When a block's stage
  completes it drops the worse fraction of every bin and suggests that
  block's next stage on the survivors only; blocks advance independently, so
  a slow block never holds the others. Tune does not checkpoint a searcher's
  state during a run, so the searcher saves the shrinking state itself
  (``RUN/blocks/shrink_state.json``, atomically) after every decision, and the
  stage rows (``RUN/blocks/stages.parquet``) before it: a killed driver
  reruns into the same state, and a stage that was scored but not yet
  recorded is simply scored again (same checkpoint, same scores).
- Each block checkpoints its own weights and optimizer
  (``RUN/blocks/block-K/checkpoint.pt``, atomically) every
  ``checkpoint_every`` steps and at the end of each stage's training. A
  failed trial is retried by Tune (``max_failures``) from that block's
  checkpoint; the other blocks do not restart.

``RUN`` must be on storage every node sees (as for any Ray Train run).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch
from ray.tune.search import Searcher

from raynas.atomic_io import atomic_file
from raynas.blockwise.shrinking import STAGES_SCHEMA, ShrinkConfig, ShrinkState, stages_to_finish
from raynas.errors import ConfigError
from raynas.stages import clock
from raynas.tables import to_table, write_parquet

Say = Callable[[str], None]
STATE_FILE, STAGES_FILE, CHECKPOINT = "shrink_state.json", "stages.parquet", "checkpoint.pt"
FAULT_ENV = "RAYNAS_FAULT_BLOCK"  # "K:STEP": block K's first attempt exits its process at STEP (fault tests)
#: the shrinking's rows plus what the trial that scored them reports
ROWS_SCHEMA = pa.schema([*STAGES_SCHEMA, ("trial_id", pa.string()), ("train_loss", pa.float64()), ("step", pa.int64()),
                         ("start_step", pa.int64())])  # where the scoring attempt's training began (a resume: mid-stage)


@dataclass
class BlockTrainConfig:
    """How every block trains (the teacher pairs and the shrinking schedule are configured elsewhere)."""

    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    batch_size: int = 16
    score_batch_size: int = 32
    checkpoint_every: int = 20
    log_every: int = 50  # a progress line per block every N steps (0: one line per stage, from the driver)
    cpus_per_block: float = 1.0
    gpus_per_block: float = 0.0
    block_resources: dict[str, dict[str, float]] = field(default_factory=dict)  # "K" -> {"cpu": .., "gpu": ..}
    device: str = "auto"  # auto: cuda when Ray gave the block a GPU
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu | fp32 | bf16 (cuda only)
    max_failures: int = 2  # Tune retries of a failed block stage, from the block's checkpoint
    seed: int = 0

    def __post_init__(self) -> None:
        from raynas.config_loading import FieldErrors

        problems = []
        for name in ("lr", "batch_size", "score_batch_size", "cpus_per_block"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "log_every", "max_failures"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision: expected auto, fp32 or bf16, got {self.precision!r}")
        if problems:
            raise FieldErrors(problems)

    def resources(self, block: int) -> dict[str, float]:
        over = self.block_resources.get(str(block), {})
        return {"cpu": float(over.get("cpu", self.cpus_per_block)), "gpu": float(over.get("gpu", self.gpus_per_block))}


def total_steps(cfg: ShrinkConfig) -> int:
    """Training steps of the longest possible block schedule: a full bin of ``candidates_per_bin`` paths.

    A function of the config alone, so the learning-rate schedule of a block
    resumed by a rerun is the one it started with.
    """
    return stage_end_step(max(1, stages_to_finish(cfg.candidates_per_bin, cfg)) - 1, cfg)


def stage_end_step(stage: int, cfg: ShrinkConfig) -> int:
    """The training step block training reaches before stage ``stage`` is scored."""
    return cfg.warmup_steps + (stage + 1) * cfg.steps_per_stage


# ---------------------------------------------------------------- the schedule (runs in the driver)


class ShrinkingSearcher(Searcher):
    """Bin-wise progressive shrinking as a Tune searcher over (block, stage) trials; see the module docstring."""

    def __init__(self, state: ShrinkState, cfg: ShrinkConfig, params_of: Callable[[tuple[str, ...]], int],
                 out: Path, say: Say) -> None:
        super().__init__(metric="best_loss", mode="min")
        self.state, self.cfg, self.params_of, self.out, self.say = state, cfg, params_of, out, say
        self.in_flight: dict[str, int] = {}
        self.failed: set[int] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        busy = set(self.in_flight.values())
        todo = [k for k, b in sorted(self.state.blocks.items()) if not b.finished and k not in self.failed]
        if not todo:
            return Searcher.FINISHED
        for k in todo:
            if k not in busy:
                b = self.state.blocks[k]
                self.in_flight[trial_id] = k
                return {"block": k, "stage": b.stage, "until": stage_end_step(b.stage, self.cfg),
                        "pool": [list(p) for p in b.survivors()]}
        return None  # every unfinished block is training

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        k = self.in_flight.pop(trial_id, None)
        if k is None:
            return
        if error or not result or "scores" not in result:
            self.failed.add(k)
            self.say(f"blocks: block {k} failed after its retries; the other blocks go on (a rerun resumes it)")
            return
        b = self.state.blocks[k]
        scores = {tuple(p.split(",")): float(v) for p, v in json.loads(result["scores"]).items()}
        sizes_before = [len(x) for x in b.bins]
        rows = b.apply(scores, self.params_of, self.cfg)
        started, finished = (datetime.fromtimestamp(result[t], tz=timezone.utc) for t in ("started_at", "finished_at"))
        for r in rows:
            r.update(started_at=started, finished_at=finished, trial_id=trial_id,
                     train_loss=result.get("train_loss"), step=int(result["step"]),
                     start_step=int(result.get("start_step", -1)))
        append_stage_rows(self.out / STAGES_FILE, rows)  # rows first: a rerun re-scores, it never loses a stage
        self.state.save(self.out / STATE_FILE)
        sizes = [len(x) for x in b.bins]
        self.say(f"blocks: block {k} stage {result['stage']} scored {len(scores)} paths in "
                 f"{result['score_s']:.0f} s (train {result['train_s']:.0f} s, loss {result.get('train_loss', math.nan):.4f});"
                 f" per-bin survivors {sizes_before} -> {sizes}{' (finished)' if b.finished else ''}")

    def save(self, checkpoint_path: str) -> None:
        """For ``Tuner.restore``; raynas' own resume reads ``shrink_state.json`` (saved after every decision)."""
        with open(checkpoint_path, "w") as f:
            json.dump({"state": self.state.to_dict(), "failed": sorted(self.failed)}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            raw = json.load(f)
        self.state, self.failed, self.in_flight = ShrinkState.from_dict(raw["state"]), set(raw["failed"]), {}


def append_stage_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append a stage's rows, replacing any rows of the same (block, stage) a killed run left behind."""
    import pyarrow.parquet as pq

    old: list[dict[str, Any]] = pq.read_table(path).to_pylist() if path.is_file() else []
    keys = {(r["block"], r["stage"]) for r in rows}
    kept = [r for r in old if (r["block"], r["stage"]) not in keys]
    write_parquet(to_table(kept + rows, ROWS_SCHEMA), path)


# ---------------------------------------------------------------- the trial (one block stage, in a Ray actor)


def _maybe_fault(block: int, step: int, marker_dir: Path) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    k, s = (int(x) for x in spec.split(":"))
    marker = marker_dir / f"fault-{k}-{s}"
    if block == k and step >= s and not marker.exists():
        marker.write_text(str(os.getpid()))
        print(f"block {block}: injected fault at step {step} ({FAULT_ENV})", file=sys.stderr, flush=True)
        os._exit(1)


def _block_stage(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: block ``config['block']``, stage ``config['stage']``; train, checkpoint, score, report."""
    import ray
    from ray import tune

    from raynas.blockwise.blocks import StudentBlock
    from raynas.blockwise.training import BlockData, BlockTrainer
    from raynas.orchestration.finetune_sweep import trial_device
    from raynas.orchestration.shared_supernet import shared_supernet
    from raynas.training.optim import Placement

    started = time.time()
    k, stage, until = int(config["block"]), int(config["stage"]), int(config["until"])
    tcfg = BlockTrainConfig(**shared["train"])
    device = trial_device(tcfg.device, ray.get_gpu_ids())
    torch.set_num_threads(max(1, int(tcfg.resources(k)["cpu"])))
    placement = Placement.resolve(device, tcfg.precision)
    net = shared_supernet(shared["supernet"], "cpu")
    plan = shared["plan"]
    block = StudentBlock(net, plan, k, shared["hidden"], shared["teacher_dim"])
    data = BlockData.from_numpy(*ray.get(shared["pairs"][k]))
    trainer = BlockTrainer(block, data, lr=tcfg.lr, weight_decay=tcfg.weight_decay, total_steps=shared["total_steps"],
                           warmup_ratio=tcfg.warmup_ratio, batch_size=tcfg.batch_size, seed=tcfg.seed, index=k,
                           placement=placement)
    folder = Path(shared["out"]) / f"block-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / CHECKPOINT
    if ckpt.is_file():
        trainer.load_state_dict(torch.load(ckpt, map_location=placement.device, weights_only=False))

    def save(t: BlockTrainer) -> None:
        with atomic_file(ckpt) as tmp:
            torch.save(t.state_dict(), tmp)

    def fault_then_save(t: BlockTrainer) -> None:
        save(t)
        _maybe_fault(k, t.step, Path(shared["out"]))

    pool = [tuple(p) for p in config["pool"]]
    start_step = trainer.step
    t0 = time.perf_counter()
    train_loss = math.nan
    if trainer.step < until:
        t_start, s_start = time.perf_counter(), trainer.step

        def log(step: int, loss: float) -> None:
            rate = (time.perf_counter() - t_start) / max(1, step - s_start)
            print(f"block {k} stage {stage}: step {step}/{until} loss {loss:.4f} ({rate:.2f} s/step, "
                  f"stage ETA {clock(rate * (until - step))})", flush=True)

        train_loss = trainer.train_until(until, pool, every=tcfg.checkpoint_every, on_checkpoint=fault_then_save,
                                         on_log=log, log_every=tcfg.log_every)
        save(trainer)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = trainer.score(pool, tcfg.score_batch_size)
    score_s = time.perf_counter() - t1
    tune.report({"block": k, "stage": stage, "step": trainer.step, "best_loss": min(scores.values()),
                 "scores": json.dumps({",".join(p): v for p, v in scores.items()}), "train_loss": train_loss,
                 "start_step": start_step, "train_s": train_s, "score_s": score_s, "started_at": started,
                 "finished_at": time.time()})


# ---------------------------------------------------------------- the driver


def run_shrinking(state: ShrinkState, shrink: ShrinkConfig, train: BlockTrainConfig, *, supernet: Any, plan: Any,
                  hidden: int, teacher_dim: int, pairs: list[Any], params_of: Callable[[tuple[str, ...]], int],
                  out: Path, say: Say | None = None) -> ShrinkState:
    """Run every unfinished block's stages on Ray Tune until all blocks are shrunk; returns the final state.

    ``state`` is the restored (or fresh) shrinking state; ``pairs[k]`` is the
    object ref of block ``k``'s ``((train in, out, mask), (val in, out, mask))``
    numpy arrays, put once by the caller; ``supernet`` the ref of the seeded
    supernet (:func:`raynas.orchestration.shared_supernet.put_supernet`).
    """
    from ray import tune

    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    if state.finished:
        return state
    steps = total_steps(shrink)
    searcher = ShrinkingSearcher(state, shrink, params_of, out, say)
    shared = {"supernet": supernet, "plan": plan, "hidden": hidden, "teacher_dim": teacher_dim, "pairs": pairs,
              "train": asdict(train), "total_steps": steps, "out": str(out)}
    trainable = tune.with_resources(tune.with_parameters(_block_stage, shared=shared),
                                    lambda cfg: train.resources(int(cfg["block"])))
    storage = (out / "ray_results").resolve()
    todo = sum(not b.finished for b in state.blocks.values())
    say(f"blocks: {todo} block(s) to shrink concurrently, up to {steps} training steps each, "
        f"bins of at most {shrink.max_per_bin} at the end")
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=len(state.blocks),
                                    trial_dirname_creator=lambda t: f"block_stage_{t.trial_id}"),
        run_config=tune.RunConfig(name=f"blocks-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=train.max_failures)),
    )
    tuner.fit()
    if searcher.failed:
        raise ConfigError(f"blocks: block(s) {sorted(searcher.failed)} failed after {train.max_failures} retries "
                          f"(see {storage}); finished blocks are kept, a rerun resumes the rest")
    say(f"blocks: all {len(state.blocks)} blocks shrunk in {clock(time.perf_counter() - t0)}")
    return state
