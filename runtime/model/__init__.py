"""hyrun's Hunyuan-Large-style MoE model: `config` (shape and presets) and `schedule` (LR schedule) are
plain Python, read by the job file, the planner's adapter and the coordinator; `transformer`, `routing`,
`experts`, `expert_lr`, `optimizer` and `loss` are PyTorch and load only where a model is built.
Import each from its module: this package re-exports nothing, so reading a config never loads torch."""
