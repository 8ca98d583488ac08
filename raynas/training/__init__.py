"""Supernet training, the pure-torch parts: the run config, losses, teacher caching, arch samplers, the student.

The Ray Train / DeepSpeed adapters (:mod:`raynas.orchestration`) drive these;
nothing here imports them.
"""

from raynas.training.objectives import (
    HiddenDistillation,
    SupernetObjective,
    TeacherCache,
    TeacherOutput,
    logits_distillation,
    mlm_loss,
)
from raynas.training.sampling import (
    SAMPLERS,
    ArchSampler,
    BatchwiseSampler,
    SandwichSampler,
    UniformSampler,
    build_sampler,
    size_class,
)

__all__ = [
    "SAMPLERS", "ArchSampler", "BatchwiseSampler", "HiddenDistillation", "SandwichSampler", "SupernetObjective",
    "TeacherCache", "TeacherOutput", "UniformSampler", "build_sampler", "logits_distillation", "mlm_loss",
    "size_class",
]
