"""Value types returned by the client.

Descriptive records (snapshots, sandboxes, files, workspaces, the version)
are the generated protobuf messages, re-exported here under names that do not
clash with the client's handle classes. Command and evaluation results,
processes and file events are small dataclasses with helpers, because callers
branch on them constantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ._gen.forkd.v1 import common_pb2, sandbox_pb2, snapshot_pb2, system_pb2, workspace_pb2
from .errors import CommandError

__all__ = [
    "SnapshotInfo",
    "SandboxInfo",
    "WorkspaceInfo",
    "FileInfo",
    "VersionInfo",
    "Event",
    "PingResult",
    "DeleteSnapshotResult",
    "PushResult",
    "RemoteSnapshot",
    "PoolInfo",
    "ExecResult",
    "EvalResult",
    "ProcessInfo",
    "FileEvent",
]

SnapshotInfo = common_pb2.Snapshot
SandboxInfo = common_pb2.Sandbox
WorkspaceInfo = common_pb2.Workspace
FileInfo = sandbox_pb2.FileInfo
VersionInfo = system_pb2.VersionInfo
Event = sandbox_pb2.Event
PingResult = sandbox_pb2.PingResponse
DeleteSnapshotResult = snapshot_pb2.DeleteSnapshotResponse
PushResult = snapshot_pb2.PushSnapshotResponse
RemoteSnapshot = snapshot_pb2.RemoteSnapshot
PoolInfo = snapshot_pb2.Pool
DeleteWorkspaceResult = workspace_pb2.DeleteWorkspaceResponse


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command run to completion in a sandbox."""

    stdout: str
    stderr: str
    #: Exit code, or -1 when a signal ended the command.
    exit_code: int
    #: Signal that ended the command (0 when it exited).
    signal: int = 0
    #: True when the command was killed for running past its timeout.
    timed_out: bool = False
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def check(self) -> "ExecResult":
        """Returns self, or raises CommandError when the command failed."""
        if not self.ok:
            why = "timed out" if self.timed_out else (
                f"was killed by signal {self.signal}" if self.signal else f"exited with {self.exit_code}"
            )
            tail = self.stderr.strip()[-500:]
            raise CommandError(f"command {why}" + (f": {tail}" if tail else ""), self)
        return self

    @classmethod
    def _from_pb(cls, r: sandbox_pb2.ExecResponse, stdout: str | None = None, stderr: str | None = None) -> "ExecResult":
        return cls(
            stdout=r.stdout if stdout is None else stdout,
            stderr=r.stderr if stderr is None else stderr,
            exit_code=r.exit_code,
            signal=r.signal,
            timed_out=r.timed_out,
            duration_ms=r.duration_ms,
        )


@dataclass(frozen=True)
class EvalResult:
    """The outcome of evaluating Python in a sandbox's warm interpreter."""

    #: repr() of the last expression's value ("" for statements).
    result: str
    #: The exception and traceback, "" when the code ran without one.
    error: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return not self.error and self.exit_code == 0

    def check(self) -> "EvalResult":
        """Returns self, or raises CommandError when the evaluation failed."""
        if not self.ok:
            raise CommandError(f"evaluation failed: {self.error.strip()[-500:] or f'exit code {self.exit_code}'}", self)
        return self

    @classmethod
    def _from_pb(cls, r: sandbox_pb2.EvalResponse) -> "EvalResult":
        return cls(result=r.result, error=r.error, exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@dataclass(frozen=True)
class ProcessInfo:
    """A process of a sandbox, started with ``start_process`` or
    ``exec_interactive``; name it by ``pid`` or ``tag`` in later calls."""

    pid: int
    #: The tag it was started with ("" for none).
    tag: str
    args: Tuple[str, ...]
    cwd: str
    #: Runs on a pseudo-terminal (its output arrives as "pty" chunks).
    pty: bool
    #: Its stdin still accepts ``send_stdin``.
    stdin_open: bool
    started_unix_ms: int
    #: Output bytes produced so far, including those no longer buffered:
    #: ``attach(p, from_offset=p.output_bytes)`` shows only new output.
    output_bytes: int
    running: bool
    #: How it ended (output not included); None while it runs.
    exit: Optional[ExecResult] = None

    @classmethod
    def _from_pb(cls, p: sandbox_pb2.ProcessInfo) -> "ProcessInfo":
        return cls(
            pid=p.pid,
            tag=p.tag,
            args=tuple(p.args),
            cwd=p.cwd,
            pty=p.pty,
            stdin_open=p.stdin_open,
            started_unix_ms=p.started_unix_ms,
            output_bytes=p.output_bytes,
            running=p.running,
            exit=ExecResult._from_pb(p.exit) if p.HasField("exit") else None,
        )


@dataclass(frozen=True)
class FileEvent:
    """A change under a watched guest directory.

    ``kind`` is "create", "write", "remove", "rename" (``from_`` is the old
    path) or "chmod"; or "overflow": events were lost at this point (a queue
    was full) and ``path`` is the watched directory, to be rescanned.
    """

    kind: str
    path: str
    #: For "rename": the path it had before.
    from_: str = ""
    is_dir: bool = False

    @classmethod
    def _from_pb(cls, e: sandbox_pb2.FileEvent) -> "FileEvent":
        try:
            kind = sandbox_pb2.FileEvent.Kind.Name(e.kind).lower()
        except ValueError:  # a kind newer than this client
            kind = f"unknown-{e.kind}"
        return cls(kind=kind, path=e.path, from_=getattr(e, "from"), is_dir=e.is_dir)
