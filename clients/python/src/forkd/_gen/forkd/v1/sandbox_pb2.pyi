from forkd._gen.google.api import annotations_pb2 as _annotations_pb2
from forkd._gen.forkd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PortTarget(_message.Message):
    __slots__ = ("id", "port")
    ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    id: str
    port: int
    def __init__(self, id: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class PortInput(_message.Message):
    __slots__ = ("open", "data", "eof")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    open: PortTarget
    data: bytes
    eof: bool
    def __init__(self, open: _Optional[_Union[PortTarget, _Mapping]] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class PortOutput(_message.Message):
    __slots__ = ("opened", "data", "eof")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    opened: PortTarget
    data: bytes
    eof: bool
    def __init__(self, opened: _Optional[_Union[PortTarget, _Mapping]] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class SharePortRequest(_message.Message):
    __slots__ = ("id", "port")
    ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    id: str
    port: int
    def __init__(self, id: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class PortShare(_message.Message):
    __slots__ = ("sandbox_id", "port", "token", "path", "created_unix")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    port: int
    token: str
    path: str
    created_unix: int
    def __init__(self, sandbox_id: _Optional[str] = ..., port: _Optional[int] = ..., token: _Optional[str] = ..., path: _Optional[str] = ..., created_unix: _Optional[int] = ...) -> None: ...

class ListPortSharesRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListPortSharesResponse(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[PortShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[PortShare, _Mapping]]] = ...) -> None: ...

class UnsharePortRequest(_message.Message):
    __slots__ = ("id", "port")
    ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    id: str
    port: int
    def __init__(self, id: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class UnsharePortResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class GetSandboxMetricsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchSandboxMetricsRequest(_message.Message):
    __slots__ = ("id", "interval_secs")
    ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECS_FIELD_NUMBER: _ClassVar[int]
    id: str
    interval_secs: int
    def __init__(self, id: _Optional[str] = ..., interval_secs: _Optional[int] = ...) -> None: ...

class SandboxMetrics(_message.Message):
    __slots__ = ("id", "sampled_unix_ms", "cpu_time_us", "cpu_percent", "vcpus", "vmm_rss_bytes", "vmm_pss_bytes", "guest_memory_total_bytes", "guest_memory_available_bytes", "guest_memory_used_bytes", "disk_bytes", "net_rx_bytes", "net_tx_bytes", "has_nic", "exec_count", "last_activity_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_US_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    VMM_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    VMM_PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NET_RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    NET_TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_NIC_FIELD_NUMBER: _ClassVar[int]
    EXEC_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    sampled_unix_ms: int
    cpu_time_us: int
    cpu_percent: float
    vcpus: int
    vmm_rss_bytes: int
    vmm_pss_bytes: int
    guest_memory_total_bytes: int
    guest_memory_available_bytes: int
    guest_memory_used_bytes: int
    disk_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    has_nic: bool
    exec_count: int
    last_activity_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., sampled_unix_ms: _Optional[int] = ..., cpu_time_us: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., vcpus: _Optional[int] = ..., vmm_rss_bytes: _Optional[int] = ..., vmm_pss_bytes: _Optional[int] = ..., guest_memory_total_bytes: _Optional[int] = ..., guest_memory_available_bytes: _Optional[int] = ..., guest_memory_used_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., net_rx_bytes: _Optional[int] = ..., net_tx_bytes: _Optional[int] = ..., has_nic: _Optional[bool] = ..., exec_count: _Optional[int] = ..., last_activity_unix_ms: _Optional[int] = ...) -> None: ...

class CreateSandboxesRequest(_message.Message):
    __slots__ = ("snapshot_tag", "n", "memory_limit_mib", "cpu_quota", "pids_limit", "network", "allow", "per_child_netns", "ttl_secs", "idle_timeout_secs", "labels", "volumes", "prewarm", "live_fork", "hugepages", "pull_missing")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MIB_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    PER_CHILD_NETNS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    PREWARM_FIELD_NUMBER: _ClassVar[int]
    LIVE_FORK_FIELD_NUMBER: _ClassVar[int]
    HUGEPAGES_FIELD_NUMBER: _ClassVar[int]
    PULL_MISSING_FIELD_NUMBER: _ClassVar[int]
    snapshot_tag: str
    n: int
    memory_limit_mib: int
    cpu_quota: float
    pids_limit: int
    network: str
    allow: _containers.RepeatedScalarFieldContainer[str]
    per_child_netns: bool
    ttl_secs: int
    idle_timeout_secs: int
    labels: _containers.ScalarMap[str, str]
    volumes: _containers.RepeatedScalarFieldContainer[str]
    prewarm: bool
    live_fork: bool
    hugepages: bool
    pull_missing: bool
    def __init__(self, snapshot_tag: _Optional[str] = ..., n: _Optional[int] = ..., memory_limit_mib: _Optional[int] = ..., cpu_quota: _Optional[float] = ..., pids_limit: _Optional[int] = ..., network: _Optional[str] = ..., allow: _Optional[_Iterable[str]] = ..., per_child_netns: _Optional[bool] = ..., ttl_secs: _Optional[int] = ..., idle_timeout_secs: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., volumes: _Optional[_Iterable[str]] = ..., prewarm: _Optional[bool] = ..., live_fork: _Optional[bool] = ..., hugepages: _Optional[bool] = ..., pull_missing: _Optional[bool] = ...) -> None: ...

class CreateSandboxesResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sandbox]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[_common_pb2.Sandbox, _Mapping]]] = ...) -> None: ...

