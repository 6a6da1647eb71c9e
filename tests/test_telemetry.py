"""Simulated telemetry plays scripted hardware faults from the step they are due."""

from __future__ import annotations

from hyrun.agent.telemetry import SimulatedCards


def test_temperature_ramp_starts_at_its_step_and_rises():
    cards = SimulatedCards([0, 1])
    cards.script([{"kind": "temperature_ramp", "node": "n", "card": 1, "at_step": 3, "c_per_s": 2.0}])
    cards.observe_step(1, 2, now_s=0.0)
    assert [s.temperature_c for s in cards.sample(now_s=10.0)] == [45.0, 45.0]
    cards.observe_step(1, 3, now_s=10.0)
    assert [s.temperature_c for s in cards.sample(now_s=15.0)] == [45.0, 55.0]


def test_xid_is_reported_once_and_ecc_counts_up():
    cards = SimulatedCards([0])
    cards.script([{"kind": "xid", "node": "n", "card": 0, "at_step": 1, "xid": 79},
                  {"kind": "ecc", "node": "n", "card": 0, "at_step": 1}])  # fmt: skip
    cards.observe_step(0, 1, now_s=0.0)
    first, second = cards.sample(now_s=1.0)[0], cards.sample(now_s=2.0)[0]
    assert first.xid_events == (79,) and second.xid_events == ()
    assert first.ecc_uncorrected == second.ecc_uncorrected == 1


def test_a_stepping_card_reads_busy_and_a_hot_one_throttled():
    from hyrun.agent.telemetry import THROTTLE_HW_THERMAL

    cards = SimulatedCards([0, 1])
    cards.script([{"kind": "temperature_ramp", "node": "n", "card": 1, "at_step": 1, "c_per_s": 10.0}])
    cards.observe_step(1, 1, now_s=0.0)
    idle, hot = cards.sample(now_s=4.0)
    assert idle.utilization == 0.0 and idle.power_w < hot.power_w and hot.utilization == 1.0
    assert idle.throttle_reasons == 0 and hot.throttle_reasons == 0  # 85 °C: below its 90 °C threshold
    assert cards.sample(now_s=5.0)[1].throttle_reasons & THROTTLE_HW_THERMAL  # 95 °C
    assert cards.sample(now_s=60.0)[1].utilization == 0.0  # its worker stopped stepping


def test_heat_outlives_its_generation_and_cools_slowly_capped_short_of_shutdown():
    cards = SimulatedCards([0], cooling_c_per_s=1.0)
    cards.script([{"kind": "temperature_ramp", "node": "n", "card": 0, "at_step": 1, "c_per_s": 100.0}], now_s=0.0)
    cards.observe_step(0, 1, now_s=0.0)
    assert cards.sample(now_s=10.0)[0].temperature_c == 100.0  # capped 10 °C above its 90 °C slowdown
    cards.script([], now_s=10.0)  # the next generation scripts no fault on it
    assert cards.sample(now_s=15.0)[0].temperature_c == 95.0 and cards.sample(now_s=15.0)[0].throttle_reasons
    assert cards.sample(now_s=200.0)[0].temperature_c == 45.0 and not cards.sample(now_s=200.0)[0].throttle_reasons
