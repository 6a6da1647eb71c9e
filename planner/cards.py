"""What a card can do, described by capability rather than by name, and a catalogue of common cards.

The planner never branches on a card's name: every decision reads the numbers below, so a card type
declared in a job file is planned exactly like a catalogue entry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

GIB = 1 << 30
GB_PER_S = 1e9

# Link figures are *per direction, per card*: a ring collective moves data one way around the ring,
# so a datasheet's bidirectional NVLink total (e.g. A100: 600 GB/s) counts half (300 GB/s) here.
# Inter-node figures are the NIC share one card gets in the vendor's reference server (DGX A100:
# one 200 Gb/s HDR port per GPU = 25 GB/s; DGX H100: one 400 Gb/s NDR port per GPU = 50 GB/s).


@dataclass(frozen=True)
class CardSpec:
    """One card type's capability. `speed` scales its compute and memory bandwidth: 1.0 is what the
    datasheet promises, 0.5 a card that runs at half that (throttled, or measured slower)."""

    name: str
    peak_tflops: float  # dense bf16 (fp16 where the card has no bf16), no sparsity
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float
    intra_node_bandwidth_bytes_per_s: float
    inter_node_bandwidth_bytes_per_s: float
    speed: float = 1.0
    # Fixed cost of one collective whatever its size (launch, synchronisation, a network round trip):
    # what makes many small messages (tp, cp, ep inside every layer) dearer than their bytes say.
    collective_latency_s: float = 20e-6

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("CardSpec.name must be non-empty")
        for field in ("peak_tflops", "memory_bandwidth_bytes_per_s", "intra_node_bandwidth_bytes_per_s",
                      "inter_node_bandwidth_bytes_per_s", "speed"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"card {self.name!r}: {field}={value!r} must be a finite number > 0")
        if not (isinstance(self.collective_latency_s, (int, float)) and math.isfinite(self.collective_latency_s)
                and self.collective_latency_s >= 0):
            raise ValueError(f"card {self.name!r}: collective_latency_s={self.collective_latency_s!r} must be >= 0")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ValueError(f"card {self.name!r}: memory_bytes={self.memory_bytes!r} must be a positive int")


def _nvidia(name: str, tflops: float, memory_gib: int, memory_gb_per_s: float, nvlink_gb_per_s: float,
            nic_gb_per_s: float) -> CardSpec:
    return CardSpec(name, tflops, memory_gib * GIB, memory_gb_per_s * GB_PER_S, nvlink_gb_per_s * GB_PER_S,
                    nic_gb_per_s * GB_PER_S)


# The CPU testbed's simulated card: a worker process on one CPU core, slowed by its `speed`.
# Nothing is measured here. 0.05 TFLOP/s is the order of what one modern core's fp32 matmul reaches
# (AVX2/AVX-512 FMA, tens of GFLOP/s), so predicted step times land in the right decade; `calibrate`
# replaces it with what the job really does (it folds the ratio into `speed`). 16 GiB matches the
# agent's default memory for a simulated card; the links are gloo over loopback TCP, a few GB/s.
CPU_SIM_PEAK_TFLOPS = 0.05
CPU_SIM_MEMORY_BYTES = 16 * GIB
CPU_SIM_MEMORY_BANDWIDTH_BYTES_PER_S = 20 * GB_PER_S
CPU_SIM_INTRA_NODE_BANDWIDTH_BYTES_PER_S = 2 * GB_PER_S
CPU_SIM_INTER_NODE_BANDWIDTH_BYTES_PER_S = 1 * GB_PER_S
# Measured, not assumed (`python benchmarks/layouts.py`): the step time tp, cp and ep layouts add over
# dp=4, divided by the collectives they add, is 3-10 ms per collective on the CPU testbed (gloo on
# loopback plus DTensor dispatch, four workers sharing two cores). GPUs with NCCL: ~20 us (default).
CPU_SIM_COLLECTIVE_LATENCY_S = 3e-3

CARD_CATALOGUE: Mapping[str, CardSpec] = {spec.name: spec for spec in (
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): BF16 312 TFLOPS dense (624 with sparsity),
    # 40 GB HBM2 at 1,555 GB/s or 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s bidirectional.
    _nvidia("A100-40GB", 312, 40, 1555, 300, 25),
    _nvidia("A100-80GB", 312, 80, 2039, 300, 25),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 989 TFLOPS dense (1,979 with sparsity),
    # 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional; DGX H100: 400 Gb/s NDR per GPU.
    _nvidia("H100-SXM", 989, 80, 3350, 450, 50),
    # H800 SXM5 (export variant of H100): same compute and memory, NVLink cut to 400 GB/s.
    _nvidia("H800", 989, 80, 3350, 200, 50),
    # H20 (NVIDIA HGX H20 product brief): BF16 148 TFLOPS dense, 96 GB HBM3 at 4.0 TB/s,
    # NVLink 900 GB/s; compute-poor but memory-rich, so the planner should favour it for memory.
    _nvidia("H20", 148, 96, 4000, 450, 50),
    # NVIDIA L40S datasheet: BF16 362 TFLOPS dense (733 with sparsity), 48 GB GDDR6 at 864 GB/s,
    # no NVLink: peers talk over PCIe Gen4 x16 (64 GB/s bidirectional); typical servers share one
    # 200 Gb/s NIC between two cards.
    _nvidia("L40S", 362, 48, 864, 32, 12.5),
    # NVIDIA V100 datasheet (SXM2 32 GB): no bf16, FP16 tensor 125 TFLOPS, HBM2 900 GB/s,
    # NVLink 300 GB/s bidirectional; DGX-1/2 era nodes ship 100 Gb/s EDR per GPU.
    _nvidia("V100-32GB", 125, 32, 900, 150, 12.5),
    # AMD Instinct MI300X data sheet: BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity), 192 GB HBM3
    # at 5.3 TB/s, 7 Infinity Fabric links of 128 GB/s bidirectional (896 GB/s); 400 Gb/s NIC per GPU.
    _nvidia("MI300X", 1307.4, 192, 5300, 448, 50),
    # Huawei Ascend 910B (Atlas 800T A2 materials): FP16 ~313 TFLOPS for the 910B3 bin (other bins
    # range higher; `calibrate` corrects), 64 GB HBM2e at 1.6 TB/s, HCCS 392 GB/s bidirectional,
    # 200 Gb/s RoCE per NPU.
    _nvidia("Ascend-910B", 313, 64, 1600, 196, 25),
    CardSpec("cpu-sim", CPU_SIM_PEAK_TFLOPS, CPU_SIM_MEMORY_BYTES, CPU_SIM_MEMORY_BANDWIDTH_BYTES_PER_S,
             CPU_SIM_INTRA_NODE_BANDWIDTH_BYTES_PER_S, CPU_SIM_INTER_NODE_BANDWIDTH_BYTES_PER_S,
             collective_latency_s=CPU_SIM_COLLECTIVE_LATENCY_S),
)}


def card_spec(name: str, *, custom: Mapping[str, CardSpec] | None = None, speed: float | None = None,
              memory_bytes: int | None = None) -> CardSpec:
    """The spec named `name`: a type declared by the job (`custom`, which wins over the catalogue) or a
    catalogue entry, optionally with this card's own speed factor or memory size."""
    custom = custom or {}
    spec = custom.get(name) or CARD_CATALOGUE.get(name)
    if spec is None:
        known = sorted(set(CARD_CATALOGUE) | set(custom))
        raise ValueError(f"unknown card type {name!r}; known types: {', '.join(known)} "
                         "(declare other types in the job file's cluster.card_types)")
    if spec.name != name:
        spec = dataclasses.replace(spec, name=name)
    if speed is not None:
        spec = dataclasses.replace(spec, speed=speed)
    if memory_bytes is not None:
        spec = dataclasses.replace(spec, memory_bytes=int(memory_bytes))
    return spec


def effective_flops_per_s(spec: CardSpec, achieved_fraction: float) -> float:
    """FLOP/s the card sustains in training: datasheet peak × achieved fraction × measured speed."""
    return spec.peak_tflops * 1e12 * achieved_fraction * spec.speed

