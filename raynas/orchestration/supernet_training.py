"""Ray Train adapter for supernet training: config, per-worker loop, driver.

The losses, samplers, corpus and masking are pure torch / Python
(:mod:`raynas.training`, :mod:`raynas.data`); this module only wires them into
a ``TorchTrainer``. The corpus is built once in the driver and memory-mapped
by every worker, so N workers do not tokenize N times. Each step a worker
draws its sub-models (AutoTinyBERT batch-wise: M per batch), runs them on the
same micro-batch accumulating gradients, and takes one optimizer step;
DeepSpeed (ZeRO) or plain DDP averages across workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raynas.data.corpus import CorpusConfig
from raynas.errors import ConfigError, require

STATE_FILE, OPTIM_FILE, SUPERNET_DIR, DS_DIR = "trainer_state.json", "optimizer.pt", "supernet", "deepspeed"


@dataclass
class ObjectiveConfig:
    mode: str = "mlm"  # only mlm for now: kd needs the projection inside the engine
    mlm_probability: float = 0.15


@dataclass
class SamplerConfig:
    name: str = "batchwise"  # uniform | sandwich | batchwise
    per_worker: int = 2  # sub-models per batch per worker (batchwise / uniform)
    n_random: int = 1  # sandwich: random archs besides largest and smallest


@dataclass
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: int = 2
    config: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config


@dataclass
class SupernetTrainConfig:
    """One supernet training run; ``space`` (+ ``space_overrides``) or ``init_from`` fixes the supernet."""

    out: str = "runs/supernet-train"
    space: str | None = None
    space_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str | None = None  # default: init_from's tokenizer/
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    steps: int = 100
    batch_size: int = 16  # global: split across workers
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    dropout: float = 0.1  # only for supernets made from a space
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    checkpoint_every: int = 50
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    max_failures: int = 0
    name: str = "supernet"

    def __post_init__(self) -> None:
        if (self.space is None) == (self.init_from is None):
            raise ValueError("give exactly one of space and init_from")
        if self.objective.mode != "mlm":
            raise ValueError(f"objective.mode: only 'mlm' is implemented, got {self.objective.mode!r}")
        for name in ("steps", "batch_size", "num_workers", "checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of num_workers {self.num_workers}")


# ---------------------------------------------------------------- driver


def load_tokenizer(cfg: SupernetTrainConfig) -> Any:
    from transformers import AutoTokenizer

    from raynas.supernet.checkpoint import load_supernet_tokenizer
    from raynas.teachers import resolve_teacher

    if cfg.tokenizer:
        where = cfg.tokenizer if Path(cfg.tokenizer).expanduser().is_dir() else resolve_teacher(cfg.tokenizer)
        return AutoTokenizer.from_pretrained(where)
    tok = load_supernet_tokenizer(cfg.init_from) if cfg.init_from else None
    if tok is None:
        raise ConfigError("tokenizer: not given, and init_from has no tokenizer/ folder")
    return tok


def train_supernet(cfg: SupernetTrainConfig) -> dict[str, Any]:
    """Build the corpus once, run the TorchTrainer, return the last reported metrics."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raynas.data.corpus import build_corpus, corpus_stats

    out = Path(cfg.out).resolve()
    tokenizer = load_tokenizer(cfg)
    corpus = build_corpus(cfg.corpus, tokenizer, cache_dir=out / "corpus")
    print(f"corpus: {corpus_stats(corpus)}", file=sys.stderr)
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    raw = asdict(cfg)  # workers run in Ray's working dir: pass absolute paths
    raw["out"] = str(out)
    for key in ("space", "init_from"):
        if raw[key] and Path(raw[key]).expanduser().exists():
            raw[key] = str(Path(raw[key]).expanduser().resolve())
    loop_cfg = {"cfg": raw, "corpus_dir": corpus.cache_files["train"][0]["filename"].rsplit("/train/", 1)[0],
                "tokenizer_dir": str(tok_dir), "out": str(out)}
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(out / "ray_results"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


# ---------------------------------------------------------------- worker


def _config_from_dict(raw: dict[str, Any]) -> SupernetTrainConfig:
    from raynas.config_loading import load_config

    return load_config(SupernetTrainConfig, None, defaults=raw)


def _build_net(cfg: SupernetTrainConfig) -> Any:
    import torch

    from raynas.spaces import load_space
    from raynas.supernet import Supernet
    from raynas.supernet.checkpoint import load_supernet

    if cfg.init_from:
        return load_supernet(cfg.init_from).train()
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    space = load_space(cfg.space, cfg.space_overrides or None)
    return Supernet.from_space(space, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)


def _lr_lambda(cfg: SupernetTrainConfig) -> Any:
    warmup = max(1, int(cfg.steps * cfg.warmup_ratio))

    def f(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))

    return f


