"""MoE layer forward+backward: hyrun's grouped expert path against the naive per-expert loop, same
layer, same tokens, same run. Prints time and achieved TFLOP/s of each, MFU on CUDA, and the speed-up
ratio last.

    python benchmarks/moe_layer.py                  # CPU, small sizes, about a minute on 2 cores
    python benchmarks/moe_layer.py --device cuda    # Hunyuan-like width in bf16 (hidden 4096, 16 experts)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.experts import resolve_expert_path
from hyrun.runtime.model.moe import MoEFeedForward

H100_SXM_BF16_DENSE_TFLOPS = 989.0

CPU_DEFAULTS = dict(tokens=4096, hidden=384, ffn=768, shared_ffn=768, experts=8, top_k=2, iters=12, warmup=2)
# Hunyuan-Large's FFN/hidden ratio (18304/6400 ≈ 2.9) at hidden 4096, its 16 experts, top-1.
CUDA_DEFAULTS = dict(tokens=16384, hidden=4096, ffn=11776, shared_ffn=11776, experts=16, top_k=1,
                     iters=20, warmup=5)


@dataclass(frozen=True)
class Timing:
    path: str
    step_times_s: tuple[float, ...]
    flops_per_step: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def tflops(self) -> float:
        return self.flops_per_step / self.median_s / 1e12


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    for name in ("tokens", "hidden", "ffn", "shared-ffn", "experts", "top-k", "iters", "warmup"):
        parser.add_argument(f"--{name}", type=int, default=None, help="default depends on --device")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--path", default="auto", help="hyrun's path: auto | grouped_mm | loop")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_layer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MoEFeedForward:
    config = ModelConfig(
        vocab_size=8, hidden_size=args.hidden, num_layers=1, num_heads=1, num_kv_heads=1,
        expert_ffn_size=args.ffn, shared_ffn_size=args.shared_ffn, num_experts=args.experts,
        top_k=args.top_k, capacity_factor=args.capacity_factor, head_dim=8)
    torch.manual_seed(0)
    layer = MoEFeedForward(config, layer_index=0)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return layer.to(device=device, dtype=dtype)


def layer_flops(args: argparse.Namespace, computed_assignments: int) -> float:
    """Matmul FLOPs of one forward+backward (backward = 2 × forward)."""
    per_token_shared = 2 * 3 * args.hidden * args.shared_ffn
    per_assignment = 2 * 3 * args.hidden * args.ffn
    router = 2 * args.hidden * args.experts
    forward = args.tokens * (per_token_shared + router) + computed_assignments * per_assignment
    return 3.0 * forward


def time_paths(layer: MoEFeedForward, x: torch.Tensor, grad: torch.Tensor, paths: tuple[str, ...],
               args: argparse.Namespace) -> dict[str, Timing]:
    """Median fwd+bwd time per path. Iterations alternate between the paths so that load from other
    processes on a shared machine lands on both alike."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {path: [] for path in paths}
    computed: dict[str, int] = {}
    for i in range(args.warmup + args.iters):
        for path in paths:
            layer.experts.path = path
            x.grad = None
            layer.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            out, _, stats = layer(x)
            out.backward(grad)
            sync()
            if i >= args.warmup:
                times[path].append(time.perf_counter() - start)
            computed[path] = int(stats.tokens_per_expert.sum())
    return {path: Timing(path=path, step_times_s=tuple(times[path]),
                         flops_per_step=layer_flops(args, computed[path])) for path in paths}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch sees no CUDA card")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = build_layer(args, device, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    hyrun_path = resolve_expert_path(args.path, device)

    print(f"MoE layer fwd+bwd on {device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu"
          else f"MoE layer fwd+bwd on {torch.cuda.get_device_name(device)}")
    print(f"  tokens={args.tokens} hidden={args.hidden} expert_ffn={args.ffn} shared_ffn={args.shared_ffn} "
          f"experts={args.experts} top_k={args.top_k} capacity_factor={args.capacity_factor} dtype={dtype}")
    # Check the two paths agree before timing them.
    with torch.no_grad():
        layer.experts.path = "naive"
        reference = layer(x)[0]
        layer.experts.path = hyrun_path
        error = (layer(x)[0] - reference).abs().max().item() / reference.abs().max().item()
    print(f"  max relative difference {hyrun_path} vs naive: {error:.2e}")

    timings = time_paths(layer, x, grad, ("naive", hyrun_path), args)
    naive, ours = timings["naive"], timings[hyrun_path]
    for timing in (naive, ours):
        line = f"  {timing.path:>10}: {timing.median_s * 1e3:9.2f} ms/step  {timing.tflops:8.3f} TFLOP/s"
        if device.type == "cuda":
            line += f"  MFU {timing.tflops / H100_SXM_BF16_DENSE_TFLOPS:6.1%} of H100 SXM bf16 dense"
        print(line)
    print(f"speed-up {hyrun_path} / naive loop: {naive.median_s / ours.median_s:.2f}x")


if __name__ == "__main__":
    main()
