"""What the coordinator's decision function returns: typed actions, each with structured evidence
(a cause and the numbers that triggered it). Text is made from evidence only at the edge (logs,
status, incidents), so rules and their tests compare causes and numbers, never strings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CardRef:
    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.node}/card{self.index}"
