"""`hyrun chaos run scenario.yaml`: runs a job while injecting scripted faults, then reports, per
fault, whether the right card was named, how long detection and recovery took, how many steps were
trained again, and whether the final loss matches a fault-free run of the same job.

A scenario names a job file (relative to the scenario) and the faults to inject (the job file's
`faults` entries: keyed by node, card, generation and step, so they fire at the same point every run).
With `repeat` (or `--repeat N`) it runs N trials, each a fresh job; `randomize` draws each trial's
step and target card from a seed (`--seed`), so a run is random but repeatable. A trial that passes
its deadline is stopped and counted FAILED with that reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hyrun.runtime.coordinator.records import SAVE_FAILED_VERDICT, STORE_OUTAGE_VERDICT
from hyrun.runtime.jobfile import FaultSpec, JobFileError, JobSpec, load_job
from hyrun.runtime.launch import JobOutcome
from hyrun.runtime.storage_faults import unavailable


class Randomize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at_step: tuple[int, int] | None = Field(None, description="draw each fault's step from [first, last]")
    at_s: tuple[float, float] | None = Field(None, description="draw each timed fault's second from [first, last]")
    target: bool = Field(False, description="draw each fault's node and card among the job's cards")


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(..., description="the job file, relative to the scenario file")
    faults: list[FaultSpec] = Field(..., min_length=1, description="faults to inject")
    compare: bool = Field(True, description="also run the job without faults and compare the final loss")
    loss_tolerance: float = Field(0.02, gt=0, description="relative final-loss difference that still matches")
    repeat: int = Field(1, ge=1, description="trials, each a fresh job")
    seed: int = Field(0, description="seeds the draws of `randomize`")
    randomize: Randomize = Field(default_factory=Randomize)
    trial_timeout_s: float = Field(600.0, gt=0, description="a trial still running after this is stopped and FAILED")
    expect: str = Field("survive", pattern="^(survive|fail)$",
                        description="survive: every trial must complete; fail: the scenario is meant to be unsurvivable")
    each: bool = Field(False, description="one fault per trial (a matrix: `repeat` trials per fault) instead of all together")


def trial_faults(scenario: Scenario) -> list[list[FaultSpec]]:
    """Each trial's faults before the draws: all of them `repeat` times, or (`each`) one at a time."""
    if scenario.each:
        return [[fault] for _ in range(scenario.repeat) for fault in scenario.faults]
    return [list(scenario.faults) for _ in range(scenario.repeat)]


def draw_faults(scenario: Scenario, job: JobSpec, trial: int, faults: list[FaultSpec]) -> list[FaultSpec]:
    """Trial `trial`'s faults, with step and target drawn where the scenario says so: a pure function
    of (scenario, seed, trial)."""
    rng = random.Random(f"{scenario.seed}/{trial}")
    cards = [(n.name, i) for n in job.cluster.nodes for i in range(sum(g.count for g in n.cards))]
    drawn = []
    for fault in faults:
        update: dict[str, Any] = {}
        if scenario.randomize.at_step is not None and fault.at_step is not None:
            update["at_step"] = rng.randint(*scenario.randomize.at_step)
        if scenario.randomize.at_s is not None and fault.at_s is not None:
            update["at_s"] = round(rng.uniform(*scenario.randomize.at_s), 2)
        if scenario.randomize.target and not fault.is_storage:
            update["node"], update["card"] = rng.choice(cards)
        drawn.append(fault.model_copy(update=update))
    return drawn


def load_scenario(path: Path) -> tuple[Scenario, JobSpec]:
    if not path.is_file():
        raise JobFileError(f"scenario {str(path)!r} does not exist")
    try:
        scenario = Scenario.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as error:
        raise JobFileError(f"{path} is not a valid chaos scenario:\n{error}") from None
    job = load_job(path.parent / scenario.job)
    nodes = {n.name: sum(g.count for g in n.cards) for n in job.cluster.nodes}
    if reason := unavailable(job.model_copy(update={"faults": list(scenario.faults)}), embedded=True):
        raise JobFileError(f"{path}: {reason}")
    for number, fault in enumerate(scenario.faults):
        if fault.is_network:
            raise JobFileError(f"{path}: faults.{number} is a network fault: run it with `hyrun launch --netns` "
                               "(chaos trials run on one network host)")
        if fault.is_storage:
            continue
        if fault.card >= nodes.get(fault.node, 0):
            raise JobFileError(f"{path}: faults.{number} names {fault.node}/card{fault.card}, which the job does not have")
    return scenario, job


