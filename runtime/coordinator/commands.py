"""The commands the coordinator sends down agents' streams, built from a generation (no I/O)."""

from __future__ import annotations

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.generation import Generation


def start_commands(gen: Generation, rendezvous_info, *, backend: str, job_json: str, run_dir: str) -> dict[str, pb.CoordinatorCommand]:
    """One StartGeneration per node of the generation, naming that node's ranks."""
    rendezvous = pb.Rendezvous(
        store_host=rendezvous_info.host, store_port=rendezvous_info.port, key_prefix=rendezvous_info.key_prefix,
        world_size=rendezvous_info.world_size, backend=backend,
    )  # fmt: skip
    layout_json = gen.layout.to_json()
    commands = {}
    for node in gen.nodes:
        ranks = [
            pb.RankAssignment(
                rank=s.rank, card_index=s.card_index, speed=s.speed, micro_batches=s.micro_batches,
                micro_batch_offset=gen.layout.micro_batch_offset(s.rank), node=s.node,
            )  # fmt: skip
            for s in gen.ranks
            if s.node == node
        ]
        start = pb.StartGeneration(
            generation=gen.number, rendezvous=rendezvous, ranks=ranks, job_json=job_json, run_dir=run_dir,
            layout_json=layout_json,
        )  # fmt: skip
        commands[node] = pb.CoordinatorCommand(start=start)
    return commands


def stop_command(gen: Generation, reason: str) -> pb.CoordinatorCommand:
    return pb.CoordinatorCommand(stop=pb.StopGeneration(generation=gen.number, reason=reason))


def checkpoint_command(gen: Generation, reason: str) -> pb.CoordinatorCommand:
    return pb.CoordinatorCommand(checkpoint_now=pb.CheckpointNow(generation=gen.number, reason=reason))
