from forkd._gen.google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "api", "backend", "accel", "accel_reason", "git_commit", "data_dir", "sandboxes", "snapshots", "vmm_confinement", "auth")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ACCEL_FIELD_NUMBER: _ClassVar[int]
    ACCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    VMM_CONFINEMENT_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    version: str
    api: str
    backend: str
    accel: str
    accel_reason: str
    git_commit: str
    data_dir: str
    sandboxes: int
    snapshots: int
    vmm_confinement: str
    auth: str
    def __init__(self, version: _Optional[str] = ..., api: _Optional[str] = ..., backend: _Optional[str] = ..., accel: _Optional[str] = ..., accel_reason: _Optional[str] = ..., git_commit: _Optional[str] = ..., data_dir: _Optional[str] = ..., sandboxes: _Optional[int] = ..., snapshots: _Optional[int] = ..., vmm_confinement: _Optional[str] = ..., auth: _Optional[str] = ...) -> None: ...
