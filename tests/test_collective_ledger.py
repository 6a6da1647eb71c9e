"""The per-kind collective ledger counts what goes through torch.distributed in a real gloo group
(world of one, in this process): bytes of the rank's input and time in the call, per kind."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import free_port
from hyrun.runtime.parallel.collective_ledger import CollectiveLedger


@pytest.fixture
def gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collectives_are_counted_by_kind_and_taken_per_step(gloo_group, monkeypatch):
    ledger = CollectiveLedger()
    for name in ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "broadcast"):
        monkeypatch.setattr(dist, name, getattr(dist, name))  # restored after the test: the wrap is process-wide
    ledger.install()
    ledger.install()  # once only: a second install must not count twice
    dist.all_reduce(torch.ones(10, dtype=torch.float32))
    dist.all_to_all_single(torch.empty(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    dist.all_gather_into_tensor(output_tensor=torch.empty(3), input_tensor=torch.ones(3))
    moved, spent = ledger.take()
    assert moved == {"all_reduce": 40.0, "all_to_all": 48.0, "all_gather": 12.0}
    assert set(spent) == set(moved) and all(s >= 0 for s in spent.values())
    assert ledger.take() == ({}, {})  # taken: the next step starts from nothing
