"""The coordinator's Prometheus metrics. One registry per coordinator (tests run several in one
process), served over HTTP by prometheus-client. Names follow Prometheus conventions: base units,
`_total` for counters, labels for the dimension rather than one metric per rank."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.nodes_alive = Gauge("hyrun_nodes_alive", "Nodes whose agent heartbeats are current", registry=r)
        self.cards = Gauge("hyrun_cards", "Cards registered by live nodes", registry=r)
        self.generation = Gauge("hyrun_generation", "Number of the current generation", registry=r)
        self.step = Gauge("hyrun_step", "Last optimizer step completed by every rank", registry=r)
        self.loss = Gauge("hyrun_loss", "Training loss of the last completed step", registry=r)
        self.tokens_per_second = Gauge("hyrun_tokens_per_second", "Training throughput", registry=r)
        self.rank_step_time_seconds = Gauge(
            "hyrun_rank_step_time_seconds", "Last step time per rank", ["rank", "node"], registry=r
        )
        self.rank_time_seconds = Gauge(
            "hyrun_rank_time_seconds", "Where a rank's last step went: compute, comm_wait or bubble",
            ["rank", "node", "part"], registry=r,
        )
        self.heartbeats_total = Counter("hyrun_heartbeats_total", "Agent heartbeats received", registry=r)
        self.worker_exits_total = Counter(
            "hyrun_worker_exits_total", "Worker exits by outcome", ["outcome"], registry=r
        )
        self.stale_reports_total = Counter(
            "hyrun_stale_reports_total", "Reports ignored because they named an older generation", registry=r
        )
        self.evictions_total = Counter(
            "hyrun_evictions_total", "Cards evicted, by verdict", ["verdict"], registry=r
        )
        self.steps_lost_total = Counter(
            "hyrun_steps_lost_total", "Steps trained again after resuming from a checkpoint", registry=r
        )
        self.job_failures_total = Counter("hyrun_job_failures_total", "Jobs ended by a failure", registry=r)
        self.loop_lag_seconds = Gauge(
            "hyrun_coordinator_loop_lag_seconds", "How late the coordinator's policy timer last ran", registry=r
        )
        self._server = None

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP server; returns the port it bound (port 0 picks one)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
