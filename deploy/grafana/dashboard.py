"""Writes hyrun-dashboard.json: edit the panels here, run `python deploy/grafana/dashboard.py`, commit
both. tests/test_deploy.py fails when the JSON is not what this script writes, when a panel queries a
series the coordinator does not export, or when Grafana's JSON model would drop or change a field;
tests/test_monitoring_prometheus.py evaluates every query against a real Prometheus."""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
COORD = 'job=~"$job",instance=~"$instance"'  # the coordinator's own series
CARD = COORD + ',node=~"$node"'  # per-card and per-rank series
_ids = iter(range(1, 1000))


def q(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, "range": True, **extra}


def panel(kind: str, title: str, description: str, x: int, y: int, w: int, h: int, targets: list[dict], *,
          unit: str = "short", options: dict | None = None, defaults: dict | None = None,
          overrides: list | None = None) -> dict:  # fmt: skip
    for ref, target in zip("ABCDEFGH", targets):
        target["refId"] = ref
    field_defaults = {"unit": unit, "color": {"mode": "palette-classic"}, **(defaults or {})}
    return {
        "type": kind, "id": next(_ids), "title": title, "description": description, "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
        "options": options if options is not None else _TIMESERIES_OPTIONS,
    }  # fmt: skip


_TIMESERIES_OPTIONS = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
                       "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
_STAT_OPTIONS = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "colorMode": "value", "graphMode": "none", "textMode": "auto", "orientation": "auto"}  # fmt: skip


def stat(title, description, x, y, expr, unit="short"):
    return panel("stat", title, description, x, y, 4, 4, [q(expr, "{{instance}}")], unit=unit, options=_STAT_OPTIONS)


def series(title, description, x, y, w, targets, unit="short", h=8, **kw):
    return panel("timeseries", title, description, x, y, w, h, targets, unit=unit, **kw)


def row(title, y):
    return {"type": "row", "id": next(_ids), "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": []}  # fmt: skip


def margin_colours() -> dict:
    """Red within the drain margin (5 °C, health.temperature_margin_c), orange within 15 °C."""
    return {"color": {"mode": "thresholds"}, "min": 0,
            "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 5},
                                                         {"color": "green", "value": 15}]}}  # fmt: skip


