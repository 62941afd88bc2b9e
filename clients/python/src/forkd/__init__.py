"""Python client for forkd: fork copy-on-write microVM sandboxes from warmed
snapshots, run commands and Python in them, move files, branch and kill.

    import forkd

    client = forkd.Client()            # $FORKD_URL, $FORKD_TOKEN
    with client.fork("py", n=3) as sandboxes:
        for sb in sandboxes:
            print(sb.exec(["hostname"]).stdout)

The asyncio flavour is :mod:`forkd.aio`; :class:`Controller` offers the
reference forkd SDK's controller API (dicts in, dicts out) over this client.
"""

from .client import (
    Client,
    ExecStream,
    Files,
    FileWatch,
    InteractiveProcess,
    ProcessStream,
    Sandbox,
    SandboxGroup,
    Sandboxes,
    Snapshots,
    Workspaces,
)
from .controller import Controller, ControllerError
from .errors import (
    AuthenticationError,
    CommandError,
    ConflictError,
    DeadlineExceededError,
    ForkdError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SnapshotFailedError,
    UnavailableError,
    UnimplementedError,
)
from .types import EvalResult, ExecResult, FileEvent, ProcessInfo

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Sandbox",
    "SandboxGroup",
    "Snapshots",
    "Sandboxes",
    "Workspaces",
    "Files",
    "ExecStream",
    "ProcessStream",
    "InteractiveProcess",
    "FileWatch",
    "ExecResult",
    "EvalResult",
    "ProcessInfo",
    "FileEvent",
    "Controller",
    "ControllerError",
    "ForkdError",
    "NotFoundError",
    "AuthenticationError",
    "PermissionDeniedError",
    "InvalidArgumentError",
    "ConflictError",
    "ResourceExhaustedError",
    "UnimplementedError",
    "UnavailableError",
    "DeadlineExceededError",
    "SnapshotFailedError",
    "CommandError",
]
