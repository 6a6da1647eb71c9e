"""The agent's side of a job's lifetime, without a coordinator: the worker lifecycle table, and the
clean-up of RAM snapshots by ownership record and owner liveness (pid and start time)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from hyrun.agent.lifecycle import ALLOWED, IllegalTransition, WorkerLifecycle, WorkerState
from hyrun.agent.node_agent import Outbox
from hyrun.common.process import is_same_process, process_start_ticks
from hyrun.common.snapshots import (
    SnapshotOwner,
    claim_snapshot,
    free_orphaned_snapshots,
    owner_path,
    snapshot_path,
)
from hyrun.proto import hyrun_pb2 as pb

S = WorkerState


# ---- the worker lifecycle ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        [S.ASSIGNED, S.EXITED],                # a rank that finished (or died) on its own
        [S.ASSIGNED, S.STOPPING, S.EXITED],    # stopped, went on SIGTERM
        [S.ASSIGNED, S.STOPPING, S.KILLED, S.EXITED],  # ignored SIGTERM: SIGKILL
        [S.STOPPING, S.EXITED],                # a spare stopped with the agent
        [S.EXITED],                            # a spare that died while waiting
    ],
)
def test_legal_worker_paths(path):
    life = WorkerLifecycle()
    for state in path:
        life.move(state)
    assert life.state is path[-1]
    assert life.stopped_by_agent == (S.STOPPING in path)


@pytest.mark.parametrize(
    "before, to",
    [
        ([], S.KILLED),                   # SIGKILL without a SIGTERM first
        ([S.ASSIGNED], S.ASSIGNED),       # one worker, two ranks
        ([S.ASSIGNED, S.STOPPING], S.ASSIGNED),  # a stopping worker gets no new rank
        ([S.EXITED], S.STOPPING),         # nothing to stop
        ([S.EXITED], S.ASSIGNED),         # a dead spare is never handed a rank
    ],
)
def test_illegal_worker_transitions_raise(before, to):
    life = WorkerLifecycle()
    for state in before:
        life.move(state)
    with pytest.raises(IllegalTransition):
        life.move(to)


def test_every_state_can_end_and_exited_is_final():
    assert all(S.EXITED in ALLOWED[state] for state in S if state is not S.EXITED)
    assert ALLOWED[S.EXITED] == frozenset()


def test_only_one_of_two_racing_stops_wins():
    life = WorkerLifecycle()
    life.move(S.ASSIGNED)
    wins = []
    threads = [threading.Thread(target=lambda: wins.append(life.move_if(frozenset({S.SPARE, S.ASSIGNED}), S.STOPPING)))
               for _ in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_a_heartbeat_overtakes_queued_reports_and_only_the_latest_is_sent():
    outbox = Outbox()
    for step in range(3):
        outbox.put(pb.AgentMessage(step=pb.StepReport(step=step)))
    outbox.put_heartbeat(pb.AgentMessage(heartbeat=pb.Heartbeat(sequence=1)))
    outbox.put_heartbeat(pb.AgentMessage(heartbeat=pb.Heartbeat(sequence=2)))
    sent = [outbox.get(timeout_s=0.01) for _ in range(5)]
    assert [m.WhichOneof("body") for m in sent[:4]] == ["heartbeat", "step", "step", "step"]
    assert sent[0].heartbeat.sequence == 2 and [m.step.step for m in sent[1:4]] == [0, 1, 2]
    assert sent[4] is None


# ---- snapshot ownership and clean-up ---------------------------------------------------------------


def _snapshot(shm, job: str, rank: int, owner: SnapshotOwner | None = None):
    """A snapshot file with an ownership record (this process's, or `owner`)."""
    path = snapshot_path(shm, job, rank)
    path.write_bytes(b"state")
    claim_snapshot(shm, job, rank)
    if owner is not None:
        owner_path(shm, job, rank).write_text(owner.model_dump_json())
    return path


def _dead_pid() -> tuple[int, int]:
    """(pid, start ticks) of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.05)"])
    ticks = process_start_ticks(child.pid)
    child.wait()
    return child.pid, ticks


def test_start_ticks_name_one_live_process():
    me = os.getpid()
    assert is_same_process(me, process_start_ticks(me))
    assert not is_same_process(me, process_start_ticks(me) + 1)
    pid, ticks = _dead_pid()
    assert ticks is not None and not is_same_process(pid, ticks)


def test_a_live_owners_snapshot_is_kept(tmp_path):
    kept = _snapshot(tmp_path, "job-live", 0)
    assert free_orphaned_snapshots(tmp_path) == []
    assert kept.exists() and owner_path(tmp_path, "job-live", 0).exists()


def test_a_dead_owners_snapshot_is_removed(tmp_path):
    pid, ticks = _dead_pid()
    dead = SnapshotOwner(job_id="job-dead", rank=1, owner_pid=pid, owner_start_ticks=ticks)
    gone = _snapshot(tmp_path, "job-dead", 1, owner=dead)
    kept = _snapshot(tmp_path, "job-live", 0)
    assert free_orphaned_snapshots(tmp_path) == [gone]
    assert not gone.exists() and not owner_path(tmp_path, "job-dead", 1).exists()
    assert kept.exists()


def test_a_reused_pid_with_another_start_time_counts_as_dead(tmp_path):
    # The owner's pid is alive (it is this process), but it started at another time: a new process
    # that got the dead owner's pid.
    me = SnapshotOwner.this_process("job-reused", 0)
    impostor = me.model_copy(update={"owner_start_ticks": me.owner_start_ticks + 1})
    gone = _snapshot(tmp_path, "job-reused", 0, owner=impostor)
    assert free_orphaned_snapshots(tmp_path) == [gone]


def test_an_owner_on_its_way_out_frees_its_own_but_not_a_live_peers(tmp_path):
    mine = _snapshot(tmp_path, "job", 0)
    parent = SnapshotOwner(job_id="job", rank=1, owner_pid=os.getppid(), owner_start_ticks=process_start_ticks(os.getppid()))
    peers = _snapshot(tmp_path, "job", 1, owner=parent)
    assert free_orphaned_snapshots(tmp_path, leaving=True) == [mine]
    assert peers.exists()


def test_a_snapshot_without_a_record_or_with_a_bad_one_is_never_touched(tmp_path):
    unowned = snapshot_path(tmp_path, "other", 0)
    unowned.write_bytes(b"state")  # no record: not ours to judge (never a blind glob)
    forged = _snapshot(tmp_path, "job", 3)
    owner_path(tmp_path, "job", 3).write_text('{"job_id": "job", "rank": "3"}')  # not a valid record
    misnamed = _snapshot(tmp_path, "job", 4)
    pid, ticks = _dead_pid()
    owner_path(tmp_path, "job", 4).write_text(
        SnapshotOwner(job_id="job", rank=5, owner_pid=pid, owner_start_ticks=ticks).model_dump_json()
    )  # names another rank than its file
    assert free_orphaned_snapshots(tmp_path) == []
    assert unowned.exists() and forged.exists() and misnamed.exists()


# ---- bounded stop of a worker's process group ------------------------------------------------------

STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # ignores the polite stop
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # in its group
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_ignoring_sigterm_and_its_child_are_killed_within_the_bound(monkeypatch):
    from hyrun.agent import supervisor as sup_module

    monkeypatch.setattr(sup_module, "STOP_GRACE_S", 0.5)
    sent: list[pb.AgentMessage] = []
    supervisor = sup_module.Supervisor("node-x", sent.append, warm_workers=0)
    report_read, report_write = os.pipe()
    control_read, control_write = os.pipe()
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                               pass_fds=(report_write,), process_group=0)  # fmt: skip
    os.close(report_write)
    os.close(control_read)
    child_pid = int(process.stdout.readline())
    worker = sup_module.WorkerProcess(process, report_read, control_write, generation=1, rank=0, card_index=0)
    worker.life.move(S.ASSIGNED)
    supervisor.workers[0] = worker
    reader = threading.Thread(target=supervisor._forward_reports, args=(worker,))
    reader.start()

    started = time.monotonic()
    supervisor.stop_all("test")
    elapsed_s = time.monotonic() - started
    reader.join(timeout=5)

    assert elapsed_s < 0.5 + sup_module.KILL_WAIT_S, elapsed_s
    assert process.returncode == -signal.SIGKILL and worker.life.state is S.EXITED
    assert _gone_within(child_pid, 2.0), "the worker's child outlived the SIGKILL of its group"
    (exit_report,) = [m.worker_exit for m in sent if m.WhichOneof("body") == "worker_exit"]
    assert exit_report.reason == "killed by SIGKILL" and supervisor.workers == {}


def _gone_within(pid: int, timeout_s: float) -> bool:
    """True once `pid` is dead (a zombie waiting for init counts): a SIGKILL lands asynchronously."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.timeout(120)
def test_a_signalled_agent_exits_within_its_bound_and_takes_its_spares(tmp_path):
    # No coordinator at this address: the agent sits in its reconnect loop, with a spare worker.
    from hyrun.agent.node_agent import SHUTDOWN_BOUND_S

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    agent = subprocess.Popen(
        [sys.executable, "-m", "hyrun.runtime.cli", "agent", "--coordinator", f"127.0.0.1:{free_port}",
         "--node", "n", "--simulate", "cpu-sim:1", "--warm-workers", "1", "--shm-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (spares := psutil.Process(agent.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spares, "the agent never started its spare"
        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=SHUTDOWN_BOUND_S + 5)
        assert time.monotonic() - started < SHUTDOWN_BOUND_S, stderr[-2000:]
        assert agent.returncode == 0 and "stopping: SIGTERM received" in stderr, stderr[-2000:]
        assert all(_gone_within(spare.pid, 5.0) for spare in spares)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