def _param_groups(net: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ds_config(cfg: SupernetTrainConfig, micro: int, accum: int, world: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage}, "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 10**9,
    }
    return _merge(base, cfg.deepspeed.config)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Engine:
    """One face for DeepSpeed and DDP: forward module, backward, step at the accumulation boundary."""

    def __init__(self, cfg: SupernetTrainConfig, net: Any, accum: int, micro: int, world: int) -> None:
        import torch

        self.cfg, self.accum, self.ds = cfg, accum, cfg.deepspeed.enabled
        opt = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
        if self.ds:
            import deepspeed

            self.model, self.opt, _, self.sched = deepspeed.initialize(
                model=net, optimizer=opt, lr_scheduler=sched, config=_ds_config(cfg, micro, accum, world))
            self.module = self.model.module
        else:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(
                net, parallel_strategy_kwargs={"find_unused_parameters": True})
            self.module = getattr(self.model, "module", self.model)
            self.opt, self.sched = opt, sched
        self.micro = 0

    def backward(self, loss: Any) -> None:
        if self.ds:
            self.model.backward(loss)
            self.model.step()
            return
        (loss / self.accum).backward()
        self.micro += 1
        if self.micro % self.accum == 0:
            import torch

            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        """Optimizer + scheduler state (all ranks take part for DeepSpeed: ZeRO shards it)."""
        if self.ds:
            self.model.save_checkpoint(str(folder / DS_DIR), tag="state", save_latest=False)
        else:
            import torch

            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}, folder / OPTIM_FILE)

    def load(self, folder: Path) -> None:
        if self.ds:
            self.model.load_checkpoint(str(folder / DS_DIR), tag="state")
        else:
            import torch

            state = torch.load(folder / OPTIM_FILE, weights_only=False)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])


