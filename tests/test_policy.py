"""The single-signal rules (policy.py), without processes; how decide() combines them is in test_decide.py."""

from __future__ import annotations

import pytest

from hyrun.runtime.coordinator.actions import CardRef, Cause, VerdictKind
from hyrun.runtime.coordinator.policy import RankFailure, blame_exits, same_job_error


def _failure(rank: int, code: int, reason: str, at: float) -> RankFailure:
    return RankFailure(rank, CardRef("n", rank), "cpu-sim", code, reason, at)


def test_signal_death_is_blamed_and_peer_errors_are_not():
    verdicts = blame_exits([
        _failure(0, 1, "exited with code 1: RuntimeError: [gloo] Connection closed by peer", 1.0),
        _failure(2, -9, "killed by SIGKILL", 1.1),
        _failure(1, 1, "exited with code 1: DistBackendError: Broken pipe", 1.2),
        _failure(3, -6, "killed by SIGABRT: what():  [pair.cc:537] Read error: Connection reset by peer.", 1.2),
    ])  # fmt: skip
    assert [(v.kind, v.card.index) for v in verdicts] == [(VerdictKind.EVICT, 2)]
    assert "killed by SIGKILL" in verdicts[0].reason


def test_a_rank_that_crashed_on_its_own_is_blamed():
    verdicts = blame_exits([_failure(1, 1, "exited with code 1: error: RuntimeError: CUDA error: an illegal memory access", 1.0)])
    assert [v.card.index for v in verdicts] == [1]


def test_when_every_exit_looks_like_a_victim_the_first_to_go_is_blamed():
    verdicts = blame_exits([
        _failure(3, 1, "Connection reset by peer", 2.0),
        _failure(1, 1, "Connection reset by peer", 1.5),
    ])  # fmt: skip
    assert [v.card.index for v in verdicts] == [1]


def test_the_same_error_on_every_rank_is_the_jobs_not_a_cards():
    oom = "exited with code 1: RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate {} bytes"
    failures = [_failure(r, 1, oom.format(10**12 + r), 1.0 + r / 10) for r in range(4)]
    assert same_job_error(failures, world_size=4) is failures[0]
    assert same_job_error(failures[:3], world_size=4) is None  # one rank still running
    killed = failures[:3] + [_failure(3, -9, "killed by SIGKILL", 1.5)]
    assert same_job_error(killed, world_size=4) is None  # a signal is a card's or a host's, not the job's
    other = failures[:3] + [_failure(3, 1, "exited with code 1: ImportError: no module x", 1.5)]
    assert same_job_error(other, world_size=4) is None
    assert failures[0].evidence.cause is Cause.WORKER_EXIT


def test_hang_names_the_rank_that_never_entered_the_reduce():
    from hyrun.runtime.coordinator.policy import hung_ranks

    steps_done = {0: 7, 1: 7, 2: 7, 3: 7}
    entered = {0: 8, 1: 8, 3: 8}  # rank 2 stopped in its compute of step 8
    assert hung_ranks(steps_done, entered, 4) == [2]


def test_hang_names_a_rank_a_whole_step_behind():
    from hyrun.runtime.coordinator.policy import hung_ranks

    assert hung_ranks({0: 7, 1: 6, 2: 7}, {0: 8, 2: 8}, 3) == [1]


def test_hang_with_everyone_at_the_same_point_singles_out_nobody():
    from hyrun.runtime.coordinator.policy import hung_ranks

    assert hung_ranks({0: 7, 1: 7}, {0: 8, 1: 8}, 2) is None


def test_hot_card_near_its_threshold_is_drained():
    from hyrun.runtime.jobfile import HealthSection
    from hyrun.runtime.coordinator.policy import temperature_verdict

    verdict = temperature_verdict(CardRef("n", 0), [(0.0, 86.0)], 90.0, HealthSection())
    assert verdict.kind is VerdictKind.DRAIN and "within 5 °C" in verdict.reason


