from forkd._gen.google.api import annotations_pb2 as _annotations_pb2
from forkd._gen.forkd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateWorkspaceRequest(_message.Message):
    __slots__ = ("name", "snapshot_tag", "memory_limit_mib", "cpu_quota", "network", "volumes", "labels", "ttl_secs", "idle_timeout_secs", "per_child_netns")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MIB_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    PER_CHILD_NETNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    snapshot_tag: str
    memory_limit_mib: int
    cpu_quota: float
    network: str
    volumes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    ttl_secs: int
    idle_timeout_secs: int
    per_child_netns: bool
    def __init__(self, name: _Optional[str] = ..., snapshot_tag: _Optional[str] = ..., memory_limit_mib: _Optional[int] = ..., cpu_quota: _Optional[float] = ..., network: _Optional[str] = ..., volumes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., ttl_secs: _Optional[int] = ..., idle_timeout_secs: _Optional[int] = ..., per_child_netns: _Optional[bool] = ...) -> None: ...

class GetWorkspaceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListWorkspacesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkspacesResponse(_message.Message):
    __slots__ = ("workspaces", "next_page_token")
    WORKSPACES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workspaces: _containers.RepeatedCompositeFieldContainer[_common_pb2.Workspace]
    next_page_token: str
    def __init__(self, workspaces: _Optional[_Iterable[_Union[_common_pb2.Workspace, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SuspendWorkspaceRequest(_message.Message):
    __slots__ = ("name", "diff")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    name: str
    diff: bool
    def __init__(self, name: _Optional[str] = ..., diff: _Optional[bool] = ...) -> None: ...

class ResumeWorkspaceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteWorkspaceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteWorkspaceResponse(_message.Message):
    __slots__ = ("deleted_snapshots",)
    DELETED_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    deleted_snapshots: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_snapshots: _Optional[_Iterable[str]] = ...) -> None: ...
