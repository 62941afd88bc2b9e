from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Snapshot(_message.Message):
    __slots__ = ("tag", "status", "status_reason", "image", "vcpus", "mem_mib", "kind", "parent_tag", "ancestors", "dependents", "chain_depth", "logical_size_bytes", "physical_size_bytes", "memory_digest", "state_digest", "parent_memory_digest", "created_at_unix", "branched_from", "pause_ms_exact", "dirty_bytes", "backend", "accel", "volumes", "labels", "live_sandboxes", "warm_ms", "runtime", "volume_slots", "owner", "shared", "dir", "bootable", "warning", "diff_ms", "diff_physical_bytes", "diff_logical_bytes", "vmstate_bytes", "pause_ms")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TAG_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEM_MIB_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_TAG_FIELD_NUMBER: _ClassVar[int]
    ANCESTORS_FIELD_NUMBER: _ClassVar[int]
    DEPENDENTS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARENT_MEMORY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    BRANCHED_FROM_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_EXACT_FIELD_NUMBER: _ClassVar[int]
    DIRTY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ACCEL_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    WARM_MS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    DIR_FIELD_NUMBER: _ClassVar[int]
    BOOTABLE_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    DIFF_MS_FIELD_NUMBER: _ClassVar[int]
    DIFF_PHYSICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIFF_LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VMSTATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    tag: str
    status: str
    status_reason: str
    image: str
    vcpus: int
    mem_mib: int
    kind: str
    parent_tag: str
    ancestors: _containers.RepeatedScalarFieldContainer[str]
    dependents: _containers.RepeatedScalarFieldContainer[str]
    chain_depth: int
    logical_size_bytes: int
    physical_size_bytes: int
    memory_digest: str
    state_digest: str
    parent_memory_digest: str
    created_at_unix: int
    branched_from: str
    pause_ms_exact: float
    dirty_bytes: int
    backend: str
    accel: str
    volumes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    live_sandboxes: int
    warm_ms: float
    runtime: str
    volume_slots: int
    owner: str
    shared: bool
    dir: str
    bootable: bool
    warning: str
    diff_ms: float
    diff_physical_bytes: int
    diff_logical_bytes: int
    vmstate_bytes: int
    pause_ms: int
    def __init__(self, tag: _Optional[str] = ..., status: _Optional[str] = ..., status_reason: _Optional[str] = ..., image: _Optional[str] = ..., vcpus: _Optional[int] = ..., mem_mib: _Optional[int] = ..., kind: _Optional[str] = ..., parent_tag: _Optional[str] = ..., ancestors: _Optional[_Iterable[str]] = ..., dependents: _Optional[_Iterable[str]] = ..., chain_depth: _Optional[int] = ..., logical_size_bytes: _Optional[int] = ..., physical_size_bytes: _Optional[int] = ..., memory_digest: _Optional[str] = ..., state_digest: _Optional[str] = ..., parent_memory_digest: _Optional[str] = ..., created_at_unix: _Optional[int] = ..., branched_from: _Optional[str] = ..., pause_ms_exact: _Optional[float] = ..., dirty_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., accel: _Optional[str] = ..., volumes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., live_sandboxes: _Optional[int] = ..., warm_ms: _Optional[float] = ..., runtime: _Optional[str] = ..., volume_slots: _Optional[int] = ..., owner: _Optional[str] = ..., shared: _Optional[bool] = ..., dir: _Optional[str] = ..., bootable: _Optional[bool] = ..., warning: _Optional[str] = ..., diff_ms: _Optional[float] = ..., diff_physical_bytes: _Optional[int] = ..., diff_logical_bytes: _Optional[int] = ..., vmstate_bytes: _Optional[int] = ..., pause_ms: _Optional[int] = ...) -> None: ...

