"""`hyrun chaos run scenario.yaml`: runs a job while injecting scripted faults, then reports, per
fault, whether the right card was named, how long detection and recovery took, how many steps were
trained again, and whether the final loss matches a fault-free run of the same job.

A scenario names a job file (relative to the scenario) and the faults to inject (the job file's
`faults` entries: keyed by node, card, generation and step, so they fire at the same point every run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hyrun.runtime.jobfile import FaultSpec, JobFileError, JobSpec, load_job
from hyrun.runtime.launch import JobOutcome


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(..., description="the job file, relative to the scenario file")
    faults: list[FaultSpec] = Field(..., min_length=1, description="faults to inject")
    compare: bool = Field(True, description="also run the job without faults and compare the final loss")
    loss_tolerance: float = Field(0.02, gt=0, description="relative final-loss difference that still matches")


def load_scenario(path: Path) -> tuple[Scenario, JobSpec]:
    if not path.is_file():
        raise JobFileError(f"scenario {str(path)!r} does not exist")
    try:
        scenario = Scenario.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as error:
        raise JobFileError(f"{path} is not a valid chaos scenario:\n{error}") from None
    job = load_job(path.parent / scenario.job)
    nodes = {n.name: sum(g.count for g in n.cards) for n in job.cluster.nodes}
    for number, fault in enumerate(scenario.faults):
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


def match_incidents(faults: list[FaultSpec], incidents: list[dict]) -> list[FaultReport]:
    """Pairs each injected fault with the incident that evicted its card, if any."""
    reports = []
    for fault in faults:
        card = f"{fault.node}/card{fault.card}"
        incident = next(
            (i for i in incidents if card in i.get("cards", []) and int(i.get("generation", 0)) == fault.generation),
            None,
        )
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


def run_scenario(
    scenario: Scenario, job: JobSpec, *, run: Callable[[JobSpec], JobOutcome], say: Callable[[str], None] = print
) -> ChaosReport:
    """`run` trains a job to its end (the CLI passes an embedded launch)."""
    reference = None
    if scenario.compare:
        say("fault-free reference run ...")
        reference = run(job.model_copy(update={"faults": []}))
    say(f"run with {len(scenario.faults)} fault(s) ...")
    faulty = run(job.model_copy(update={"faults": list(scenario.faults)}))
    return ChaosReport(
        outcome=faulty,
        faults=match_incidents(list(scenario.faults), faulty.incidents),
        reference_loss=_final_loss(reference) if reference and reference.succeeded else None,
        final_loss=_final_loss(faulty),
        loss_tolerance=scenario.loss_tolerance,
    )
