"""Each generation's rendezvous: a fresh torch TCPStore hosted by the coordinator on a port the OS
picks, and a key prefix naming the job and generation. The coordinator itself imports no torch:
whoever starts it (`hyrun launch`, `hyrun coordinator`) passes `GenerationStore` in as its
rendezvous factory. Measured on torch 2.13 + gloo, a store
reused across restarts hands the next generation the dead one's addresses (pytorch#135712), so a
store never outlives its generation."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed import TCPStore


@dataclass(frozen=True)
class RendezvousInfo:
    host: str
    port: int
    key_prefix: str
    world_size: int


class GenerationStore:
    def __init__(self, bind_host: str, advertise_host: str, job_id: str, generation: int, world_size: int):
        self._store = TCPStore(bind_host, 0, is_master=True, wait_for_workers=False)
        self.info = RendezvousInfo(advertise_host, self._store.port, f"hyrun/{job_id}/gen{generation}/", world_size)

    def close(self) -> None:
        # Dropping the last reference shuts the server down; workers of this generation are gone.
        self._store = None