class Sandbox(_message.Message):
    __slots__ = ("id", "snapshot_tag", "pid", "created_at_unix", "status", "status_reason", "hostname", "memory_limit_mib", "cpu_quota", "pids_limit", "network", "allow", "volumes", "labels", "ttl_secs", "idle_timeout_secs", "expires_at_unix", "spawn_ms", "workspace", "backend", "accel", "last_active_unix", "owner", "guest_addr", "netns", "has_branched", "branch_count", "spawn_phases")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MIB_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SPAWN_MS_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ACCEL_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_UNIX_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    GUEST_ADDR_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    HAS_BRANCHED_FIELD_NUMBER: _ClassVar[int]
    BRANCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    SPAWN_PHASES_FIELD_NUMBER: _ClassVar[int]
    id: str
    snapshot_tag: str
    pid: int
    created_at_unix: int
    status: str
    status_reason: str
    hostname: str
    memory_limit_mib: int
    cpu_quota: float
    pids_limit: int
    network: str
    allow: _containers.RepeatedScalarFieldContainer[str]
    volumes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    ttl_secs: int
    idle_timeout_secs: int
    expires_at_unix: int
    spawn_ms: float
    workspace: str
    backend: str
    accel: str
    last_active_unix: int
    owner: str
    guest_addr: str
    netns: str
    has_branched: bool
    branch_count: int
    spawn_phases: SpawnPhases
    def __init__(self, id: _Optional[str] = ..., snapshot_tag: _Optional[str] = ..., pid: _Optional[int] = ..., created_at_unix: _Optional[int] = ..., status: _Optional[str] = ..., status_reason: _Optional[str] = ..., hostname: _Optional[str] = ..., memory_limit_mib: _Optional[int] = ..., cpu_quota: _Optional[float] = ..., pids_limit: _Optional[int] = ..., network: _Optional[str] = ..., allow: _Optional[_Iterable[str]] = ..., volumes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., ttl_secs: _Optional[int] = ..., idle_timeout_secs: _Optional[int] = ..., expires_at_unix: _Optional[int] = ..., spawn_ms: _Optional[float] = ..., workspace: _Optional[str] = ..., backend: _Optional[str] = ..., accel: _Optional[str] = ..., last_active_unix: _Optional[int] = ..., owner: _Optional[str] = ..., guest_addr: _Optional[str] = ..., netns: _Optional[str] = ..., has_branched: _Optional[bool] = ..., branch_count: _Optional[int] = ..., spawn_phases: _Optional[_Union[SpawnPhases, _Mapping]] = ...) -> None: ...

class SpawnPhases(_message.Message):
    __slots__ = ("prepared_ms", "restored_ms", "resumed_ms", "reinit_ms", "pooled", "guest_steps")
    PREPARED_MS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_MS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_MS_FIELD_NUMBER: _ClassVar[int]
    REINIT_MS_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    GUEST_STEPS_FIELD_NUMBER: _ClassVar[int]
    prepared_ms: float
    restored_ms: float
    resumed_ms: float
    reinit_ms: float
    pooled: bool
    guest_steps: GuestReinitSteps
    def __init__(self, prepared_ms: _Optional[float] = ..., restored_ms: _Optional[float] = ..., resumed_ms: _Optional[float] = ..., reinit_ms: _Optional[float] = ..., pooled: _Optional[bool] = ..., guest_steps: _Optional[_Union[GuestReinitSteps, _Mapping]] = ...) -> None: ...

class GuestReinitSteps(_message.Message):
    __slots__ = ("clock_ms", "entropy_ms", "hostname_ms", "reseed_ms", "network_ms", "pids_ms")
    CLOCK_MS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_MS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_MS_FIELD_NUMBER: _ClassVar[int]
    RESEED_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    PIDS_MS_FIELD_NUMBER: _ClassVar[int]
    clock_ms: float
    entropy_ms: float
    hostname_ms: float
    reseed_ms: float
    network_ms: float
    pids_ms: float
    def __init__(self, clock_ms: _Optional[float] = ..., entropy_ms: _Optional[float] = ..., hostname_ms: _Optional[float] = ..., reseed_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., pids_ms: _Optional[float] = ...) -> None: ...

class Workspace(_message.Message):
    __slots__ = ("name", "status", "status_reason", "live_sandbox_id", "source_snapshot_tag", "state_tag", "memory_limit_mib", "cpu_quota", "network", "volumes", "labels", "ttl_secs", "idle_timeout_secs", "created_at_unix", "updated_at_unix", "suspended_at_unix", "owner")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    LIVE_SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    STATE_TAG_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MIB_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    status_reason: str
    live_sandbox_id: str
    source_snapshot_tag: str
    state_tag: str
    memory_limit_mib: int
    cpu_quota: float
    network: str
    volumes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    ttl_secs: int
    idle_timeout_secs: int
    created_at_unix: int
    updated_at_unix: int
    suspended_at_unix: int
    owner: str
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., status_reason: _Optional[str] = ..., live_sandbox_id: _Optional[str] = ..., source_snapshot_tag: _Optional[str] = ..., state_tag: _Optional[str] = ..., memory_limit_mib: _Optional[int] = ..., cpu_quota: _Optional[float] = ..., network: _Optional[str] = ..., volumes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., ttl_secs: _Optional[int] = ..., idle_timeout_secs: _Optional[int] = ..., created_at_unix: _Optional[int] = ..., updated_at_unix: _Optional[int] = ..., suspended_at_unix: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
