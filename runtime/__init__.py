"""hyrun.runtime: the coordinator, the trainer, the MoE model, checkpointing, metrics and the CLI."""

__version__ = "0.1.0"
