"""SwiGLU experts: the dense shared expert and the routed experts held as one module with stacked
weights ([num_experts, ...], so expert parallelism can shard dim 0).

Routed experts run in one of three ways, all computing the same function:
- "grouped_mm": assignments sorted by expert and run as one grouped GEMM per projection
  (`torch._grouped_mm`; bf16 on CUDA, and the fp32 fallback torch ships for CPU);
- "loop": the same sorted layout, one matmul per expert (portable; the CPU default);
- "naive": the textbook per-expert gather/scatter over unsorted tokens (the benchmark's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Dispatch, count_per_expert

ExpertPath = Literal["auto", "grouped_mm", "loop", "naive"]
EXPERT_PATHS = ("auto", "grouped_mm", "loop", "naive")

# On CUDA each expert's group is padded to a multiple of 16 rows: in the backward the token groups
# become the jagged K dimension of the weight-gradient GEMM, whose kernels want 16-byte-aligned group
# offsets (8 rows in bf16, 16 in fp8); 16 covers both at a cost of < 16 rows per expert.
CUDA_GROUP_ALIGN_ROWS = 16


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the shared expert every token passes through."""

    COLWISE_PROJECTIONS = ("gate_proj", "up_proj")
    ROWWISE_PROJECTIONS = ("down_proj",)

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_mm_supported(device: torch.device) -> bool:
    """Whether `torch._grouped_mm` can be the automatic choice on `device` (CUDA, SM 8.0+)."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_expert_path(path: ExpertPath, device: torch.device) -> str:
    if path not in EXPERT_PATHS:
        raise ValueError(f"unknown expert path {path!r}; choose one of {', '.join(EXPERT_PATHS)}")
    if path != "auto":
        return path
    return "grouped_mm" if grouped_mm_supported(device) else "loop"


class GroupedExperts(nn.Module):
    """N SwiGLU experts with stacked weights.

    w_gate_up [E, hidden, 2·ffn] holds each expert's gate and up projections side by side (one GEMM
    for both); w_down is [E, ffn, hidden]. Both are laid out as `input @ weight[e]`, the layout
    `torch._grouped_mm` takes without a transpose.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int,
                 path: ExpertPath = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ffn_size = ffn_size
        self.path = path
        self.align_rows: int | None = None  # grouped_mm row alignment; None: 16 on CUDA, else 1
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))

    def forward(self, x: torch.Tensor, dispatch: Dispatch, path: ExpertPath | None = None) -> torch.Tensor:
        """x: [tokens, hidden] → Σ over each token's assignments of weight × expert(x)."""
        chosen = resolve_expert_path(path or self.path, x.device)
        if chosen == "naive":
            return self._naive(x, dispatch)
        if chosen == "grouped_mm":
            align = self.align_rows or (CUDA_GROUP_ALIGN_ROWS if x.is_cuda else 1)
            layout = _group_by_expert(dispatch, align)
            rows = self._grouped_mm(x, layout, align)
        else:
            layout = _group_by_expert(dispatch, align=1)
            rows = self._loop(x[layout.token_index], layout.group_end)
        weighted = rows * layout.weight.unsqueeze(1).to(rows.dtype)
        return torch.zeros_like(x).index_add(0, layout.token_index, weighted)

    def _grouped_mm(self, x: torch.Tensor, layout: "_Layout", align: int) -> torch.Tensor:
        """Rows in sorted-assignment order: three grouped GEMMs (gate+up fused, then down)."""
        valid = layout.valid.unsqueeze(1)
        # Rows past the last group (dropped assignments) come back from the grouped GEMM, and their
        # gradients too, uninitialized; `where` keeps that garbage out of x and out of the output.
        source = torch.where(valid, x[layout.token_index], 0.0)
        if align > 1:
            grouped = x.new_zeros(layout.num_rows, x.shape[1]).index_copy(0, layout.row, source)
        else:
            grouped = source  # unpadded: row i is sorted assignment i
        # bf16 on CUDA (the grouped kernel's dtype); the CPU fallback runs in the input's dtype.
        dtype = torch.bfloat16 if x.is_cuda else x.dtype
        offs = layout.group_end.to(torch.int32)
        gate_up = torch._grouped_mm(grouped.to(dtype), self.w_gate_up.to(dtype), offs=offs)
        gate, up = gate_up.split(self.ffn_size, dim=-1)
        hidden = (F.silu(gate) * up).contiguous()
        out = torch._grouped_mm(hidden, self.w_down.to(dtype), offs=offs).to(x.dtype)
        return torch.where(valid, out[layout.row] if align > 1 else out, 0.0)

    def _loop(self, grouped: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        ends = group_end.tolist()  # host sync: fine for the portable path
        # unbind, not w[e]: indexing would make every expert's backward allocate a full-size zero grad.
        gate_ups, downs = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        parts, start = [], 0
        for expert, end in enumerate(ends):
            if end > start:
                parts.append(_swiglu(grouped[start:end], gate_ups[expert], downs[expert], self.ffn_size))
            start = end
        parts.append(grouped.new_zeros(grouped.shape[0] - start, grouped.shape[1]))  # dropped
        return torch.cat(parts)

    def _naive(self, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        gate_ups, downs = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        out = torch.zeros_like(x)
        for expert in range(self.num_experts):
            picked = (dispatch.expert_index == expert).nonzero().squeeze(1)
            tokens = dispatch.token_index[picked]
            y = _swiglu(x[tokens], gate_ups[expert], downs[expert], self.ffn_size)
            out = out.index_add(0, tokens, y * dispatch.weight[picked].unsqueeze(1).to(y.dtype))
        return out


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ffn_size: int) -> torch.Tensor:
    gate, up = (x @ w_gate_up).split(ffn_size, dim=-1)
    return (F.silu(gate) * up) @ w_down


@dataclass(frozen=True)
class _Layout:
    """Assignments sorted by expert, each expert's rows padded to a multiple of the alignment."""

    token_index: torch.Tensor  # [A] token of each sorted assignment
    weight: torch.Tensor  # [A]
    valid: torch.Tensor  # [A] False for dropped assignments
    row: torch.Tensor  # [A] row of the grouped buffer holding it
    group_end: torch.Tensor  # [E] end row of each expert's group (cumulative, padded)
    num_rows: int


def _group_by_expert(dispatch: Dispatch, align: int) -> _Layout:
    experts = dispatch.num_experts
    order = dispatch.expert_index.argsort(stable=True)
    sorted_expert = dispatch.expert_index[order]
    counts = count_per_expert(dispatch.expert_index, experts + 1)  # last bin: dropped
    start = counts.cumsum(0) - counts
    padded = (counts[:experts] + align - 1) // align * align
    padded_end = padded.cumsum(0)
    padded_start = torch.cat([padded_end - padded, padded_end[-1:]])  # dropped go after all groups
    rank = torch.arange(order.numel(), device=order.device) - start[sorted_expert]
    # A static bound on rows (no host sync): every assignment plus the worst-case padding.
    num_rows = order.numel() + experts * (align - 1)
    return _Layout(token_index=dispatch.token_index[order], weight=dispatch.weight[order],
                   valid=sorted_expert < experts, row=padded_start[sorted_expert] + rank,
                   group_end=padded_end, num_rows=num_rows)