def _evaluate(module: Any, archs: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, float]:
    """Validation MLM loss per named arch (dropout off), on fixed masked batches."""
    import torch

    from raynas.training.objectives import mlm_loss, model_inputs

    was_training, active = module.training, module.active_arch
    module.eval()
    out = {}
    with torch.no_grad():
        for name, arch in archs.items():
            module.set_active(arch)
            losses = [float(mlm_loss(module(**model_inputs(b)).logits, b["labels"])) for b in batches]
            out[f"val_loss_{name}"] = sum(losses) / max(1, len(losses))
    module.set_active(active)
    module.train(was_training)
    return out


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker: one data-parallel replica of the supernet."""
    import datasets
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from raynas.data.corpus import shard_for_worker
    from raynas.data.masking import MLMCollator
    from raynas.supernet.checkpoint import load_supernet, save_supernet
    from raynas.training.objectives import SupernetObjective
    from raynas.training.sampling import build_sampler, size_class

    cfg = _config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    corpus = datasets.load_from_disk(config["corpus_dir"])
    train, val = shard_for_worker(corpus["train"], rank, world), corpus["validation"]
    require(len(train) > 0, f"worker {rank}: empty training shard")
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
    micro = cfg.batch_size // world

    net = _build_net(cfg)
    space = net.space
    # ZeRO reduces gradient buckets in the order backward fills them, so every rank must run the same graph:
    # under DeepSpeed all workers draw the same archs (rank 0's stream); DDP's fixed buckets allow per-rank archs.
    same = cfg.deepspeed.enabled and world > 1
    kw = {"per_worker": cfg.sampler.per_worker, "rank": 0 if same else rank, "world_size": 1 if same else world} \
        if cfg.sampler.name == "batchwise" else {"per_batch": cfg.sampler.per_worker} \
        if cfg.sampler.name == "uniform" else {"n_random": cfg.sampler.n_random}
    sampler = build_sampler(cfg.sampler.name, space, cfg.seed, **kw)
    accum = len(build_sampler(cfg.sampler.name, space, cfg.seed, **kw).sample(0))
    collator = MLMCollator(tokenizer, cfg.objective.mlm_probability, seed=cfg.seed * 1000 + rank)
    val_collator = MLMCollator(tokenizer, cfg.objective.mlm_probability, seed=12345)
    val_batches = [val_collator(val[i: i + micro]["input_ids"]) for i in range(0, min(len(val), micro * cfg.eval_batches), micro)]
    eval_archs = {"largest": space.largest(), "smallest": space.smallest()}

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            net.load_state_dict(load_supernet(Path(d) / SUPERNET_DIR).state_dict())
            sampler.load_state_dict(state["sampler"][str(rank)])
            collator.load_state_dict({"generator": torch.tensor(state["collator"][str(rank)], dtype=torch.uint8)})
            start = state["step"]
            engine = _Engine(cfg, net, accum, micro, world)
            engine.load(Path(d))
        if rank == 0:
            print(f"resumed from step {start}", file=sys.stderr)
    else:
        engine = _Engine(cfg, net, accum, micro, world)
    objective = SupernetObjective("mlm")
    module = engine.module
    module.train()

    metrics: dict[str, Any] = {}
    if rank == 0 and start == 0:
        metrics.update(_evaluate(module, eval_archs, val_batches))
        print(f"step 0 {json.dumps(metrics)}", file=sys.stderr)
    initial = dict(metrics)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + rank)).tolist()
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        i = step * micro % max(1, len(order) - micro + 1)
        batch = collator(train[order[i: i + micro]]["input_ids"] if len(order) >= micro else train[:]["input_ids"])
        losses: dict[str, list[float]] = {}
        for arch in sampler.sample(step):
            module.set_active(arch)
            loss, terms = objective(engine.model, batch)
            engine.backward(loss)
            losses.setdefault(size_class(space, arch), []).append(terms["loss"])
        all_losses = sum(losses.values(), [])
        tokens += int(batch["attention_mask"].sum()) * len(all_losses)
        done = step + 1
        metrics = {"step": done, "loss": sum(all_losses) / len(all_losses),
                   **{f"loss_{k}": sum(v) / len(v) for k, v in losses.items()},
                   "tokens_per_s": tokens * world / max(1e-9, time.perf_counter() - t0), "start_step": start,
                   "lr": engine.sched.get_last_lr()[0], **{f"initial_{k}": v for k, v in initial.items()}}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics.update(_evaluate(module, eval_archs, val_batches))
        if rank == 0 and (done % cfg.log_every == 0 or done == start + 1):
            print(f"step {done} loss {metrics['loss']:.4f} tok/s {metrics['tokens_per_s']:.0f}", file=sys.stderr)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _report_with_checkpoint(cfg, engine, sampler, collator, module, tokenizer, metrics, done, rank, world)
        else:
            ray.train.report(metrics)
    if rank == 0:
        save_supernet(module, Path(config["out"]) / SUPERNET_DIR, tokenizer=tokenizer)


def _report_with_checkpoint(cfg: SupernetTrainConfig, engine: _Engine, sampler: Any, collator: Any, module: Any,
                            tokenizer: Any, metrics: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Every rank writes its shard of state into a shared folder; rank 0 reports it as the checkpoint."""
    import ray.train
    import torch.distributed as dist

    from raynas.supernet.checkpoint import save_supernet

    folder = Path(cfg.out).resolve() / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    if engine.ds or rank == 0:
        engine.save(folder)
    # sampler / collator RNG states differ per rank: gather them so one folder resumes every worker
    local = {"sampler": sampler.state_dict(), "collator": collator.state_dict()["generator"].tolist()}
    gathered: list[Any] = [None] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if rank == 0:
        save_supernet(module, folder / SUPERNET_DIR, tokenizer=tokenizer)
        state = {"step": step, "sampler": {str(r): g["sampler"] for r, g in enumerate(gathered)},
                 "collator": {str(r): g["collator"] for r, g in enumerate(gathered)}, "config": asdict(cfg)}
        (folder / STATE_FILE).write_text(json.dumps(state))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint)