def panels() -> list[dict]:
    out = [row("Job", 0)]
    out += [
        stat("Nodes alive", "Nodes whose agent heartbeats are current.", 0, 1, f"hyrun_nodes_alive{{{COORD}}}"),
        stat("Cards", "Cards registered by live nodes.", 4, 1, f"hyrun_cards{{{COORD}}}"),
        stat("Generation", "Current generation: a new one starts after every recovery.", 8, 1, f"hyrun_generation{{{COORD}}}"),
        stat("Step", "Last step every rank completed.", 12, 1, f"hyrun_step{{{COORD}}}"),
        stat("Job failures", "Jobs that ended FAILED.", 16, 1, f"hyrun_job_failures_total{{{COORD}}}"),
        stat("Steps lost", "Steps trained again after resuming from a checkpoint.", 20, 1,
             f"sum by (instance) (hyrun_steps_lost_total{{{COORD}}})"),
        series("Loss", "Training loss of the last completed step; generation changes are marked.", 0, 5, 12,
               [q(f"hyrun_loss{{{COORD}}}", "{{instance}}")]),
        series("Tokens/s", "Training throughput of the last completed step.", 12, 5, 12,
               [q(f"hyrun_tokens_per_second{{{COORD}}}", "{{instance}}")]),
        series("Step time: predicted vs measured", "The cost model's step time for the running plan against the "
               "measured one (slowest rank). NaN prediction: an even split, no plan.", 0, 13, 12,
               [q(f"hyrun_step_time_seconds{{{COORD}}}", "measured"),
                q(f"hyrun_planner_predicted_step_time_seconds{{{COORD}}}", "predicted")], unit="s"),
        series("Replans by cause", "Generations planned again after one ended, by the cause of the first verdict.",
               12, 13, 12, [q(f"sum by (cause) (hyrun_replans_total{{{COORD}}})", "{{cause}}")]),
    ]
    out.append(row("Ranks", 21))
    out += [
        series("Step time per rank", "Wall time of each rank's last step: a straggler is the line far above the rest.",
               0, 22, 12, [q(f"hyrun_rank_step_time_seconds{{{CARD}}}", "rank {{rank}} ({{node}})")], unit="s"),
        series("Where a rank's step goes (compute, comm wait, pipeline bubble)", "Per rank: compute, waiting on "
               "collectives, idle in the pipeline bubble.", 12, 22, 12,
               [q(f"hyrun_rank_time_seconds{{{CARD}}}", "rank {{rank}} {{part}}")], unit="s",
               defaults={"custom": {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 30}}),
        series("Gradient norm per rank", "Norm of each rank's local gradients before reduction; NaN or a spike on one "
               "rank while its peers are flat points at that card.", 0, 30, 12,
               [q(f"hyrun_rank_grad_norm{{{CARD}}}", "rank {{rank}} ({{node}})")]),
        panel("heatmap", "Gradient overflow (rank × step)", "Steps with NaN/inf local gradients per rank, per time "
              "bucket (time runs with the step). One hot row: suspect that card (the coordinator drains it after "
              "health.overflow_strikes); every row at once: the job's numerics.", 12, 30, 12, 8,
              [q(f"sum by (rank) (increase(hyrun_rank_nonfinite_grad_steps_total{{{CARD}}}[$__rate_interval]))",
                 "{{rank}}", format="time_series")],
              options={"calculate": False, "yAxis": {"axisLabel": "rank"}, "rowsFrame": {"layout": "auto"},
                       "color": {"mode": "scheme", "scheme": "Reds", "fill": "dark-red", "exponent": 0.5, "steps": 64},
                       "cellGap": 1, "legend": {"show": True}, "tooltip": {"show": True, "yHistogram": False}}),
        series("Steps skipped", "Steps whose update every rank skipped because some rank's gradients were not finite.",
               0, 38, 8, [q(f"increase(hyrun_steps_skipped_total{{{COORD}}}[$__rate_interval])", "{{instance}}")]),
        series("Worker exits by outcome", "finished: exit 0 at the job's end; failed: anything else.", 8, 38, 8,
               [q(f"sum by (outcome) (hyrun_worker_exits_total{{{COORD}}})", "{{outcome}}")]),
        series("Collectives by kind", "Bytes per second the ranks put into collectives (all_reduce, all_gather, "
               "reduce_scatter, all_to_all, broadcast, p2p), and the share of their time spent inside those calls.",
               16, 38, 8,
               [q(f"sum by (kind) (rate(hyrun_rank_collective_bytes_total{{{CARD}}}[$__rate_interval]))", "{{kind}} bytes/s"),
                q(f"sum by (kind) (rate(hyrun_rank_collective_seconds_total{{{CARD}}}[$__rate_interval])) / on() "
                  f"group_left() count(hyrun_rank_step_time_seconds{{{COORD}}})", "{{kind}} share of time")], unit="Bps",
               overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [{"id": "unit", "value": "percentunit"}]}]),
    ]
    out.append(row("Cards", 46))
    out += [
        series("Card temperature vs slowdown threshold", "Each card's temperature (solid) and the temperature at "
               "which it slows itself down (dashed).", 0, 47, 12,
               [q(f"hyrun_card_temperature_celsius{{{CARD}}}", "{{node}}/card{{card}}"),
                q(f"hyrun_card_slowdown_temperature_celsius{{{CARD}}}", "{{node}}/card{{card}} threshold")],
               unit="celsius",
               overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                           "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}]),
        panel("bargauge", "Temperature margin per card", "Slowdown threshold minus temperature, coloured by margin: "
              "red inside the coordinator's drain margin.", 12, 47, 12, 8,
              [q(f"hyrun_card_slowdown_temperature_celsius{{{CARD}}} - hyrun_card_temperature_celsius{{{CARD}}}",
                 "{{node}}/card{{card}}")], unit="celsius", defaults=margin_colours(),
              options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}),
        series("XID, ECC and throttle events", "XID events by code (fatal ones evict the card), new uncorrectable ECC "
               "errors, and clock throttling for heat or power.", 0, 55, 12,
               [q(f"sum by (node, card, xid, fatal) (increase(hyrun_card_xid_events_total{{{CARD}}}[$__rate_interval]))",
                  "XID {{xid}} {{node}}/card{{card}}"),
                q(f"sum by (node, card) (increase(hyrun_card_ecc_uncorrected_errors_total{{{CARD}}}[$__rate_interval]))",
                  "ECC {{node}}/card{{card}}"),
                q(f'hyrun_card_throttle_reasons{{{CARD},reason!~"gpu_idle|applications_clocks|display_clocks"}}',
                  "throttle {{reason}} {{node}}/card{{card}}")],
               defaults={"custom": {"drawStyle": "bars", "fillOpacity": 60}}),
        panel("state-timeline", "Quarantined cards", "1 while a card is kept out of the job (evicted or drained).",
              12, 55, 12, 8, [q(f"hyrun_card_quarantined{{{CARD}}}", "{{node}}/card{{card}}")],
              defaults={"color": {"mode": "thresholds"}, "thresholds": {"mode": "absolute", "steps": [
                  {"color": "green", "value": None}, {"color": "red", "value": 1}]}},
              options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8, "legend": {"showLegend": False}}),
        series("Power", "Card power draw.", 0, 63, 8, [q(f"hyrun_card_power_watts{{{CARD}}}", "{{node}}/card{{card}}")],
               unit="watt"),
        series("Utilization", "Share of time each card was busy.", 8, 63, 8,
               [q(f"hyrun_card_utilization_ratio{{{CARD}}}", "{{node}}/card{{card}}")], unit="percentunit"),
        series("Memory used / total", "Card memory in use against the card's memory.", 16, 63, 8,
               [q(f"hyrun_card_memory_used_bytes{{{CARD}}} / hyrun_card_memory_total_bytes{{{CARD}}}",
                  "{{node}}/card{{card}}")], unit="percentunit"),
    ]
    out.append(row("Checkpoints", 71))
    out += [
        series("Checkpoint stall", "Share of training time the ranks lost to checkpoints (staging and fence), and "
               "the 99th percentile stall of a saving step.", 0, 72, 8,
               [q(f"sum(rate(hyrun_checkpoint_stall_seconds_sum{{{COORD}}}[$__rate_interval])) / "
                  f"count(hyrun_rank_step_time_seconds{{{COORD}}})", "share of time"),
                q(f"histogram_quantile(0.99, sum by (le) (increase(hyrun_checkpoint_stall_seconds_bucket{{{COORD}}}[$__range])))",
                  "p99 stall per save")], unit="percentunit",
               overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [{"id": "unit", "value": "s"}]}]),
        series("Checkpoint time to durable", "From staging to the all-ranks commit on disk: each commit's time "
               "(mean per interval) and the median over the range.", 8, 72, 8,
               [q(f"hyrun_checkpoint_durable_seconds_sum{{{COORD}}} / hyrun_checkpoint_durable_seconds_count{{{COORD}}}",
                  "mean since start"),
                q(f"histogram_quantile(0.5, sum by (le) (increase(hyrun_checkpoint_durable_seconds_bucket{{{COORD}}}[$__range])))",
                  "median over the range")], unit="s"),
        series("Checkpoint age vs interval", "Time since the newest checkpoint committed, against three expected "
               "intervals (HyrunCheckpointStale fires above it, and past 5 minutes).", 16, 72, 8,
               [q(f"hyrun_checkpoint_age_seconds{{{COORD}}}", "age"),
                q(f"3 * hyrun_checkpoint_interval_seconds{{{COORD}}}", "3 intervals")], unit="s"),
        series("Checkpoint size", "The newest committed checkpoint: its size on disk, all ranks.", 0, 80, 8,
               [q(f"hyrun_checkpoint_size_bytes{{{COORD}}}", "size")], unit="bytes"),
        series("Checkpoint failures by cause", "Saves that failed on every rank; training went on from the previous "
               "checkpoint.", 8, 80, 8, [q(f"sum by (cause) (hyrun_checkpoint_failures_total{{{COORD}}})", "{{cause}}")]),
        series("Resumes by source", "Ranks that resumed from their RAM snapshot or from disk, and newer checkpoints "
               "refused on the way (damaged).", 16, 80, 8,
               [q(f"sum by (source) (hyrun_checkpoint_resumes_total{{{COORD}}})", "{{source}}"),
                q(f"hyrun_checkpoint_resume_fallbacks_total{{{COORD}}}", "fallbacks")]),
    ]
    out.append(row("Recoveries", 88))
    out += [
        series("Recovery timeline: evictions, drains, replans", "Cards acted on so far, by verdict and the cause of "
               "its evidence (each step up is one card), and steps trained again; the annotations mark each one.",
               0, 89, 8,
               [q(f"sum by (verdict, cause) (hyrun_evictions_total{{{COORD}}})", "{{verdict}}: {{cause}}"),
                q(f"sum by (verdict) (hyrun_steps_lost_total{{{COORD}}})", "steps lost ({{verdict}})")],
               defaults={"custom": {"lineInterpolation": "stepAfter"}}),
        series("Recovery time by verdict", "Detection: from the last step every rank completed to the verdict. "
               "Resume: from the verdict to the next generation's first step. Means since the coordinator started.",
               8, 89, 8,
               [q(f"sum by (verdict) (hyrun_recovery_detection_seconds_sum{{{COORD}}}) / "
                  f"sum by (verdict) (hyrun_recovery_detection_seconds_count{{{COORD}}})", "detect {{verdict}}"),
                q(f"sum by (verdict) (hyrun_recovery_resume_seconds_sum{{{COORD}}}) / "
                  f"sum by (verdict) (hyrun_recovery_resume_seconds_count{{{COORD}}})", "resume {{verdict}}")], unit="s"),
        series("Heartbeats and stale reports /s", "Agent heartbeats received, and reports fenced off because they "
               "named an older generation.", 16, 89, 8,
               [q(f"sum by (instance) (rate(hyrun_heartbeats_total{{{COORD}}}[$__rate_interval]))", "heartbeats {{instance}}"),
                q(f"sum by (instance) (rate(hyrun_stale_reports_total{{{COORD}}}[$__rate_interval]))", "stale {{instance}}")]),
    ]
    out.append(row("Coordinator", 97))
    out += [
        series("Coordinator loop lag", "How late the policy timer ran (worst of the last 15 s). Half a heartbeat "
               "timeout or more is a stall: node silence is counted again from its end.", 0, 98, 8,
               [q(f"hyrun_coordinator_loop_lag_seconds{{{COORD}}}", "{{instance}}")], unit="s"),
        series("Fleet temperature margin", "Every card, exported as its own series or not: how many run within "
               "each margin of their slowdown threshold, by card type.", 8, 98, 8,
               [q(f"sum by (card_type, le) (hyrun_cards_temperature_margin_celsius_bucket{{{COORD}}})",
                  "{{card_type}} ≤ {{le}} °C")]),
        series("Cards without their own series", "Cards left out of per-card series by the cardinality limit (they "
               "are still in the fleet histogram).", 16, 98, 8, [q(f"hyrun_cards_unexported{{{COORD}}}", "{{instance}}")]),
    ]
    out.append(row("Evaluation", 106))
    out += [
        series("Held-out loss per source, by checkpoint", "Held-out loss (nats/token) per source of the newest "
               "checkpoint the evaluation beside training scored, and that checkpoint's step (right axis): each "
               "step up is a new checkpoint. HyrunEvalWorse fires when a source's loss rises past the job's "
               "regression margin over the checkpoint before.", 0, 107, 16,
               [q(f"hyrun_eval_loss{{{COORD}}}", "{{source}}"),
                q(f"hyrun_eval_checkpoint_step{{{COORD}}}", "checkpoint step")],
               defaults={"custom": {"lineInterpolation": "stepAfter"}},
               overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                           "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                          {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}]),
        series("Evaluations: failures and time", "Checkpoint evaluations that failed (training went on; the error is "
               "in RUN_DIR/eval.jsonl), and the mean time to score one checkpoint.", 16, 107, 8,
               [q(f"hyrun_eval_failures_total{{{COORD}}}", "failed"),
                q(f"hyrun_eval_duration_seconds_sum{{{COORD}}} / hyrun_eval_duration_seconds_count{{{COORD}}}",
                  "mean seconds per checkpoint")],
               overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                           "properties": [{"id": "unit", "value": "s"}, {"id": "custom.axisPlacement", "value": "right"}]}]),
    ]
    return out


