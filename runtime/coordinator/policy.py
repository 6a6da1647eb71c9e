"""The single-signal health rules: pure functions from what the coordinator observed to verdicts
with structured evidence. decide.py combines them (and settles their conflicts); nothing here
touches a process or a clock, so every rule is tested with hand-built state.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from hyrun.runtime.coordinator.actions import CardRef, Cause, Evidence, Verdict, VerdictKind
from hyrun.runtime.jobfile import HealthSection

# What a rank prints when a *peer* died under it: these ranks are victims, not culprits.
_PEER_FAILURE = re.compile(
    r"connection (closed|reset)|broken pipe|connectFullMesh|timed out|timeout|"
    r"ProcessGroupGloo|DistBackendError|NCCL (error|communicator)|Socket Timeout|peer",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RankFailure:
    """A worker that exited non-zero during a generation."""

    rank: int
    card: CardRef
    card_type: str
    exit_code: int   # < 0: killed by signal -exit_code
    reason: str      # the worker's own summary (its exception's first line, or the signal)
    at_s: float
    log_path: str = ""

    @property
    def evidence(self) -> Evidence:
        log_hint = f" (log: {self.log_path})" if self.log_path else ""
        return Evidence.of(Cause.WORKER_EXIT, rank=self.rank, node=self.card.node, card=self.card.index,
                           card_type=self.card_type, reason=self.reason + log_hint, exit_code=self.exit_code,
                           signature=self.error_signature)

    @property
    def error_signature(self) -> str:
        """The reason with numbers masked: ranks that hit the same error (an allocation too big for
        every card, an import error) share it even when sizes or ranks differ."""
        return re.sub(r"\d+", "#", self.reason)

    @property
    def looks_like_victim(self) -> bool:
        """Died of an error about its peers (a collective failed because someone else died) — by
        exit code, or by SIGABRT when gloo throws from a communication thread."""
        return bool(_PEER_FAILURE.search(self.reason))


def blame_exits(failures: list[RankFailure]) -> list[Verdict]:
    """Which cards to evict when ranks exit: when one rank dies, its peers' collectives fail and
    they exit too, so evict only the ranks that did not die of a peer's failure; if every one
    looks like a victim (the real cause printed nothing recognisable), evict the first to go."""
    if not failures:
        return []
    culprits = [f for f in failures if not f.looks_like_victim] or [min(failures, key=lambda f: f.at_s)]
    return [Verdict(VerdictKind.EVICT, f.card, f.evidence) for f in culprits]


def same_job_error(failures: list[RankFailure], world_size: int) -> RankFailure | None:
    """A failure of the job rather than of a card: every rank raised the same error (an exit code,
    not a signal: a card or a host kills, a bad job raises), and not one of a peer dying.
    Returns one of them to show, or None."""
    if len({f.rank for f in failures}) < world_size or not job_error_forming(failures):
        return None
    return failures[0]


def job_error_forming(failures: list[RankFailure]) -> bool:
    """At least two ranks raised the same non-peer error so far: worth waiting for the rest."""
    return (
        len(failures) >= 2
        and all(f.exit_code > 0 and not f.looks_like_victim for f in failures)
        and len({f.error_signature for f in failures}) == 1
    )


def repeated_error(culprits: list[RankFailure], blamed_errors: dict[str, tuple[CardRef, ...]]) -> bool:
    """The culprits raised (not were killed by) an error that already cost another card its place in
    an earlier generation: the error follows the work (a rank's role, e.g. rank 0 writing the
    checkpoint folder), not the card."""
    return bool(culprits) and all(
        f.exit_code > 0 and f.card not in blamed_errors.get(f.error_signature, (f.card,)) for f in culprits
    )


def hung_ranks(steps_done: dict[int, int], reduce_entered: dict[int, int], world_size: int) -> list[int] | None:
    """Which ranks a hung step waits for: those furthest behind, by (last step completed, whether
    they entered the all-reduce of the next one). None when every rank is equally far (nobody to
    single out: the whole generation is stuck)."""
    def progress(rank: int) -> tuple[int, int]:
        done = steps_done.get(rank, 0)
        return done, int(reduce_entered.get(rank, 0) > done)

    keys = {rank: progress(rank) for rank in range(world_size)}
    slowest = min(keys.values())
    if all(key == slowest for key in keys.values()):
        return None
    return sorted(rank for rank, key in keys.items() if key == slowest)


def hang_evidence(rank: int, steps_done: int, silent_s: float) -> Evidence:
    return Evidence.of(Cause.HANG, rank=rank, step=steps_done, next_step=steps_done + 1, silent_s=silent_s)


def temperature_verdict(
    card: CardRef, samples: list[tuple[float, float]], slowdown_c: float, settings: HealthSection
) -> Verdict | None:
    """Drain a card that is near its slowdown temperature, or heading there within the horizon
    (least-squares trend over the recent samples: (time_s, temperature_c), oldest first)."""
    if not samples or slowdown_c <= 0:
        return None
    now_s, current_c = samples[-1]
    if current_c >= slowdown_c - settings.temperature_margin_c:
        evidence = Evidence.of(Cause.TEMPERATURE_NEAR, temperature_c=current_c,
                               margin_c=settings.temperature_margin_c, slowdown_c=slowdown_c)
        return Verdict(VerdictKind.DRAIN, card, evidence)
    if len(samples) < settings.temperature_min_samples:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_c = sum(c for _, c in samples) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    if var_t <= 0:
        return None
    slope_c_per_s = sum((t - mean_t) * (c - mean_c) for t, c in samples) / var_t
    if slope_c_per_s <= 0:
        return None
    crossing_in_s = (slowdown_c - settings.temperature_margin_c - current_c) / slope_c_per_s
    if crossing_in_s > settings.temperature_horizon_s:
        return None
    evidence = Evidence.of(Cause.TEMPERATURE_TREND, temperature_c=current_c, rise_c_per_min=slope_c_per_s * 60,
                           slowdown_c=slowdown_c, margin_c=settings.temperature_margin_c, crossing_s=crossing_in_s)
    return Verdict(VerdictKind.DRAIN, card, evidence)


def hardware_error_verdict(
    card: CardRef, xid_events: list[int], ecc_uncorrected_new: int, settings: HealthSection
) -> Verdict | None:
    fatal = sorted(set(xid_events) & settings.fatal_xids)
    if fatal:
        return Verdict(VerdictKind.EVICT, card, Evidence.of(Cause.FATAL_XID, xids=", ".join(map(str, fatal))))
    if ecc_uncorrected_new > 0:
        return Verdict(VerdictKind.EVICT, card, Evidence.of(Cause.ECC, count=ecc_uncorrected_new))
    return None


def suspected_corruption(
    nonfinite_by_step: dict[int, dict[int, bool]], latest_step: int, settings: HealthSection
) -> dict[int, Evidence]:
    """Ranks whose local gradients were non-finite while a data-parallel peer's were finite, at
    least `overflow_strikes` times in the last `overflow_window_steps` steps: rank -> evidence.
    (An overflow on every rank at once is the model's, not a card's, and singles out nobody.)"""
    strikes: dict[int, list[int]] = {}
    for step, by_rank in nonfinite_by_step.items():
        if step <= latest_step - settings.overflow_window_steps:
            continue
        if all(by_rank.values()) or not any(by_rank.values()):
            continue
        for rank, nonfinite in by_rank.items():
            if nonfinite:
                strikes.setdefault(rank, []).append(step)
    return {
        rank: Evidence.of(Cause.CORRUPTION, rank=rank, steps=", ".join(map(str, sorted(steps))))
        for rank, steps in strikes.items()
        if len(steps) >= settings.overflow_strikes
    }


def straggler_verdicts(
    seconds_per_micro_batch: dict[CardRef, list[float]],
    card_type: dict[CardRef, str],
    believed_speed: dict[CardRef, float],
    settings: HealthSection,
) -> list[Verdict]:
    """Cards persistently slower than the planner believes, judged against cards of their own type:
    each card's recent compute seconds per micro-batch, times the speed the plan assumed for it,
    should match its peers'. Slower by `straggler_ratio` on every step of the window: replan with
    its measured speed; by `straggler_drain_ratio`: drain it."""
    window = settings.straggler_window_steps
    normalized = {
        card: [t * believed_speed[card] for t in times[-window:]]
        for card, times in seconds_per_micro_batch.items()
        if len(times) >= window
    }
    verdicts = []
    for card, times in normalized.items():
        peers = [statistics.median(v) for c, v in normalized.items() if c != card and card_type[c] == card_type[card]]
        if not peers:
            continue
        typical = statistics.median(peers)
        ratios = [t / typical for t in times]
        if min(ratios) < settings.straggler_ratio:
            continue
        ratio = statistics.median(ratios)
        facts = dict(ratio=ratio, card_type=card_type[card], window=window,
                     ms_per_micro_batch=statistics.median(times) / believed_speed[card] * 1e3)
        if ratio >= settings.straggler_drain_ratio:
            verdicts.append(Verdict(VerdictKind.DRAIN, card, Evidence.of(Cause.STRAGGLER, action="", **facts)))
        else:
            speed = believed_speed[card] / ratio
            evidence = Evidence.of(Cause.STRAGGLER, action=f"; replanning at speed {speed:.2f}", **facts)
            verdicts.append(Verdict(VerdictKind.REPLAN, card, evidence, speed))
    return verdicts
