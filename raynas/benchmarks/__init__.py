"""Benchmarks (pure torch): measurements behind the ``raynas bench`` recipes."""

from raynas.benchmarks.step_time import bench_step_time, make_mlm_batch, time_train_step

__all__ = ["bench_step_time", "make_mlm_batch", "time_train_step"]
