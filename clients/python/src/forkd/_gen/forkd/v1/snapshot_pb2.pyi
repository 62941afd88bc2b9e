from forkd._gen.google.api import annotations_pb2 as _annotations_pb2
from forkd._gen.forkd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetPoolRequest(_message.Message):
    __slots__ = ("tag", "target", "network")
    TAG_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    tag: str
    target: int
    network: str
    def __init__(self, tag: _Optional[str] = ..., target: _Optional[int] = ..., network: _Optional[str] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("tag", "ready", "filling", "target", "network")
    TAG_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FILLING_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    tag: str
    ready: int
    filling: int
    target: int
    network: str
    def __init__(self, tag: _Optional[str] = ..., ready: _Optional[int] = ..., filling: _Optional[int] = ..., target: _Optional[int] = ..., network: _Optional[str] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("tag", "image", "vcpus", "mem_mib", "warm_timeout_secs", "warm_eval", "volumes", "labels", "wait", "rootfs", "kernel", "rw", "tap", "boot_wait_secs")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TAG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEM_MIB_FIELD_NUMBER: _ClassVar[int]
    WARM_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    WARM_EVAL_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    RW_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    BOOT_WAIT_SECS_FIELD_NUMBER: _ClassVar[int]
    tag: str
    image: str
    vcpus: int
    mem_mib: int
    warm_timeout_secs: int
    warm_eval: str
    volumes: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    wait: bool
    rootfs: str
    kernel: str
    rw: bool
    tap: str
    boot_wait_secs: int
    def __init__(self, tag: _Optional[str] = ..., image: _Optional[str] = ..., vcpus: _Optional[int] = ..., mem_mib: _Optional[int] = ..., warm_timeout_secs: _Optional[int] = ..., warm_eval: _Optional[str] = ..., volumes: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., wait: _Optional[bool] = ..., rootfs: _Optional[str] = ..., kernel: _Optional[str] = ..., rw: _Optional[bool] = ..., tap: _Optional[str] = ..., boot_wait_secs: _Optional[int] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots", "next_page_token")
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[_common_pb2.Snapshot]
    next_page_token: str
    def __init__(self, snapshots: _Optional[_Iterable[_Union[_common_pb2.Snapshot, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("tag", "cascade", "force")
    TAG_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    tag: str
    cascade: bool
    force: bool
    def __init__(self, tag: _Optional[str] = ..., cascade: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ("deleted", "orphaned")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    ORPHANED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    orphaned: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., orphaned: _Optional[_Iterable[str]] = ...) -> None: ...

class CompactSnapshotRequest(_message.Message):
    __slots__ = ("tag", "to")
    TAG_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    tag: str
    to: str
    def __init__(self, tag: _Optional[str] = ..., to: _Optional[str] = ...) -> None: ...

class DeriveSnapshotRequest(_message.Message):
    __slots__ = ("from_tag", "tag", "exec", "timeout_secs")
    FROM_TAG_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    EXEC_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    from_tag: str
    tag: str
    exec: _containers.RepeatedScalarFieldContainer[str]
    timeout_secs: int
    def __init__(self, from_tag: _Optional[str] = ..., tag: _Optional[str] = ..., exec: _Optional[_Iterable[str]] = ..., timeout_secs: _Optional[int] = ...) -> None: ...

class ExportSnapshotRequest(_message.Message):
    __slots__ = ("tag", "layer_only", "flat", "description", "base_image")
    TAG_FIELD_NUMBER: _ClassVar[int]
    LAYER_ONLY_FIELD_NUMBER: _ClassVar[int]
    FLAT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BASE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    tag: str
    layer_only: bool
    flat: bool
    description: str
    base_image: str
    def __init__(self, tag: _Optional[str] = ..., layer_only: _Optional[bool] = ..., flat: _Optional[bool] = ..., description: _Optional[str] = ..., base_image: _Optional[str] = ...) -> None: ...

class ImportSnapshotRequest(_message.Message):
    __slots__ = ("tag", "data")
    TAG_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tag: str
    data: bytes
    def __init__(self, tag: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushSnapshotRequest(_message.Message):
    __slots__ = ("tag", "remote")
    TAG_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    tag: str
    remote: str
    def __init__(self, tag: _Optional[str] = ..., remote: _Optional[str] = ...) -> None: ...

class PushSnapshotResponse(_message.Message):
    __slots__ = ("url", "bytes", "uploaded_blobs", "present_blobs", "total_bytes", "manifest_written", "seconds")
    URL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_BLOBS_FIELD_NUMBER: _ClassVar[int]
    PRESENT_BLOBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    url: str
    bytes: int
    uploaded_blobs: int
    present_blobs: int
    total_bytes: int
    manifest_written: bool
    seconds: float
    def __init__(self, url: _Optional[str] = ..., bytes: _Optional[int] = ..., uploaded_blobs: _Optional[int] = ..., present_blobs: _Optional[int] = ..., total_bytes: _Optional[int] = ..., manifest_written: _Optional[bool] = ..., seconds: _Optional[float] = ...) -> None: ...

class PullSnapshotRequest(_message.Message):
    __slots__ = ("remote", "tag")
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    remote: str
    tag: str
    def __init__(self, remote: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class ListRemoteSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RemoteSnapshot(_message.Message):
    __slots__ = ("tag", "pushed_unix", "manifest_bytes")
    TAG_FIELD_NUMBER: _ClassVar[int]
    PUSHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    tag: str
    pushed_unix: int
    manifest_bytes: int
    def __init__(self, tag: _Optional[str] = ..., pushed_unix: _Optional[int] = ..., manifest_bytes: _Optional[int] = ...) -> None: ...

class ListRemoteSnapshotsResponse(_message.Message):
    __slots__ = ("url", "snapshots")
    URL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    url: str
    snapshots: _containers.RepeatedCompositeFieldContainer[RemoteSnapshot]
    def __init__(self, url: _Optional[str] = ..., snapshots: _Optional[_Iterable[_Union[RemoteSnapshot, _Mapping]]] = ...) -> None: ...

class ShareSnapshotRequest(_message.Message):
    __slots__ = ("tag", "shared")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    tag: str
    shared: bool
    def __init__(self, tag: _Optional[str] = ..., shared: _Optional[bool] = ...) -> None: ...
