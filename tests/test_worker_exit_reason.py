"""The reason an agent reports for a worker's exit is the worker's own error summary, not what a
crashing teardown prints after it: that is what tells a rank that died of a peer's failure (not
evicted) from the one that failed."""

from __future__ import annotations

from hyrun.agent.supervisor import last_error_line
from hyrun.runtime.coordinator.actions import CardRef
from hyrun.runtime.coordinator.policy import RankFailure

GLOO_VICTIM_LOG = """\
Traceback (most recent call last):
  File "runtime/trainer/loop.py", line 194, in train
RuntimeError: Got the following error when running the callback: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20360.

At:
  <frozen runpy>(198): _run_module_as_main
error: RuntimeError: Got the following error when running the callback: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20360.
terminate called without an active exception
"""


def test_the_workers_error_summary_wins_over_a_teardown_abort(tmp_path):
    log = tmp_path / "rank-2.log"
    log.write_text(GLOO_VICTIM_LOG)
    detail = last_error_line(log)
    assert detail.startswith("error: RuntimeError") and "Connection closed by peer" in detail
    victim = RankFailure(2, CardRef("node-b", 0), "cpu-sim", -6, f"killed by SIGABRT: {detail}", 1.0)
    assert victim.looks_like_victim


def test_without_a_summary_the_last_error_looking_line_is_used(tmp_path):
    log = tmp_path / "rank-0.log"
    log.write_text("step 3 done\nterminate called after throwing an instance of 'c10::Error'\n  what(): CUDA error\n")
    assert last_error_line(log) == "what(): CUDA error"
