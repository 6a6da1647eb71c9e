"""Executing the planner's 5D plans: the mesh owner (`ParallelDims`), `parallelize` (pipeline split,
tensor, context and expert parallelism, FSDP last) and the per-step runner with its timing split."""

from .dims import ParallelDims
from .parallelize import parallelize
from .runner import ParallelModel, StepResult
from .timing import StepTiming

__all__ = ["ParallelDims", "ParallelModel", "StepResult", "StepTiming", "parallelize"]