class ListSandboxesRequest(_message.Message):
    __slots__ = ("snapshot_tag", "page_size", "page_token")
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    snapshot_tag: str
    page_size: int
    page_token: str
    def __init__(self, snapshot_tag: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSandboxesResponse(_message.Message):
    __slots__ = ("sandboxes", "next_page_token")
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Sandbox]
    next_page_token: str
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[_common_pb2.Sandbox, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetSandboxRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteSandboxRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteSandboxesRequest(_message.Message):
    __slots__ = ("ids", "snapshot_tag", "all")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    snapshot_tag: str
    all: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., snapshot_tag: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class DeleteSandboxesResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("id", "args", "timeout_secs", "env", "cwd", "stdin", "max_output_bytes", "pty", "tag", "user")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PTY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    timeout_secs: int
    env: _containers.ScalarMap[str, str]
    cwd: str
    stdin: bytes
    max_output_bytes: int
    pty: PtySize
    tag: str
    user: str
    def __init__(self, id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., timeout_secs: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., stdin: _Optional[bytes] = ..., max_output_bytes: _Optional[int] = ..., pty: _Optional[_Union[PtySize, _Mapping]] = ..., tag: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("stdout", "stderr", "exit_code", "signal", "timed_out", "duration_ms", "stdout_truncated", "stderr_truncated")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    stdout: str
    stderr: str
    exit_code: int
    signal: int
    timed_out: bool
    duration_ms: float
    stdout_truncated: bool
    stderr_truncated: bool
    def __init__(self, stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., duration_ms: _Optional[float] = ..., stdout_truncated: _Optional[bool] = ..., stderr_truncated: _Optional[bool] = ...) -> None: ...

class ExecEvent(_message.Message):
    __slots__ = ("stdout", "stderr", "exit", "pty", "started", "dropped")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    PTY_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    exit: ExecResponse
    pty: bytes
    started: ProcessInfo
    dropped: int
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exit: _Optional[_Union[ExecResponse, _Mapping]] = ..., pty: _Optional[bytes] = ..., started: _Optional[_Union[ProcessInfo, _Mapping]] = ..., dropped: _Optional[int] = ...) -> None: ...

class ExecInput(_message.Message):
    __slots__ = ("start", "stdin", "eof", "resize", "signal")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    start: ExecRequest
    stdin: bytes
    eof: bool
    resize: PtySize
    signal: str
    def __init__(self, start: _Optional[_Union[ExecRequest, _Mapping]] = ..., stdin: _Optional[bytes] = ..., eof: _Optional[bool] = ..., resize: _Optional[_Union[PtySize, _Mapping]] = ..., signal: _Optional[str] = ...) -> None: ...

class PtySize(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class StartProcessRequest(_message.Message):
    __slots__ = ("id", "args", "env", "cwd", "tag", "pty", "stdin", "timeout_secs", "user")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PTY_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    cwd: str
    tag: str
    pty: PtySize
    stdin: bool
    timeout_secs: int
    user: str
    def __init__(self, id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., tag: _Optional[str] = ..., pty: _Optional[_Union[PtySize, _Mapping]] = ..., stdin: _Optional[bool] = ..., timeout_secs: _Optional[int] = ..., user: _Optional[str] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "tag", "args", "cwd", "pty", "stdin_open", "started_unix_ms", "output_bytes", "running", "exit")
    PID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    PTY_FIELD_NUMBER: _ClassVar[int]
    STDIN_OPEN_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    tag: str
    args: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    pty: bool
    stdin_open: bool
    started_unix_ms: int
    output_bytes: int
    running: bool
    exit: ExecResponse
    def __init__(self, pid: _Optional[int] = ..., tag: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., pty: _Optional[bool] = ..., stdin_open: _Optional[bool] = ..., started_unix_ms: _Optional[int] = ..., output_bytes: _Optional[int] = ..., running: _Optional[bool] = ..., exit: _Optional[_Union[ExecResponse, _Mapping]] = ...) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ...) -> None: ...

class AttachProcessRequest(_message.Message):
    __slots__ = ("id", "process", "from_offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    FROM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    process: str
    from_offset: int
    def __init__(self, id: _Optional[str] = ..., process: _Optional[str] = ..., from_offset: _Optional[int] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("id", "process", "signal")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    process: str
    signal: str
    def __init__(self, id: _Optional[str] = ..., process: _Optional[str] = ..., signal: _Optional[str] = ...) -> None: ...

class SendStdinRequest(_message.Message):
    __slots__ = ("id", "process", "data", "close")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    process: str
    data: bytes
    close: bool
    def __init__(self, id: _Optional[str] = ..., process: _Optional[str] = ..., data: _Optional[bytes] = ..., close: _Optional[bool] = ...) -> None: ...

class CloseStdinRequest(_message.Message):
    __slots__ = ("id", "process")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    process: str
    def __init__(self, id: _Optional[str] = ..., process: _Optional[str] = ...) -> None: ...

class ResizePtyRequest(_message.Message):
    __slots__ = ("id", "process", "size")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    process: str
    size: PtySize
    def __init__(self, id: _Optional[str] = ..., process: _Optional[str] = ..., size: _Optional[_Union[PtySize, _Mapping]] = ...) -> None: ...

class WatchFilesRequest(_message.Message):
    __slots__ = ("id", "path", "recursive")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    recursive: bool
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., recursive: _Optional[bool] = ...) -> None: ...

class FileEvent(_message.Message):
    __slots__ = ("kind", "path", "is_dir")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CREATE: _ClassVar[FileEvent.Kind]
        WRITE: _ClassVar[FileEvent.Kind]
        REMOVE: _ClassVar[FileEvent.Kind]
        RENAME: _ClassVar[FileEvent.Kind]
        CHMOD: _ClassVar[FileEvent.Kind]
    CREATE: FileEvent.Kind
    WRITE: FileEvent.Kind
    REMOVE: FileEvent.Kind
    RENAME: FileEvent.Kind
    CHMOD: FileEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    IS_DIR_FIELD_NUMBER: _ClassVar[int]
    kind: FileEvent.Kind
    path: str
    is_dir: bool
    def __init__(self, kind: _Optional[_Union[FileEvent.Kind, str]] = ..., path: _Optional[str] = ..., is_dir: _Optional[bool] = ..., **kwargs) -> None: ...

class FileEvents(_message.Message):
    __slots__ = ("events", "overflow")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FileEvent]
    overflow: bool
    def __init__(self, events: _Optional[_Iterable[_Union[FileEvent, _Mapping]]] = ..., overflow: _Optional[bool] = ...) -> None: ...

class EvalRequest(_message.Message):
    __slots__ = ("id", "code", "timeout_secs")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: str
    timeout_secs: int
    def __init__(self, id: _Optional[str] = ..., code: _Optional[str] = ..., timeout_secs: _Optional[int] = ...) -> None: ...

class EvalResponse(_message.Message):
    __slots__ = ("result", "error", "exit_code", "stdout", "stderr")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    result: str
    error: str
    exit_code: int
    stdout: str
    stderr: str
    def __init__(self, result: _Optional[str] = ..., error: _Optional[str] = ..., exit_code: _Optional[int] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("ok", "latency_ms", "uptime_secs", "runtime_ready", "pong")
    OK_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_READY_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    latency_ms: float
    uptime_secs: float
    runtime_ready: bool
    pong: bool
    def __init__(self, ok: _Optional[bool] = ..., latency_ms: _Optional[float] = ..., uptime_secs: _Optional[float] = ..., runtime_ready: _Optional[bool] = ..., pong: _Optional[bool] = ...) -> None: ...

class BranchRequest(_message.Message):
    __slots__ = ("id", "tag", "mode", "diff", "measure_diff", "wait", "live", "parent_tag")
    ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    MEASURE_DIFF_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    PARENT_TAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    tag: str
    mode: str
    diff: bool
    measure_diff: bool
    wait: bool
    live: bool
    parent_tag: str
    def __init__(self, id: _Optional[str] = ..., tag: _Optional[str] = ..., mode: _Optional[str] = ..., diff: _Optional[bool] = ..., measure_diff: _Optional[bool] = ..., wait: _Optional[bool] = ..., live: _Optional[bool] = ..., parent_tag: _Optional[str] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class WriteFileRequest(_message.Message):
    __slots__ = ("id", "path", "data", "mode")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    data: bytes
    mode: int
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ..., mode: _Optional[int] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("name", "path", "size", "mode", "is_dir", "is_symlink", "mtime_unix", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    IS_DIR_FIELD_NUMBER: _ClassVar[int]
    IS_SYMLINK_FIELD_NUMBER: _ClassVar[int]
    MTIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    size: int
    mode: int
    is_dir: bool
    is_symlink: bool
    mtime_unix: int
    digest: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., is_dir: _Optional[bool] = ..., is_symlink: _Optional[bool] = ..., mtime_unix: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class ListFilesRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ListFilesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FileInfo]
    def __init__(self, entries: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ...) -> None: ...

class StatFileRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class RemoveFileRequest(_message.Message):
    __slots__ = ("id", "path", "recursive")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    recursive: bool
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., recursive: _Optional[bool] = ...) -> None: ...

class RemoveFileResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewSandboxRequest(_message.Message):
    __slots__ = ("id", "ttl_secs")
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    id: str
    ttl_secs: int
    def __init__(self, id: _Optional[str] = ..., ttl_secs: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("sandbox_id", "workspace", "snapshot_tag")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    workspace: str
    snapshot_tag: str
    def __init__(self, sandbox_id: _Optional[str] = ..., workspace: _Optional[str] = ..., snapshot_tag: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "sandbox_id", "workspace", "snapshot_tag", "reason", "at_unix_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sandbox_id: str
    workspace: str
    snapshot_tag: str
    reason: str
    at_unix_ms: int
    def __init__(self, kind: _Optional[str] = ..., sandbox_id: _Optional[str] = ..., workspace: _Optional[str] = ..., snapshot_tag: _Optional[str] = ..., reason: _Optional[str] = ..., at_unix_ms: _Optional[int] = ...) -> None: ...
