"""hyrun.agent: one per node. Describes the node's cards, samples their health, keeps one stream to
the coordinator, and supervises the node's worker processes. Imports nothing from the coordinator."""
