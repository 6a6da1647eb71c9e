"""Health of real NVIDIA cards through NVML (nvidia-ml-py): temperature and its slowdown threshold,
power, clocks' throttle reasons, utilization, memory, ECC counts, and XID events from an NVML event
set. One `NvmlCards` per agent; `sample()` runs on the heartbeat timer, never on a worker's path.

A counter or query a card does not support (ECC on consumer cards, XID events without root) reads
as zero for that card instead of failing the whole sample: health reports must keep flowing.
"""

from __future__ import annotations

import logging

from hyrun.agent.telemetry import CardSample

log = logging.getLogger("hyrun.agent")


class NvmlCards:
    def __init__(self, indices: list[int], nvml=None) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = {index: nvml.nvmlDeviceGetHandleByIndex(index) for index in indices}
        self.slowdown_c = {index: self._query(index, self._slowdown, 0.0) for index in indices}
        self._events = self._event_set()

    def _query(self, index: int, read, default):
        try:
            return read(self.handles[index])
        except self.nvml.NVMLError:
            return default

    def _slowdown(self, handle) -> float:
        return float(self.nvml.nvmlDeviceGetTemperatureThreshold(handle, self.nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))

    def _event_set(self):
        """An event set for XID (critical) errors on every card, or None where NVML refuses one."""
        try:
            events = self.nvml.nvmlEventSetCreate()
            for handle in self.handles.values():
                self.nvml.nvmlDeviceRegisterEvents(handle, self.nvml.nvmlEventTypeXidCriticalError, events)
            return events
        except self.nvml.NVMLError as error:
            log.warning("no XID events from NVML (%s): fatal XIDs will not be seen", error)
            return None

    def _drain_xids(self) -> dict[int, list[int]]:
        xids: dict[int, list[int]] = {}
        if self._events is None:
            return xids
        while True:
            try:
                event = self.nvml.nvmlEventSetWait_v2(self._events, 0)
            except self.nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing pending
                return xids
            index = next((i for i, h in self.handles.items() if _same_device(h, event.device)), -1)
            xids.setdefault(index, []).append(int(event.eventData))

    def sample(self) -> list[CardSample]:
        nvml = self.nvml
        xids = self._drain_xids()
        samples = []
        for index, handle in self.handles.items():
            def read(fn, default=0):
                try:
                    return fn()
                except nvml.NVMLError:
                    return default

            samples.append(
                CardSample(
                    index=index,
                    temperature_c=float(read(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
                    slowdown_temperature_c=self.slowdown_c[index],
                    power_w=read(lambda: nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0,
                    utilization=read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0,
                    memory_used_bytes=int(read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used)),
                    ecc_uncorrected=int(read(lambda: nvml.nvmlDeviceGetTotalEccErrors(
                        handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))),
                    xid_events=tuple(xids.get(index, ())),
                    throttle_reasons=int(read(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))),
                )
            )  # fmt: skip
        return samples

    def close(self) -> None:
        try:
            if self._events is not None:
                self.nvml.nvmlEventSetFree(self._events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _same_device(a, b) -> bool:
    """NVML handles are ctypes pointers: equal when they point at the same device."""
    import ctypes

    try:
        return ctypes.cast(a, ctypes.c_void_p).value == ctypes.cast(b, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return a == b
