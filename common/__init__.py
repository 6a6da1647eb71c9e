"""hyrun.common: the few helpers both the agent and the runtime need (gRPC security, process
lifetimes, RAM snapshot ownership and clean-up). It imports nothing from runtime, agent or planner,
and never torch: a node agent loads it without the trainer's stack."""
