from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CardInfo(_message.Message):
    __slots__ = ("index", "type", "memory_bytes", "speed", "simulated", "uuid")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    index: int
    type: str
    memory_bytes: int
    speed: float
    simulated: bool
    uuid: str
    def __init__(self, index: _Optional[int] = ..., type: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., speed: _Optional[float] = ..., simulated: _Optional[bool] = ..., uuid: _Optional[str] = ...) -> None: ...

class CardTelemetry(_message.Message):
    __slots__ = ("index", "temperature_c", "power_w", "utilization", "memory_used_bytes", "ecc_uncorrected", "xid_events", "throttle_reasons", "slowdown_temperature_c")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    index: int
    temperature_c: float
    power_w: float
    utilization: float
    memory_used_bytes: int
    ecc_uncorrected: int
    xid_events: _containers.RepeatedScalarFieldContainer[int]
    throttle_reasons: int
    slowdown_temperature_c: float
    def __init__(self, index: _Optional[int] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ..., utilization: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., ecc_uncorrected: _Optional[int] = ..., xid_events: _Optional[_Iterable[int]] = ..., throttle_reasons: _Optional[int] = ..., slowdown_temperature_c: _Optional[float] = ...) -> None: ...

class HostTelemetry(_message.Message):
    __slots__ = ("cpu_percent", "memory_percent", "net_errors", "net_drops", "data_nic")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    NET_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NET_DROPS_FIELD_NUMBER: _ClassVar[int]
    DATA_NIC_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_percent: float
    net_errors: int
    net_drops: int
    data_nic: NicTelemetry
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_percent: _Optional[float] = ..., net_errors: _Optional[int] = ..., net_drops: _Optional[int] = ..., data_nic: _Optional[_Union[NicTelemetry, _Mapping]] = ...) -> None: ...

