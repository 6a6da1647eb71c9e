"""Executing the planner's 5D plans. Torch-free: `layout` (what every rank of a generation agrees on)
and `degrees` (the degree checks and rank coordinates), which the coordinator uses. PyTorch: `dims`
(the mesh owner), `parallelize` (pipeline split, tensor, context and expert parallelism, FSDP last) and
`runner` (the per-step runner with its timing split). Import each from its module: this package
re-exports nothing, so the coordinator never loads torch through it."""
