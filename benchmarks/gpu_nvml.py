"""NVML on a real card, as the agent sees it: card discovery, then one sample per second for a while
(every field printed), and what a sample costs the agent in CPU time, as a share of one core at 1 Hz.

    python benchmarks/gpu_nvml.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import sys
import time

from hyrun.agent.cards import nvml_cards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    cards = nvml_cards()
    if not cards:
        print("no NVIDIA card found through NVML")
        return 1
    for card in cards:
        print(f"card {card.index}: {card.type}, {card.memory_bytes / 2**30:.1f} GiB, uuid {card.uuid}")
    from hyrun.agent.nvml import NvmlCards

    sampler = NvmlCards([c.index for c in cards])
    print(f"slowdown thresholds: {sampler.slowdown_c}")
    cpu_s, samples = 0.0, 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        started = time.process_time()
        readings = sampler.sample()
        cpu_s += time.process_time() - started
        samples += 1
        for r in readings:
            print(f"t={samples:3d} card {r.index}: {r.temperature_c:.0f} C (slowdown {r.slowdown_temperature_c:.0f} C), "
                  f"{r.power_w:.0f} W, util {r.utilization:.0%}, memory {r.memory_used_bytes / 2**30:.2f} GiB, "
                  f"ECC uncorrected {r.ecc_uncorrected}, XIDs {list(r.xid_events)}, throttle 0x{r.throttle_reasons:x}",
                  flush=True)
        time.sleep(max(0.0, 1.0 - (time.process_time() - started)))
    per_sample = cpu_s / max(samples, 1)
    print(f"NVML sample cost: {per_sample * 1e3:.3f} ms CPU per sample of {len(cards)} card(s) = "
          f"{per_sample * 100:.3f}% of one core at 1 Hz (goal <= 1%), over {samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
