"""The worker side: one process per card that joins its generation's process group, builds the
model, trains on its share of every global batch and reports each step to its agent."""
