"""The job file: one pydantic model a user writes as YAML and `hyrun launch` validates before
anything starts. Errors name the field, the value and what is allowed (`JobFileError`).

Components never take this model whole: they take the small frozen settings they need from it.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from hyrun.runtime.data.spec import DataSection, check_data_fits
from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.schedule import LRSchedule

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def new_job_id(name: str) -> str:
    """The one job-id format: the job's name, when it was submitted, and a random tail."""
    return f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def valid_job_id(job_id: str) -> bool:
    """A job id names a run directory: letters, digits, '.', '_' and '-' only."""
    return re.fullmatch(_NAME, job_id) is not None


class JobFileError(ValueError):
    """A job file the user must fix; the message lists every problem found."""


class _Section(BaseModel):
    # An unknown key is almost always a typo; refusing it beats silently ignoring it.
    model_config = ConfigDict(extra="forbid", frozen=True)


class CardGroup(_Section):
    """`count` cards of one type on a node."""

    type: str = Field("cpu-sim", description="card type: a catalogue name or one declared in cluster.card_types")
    count: int = Field(1, ge=1, le=64, description="how many cards of this type the node has")
    memory_gb: float | None = Field(None, gt=0, description="memory per card; defaults to the type's")
    speed: float = Field(1.0, gt=0, le=1.0, description="speed factor (1.0 = full speed; 0.5 = half)")


class NodeSpec(_Section):
    name: str = Field(..., pattern=_NAME, description="node name, unique in the cluster")
    cards: list[CardGroup] = Field(..., min_length=1, description="the node's cards")


class CardTypeSpec(_Section):
    """A card type not in the catalogue, described by capability."""

    peak_tflops: float = Field(..., gt=0)
    memory_gb: float = Field(..., gt=0)
    memory_bandwidth_gbps: float = Field(1000.0, gt=0)
    intra_node_bandwidth_gbps: float = Field(100.0, gt=0)
    inter_node_bandwidth_gbps: float = Field(12.5, gt=0)