class NicTelemetry(_message.Message):
    __slots__ = ("interface", "carrier", "tx_bytes", "rx_bytes", "errors", "drops", "queue_overlimits", "queue_drops", "queue_backlog_bytes", "rdma_tx_bytes", "rdma_rx_bytes", "rdma_xmit_wait", "rdma_link_downed")
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_OVERLIMITS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DROPS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_BACKLOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    RDMA_TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RDMA_RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RDMA_XMIT_WAIT_FIELD_NUMBER: _ClassVar[int]
    RDMA_LINK_DOWNED_FIELD_NUMBER: _ClassVar[int]
    interface: str
    carrier: bool
    tx_bytes: int
    rx_bytes: int
    errors: int
    drops: int
    queue_overlimits: int
    queue_drops: int
    queue_backlog_bytes: int
    rdma_tx_bytes: int
    rdma_rx_bytes: int
    rdma_xmit_wait: int
    rdma_link_downed: int
    def __init__(self, interface: _Optional[str] = ..., carrier: _Optional[bool] = ..., tx_bytes: _Optional[int] = ..., rx_bytes: _Optional[int] = ..., errors: _Optional[int] = ..., drops: _Optional[int] = ..., queue_overlimits: _Optional[int] = ..., queue_drops: _Optional[int] = ..., queue_backlog_bytes: _Optional[int] = ..., rdma_tx_bytes: _Optional[int] = ..., rdma_rx_bytes: _Optional[int] = ..., rdma_xmit_wait: _Optional[int] = ..., rdma_link_downed: _Optional[int] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node", "cards", "host", "agent_pid", "running_generation")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_PID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_GENERATION_FIELD_NUMBER: _ClassVar[int]
    node: str
    cards: _containers.RepeatedCompositeFieldContainer[CardInfo]
    host: str
    agent_pid: int
    running_generation: int
    def __init__(self, node: _Optional[str] = ..., cards: _Optional[_Iterable[_Union[CardInfo, _Mapping]]] = ..., host: _Optional[str] = ..., agent_pid: _Optional[int] = ..., running_generation: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "cards", "host")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    cards: _containers.RepeatedCompositeFieldContainer[CardTelemetry]
    host: HostTelemetry
    def __init__(self, sequence: _Optional[int] = ..., cards: _Optional[_Iterable[_Union[CardTelemetry, _Mapping]]] = ..., host: _Optional[_Union[HostTelemetry, _Mapping]] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("generation", "rank", "step", "loss", "tokens", "step_time_s", "compute_time_s", "grad_norm", "nonfinite_grads", "lr", "checkpoint_step", "checkpoint_error", "comm_wait_s", "bubble_s", "checkpoint_stall_s", "checkpoint_persist_s", "checkpoint_failures", "checkpoint_bytes", "resume_source", "resume_fallbacks", "collective_bytes", "collective_s")
    class CollectiveBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CollectiveSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_GRADS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    COMM_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    BUBBLE_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STALL_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PERSIST_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_S_FIELD_NUMBER: _ClassVar[int]
    generation: int
    rank: int
    step: int
    loss: float
    tokens: int
    step_time_s: float
    compute_time_s: float
    grad_norm: float
    nonfinite_grads: int
    lr: float
    checkpoint_step: int
    checkpoint_error: str
    comm_wait_s: float
    bubble_s: float
    checkpoint_stall_s: float
    checkpoint_persist_s: float
    checkpoint_failures: int
    checkpoint_bytes: int
    resume_source: str
    resume_fallbacks: int
    collective_bytes: _containers.ScalarMap[str, float]
    collective_s: _containers.ScalarMap[str, float]
    def __init__(self, generation: _Optional[int] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens: _Optional[int] = ..., step_time_s: _Optional[float] = ..., compute_time_s: _Optional[float] = ..., grad_norm: _Optional[float] = ..., nonfinite_grads: _Optional[int] = ..., lr: _Optional[float] = ..., checkpoint_step: _Optional[int] = ..., checkpoint_error: _Optional[str] = ..., comm_wait_s: _Optional[float] = ..., bubble_s: _Optional[float] = ..., checkpoint_stall_s: _Optional[float] = ..., checkpoint_persist_s: _Optional[float] = ..., checkpoint_failures: _Optional[int] = ..., checkpoint_bytes: _Optional[int] = ..., resume_source: _Optional[str] = ..., resume_fallbacks: _Optional[int] = ..., collective_bytes: _Optional[_Mapping[str, float]] = ..., collective_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class WorkerExit(_message.Message):
    __slots__ = ("generation", "rank", "card_index", "exit_code", "reason", "log_path")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    generation: int
    rank: int
    card_index: int
    exit_code: int
    reason: str
    log_path: str
    def __init__(self, generation: _Optional[int] = ..., rank: _Optional[int] = ..., card_index: _Optional[int] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., log_path: _Optional[str] = ...) -> None: ...

class WorkerStarted(_message.Message):
    __slots__ = ("generation", "rank", "pid")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    generation: int
    rank: int
    pid: int
    def __init__(self, generation: _Optional[int] = ..., rank: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class RankProgress(_message.Message):
    __slots__ = ("generation", "rank", "step", "phase")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    generation: int
    rank: int
    step: int
    phase: str
    def __init__(self, generation: _Optional[int] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "step", "worker_exit", "worker_started", "progress")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKER_EXIT_FIELD_NUMBER: _ClassVar[int]
    WORKER_STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    step: StepReport
    worker_exit: WorkerExit
    worker_started: WorkerStarted
    progress: RankProgress
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., step: _Optional[_Union[StepReport, _Mapping]] = ..., worker_exit: _Optional[_Union[WorkerExit, _Mapping]] = ..., worker_started: _Optional[_Union[WorkerStarted, _Mapping]] = ..., progress: _Optional[_Union[RankProgress, _Mapping]] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("store_host", "store_port", "key_prefix", "world_size", "backend")
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    store_host: str
    store_port: int
    key_prefix: str
    world_size: int
    backend: str
    def __init__(self, store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., key_prefix: _Optional[str] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class RankAssignment(_message.Message):
    __slots__ = ("rank", "card_index", "speed", "micro_batches", "micro_batch_offset", "node")
    RANK_FIELD_NUMBER: _ClassVar[int]
    CARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    card_index: int
    speed: float
    micro_batches: int
    micro_batch_offset: int
    node: str
    def __init__(self, rank: _Optional[int] = ..., card_index: _Optional[int] = ..., speed: _Optional[float] = ..., micro_batches: _Optional[int] = ..., micro_batch_offset: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class StartGeneration(_message.Message):
    __slots__ = ("generation", "rendezvous", "ranks", "job_json", "run_dir", "layout_json")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    JOB_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    generation: int
    rendezvous: Rendezvous
    ranks: _containers.RepeatedCompositeFieldContainer[RankAssignment]
    job_json: str
    run_dir: str
    layout_json: str
    def __init__(self, generation: _Optional[int] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ..., ranks: _Optional[_Iterable[_Union[RankAssignment, _Mapping]]] = ..., job_json: _Optional[str] = ..., run_dir: _Optional[str] = ..., layout_json: _Optional[str] = ...) -> None: ...

class StopGeneration(_message.Message):
    __slots__ = ("generation", "reason")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    generation: int
    reason: str
    def __init__(self, generation: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckpointNow(_message.Message):
    __slots__ = ("generation", "reason")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    generation: int
    reason: str
    def __init__(self, generation: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("coordinator_version", "heartbeat_interval_s", "epoch")
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    coordinator_version: str
    heartbeat_interval_s: float
    epoch: int
    def __init__(self, coordinator_version: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., epoch: _Optional[int] = ...) -> None: ...

class CoordinatorCommand(_message.Message):
    __slots__ = ("welcome", "start", "stop", "shutdown", "checkpoint_now", "epoch")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_NOW_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    start: StartGeneration
    stop: StopGeneration
    shutdown: Shutdown
    checkpoint_now: CheckpointNow
    epoch: int
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., start: _Optional[_Union[StartGeneration, _Mapping]] = ..., stop: _Optional[_Union[StopGeneration, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., checkpoint_now: _Optional[_Union[CheckpointNow, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("job_yaml", "job_id")
    JOB_YAML_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_yaml: str
    job_id: str
    def __init__(self, job_yaml: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class SubmitJobReply(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("node", "alive", "cards", "state")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node: str
    alive: bool
    cards: int
    state: str
    def __init__(self, node: _Optional[str] = ..., alive: _Optional[bool] = ..., cards: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class Incident(_message.Message):
    __slots__ = ("detected_at_s", "cards", "verdict", "reason", "generation", "step_at_failure", "resumed_at_s", "resumed_step", "steps_lost", "last_step_before_s")
    DETECTED_AT_S_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_AT_FAILURE_FIELD_NUMBER: _ClassVar[int]
    RESUMED_AT_S_FIELD_NUMBER: _ClassVar[int]
    RESUMED_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_LOST_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_BEFORE_S_FIELD_NUMBER: _ClassVar[int]
    detected_at_s: float
    cards: _containers.RepeatedScalarFieldContainer[str]
    verdict: str
    reason: str
    generation: int
    step_at_failure: int
    resumed_at_s: float
    resumed_step: int
    steps_lost: int
    last_step_before_s: float
    def __init__(self, detected_at_s: _Optional[float] = ..., cards: _Optional[_Iterable[str]] = ..., verdict: _Optional[str] = ..., reason: _Optional[str] = ..., generation: _Optional[int] = ..., step_at_failure: _Optional[int] = ..., resumed_at_s: _Optional[float] = ..., resumed_step: _Optional[int] = ..., steps_lost: _Optional[int] = ..., last_step_before_s: _Optional[float] = ...) -> None: ...

class RankState(_message.Message):
    __slots__ = ("rank", "node", "card_index", "micro_batches", "compute_time_s", "step_time_s", "step", "comm_wait_s", "bubble_s")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMM_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    BUBBLE_S_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node: str
    card_index: int
    micro_batches: int
    compute_time_s: float
    step_time_s: float
    step: int
    comm_wait_s: float
    bubble_s: float
    def __init__(self, rank: _Optional[int] = ..., node: _Optional[str] = ..., card_index: _Optional[int] = ..., micro_batches: _Optional[int] = ..., compute_time_s: _Optional[float] = ..., step_time_s: _Optional[float] = ..., step: _Optional[int] = ..., comm_wait_s: _Optional[float] = ..., bubble_s: _Optional[float] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "state", "generation", "step", "total_steps", "loss", "tokens_per_s", "nodes", "message", "step_time_s", "evictions", "steps_lost", "incidents", "ranks", "layout", "eval_step", "eval_loss")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_LOST_FIELD_NUMBER: _ClassVar[int]
    INCIDENTS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    EVAL_STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: str
    generation: int
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    nodes: _containers.RepeatedCompositeFieldContainer[NodeState]
    message: str
    step_time_s: float
    evictions: _containers.RepeatedScalarFieldContainer[str]
    steps_lost: int
    incidents: _containers.RepeatedCompositeFieldContainer[Incident]
    ranks: _containers.RepeatedCompositeFieldContainer[RankState]
    layout: str
    eval_step: int
    eval_loss: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[str] = ..., generation: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., nodes: _Optional[_Iterable[_Union[NodeState, _Mapping]]] = ..., message: _Optional[str] = ..., step_time_s: _Optional[float] = ..., evictions: _Optional[_Iterable[str]] = ..., steps_lost: _Optional[int] = ..., incidents: _Optional[_Iterable[_Union[Incident, _Mapping]]] = ..., ranks: _Optional[_Iterable[_Union[RankState, _Mapping]]] = ..., layout: _Optional[str] = ..., eval_step: _Optional[int] = ..., eval_loss: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("node", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    reason: str
    def __init__(self, node: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class ReadmitRequest(_message.Message):
    __slots__ = ("node", "cards", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CARDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    cards: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, node: _Optional[str] = ..., cards: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReadmitReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class EvalSourceLoss(_message.Message):
    __slots__ = ("source", "loss", "perplexity", "tokens")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    source: str
    loss: float
    perplexity: float
    tokens: int
    def __init__(self, source: _Optional[str] = ..., loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class EvalTaskScore(_message.Message):
    __slots__ = ("task", "metric", "value")
    TASK_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    task: str
    metric: str
    value: float
    def __init__(self, task: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("job_id", "step", "sources", "tasks", "error", "duration_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    sources: _containers.RepeatedCompositeFieldContainer[EvalSourceLoss]
    tasks: _containers.RepeatedCompositeFieldContainer[EvalTaskScore]
    error: str
    duration_s: float
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[EvalSourceLoss, _Mapping]]] = ..., tasks: _Optional[_Iterable[_Union[EvalTaskScore, _Mapping]]] = ..., error: _Optional[str] = ..., duration_s: _Optional[float] = ...) -> None: ...

class EvalReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("jobs", "nodes")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobEvent]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeState]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeState, _Mapping]]] = ...) -> None: ...

class NodeBeat(_message.Message):
    __slots__ = ("node", "sent_unix_s", "heartbeat")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    node: str
    sent_unix_s: float
    heartbeat: Heartbeat
    def __init__(self, node: _Optional[str] = ..., sent_unix_s: _Optional[float] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class BeatAck(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class CardXids(_message.Message):
    __slots__ = ("position", "card_index", "xids")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    XIDS_FIELD_NUMBER: _ClassVar[int]
    position: int
    card_index: int
    xids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, position: _Optional[int] = ..., card_index: _Optional[int] = ..., xids: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeHost(_message.Message):
    __slots__ = ("position", "host")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    position: int
    host: HostTelemetry
    def __init__(self, position: _Optional[int] = ..., host: _Optional[_Union[HostTelemetry, _Mapping]] = ...) -> None: ...

class RelayBatch(_message.Message):
    __slots__ = ("relay", "relay_address", "batch", "nodes", "sequences", "sent_unix_s", "card_counts", "card_index", "temperature_c", "slowdown_temperature_c", "power_w", "utilization", "memory_used_bytes", "ecc_uncorrected", "throttle_reasons", "xids", "hosts")
    RELAY_FIELD_NUMBER: _ClassVar[int]
    RELAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CARD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    XIDS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    relay: str
    relay_address: str
    batch: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    sequences: _containers.RepeatedScalarFieldContainer[int]
    sent_unix_s: _containers.RepeatedScalarFieldContainer[float]
    card_counts: _containers.RepeatedScalarFieldContainer[int]
    card_index: _containers.RepeatedScalarFieldContainer[int]
    temperature_c: _containers.RepeatedScalarFieldContainer[float]
    slowdown_temperature_c: _containers.RepeatedScalarFieldContainer[float]
    power_w: _containers.RepeatedScalarFieldContainer[float]
    utilization: _containers.RepeatedScalarFieldContainer[float]
    memory_used_bytes: _containers.RepeatedScalarFieldContainer[int]
    ecc_uncorrected: _containers.RepeatedScalarFieldContainer[int]
    throttle_reasons: _containers.RepeatedScalarFieldContainer[int]
    xids: _containers.RepeatedCompositeFieldContainer[CardXids]
    hosts: _containers.RepeatedCompositeFieldContainer[NodeHost]
    def __init__(self, relay: _Optional[str] = ..., relay_address: _Optional[str] = ..., batch: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., sequences: _Optional[_Iterable[int]] = ..., sent_unix_s: _Optional[_Iterable[float]] = ..., card_counts: _Optional[_Iterable[int]] = ..., card_index: _Optional[_Iterable[int]] = ..., temperature_c: _Optional[_Iterable[float]] = ..., slowdown_temperature_c: _Optional[_Iterable[float]] = ..., power_w: _Optional[_Iterable[float]] = ..., utilization: _Optional[_Iterable[float]] = ..., memory_used_bytes: _Optional[_Iterable[int]] = ..., ecc_uncorrected: _Optional[_Iterable[int]] = ..., throttle_reasons: _Optional[_Iterable[int]] = ..., xids: _Optional[_Iterable[_Union[CardXids, _Mapping]]] = ..., hosts: _Optional[_Iterable[_Union[NodeHost, _Mapping]]] = ...) -> None: ...

class RelayReply(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: int
    def __init__(self, batch: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("node", "failed_relay")
    NODE_FIELD_NUMBER: _ClassVar[int]
    FAILED_RELAY_FIELD_NUMBER: _ClassVar[int]
    node: str
    failed_relay: str
    def __init__(self, node: _Optional[str] = ..., failed_relay: _Optional[str] = ...) -> None: ...

class RouteReply(_message.Message):
    __slots__ = ("relay", "relay_address", "phase_s")
    RELAY_FIELD_NUMBER: _ClassVar[int]
    RELAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PHASE_S_FIELD_NUMBER: _ClassVar[int]
    relay: str
    relay_address: str
    phase_s: float
    def __init__(self, relay: _Optional[str] = ..., relay_address: _Optional[str] = ..., phase_s: _Optional[float] = ...) -> None: ...