def test_rising_temperature_is_drained_before_it_crosses():
    from hyrun.runtime.jobfile import HealthSection
    from hyrun.runtime.coordinator.policy import temperature_verdict

    ramp = [(float(t), 60.0 + 0.2 * t) for t in range(0, 50, 5)]  # 12 °C/min, at 69 °C now
    verdict = temperature_verdict(CardRef("n", 0), ramp, 90.0, HealthSection(temperature_horizon_s=120))
    assert verdict is not None and "rising 12.0 °C/min" in verdict.reason
    assert temperature_verdict(CardRef("n", 0), ramp, 90.0, HealthSection(temperature_horizon_s=30)) is None
    steady = [(float(t), 70.0) for t in range(0, 50, 5)]
    assert temperature_verdict(CardRef("n", 0), steady, 90.0, HealthSection()) is None


def test_fatal_xid_and_uncorrectable_ecc_evict():
    from hyrun.runtime.jobfile import HealthSection
    from hyrun.runtime.coordinator.policy import hardware_error_verdict

    settings = HealthSection()
    assert "XID 79" in hardware_error_verdict(CardRef("n", 1), [13, 79], 0, settings).reason
    assert hardware_error_verdict(CardRef("n", 1), [13], 0, settings) is None  # XID 13: an application error
    assert "uncorrectable ECC" in hardware_error_verdict(CardRef("n", 1), [], 2, settings).reason


def test_repeated_lonely_overflow_is_suspected_corruption():
    from hyrun.runtime.jobfile import HealthSection
    from hyrun.runtime.coordinator.policy import suspected_corruption

    settings = HealthSection(overflow_strikes=3, overflow_window_steps=10)
    history = {s: {0: False, 1: s in (4, 6, 7), 2: False} for s in range(1, 9)}
    assert list(suspected_corruption(history, 8, settings)) == [1]
    assert suspected_corruption(history, 20, settings) == {}  # the strikes left the window
    everyone = {s: {0: True, 1: True} for s in range(1, 9)}  # the model diverged: nobody to blame
    assert suspected_corruption(everyone, 8, settings) == {}


def test_a_card_slower_than_its_peers_is_replanned_at_its_measured_speed():
    from hyrun.runtime.jobfile import HealthSection
    from hyrun.runtime.coordinator.policy import straggler_verdicts

    cards = [CardRef("a", 0), CardRef("a", 1), CardRef("b", 0)]
    times = {cards[0]: [0.10] * 5, cards[1]: [0.10] * 5, cards[2]: [0.25] * 5}
    types = {c: "cpu-sim" for c in cards}
    speeds = {c: 1.0 for c in cards}
    (verdict,) = straggler_verdicts(times, types, speeds, HealthSection())
    assert verdict.kind is VerdictKind.REPLAN and verdict.card == cards[2]
    assert verdict.speed == pytest.approx(0.4) and "2.5× slower" in verdict.reason


def test_a_card_slow_as_believed_is_no_straggler_and_a_far_slower_one_is_drained():
    from hyrun.runtime.jobfile import HealthSection
    from hyrun.runtime.coordinator.policy import straggler_verdicts

    cards = [CardRef("a", 0), CardRef("a", 1), CardRef("b", 0)]
    types = {c: "cpu-sim" for c in cards}
    believed = {cards[0]: 1.0, cards[1]: 1.0, cards[2]: 0.4}
    as_believed = {cards[0]: [0.1] * 5, cards[1]: [0.1] * 5, cards[2]: [0.25] * 5}
    assert straggler_verdicts(as_believed, types, believed, HealthSection()) == []
    far = {cards[0]: [0.1] * 5, cards[1]: [0.1] * 5, cards[2]: [1.25] * 5}
    (verdict,) = straggler_verdicts(far, types, believed, HealthSection())
    assert verdict.kind is VerdictKind.DRAIN
    one_slow_step = {cards[0]: [0.1] * 5, cards[1]: [0.1] * 5, cards[2]: [0.1] * 4 + [1.0]}
    assert straggler_verdicts(one_slow_step, types, {c: 1.0 for c in cards}, HealthSection()) == []
