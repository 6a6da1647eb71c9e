"""Every expert-computation path equals a naive per-token reference, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from hyrun.runtime.model.experts import GroupedExperts
from hyrun.runtime.model.routing import capacity_per_expert, recycle_route

torch.set_num_threads(1)

E, HIDDEN, FFN, TOKENS = 6, 16, 24, 40


def per_token_reference(x, dispatch, experts: GroupedExperts):
    """One token, one expert at a time: the definition the fast paths must match."""
    rows = [torch.zeros(x.shape[1], dtype=x.dtype) for _ in range(x.shape[0])]
    for token, expert, weight in zip(dispatch.token_index.tolist(), dispatch.expert_index.tolist(),
                                     dispatch.weight):
        if expert == experts.num_experts:
            continue  # dropped
        gate, up = (x[token] @ experts.w_gate_up[expert]).split(experts.ffn_size)
        rows[token] = rows[token] + weight * ((F.silu(gate) * up) @ experts.w_down[expert])
    return torch.stack(rows)


def make_case(capacity_factor: float, top_k: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    experts = GroupedExperts(E, HIDDEN, FFN)
    torch.nn.init.normal_(experts.w_gate_up, std=0.3)
    torch.nn.init.normal_(experts.w_down, std=0.3)
    x = torch.randn(TOKENS, HIDDEN)
    logits = torch.randn(TOKENS, E)
    logits[:, 0] += 2.0  # overflow expert 0
    weight, choice = logits.softmax(-1).topk(top_k, dim=-1)
    capacity = capacity_per_expert(capacity_factor, TOKENS, top_k, E)
    dispatch, stats = recycle_route(choice, weight, E, capacity, torch.Generator().manual_seed(1))
    return experts, x, dispatch, stats


PATHS = [("loop", None), ("naive", None), ("grouped_mm", None), ("grouped_mm", 16)]  # 16: CUDA padding


@pytest.mark.parametrize("capacity_factor", [1.25, 0.5])  # 0.5: some assignments are dropped
@pytest.mark.parametrize("path,align", PATHS)
def test_paths_equal_per_token_reference_fp32(path, align, capacity_factor):
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    experts, x, dispatch, stats = make_case(capacity_factor)
    if capacity_factor < 1:
        assert stats.dropped_count > 0
    experts.align_rows = align
    x_ref = x.clone().requires_grad_()
    reference = per_token_reference(x_ref, dispatch, experts)
    reference.pow(2).sum().backward()
    ref_grads = [x_ref.grad] + [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()

    x_path = x.clone().requires_grad_()
    out = experts(x_path, dispatch, path=path)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    grads = [x_path.grad] + [p.grad for p in experts.parameters()]
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_path_is_rejected():
    experts, x, dispatch, _ = make_case(1.25)
    with pytest.raises(ValueError, match="grouped_mm"):
        experts(x, dispatch, path="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA card")
def test_grouped_mm_bf16_on_cuda_matches_reference_loosely():
    experts, x, dispatch, _ = make_case(1.25)
    reference = per_token_reference(x, dispatch, experts)
    experts = experts.cuda()
    cuda_dispatch = type(dispatch)(**{k: (v.cuda() if torch.is_tensor(v) else v)
                                      for k, v in vars(dispatch).items()})
    out = experts(x.cuda(), cuda_dispatch, path="grouped_mm").cpu()
    torch.testing.assert_close(out, reference, rtol=5e-2, atol=5e-2)
