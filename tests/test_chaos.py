"""The chaos harness's bookkeeping: scenarios are validated, faults are matched to incidents."""

from __future__ import annotations

import pytest
import yaml

from hyrun.runtime.chaos import load_scenario, match_incidents
from hyrun.runtime.jobfile import FaultSpec, JobFileError

from conftest import job_dict


def test_faults_are_matched_to_the_incident_that_evicted_their_card_in_their_generation():
    faults = [
        FaultSpec(kind="kill", node="a", card=1, at_step=5),
        FaultSpec(kind="xid", node="b", card=0, at_step=3, generation=2),
    ]
    incidents = [
        {"cards": ["a/card1"], "generation": "1", "verdict": "evict", "reason": "killed",
         "detected_at_s": 10.5, "last_step_before_s": 10.0, "resumed_at_s": 14.0, "steps_lost": "4"},
        {"cards": ["b/card0"], "generation": "1", "verdict": "evict", "reason": "wrongly blamed",
         "detected_at_s": 10.5, "last_step_before_s": 10.0},
    ]  # fmt: skip
    kill, xid = match_incidents(faults, incidents)
    assert kill.detected and kill.detect_s == pytest.approx(0.5) and kill.resume_s == pytest.approx(3.5)
    assert kill.steps_lost == 4
    assert not xid.detected  # the generation-1 incident on b/card0 is not the generation-2 XID


def test_a_fault_on_a_card_the_job_lacks_is_refused(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict()))
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump({"job": "job.yaml", "faults": [{"kind": "kill", "node": "node-a", "card": 7, "at_step": 2}]}))
    with pytest.raises(JobFileError, match="node-a/card7"):
        load_scenario(scenario)