class ClusterSpec(_Section):
    nodes: list[NodeSpec] = Field(..., min_length=1, description="the nodes that run the job")
    card_types: dict[str, CardTypeSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_node_names(self) -> ClusterSpec:
        names = [node.name for node in self.nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"node names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @property
    def card_count(self) -> int:
        return sum(group.count for node in self.nodes for group in node.cards)


class ModelSection(_Section):
    preset: str = Field("tiny", description="model preset: tiny, small or hunyuan-large")
    overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields to change")
    init_from: str | None = Field(
        None, description="start from the weights in this directory (written by `hyrun export`, Hugging Face "
        "hunyuan_v1_moe layout), resharded onto the job's layout; checked against the preset before launch")
    init_training_state: bool = Field(
        False, description="also take the optimizer state, step and data position that `hyrun export "
        "--training-state` wrote there, and continue that run")

    @model_validator(mode="after")
    def _known_preset_and_fields(self) -> ModelSection:
        # Build the config once here so a bad preset or override is refused before launch.
        self.config()
        if self.init_training_state and not self.init_from:
            raise ValueError("model.init_training_state needs model.init_from (the directory to take it from)")
        return self

    def config(self) -> ModelConfig:
        """The model's shape: the preset with the overrides applied."""
        return ModelConfig.from_preset(self.preset, **self.overrides)


class OptimizerSection(_Section):
    lr: float = Field(3e-3, gt=0, le=1.0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    expert_lr_scaling: Literal["sqrt", "linear", "none"] = Field(
        "sqrt", description="how a routed expert's LR follows its token share"
    )
    expert_lr_interval_steps: int = Field(10, ge=1, description="recompute expert LRs every N steps")


class ScheduleSection(_Section):
    warmup_steps: int = Field(5, ge=0)
    decay: Literal["cosine", "linear"] = "cosine"
    decay_end_ratio: float = Field(0.3, ge=0, le=1, description="LR at the end of decay, over peak")
    anneal_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps in the final anneal to 1/10 of peak")


class TrainingSection(_Section):
    steps: int = Field(30, ge=1, description="optimizer steps to train")
    global_batch: int = Field(16, ge=1, description="sequences per optimizer step, over all cards")
    micro_batch: int = Field(2, ge=1, description="sequences per forward/backward on one card")
    seq_len: int = Field(64, ge=2, description="tokens per sequence")
    seed: int = Field(0, ge=0)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(
            peak_lr=self.optimizer.lr,
            total_steps=self.steps,
            warmup_steps=self.schedule.warmup_steps,
            decay=self.schedule.decay,
            decay_end_ratio=self.schedule.decay_end_ratio,
            anneal_fraction=self.schedule.anneal_fraction,
            anneal_end_ratio=min(0.1, self.schedule.decay_end_ratio),
        )

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainingSection:
        self.lr_schedule()  # raises ValueError naming the schedule field that does not fit
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingSection:
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        return self

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // self.micro_batch


class ParallelismSection(_Section):
    """Explicit degrees override the planner; leave all at 0 for `auto`."""

    dp: int = Field(0, ge=0)
    tp: int = Field(0, ge=0)
    pp: int = Field(0, ge=0)
    cp: int = Field(0, ge=0)
    ep: int = Field(0, ge=0)
    split: Literal["planned", "even"] = Field(
        "planned",
        description="planned: micro-batches, layers and experts in proportion to each card's capability; "
        "even: the same for every card, as a framework that assumes identical cards does (a baseline)",
    )

    def degrees(self) -> dict[str, int]:
        """Each degree, 0 meaning "the planner chooses" (a degree left out of the file)."""
        return {name: getattr(self, name) for name in ("dp", "tp", "pp", "cp", "ep")}


class CheckpointSection(_Section):
    directory: str | None = Field(None, description="where checkpoints go; default RUN_DIR/checkpoints")
    interval_steps: int = Field(10, ge=0, description="checkpoint every N steps; 0 = never by steps")
    interval_s: float = Field(0.0, ge=0, description="checkpoint every N seconds; 0 = never by time")
    keep_last: int = Field(3, ge=1)

    @property
    def enabled(self) -> bool:
        return self.interval_steps > 0 or self.interval_s > 0


class FaultToleranceSection(_Section):
    enabled: bool = Field(True, description="replace failed cards and continue; false: a failure ends the job")
    max_generations: int = Field(20, ge=1, description="give up after this many generations")
    failure_grace_s: float = Field(
        0.5, ge=0, le=30, description="how long to collect worker exits before deciding which card failed"
    )
    drain_timeout_s: float = Field(
        120.0, gt=0, description="how long a drain waits for its checkpoint before evicting anyway"
    )
    hang_timeout_s: float = Field(
        60.0, gt=0, description="no rank progress for this long is a hang; must exceed the slowest step"
    )


# XIDs after which the card cannot be trusted without a reset (NVIDIA's XID catalogue): 48 double-bit
# ECC, 63/64 row remapping, 74 NVLink, 79 fallen off the bus, 92 high single-bit ECC rate,
# 94/95 contained/uncontained ECC, 119/120 GSP errors.
FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})


class HealthSection(_Section):
    """Thresholds of the health policy: the coordinator's rules (coordinator/policy.py) read this
    section itself, so every threshold and its default is defined here once."""

    temperature_margin_c: float = Field(5.0, ge=0, description="drain within this many °C of slowdown")
    temperature_horizon_s: float = Field(120.0, gt=0, description="drain if the trend crosses it this soon")
    temperature_min_samples: int = Field(5, ge=2, description="a temperature trend needs this many samples")
    overflow_strikes: int = Field(3, ge=1, description="lonely non-finite gradients before a drain")
    overflow_window_steps: int = Field(20, ge=1)
    straggler_ratio: float = Field(1.5, gt=1, description="replan when a card is this much slower than its peers")
    straggler_window_steps: int = Field(5, ge=1, description="... on every one of this many steps")
    straggler_drain_ratio: float = Field(4.0, gt=1, description="drain a card this much slower")
    fatal_xids: frozenset[int] = Field(FATAL_XIDS, description="XID codes that evict a card at once")
    link_window_samples: int = Field(5, ge=2, description="heartbeats a data-link congestion verdict looks at")
    link_strikes: int = Field(3, ge=1, description="... of which the link's egress queue must have held packets back")
    link_drain_ratio: float = Field(
        0.5, gt=0, lt=1, description="drain a congested node moving less than this share of its peers' peak rate")
    link_replan_ratio: float = Field(
        0.8, gt=0, le=1, description="... replan with its measured bandwidth one moving less than this share")

    @model_validator(mode="after")
    def _window_holds_strikes(self) -> HealthSection:
        if self.link_drain_ratio > self.link_replan_ratio:
            raise ValueError(f"link_drain_ratio ({self.link_drain_ratio}) cannot exceed link_replan_ratio "
                             f"({self.link_replan_ratio}): a link slow enough to drain is slow enough to replan")
        if self.link_strikes >= self.link_window_samples:
            raise ValueError(f"link_strikes ({self.link_strikes}) must be below link_window_samples "
                             f"({self.link_window_samples}): strikes are counted between samples")
        if self.overflow_strikes > self.overflow_window_steps:
            raise ValueError(
                f"overflow_strikes ({self.overflow_strikes}) cannot exceed overflow_window_steps "
                f"({self.overflow_window_steps})"
            )
        return self


NETWORK_FAULTS = ("link_slow", "link_down", "partition", "coordinator_unreachable")
# Faults the launcher injects from outside the job's processes (at a step or a time), not a worker itself.
# Faults on what the whole job shares, not on one node: its checkpoint disk and its job-state store.
STORAGE_FAULTS = ("disk_full", "store_outage")
LAUNCHER_FAULTS = NETWORK_FAULTS + STORAGE_FAULTS + ("signal",)
# The parameters each fault kind reads beyond where and when it fires (FaultSpec's field docs).
_FAULT_PARAMETERS = {
    "nan_grad": ("repeat_steps",),
    "slow": ("speed",),
    "temperature_ramp": ("c_per_s",),
    "xid": ("xid",),
    "link_slow": ("mbit", "duration_s"),
    "link_down": ("duration_s",),
    "partition": ("duration_s",),
    "coordinator_unreachable": ("duration_s",),
    "signal": ("signal", "target"),
    "corrupt_checkpoint": ("damage",),
    "disk_full": ("duration_s", "disk_mb"),
    "store_outage": ("duration_s",),
}


class FaultSpec(_Section):
    """A fault to inject (tests, benchmarks, `hyrun chaos`): keyed by card and step, so it fires
    on the same card at the same point whatever rank that card holds in a generation."""

    kind: Literal["kill", "hang", "nan_grad", "slow", "temperature_ramp", "xid", "ecc", "signal", "corrupt_checkpoint",
                  "link_slow", "link_down", "partition", "coordinator_unreachable", "disk_full", "store_outage"] = Field(
        ..., description="kill: SIGKILL the worker; hang: SIGSTOP it; nan_grad: NaN in its local "
        "gradients; slow: run the card at `speed` from then on; temperature_ramp: its simulated "
        "temperature rises by `c_per_s`; xid / ecc: its agent reports that hardware error; signal: the "
        "launcher sends `signal` from outside to the card's worker or (`target: agent`) to the node's agent, "
        "at a step or at a time (`at_s`), whatever it is doing then; corrupt_checkpoint: the worker damages "
        "the newest committed checkpoint (`damage`) and dies, so the next generation must resume past it. Network "
        "faults (`hyrun launch --netns` only; the whole node, `card` unused): link_slow caps the node's "
        "data link at `mbit`; link_down cuts it; partition cuts data and control links; "
        "coordinator_unreachable cuts only the control link; each for `duration_s` (0: for good). Storage "
        "faults (embedded cluster, the whole job, no `node`): disk_full fills the checkpoint directory, which the "
        "launcher mounts as a tmpfs of `disk_mb` (root), leaving less than a save needs; store_outage stops the "
        "job-state store (an etcd the launcher starts for the job); each for `duration_s` (0: for good)"
    )
    node: str = Field("", description="the node it hits (every kind but the storage faults)")
    card: int = Field(0, ge=0)
    at_step: int | None = Field(None, ge=1, description="the step at whose start the fault fires")
    at_s: float | None = Field(
        None, ge=0, description="faults from outside (network, storage, signal): seconds after the job was submitted at which it fires "
        "(instead of at_step)"
    )
    signal: Literal["SIGKILL", "SIGTERM", "SIGSTOP", "SIGSEGV"] = Field("SIGKILL", description="signal: which one")
    target: Literal["worker", "agent"] = Field("worker", description="signal: the card's worker, or its node's agent")
    damage: Literal["flip", "truncate", "delete"] = Field(
        "flip", description="corrupt_checkpoint: flip 64 bytes in, truncate or delete its largest file"
    )
    repeat_steps: int = Field(1, ge=1, description="nan_grad: on this many consecutive steps")
    speed: float = Field(0.3, gt=0, le=1, description="slow: the card's new speed")
    c_per_s: float = Field(2.0, gt=0, description="temperature_ramp: degrees per second")
    xid: int = Field(79, ge=1, description="xid: the XID code reported")
    generation: int = Field(1, ge=1, description="fire only in this generation")
    mbit: float = Field(5.0, gt=0, description="link_slow: the link's new bandwidth, Mbit/s")
    duration_s: float = Field(0.0, ge=0, description="network and storage faults: repaired after this long; 0 = for good")
    disk_mb: int = Field(256, ge=16, description="disk_full: size of the tmpfs the checkpoint directory is mounted on")

    @model_validator(mode="after")
    def _one_moment(self) -> FaultSpec:
        if self.at_s is not None and not self.from_outside:
            raise ValueError(f"{self.kind}: at_s is for faults from outside (network, storage, signal); "
                             f"a {self.kind} fault fires at_step")
        if (self.at_step is None) == (self.at_s is None):
            raise ValueError(f"{self.kind}{f' on {self.node}' if self.node else ''}: give exactly one of at_step and at_s")
        if not self.node and not self.is_storage:
            raise ValueError(f"{self.kind}: name the node it hits (`node`)")
        if self.node and self.is_storage:
            raise ValueError(f"{self.kind} hits the whole job: drop `node: {self.node}`")
        return self

    @property
    def where(self) -> str:
        """What it hits, in words: a card, a node's links, or the whole job's storage."""
        return "the job" if self.is_storage else self.node if self.is_network else f"{self.node}/card{self.card}"

    @property
    def is_storage(self) -> bool:
        return self.kind in STORAGE_FAULTS

    @property
    def is_network(self) -> bool:
        return self.kind in NETWORK_FAULTS

    @property
    def from_outside(self) -> bool:
        """Injected by the launcher (network, storage, signal), not by a worker or an agent on itself."""
        return self.kind in LAUNCHER_FAULTS

    @property
    def moment(self) -> str:
        """When it fires, in words."""
        return f"step {self.at_step}" if self.at_step is not None else f"{self.at_s:g} s"

    def used_fields(self) -> set[str]:
        """The fields this kind of fault reads (a report lists these, not every default)."""
        when = {"at_step"} if self.at_step is not None else {"at_s"}
        where = {"kind"} | when | (set() if self.is_storage else {"node"}) | (set() if self.is_network or self.is_storage else {"card"})
        where |= set() if self.from_outside else {"generation"}
        return where | set(_FAULT_PARAMETERS.get(self.kind, ()))


class MetricsSection(_Section):
    host: str = Field("127.0.0.1", description="address the coordinator's /metrics listens on")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port (printed at start)")


class RuntimeSection(_Section):
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_timeout_s: float = Field(5.0, gt=0)
    rendezvous_timeout_s: float = Field(60.0, gt=0, description="how long workers wait for each other")
    node_wait_timeout_s: float = Field(60.0, gt=0, description="how long to wait for the job's nodes")
    run_dir: str = Field("runs", description="logs go to RUN_DIR/JOB/...")
    warm_workers: int = Field(
        -1, ge=-1, description="spare worker processes per node kept ready for fast restarts; -1: one per card"
    )
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    relays: bool = Field(False, description="`hyrun launch`: the first node's agent relays the others' heartbeats "
                                            "to the coordinator in batches, as thousands of nodes do (DESIGN: Scale)")

    @model_validator(mode="after")
    def _interval_below_timeout(self) -> RuntimeSection:
        # A timeout at or under the interval declares healthy nodes dead between two beats.
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        return self


class JobSpec(_Section):
    name: str = Field("job", pattern=_NAME, description="job name, used for the run directory")
    cluster: ClusterSpec
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    parallelism: Literal["auto"] | ParallelismSection = "auto"
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    fault_tolerance: FaultToleranceSection = Field(default_factory=FaultToleranceSection)
    health: HealthSection = Field(default_factory=HealthSection)
    faults: list[FaultSpec] = Field(default_factory=list, description="faults to inject (testing)")
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    store: str = Field("memory", description="job state store: 'memory' or 'etcd://HOST:PORT'")
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    data: DataSection | None = Field(None, description="real data; absent: the synthetic token stream")

    @model_validator(mode="after")
    def _data_fits(self) -> JobSpec:
        if self.data is not None:
            check_data_fits(self.data, self.training, self.model.config().max_seq_len)
        return self

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "memory" and not re.fullmatch(r"etcd://[^:/]+:\d+", value):
            raise ValueError("must be 'memory' or 'etcd://HOST:PORT'")
        return value

    @field_validator("parallelism")
    @classmethod
    def _degrees_fit_the_cards(cls, p, info: ValidationInfo):
        cluster = info.data.get("cluster")
        if p == "auto" or cluster is None:
            return p
        cards = cluster.card_count
        given = {name: value for name, value in p.degrees().items() if value and name != "ep"}
        product = 1
        for value in given.values():
            product *= value
        shown = "×".join(f"{name}={value}" for name, value in given.items())
        if len(given) == 4 and product != cards:
            raise ValueError(f"{shown} = {product} ranks, but the cluster has {cards} cards")
        if cards % product:
            raise ValueError(f"{shown} = {product} does not divide the cluster's {cards} cards")
        if p.ep and p.dp and (p.dp * max(1, p.cp)) % p.ep:
            raise ValueError(f"ep ({p.ep}) must divide dp×cp ({p.dp * max(1, p.cp)}): experts borrow those ranks")
        return p

    @field_validator("training")
    @classmethod
    def _enough_batch_for_cards(cls, training, info: ValidationInfo):
        cluster = info.data.get("cluster")
        if cluster is not None and training.micro_batches_per_step < cluster.card_count:
            raise ValueError(
                f"global_batch / micro_batch = {training.micro_batches_per_step} micro-batches per step, "
                f"fewer than the {cluster.card_count} cards; every card needs at least one"
            )
        return training

    def to_json(self) -> str:
        return self.model_dump_json()


def _describe(errors: list[dict[str, Any]]) -> str:
    lines = []
    for error in errors:
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}")
    return "\n".join(lines)


def parse_job(data: Any, *, source: str = "job") -> JobSpec:
    """Validates parsed YAML/JSON into a JobSpec, or raises JobFileError naming every bad field."""
    if not isinstance(data, dict):
        raise JobFileError(f"{source}: the job file must be a mapping of sections, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise JobFileError(f"{source} is not a valid job file:\n{_describe(error.errors())}") from None


def load_job_text(text: str, *, source: str = "job") -> JobSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise JobFileError(f"{source} is not valid YAML: {error}") from None
    return parse_job(data, source=source)


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"job file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise JobFileError(f"job file {str(path)!r} is not UTF-8 text: byte {raw[error.start]:#04x} at line {line} "
                           f"(offset {error.start}); save it as UTF-8") from None
    return load_job_text(text, source=str(path))


def job_from_json(text: str) -> JobSpec:
    """The coordinator's and workers' way back from the JSON on the wire (never pickle)."""
    return JobSpec.model_validate_json(text)