def variables() -> list[dict]:
    def query(name, label, definition, multi=True):
        return {"name": name, "label": label, "type": "query", "datasource": DS, "definition": definition,
                "query": {"query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "current": {}, "hide": 0, "includeAll": True, "allValue": ".*", "multi": multi, "options": [],
                "refresh": 2, "regex": "", "sort": 1, "skipUrlSync": False}  # fmt: skip

    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {},
         "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "", "skipUrlSync": False},
        query("job", "Job", "label_values(hyrun_nodes_alive, job)"),
        query("instance", "Coordinator", 'label_values(hyrun_nodes_alive{job=~"$job"}, instance)'),
        query("node", "Node", f"label_values(hyrun_card_temperature_celsius{{{COORD}}}, node)"),
    ]  # fmt: skip


def annotations() -> list[dict]:
    acted = f"hyrun_evictions_total{{{COORD}}}"
    return [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
         "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
        {"datasource": DS, "enable": True, "hide": False, "iconColor": "orange", "name": "New generation",
         "expr": f"changes(hyrun_generation{{{COORD}}}[1m]) > 0", "step": "30s", "titleFormat": "generation changed",
         "textFormat": "{{instance}}", "useValueForTime": False},
        # A verdict's series appears with its first card (already at 1): its appearance counts too.
        {"datasource": DS, "enable": True, "hide": False, "iconColor": "red", "name": "Evictions, drains, replans",
         "expr": f"sum by (verdict, cause, node, card) (increase({acted}[1m]) > 0 or ({acted} unless {acted} offset 1m))",
         "step": "15s", "titleFormat": "{{verdict}} {{node}}/card{{card}}", "textFormat": "evidence: {{cause}}",
         "useValueForTime": False},
    ]  # fmt: skip


def dashboard() -> dict:
    return {
        "title": "hyrun", "uid": "hyrun-overview",
        "description": "A hyrun coordinator: job progress, ranks, card health, checkpoints, recoveries, evaluations (deploy/README.md).",
        "tags": ["hyrun", "training"], "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 2,
        "refresh": "30s", "time": {"from": "now-6h", "to": "now"}, "timepicker": {}, "timezone": "browser",
        "fiscalYearStartMonth": 0, "liveNow": False, "links": [],
        "annotations": {"list": annotations()}, "templating": {"list": variables()}, "panels": panels(),
    }  # fmt: skip


PATH = Path(__file__).resolve().parent / "hyrun-dashboard.json"


def render() -> str:
    global _ids
    _ids = iter(range(1, 1000))
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH}")
