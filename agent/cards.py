"""What cards a node has: real GPUs found by NVML, or simulated cards (CPU workers standing in for
GPUs) described by the job file or the command line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("hyrun.agent")

GIB = 1 << 30


@dataclass(frozen=True)
class LocalCard:
    index: int
    type: str
    memory_bytes: int
    speed: float
    simulated: bool
    uuid: str = ""


def simulated_cards(groups: list[dict]) -> list[LocalCard]:
    """Cards from job-file card groups: [{"type", "count", "memory_gb", "speed"}, ...]."""
    cards: list[LocalCard] = []
    for group in groups:
        memory_gb = group.get("memory_gb") or 16.0
        for _ in range(int(group.get("count", 1))):
            cards.append(
                LocalCard(len(cards), group.get("type", "cpu-sim"), int(memory_gb * GIB), float(group.get("speed", 1.0)), True)
            )
    return cards


def nvml_cards() -> list[LocalCard]:
    """The node's NVIDIA GPUs, or [] where NVML is missing (no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        cards = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            cards.append(LocalCard(index, name if isinstance(name, str) else name.decode(), memory, 1.0, False, uuid))
        return cards
    finally:
        pynvml.nvmlShutdown()
