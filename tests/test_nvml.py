"""The NVML sampler against a fake NVML: what it reads, and that unsupported queries read as zero."""

from __future__ import annotations

import types

from hyrun.agent.nvml import NvmlCards


class FakeNvmlError(Exception):
    pass


def fake_nvml(xids=(), ecc_supported=True):
    pending = list(xids)

    def wait(_events, _timeout):
        if not pending:
            raise FakeNvmlError("timeout")
        device, xid = pending.pop(0)
        return types.SimpleNamespace(device=device, eventData=xid)

    def ecc(handle, *_):
        if not ecc_supported:
            raise FakeNvmlError("not supported")
        return 2 if handle == 1 else 0

    return types.SimpleNamespace(
        NVMLError=FakeNvmlError,
        NVML_TEMPERATURE_GPU=0, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN=1, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0, nvmlEventTypeXidCriticalError=8,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTemperatureThreshold=lambda h, kind: 87,
        nvmlDeviceGetTemperature=lambda h, kind: 60 + h,
        nvmlDeviceGetPowerUsage=lambda h: 350_000,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=40 << 30),
        nvmlDeviceGetTotalEccErrors=ecc,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x20,
        nvmlEventSetCreate=lambda: "events", nvmlDeviceRegisterEvents=lambda h, kind, events: None,
        nvmlEventSetWait_v2=wait, nvmlEventSetFree=lambda e: None,
    )  # fmt: skip


def test_reads_every_field_and_routes_xids_to_their_card():
    cards = NvmlCards([0, 1], nvml=fake_nvml(xids=[(1, 79)]))
    first, second = cards.sample()
    assert (first.temperature_c, first.slowdown_temperature_c, first.power_w, first.utilization) == (60.0, 87.0, 350.0, 0.97)
    assert first.memory_used_bytes == 40 << 30 and first.throttle_reasons == 0x20
    assert second.ecc_uncorrected == 2 and second.xid_events == (79,) and first.xid_events == ()
    assert cards.sample()[1].xid_events == ()  # an event is reported once


def test_unsupported_queries_read_as_zero():
    (card,) = NvmlCards([0], nvml=fake_nvml(ecc_supported=False)).sample()
    assert card.ecc_uncorrected == 0 and card.temperature_c == 60.0
