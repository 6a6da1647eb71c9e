"""5D plans on real processes (gloo, loopback, TCPStore on port 0): after a few fp32 steps, each
configuration's losses and parameters equal a single-process run of the same global batches.

Run as a script, this file is the worker: it trains the reference itself (the tiny model is cheap),
then its part of the parallel plan, and writes the largest differences it saw to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

STEPS = 3
MICRO_BATCH = 2
SEQ_LEN = 16
# Plain SGD, not Adam: Adam divides out any uniform scale of the gradient, so a wrong token weighting
# (sum instead of mean, a replica counted twice) would pass unseen.
LR = 0.5
# Routing equals the reference only if no token overflows: capacity is per forward's own tokens.
MODEL = {"capacity_factor": 16.0}


# ---- the worker ---------------------------------------------------------------------------------


def micro_batch(step: int, index: int, vocab: int, documents: bool = False) -> torch.Tensor:
    """[MICRO_BATCH, SEQ_LEN + 1] tokens; with `documents`, [MICRO_BATCH, 2, SEQ_LEN + 1]: tokens and the
    segment ids of packed documents (a few documents per row, boundaries drawn like the tokens)."""
    generator = torch.Generator().manual_seed(step * 1_000 + index)
    tokens = torch.randint(0, vocab, (MICRO_BATCH, SEQ_LEN + 1), generator=generator)
    if not documents:
        return tokens
    starts = torch.rand(MICRO_BATCH, SEQ_LEN + 1, generator=generator) < 0.2
    return torch.stack([tokens, starts.long().cumsum(dim=1)], dim=1)


def build(config):
    from hyrun.runtime.model.transformer import MoETransformer

    torch.manual_seed(0)
    return MoETransformer(config)


def optimizer_for(params):
    return torch.optim.SGD(params, lr=LR, foreach=False)


def reference(config, counts: list[int], documents: bool = False) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """Single process: every step's micro-batches accumulated with weight 1/M; CE per micro-batch."""
    from hyrun.runtime.model.loss import lm_loss

    model = build(config)
    optimizer = optimizer_for(model.parameters())
    total, ces = sum(counts), []
    for step in range(1, STEPS + 1):
        model.set_routing_step(step)
        step_ces = []
        for index in range(total):
            tokens = micro_batch(step, index, config.vocab_size, documents)
            segments = tokens[:, 1, :-1] if documents else None
            tokens = tokens[:, 0] if documents else tokens
            loss, ce = lm_loss(model(tokens[:, :-1], segments), tokens[:, 1:])
            (loss / total).backward()
            step_ces.append(float(ce))
        optimizer.step()
        optimizer.zero_grad()
        ces.append(step_ces)
    return {k: v.detach() for k, v in model.named_parameters()}, ces


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from hyrun.runtime.model.config import ModelConfig
    from hyrun.runtime.parallel.dims import ParallelDims
    from hyrun.runtime.parallel.parallelize import parallelize
    from hyrun.runtime.parallel.expert_parallel import ExpertParallelExperts

    torch.set_num_threads(1)
    spec = json.loads(args.spec)
    config = ModelConfig.from_preset("tiny", **MODEL, **spec.get("model", {}))
    dims = ParallelDims(world_size=args.world, **spec["dims"])
    counts = spec.get("micro_batches", [1] * dims.dp)
    documents = spec.get("documents", False)
    ref_params, ref_ces = reference(config, counts, documents)

    store = dist.TCPStore("127.0.0.1", args.port, args.world, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=60))
    mesh = dims.build_mesh("cpu")
    parallel = parallelize(build(config), dims=dims, mesh=mesh, layers_per_stage=spec.get("layers_per_stage"),
                           micro_batches_per_replica=counts)
    optimizer = optimizer_for(parallel.module.parameters())
    replica = mesh["dp"].get_local_rank()
    offset = sum(counts[:replica])
    loss_diffs, timings = [], []
    for step in range(1, STEPS + 1):
        parallel.module.set_routing_step(step)
        batches = [micro_batch(step, offset + i, config.vocab_size, documents) for i in range(counts[replica])]
        result = parallel.forward_backward(batches)
        optimizer.step()
        optimizer.zero_grad()
        expected = sum(ref_ces[step - 1][offset:offset + counts[replica]]) / counts[replica]
        loss_diffs.append(abs(result.loss - expected))
        timings.append(result.timing.as_dict())

    experts = {name: module for name, module in parallel.module.named_modules()
               if isinstance(module, ExpertParallelExperts)}
    param_diff, worst, compared = 0.0, "", 0
    for name, param in parallel.module.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        expected = ref_params[name]
        owner = name.rsplit(".", 1)[0]
        if owner in experts:
            expected = expected[list(experts[owner].local_experts)]
        diff = float((value.detach() - expected).abs().max())
        compared += 1
        if diff >= param_diff:
            param_diff, worst = diff, name
    moved = max(float((ref_params[n] - build(config).state_dict()[n]).abs().max()) for n in ref_params)
    Path(args.out).write_text(json.dumps({"loss_diffs": loss_diffs, "param_diff": param_diff, "worst": worst,
                                          "compared": compared, "moved": moved, "timing": timings[-1]}))
    dist.destroy_process_group()


