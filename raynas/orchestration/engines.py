"""DeepSpeed and DDP behind one face: forward, accumulate a sub-model's loss, step, save, load.

Thin adapter over the pure-torch :class:`~raynas.training.student.TrainStudent`.
Under DeepSpeed ZeRO 0-2 the M sub-models of a worker are accumulated by
:class:`~raynas.training.student.GradientAccumulator` and handed to the engine as
one backward, so every rank may run its own archs; ZeRO-3 partitions the weights
the accumulator would read, so there every rank runs the same archs and
DeepSpeed accumulates (gradient_accumulation_steps = M). DDP (find unused
parameters) handles per-rank archs natively.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from raynas.config_loading import merge_dicts as merge  # the one deep merge (DeepSpeed config over ours)
from raynas.training.config import TrainConfig
from raynas.training.optim import Placement, adamw, lr_lambda
from raynas.training.student import TrainStudent

OPTIM_FILE, DS_DIR = "optimizer.pt", "deepspeed"


def deepspeed_config(zero_stage: int, precision: str, micro: int, accum: int, world: int,
                     extra: dict[str, Any]) -> dict[str, Any]:
    """The generated DeepSpeed config, with the user's ``deepspeed.config`` merged over it."""
    base: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": precision == "fp16"}, "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }
    return merge(base, extra)




class Engine:
    """Wraps a TrainStudent for one worker; ``per_rank_archs`` says whether ranks may train different archs."""

    def __init__(self, student: TrainStudent, *, deepspeed: bool, zero_stage: int, precision: str,
                 ds_extra: dict[str, Any], lr: float, weight_decay: float, steps: int, warmup_ratio: float,
                 archs_per_step: int, micro: int, world: int, placement: Placement) -> None:
        """``student`` already on ``placement.device``; ``precision`` resolved (fp32 / bf16 / fp16) is
        DeepSpeed's (it casts the weights); DDP keeps fp32 weights and runs forwards under
        ``placement.autocast()``."""
        self.ds, self.archs_per_step, self.placement = deepspeed, archs_per_step, placement
        self.per_rank_archs = not (deepspeed and zero_stage == 3)
        opt = adamw(student, lr, weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup_ratio))
        self.accumulator = None
        if self.ds:
            import deepspeed as ds

            from raynas.training.student import GradientAccumulator

            accum = 1 if self.per_rank_archs else archs_per_step
            if zero_stage == 3:
                _register_external_params(student)
            self.model, self.opt, _, self.sched = ds.initialize(
                model=student, optimizer=opt, lr_scheduler=sched,
                config=deepspeed_config(zero_stage, precision, micro, accum, world, ds_extra))
            self.module = self.model.module
            if self.per_rank_archs:
                self.accumulator = GradientAccumulator(list(self.module.parameters()))
        else:
            import ray.train.torch

            self.model = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": True})
            self.module = getattr(self.model, "module", self.model)
            self.opt, self.sched = opt, sched

    def forward(self, batch: Any, arch: Any, teacher_out: Any = None) -> Any:
        # with the accumulator, bypass the engine's forward: it hooks the outputs so that any backward
        # through them (autograd.grad included) would start a ZeRO reduction
        model = self.module if self.accumulator is not None else self.model
        with self.placement.autocast():
            return model(batch, arch, teacher_out)

    @classmethod
    def from_config(cls, cfg: TrainConfig, student: TrainStudent, archs_per_step: int, micro: int, world: int,
                    placement: Placement) -> Engine:
        """The engine ``cfg.deepspeed`` asks for, with ``cfg``'s optimizer and schedule."""
        ds = cfg.deepspeed
        return cls(student, deepspeed=ds.enabled, zero_stage=ds.zero_stage, precision=cfg.precision,
                   ds_extra=ds.config, lr=cfg.lr, weight_decay=cfg.weight_decay, steps=cfg.steps,
                   warmup_ratio=cfg.warmup_ratio, archs_per_step=archs_per_step, micro=micro, world=world,
                   placement=placement)

    def accumulate(self, loss: Any) -> None:
        """Backward of one sub-model's loss, scaled so the step's gradient is the mean over its sub-models."""
        if self.accumulator is not None:
            self.accumulator.add(loss, 1.0 / self.archs_per_step)
        elif self.ds:
            self.model.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps
            self.model.step()  # a no-op until the accumulation boundary
        else:
            (loss / self.archs_per_step).backward()

    def step(self) -> None:
        """All-reduce (inside DeepSpeed / DDP), clip, optimizer and LR-schedule step."""
        if self.accumulator is not None:
            self.model.backward(self.accumulator.surrogate())
            self.model.step()
            self.accumulator.zero()
        elif not self.ds:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)

    def full_weights(self) -> Any:
        """A context in which the module holds its full weights (ZeRO-3 gathers them; a no-op otherwise)."""
        if self.ds and not self.per_rank_archs:
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            return GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def save(self, folder: Path, rank: int) -> None:
        """Optimizer + scheduler state; every rank takes part under DeepSpeed (ZeRO shards it)."""
        if self.ds:
            self.model.save_checkpoint(str(folder / DS_DIR), tag="state", save_latest=False)
        elif rank == 0:
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}, folder / OPTIM_FILE)

    def load(self, folder: Path) -> None:
        if self.ds:
            self.model.load_checkpoint(str(folder / DS_DIR), tag="state")
        else:
            state = torch.load(folder / OPTIM_FILE, map_location=self.placement.device, weights_only=False)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        self._resync_lr()

    def _resync_lr(self) -> None:
        """Set each group's lr from *this* run's schedule at the restored step.

        The optimizer state restores the lr the checkpointed run's schedule had
        set; a rerun with a different ``steps`` (training for longer) has another
        schedule, and without this its first step would run at the old one's lr
        (0 at the old end). Same ``steps``: the value is unchanged.
        """
        sched = self.sched
        for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * f(sched.last_epoch)


def _register_external_params(student: Any) -> None:
    """ZeRO-3 gathers a module's weights when *its* forward runs, but elastic ops slice their children's
    weights without calling them (and the MLM head reads the word embeddings): declare every weight as
    used by the root, so one gather covers a forward. Optimizer state and gradients stay partitioned."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for p in student.parameters():
        register_external_parameter(student, p)