@dataclass
class FaultReport:
    fault: FaultSpec
    detected: bool
    verdict: str = ""
    reason: str = ""
    detect_s: float | None = None   # last step completed before the fault -> verdict
    resume_s: float | None = None   # verdict -> first step of the next generation completed
    steps_lost: int = 0


@dataclass
class ChaosReport:
    outcome: JobOutcome
    faults: list[FaultReport]
    reference_loss: float | None = None
    final_loss: float | None = None
    loss_tolerance: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loss_matches(self) -> bool | None:
        if self.reference_loss is None or self.final_loss is None:
            return None
        return abs(self.final_loss - self.reference_loss) <= self.loss_tolerance * abs(self.reference_loss)

    @property
    def passed(self) -> bool:
        return self.outcome.succeeded and all(f.detected for f in self.faults) and self.loss_matches is not False


# A storage fault costs no card: what shows the runtime saw it is the incident of its kind.
_STORAGE_VERDICTS = {"disk_full": SAVE_FAILED_VERDICT, "store_outage": STORE_OUTAGE_VERDICT}


def match_incidents(faults: list[FaultSpec], incidents: list[dict]) -> list[FaultReport]:
    """Pairs each injected fault with the incident that evicted its card (or, for a storage fault,
    the incident of its kind), if any."""
    reports = []
    for fault in faults:
        card = f"{fault.node}/card{fault.card}"
        # A worker's or agent's own fault fires in its generation; one from outside whenever it is due.
        incident = next(
            (i for i in incidents
             if (i.get("verdict") == _STORAGE_VERDICTS[fault.kind] if fault.is_storage else card in i.get("cards", []))
             and (fault.from_outside or int(i.get("generation", 0)) == fault.generation)),
            None,
        )  # fmt: skip
        if incident is None:
            reports.append(FaultReport(fault, detected=False))
            continue
        resumed = incident.get("resumed_at_s", 0.0)
        reports.append(
            FaultReport(
                fault,
                detected=True,
                verdict=incident.get("verdict", ""),
                reason=incident.get("reason", ""),
                detect_s=incident["detected_at_s"] - incident.get("last_step_before_s", 0.0),
                resume_s=resumed - incident["detected_at_s"] if resumed else None,
                steps_lost=int(incident.get("steps_lost", 0)),
            )
        )
    return reports


def _final_loss(outcome: JobOutcome) -> float | None:
    return outcome.losses[max(outcome.losses)] if outcome.losses else None


@dataclass
class ChaosRun:
    """Every trial of a scenario, and the fault-free reference they are compared with."""

    scenario: Scenario
    trials: list[ChaosReport]
    reference: JobOutcome | None = None

    @property
    def passed(self) -> bool:
        if self.scenario.expect == "fail":
            return all(not t.outcome.succeeded for t in self.trials)
        return all(t.passed for t in self.trials)


def run_scenario(
    scenario: Scenario, job: JobSpec, *, run: Callable[[JobSpec], JobOutcome], say: Callable[[str], None] = print
) -> ChaosRun:
    """`run` trains a job to its end (the CLI passes an embedded launch under the trial deadline)."""
    reference = None
    if scenario.compare:
        say("fault-free reference run ...")
        reference = run(job.model_copy(update={"faults": []}))
    trials = []
    planned = trial_faults(scenario)
    for trial, chosen in enumerate(planned):
        faults = draw_faults(scenario, job, trial, chosen)
        say(f"trial {trial + 1}/{len(planned)}: " + ", ".join(f"{f.kind} {f.where} @ {f.moment}" for f in faults))
        faulty = run(job.model_copy(update={"faults": faults}))
        trials.append(ChaosReport(
            outcome=faulty,
            faults=match_incidents(faults, faulty.incidents),
            reference_loss=_final_loss(reference) if reference and reference.succeeded else None,
            final_loss=_final_loss(faulty),
            loss_tolerance=scenario.loss_tolerance,
        ))  # fmt: skip
    return ChaosRun(scenario, trials, reference)