# ---- the test side ------------------------------------------------------------------------------


class Ranks:
    """Worker processes of one run, each in its own session so teardown can kill what is left."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def run(self, world: int, spec: dict, timeout_s: float) -> list[dict]:
        from torch.distributed import TCPStore

        store = TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False, timeout=timedelta(seconds=60))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for rank in range(world):
            argv = [sys.executable, __file__, "--rank", str(rank), "--world", str(world), "--port",
                    str(store.port), "--spec", json.dumps(spec), "--out", str(self.tmp_path / f"rank{rank}.json")]
            log = open(self.tmp_path / f"rank{rank}.log", "w")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))
        deadline = time.monotonic() + timeout_s
        for rank, proc in enumerate(self.procs):
            try:
                rc = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                logs = "\n".join(f"--- rank {r}\n" + (self.tmp_path / f"rank{r}.log").read_text()[-2500:]
                                 for r in range(world))
                raise AssertionError(f"rank {rank} exited {rc}:\n{logs}")
        return [json.loads((self.tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    def kill(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@pytest.fixture
def ranks(tmp_path):
    launched = Ranks(tmp_path)
    yield launched
    launched.kill()


def _dims(dp=1, tp=1, pp=1, cp=1, ep=1) -> dict:
    return {"dp": dp, "tp": tp, "pp": pp, "cp": cp, "ep": ep}


LOSS_TOL = 1e-5
PARAM_TOL = 1e-5

CASES = {
    "fsdp_dp4": (4, {"dims": _dims(dp=4)}),
    "uneven_dp_3_1": (2, {"dims": _dims(dp=2), "micro_batches": [3, 1]}),
    "tp2_dp2": (4, {"dims": _dims(dp=2, tp=2)}),
    "ep4_8_experts": (4, {"dims": _dims(dp=4, ep=4)}),
    # cla_share_every=3: layers 0 and 3 project K/V, so a 3/1 split is legal and CLA is still exercised.
    "pp2_dp2_3_1": (4, {"dims": _dims(dp=2, pp=2), "layers_per_stage": [3, 1], "micro_batches": [2, 2],
                        "model": {"cla_share_every": 3}}),
    "cp2": (2, {"dims": _dims(cp=2)}),
    # Sub-world groups: cp and ep over 2 of 4 ranks (torch.distributed.nn's all_gather backward fails there).
    "cp2_dp2": (4, {"dims": _dims(dp=2, cp=2)}),
    "ep2_dp4": (4, {"dims": _dims(dp=4, ep=2)}),
    "pp2_tp2": (4, {"dims": _dims(pp=2, tp=2), "micro_batches": [2]}),
    # Packed documents: the segment ids travel with the hidden state from stage to stage.
    "pp2_dp2_documents": (4, {"dims": _dims(dp=2, pp=2), "micro_batches": [2, 2], "documents": True,
                              "model": {"cla_share_every": 3}, "layers_per_stage": [3, 1]}),
    "tp2_dp2_documents": (4, {"dims": _dims(dp=2, tp=2), "documents": True}),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_single_process(ranks, case):
    world, spec = CASES[case]
    results = ranks.run(world, spec, timeout_s=50)
    for rank, result in enumerate(results):
        assert result["compared"] > 0 and result["moved"] > 1e-3, f"rank {rank}: nothing trained: {result}"
        assert max(result["loss_diffs"]) < LOSS_TOL, f"{case} rank {rank}: loss differs {result}"
        assert result["param_diff"] < PARAM_TOL, f"{case} rank {rank}: parameter {result['worst']} differs {result}"
        timing = result["timing"]
        assert timing["step_s"] > 0 and timing["compute_s"] > 0
        parts = timing["compute_s"] + timing["comm_wait_s"] + timing["bubble_s"]
        assert parts == pytest.approx(timing["step_s"], rel=1e-6), timing
        assert timing["bubble_s"] == 0.0 or spec["dims"]["pp"] > 1, timing


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    worker(parser.parse_args())
