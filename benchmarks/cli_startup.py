"""How long the CLI takes to answer before any work: `hyrun --help` against a bare interpreter
(`python -c pass`) and against importing torch, each the median of N fresh processes in the same
run. Goal: `hyrun --help` <= 0.5 s (no torch, no gRPC on the CLI's start-up path).

    python benchmarks/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def median_wall_s(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    hyrun = shutil.which("hyrun") or sys.exit("hyrun is not on PATH: pip install -e . first")
    bare = median_wall_s([sys.executable, "-c", "pass"], args.runs)
    help_s = median_wall_s([hyrun, "--help"], args.runs)
    torch_s = median_wall_s([sys.executable, "-c", "import torch"], args.runs)
    print(f"python -c pass        {bare:6.3f} s")
    print(f"python -c import torch {torch_s:6.3f} s")
    print(f"hyrun --help          {help_s:6.3f} s")
    print(f"hyrun --help: {help_s:.2f} s = {help_s / bare:.1f}x a bare interpreter, {help_s / torch_s:.2f}x importing torch "
          f"(goal <= 0.5 s: {'met' if help_s <= 0.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
