"""The synchronous forkd client (gRPC)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from . import _common as c
from ._gen.forkd.v1 import (
    sandbox_pb2,
    sandbox_pb2_grpc,
    snapshot_pb2,
    snapshot_pb2_grpc,
    system_pb2,
    system_pb2_grpc,
    workspace_pb2,
    workspace_pb2_grpc,
)
from .errors import DeadlineExceededError, ForkdError, NotFoundError, SnapshotFailedError, from_rpc_error
from .types import (
    DeleteSnapshotResult,
    DeleteWorkspaceResult,
    EvalResult,
    Event,
    ExecResult,
    FileInfo,
    PingResult,
    PushResult,
    RemoteSnapshot,
    SandboxInfo,
    SnapshotInfo,
    VersionInfo,
    WorkspaceInfo,
)

__all__ = ["Client", "Sandbox", "SandboxGroup", "Files", "ExecStream", "Snapshots", "Sandboxes", "Workspaces"]

T = TypeVar("T")


class _Rpc:
    """Calls stubs with the token attached and gRPC errors made typed."""

    def __init__(self, token: Optional[str], timeout: Optional[float]) -> None:
        self.metadata = c.metadata(token)
        self.timeout = timeout

    def __call__(self, method: Callable[..., T], request: Any, timeout: Optional[float] = None) -> T:
        try:
            return method(request, metadata=self.metadata, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def stream(self, method: Callable[..., Any], request: Any, timeout: Optional[float] = None) -> "_Typed":
        call = method(request, metadata=self.metadata, timeout=timeout if timeout is not None else self.timeout)
        return _Typed(call)


class _Typed:
    """A server stream whose errors surface as ForkdError while iterating."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __iter__(self) -> "_Typed":
        return self

    def __next__(self) -> Any:
        try:
            return next(self.call)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def cancel(self) -> None:
        self.call.cancel()


class Client:
    """A connection to a forkd daemon.

    ``url`` defaults to ``$FORKD_URL``, else ``http://127.0.0.1:8889``;
    ``token`` to ``$FORKD_TOKEN``, else the contents of ``$FORKD_TOKEN_FILE``, else (loopback
    URLs) the daemon's own ``/var/lib/forkd/token`` when this user may read it.
    For ``https://`` URLs, ``ca_cert`` (PEM bytes or a path; default
    ``$FORKD_CA_CERT``) names the CA that signed the daemon's certificate; the
    system roots are used without it. ``timeout`` (seconds) bounds every call
    that has no longer natural duration; ``None`` means no limit.

    Use it as a context manager, or call :meth:`close`, to release the channel.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        ca_cert: Union[None, bytes, c.PathLike] = None,
        timeout: Optional[float] = None,
    ) -> None:
        target = c.parse_url(url if url is not None else os.environ.get("FORKD_URL", "") or c.DEFAULT_URL)
        self.url = target.url
        creds = c.channel_credentials(target, c.resolve_ca(ca_cert))
        if creds is None:
            self._channel = grpc.insecure_channel(target.address, options=c.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target.address, creds, options=c.CHANNEL_OPTIONS)
        self._rpc = _Rpc(c.resolve_token(token, target), timeout)
        self._snap = snapshot_pb2_grpc.SnapshotServiceStub(self._channel)
        self._sb = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self._ws = workspace_pb2_grpc.WorkspaceServiceStub(self._channel)
        self._sys = system_pb2_grpc.SystemServiceStub(self._channel)
        self.snapshots = Snapshots(self)
        self.sandboxes = Sandboxes(self)
        self.workspaces = Workspaces(self)

    def __repr__(self) -> str:
        return f"forkd.Client({self.url!r})"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> VersionInfo:
        """The daemon's version, backend, accelerator and counts."""
        return self._rpc(self._sys.GetVersion, system_pb2.GetVersionRequest())

    def fork(self, tag: str, n: int = 1, **opts: Any) -> "SandboxGroup":
        """Forks ``n`` copy-on-write children of the ready snapshot ``tag``.

        Options are CreateSandboxesRequest fields (``labels``, ``network``,
        ``memory_limit_mib``, ``ttl_secs``, ...). All or nothing: on error no
        child is left running. The result is a list that, used as a context
        manager, kills every child on exit.
        """
        resp = self._rpc(self._sb.CreateSandboxes, c.fork_request(tag, n, opts))
        return SandboxGroup(Sandbox(self, info) for info in resp.sandboxes)

    def sandbox(self, tag: str, **opts: Any) -> "Sandbox":
        """Forks one child; ``with client.sandbox(tag) as sb:`` kills it on exit."""
        return self.fork(tag, 1, **opts)[0]


class Snapshots:
    """``client.snapshots``: create, inspect and manage snapshots."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        tag: str,
        image: str = "python",
        *,
        wait: bool = True,
        vcpus: int = 0,
        mem_mib: int = 0,
        warm_timeout: Optional[float] = None,
        warm_eval: str = "",
        volumes: Optional[Sequence[str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        poll_interval: float = 0.5,
    ) -> SnapshotInfo:
        """Boots ``image``, warms its runtime and saves it as ``tag``.

        With ``wait`` (the default) this returns once the snapshot is ready,
        raising SnapshotFailedError if it fails, or DeadlineExceededError
        after ``timeout`` seconds; without it, it returns at once with status
        "writing".
        """
        req = c.create_snapshot_request(tag, image, vcpus, mem_mib, warm_timeout, warm_eval, volumes, labels)
        snap = self._c._rpc(self._c._snap.CreateSnapshot, req)
        return self.wait(tag, timeout=timeout, poll_interval=poll_interval) if wait else snap

    def wait(self, tag: str, *, timeout: Optional[float] = None, poll_interval: float = 0.5) -> SnapshotInfo:
        """Polls until ``tag`` leaves "writing"; returns it once "ready"."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            snap = self.get(tag)
            if snap.status == "ready":
                return snap
            if snap.status != "writing":
                raise SnapshotFailedError(tag, snap.status_reason or f"status {snap.status!r}")
            if end is not None and time.monotonic() >= end:
                raise DeadlineExceededError(f"snapshot {tag!r} still writing after {timeout}s")
            time.sleep(poll_interval)

    def list(self, status: str = "") -> List[SnapshotInfo]:
        """All snapshots, oldest first; ``status`` filters ("ready", ...)."""
        resp = self._c._rpc(self._c._snap.ListSnapshots, snapshot_pb2.ListSnapshotsRequest(status=status))
        return list(resp.snapshots)

    def get(self, tag: str) -> SnapshotInfo:
        return self._c._rpc(self._c._snap.GetSnapshot, snapshot_pb2.GetSnapshotRequest(tag=tag))

    def delete(self, tag: str, *, cascade: bool = False, force: bool = False) -> DeleteSnapshotResult:
        """Deletes ``tag``; with dependents only when ``cascade`` (delete them
        too) or ``force`` (orphan them)."""
        req = snapshot_pb2.DeleteSnapshotRequest(tag=tag, cascade=cascade, force=force)
        return self._c._rpc(self._c._snap.DeleteSnapshot, req)

    def compact(self, tag: str, to: str) -> SnapshotInfo:
        """Writes a flat, parentless copy of ``tag`` named ``to``."""
        return self._c._rpc(self._c._snap.CompactSnapshot, snapshot_pb2.CompactSnapshotRequest(tag=tag, to=to))

    def derive(self, from_tag: str, tag: str, args: c.Args, *, timeout: Optional[float] = None) -> SnapshotInfo:
        """Runs a command in a child of ``from_tag`` and saves the result as ``tag``."""
        req = snapshot_pb2.DeriveSnapshotRequest(
            from_tag=from_tag, tag=tag, exec=c.argv(args), timeout_secs=c.whole_seconds(timeout)
        )
        return self._c._rpc(self._c._snap.DeriveSnapshot, req, timeout=c.deadline(self._c._rpc.timeout, timeout))

    def export(self, tag: str, *, layer_only: bool = False) -> Iterator[bytes]:
        """The packed snapshot as a stream of byte chunks."""
        req = snapshot_pb2.ExportSnapshotRequest(tag=tag, layer_only=layer_only)
        return (chunk.data for chunk in self._c._rpc.stream(self._c._snap.ExportSnapshot, req))

    def import_(self, tag: str, chunks: Iterable[bytes]) -> SnapshotInfo:
        """Stores a packed snapshot (as produced by :meth:`export`) as ``tag``."""
        return self._c._rpc(self._c._snap.ImportSnapshot, c.import_requests(tag, chunks))

    def push(self, tag: str, remote: str = "") -> PushResult:
        """Uploads ``tag`` and its chain to the daemon's remote (``--remote``);
        only the blobs the remote lacks. ``remote``, if given, must be the
        daemon's own remote URL. Admins only."""
        return self._c._rpc(self._c._snap.PushSnapshot, snapshot_pb2.PushSnapshotRequest(tag=tag, remote=remote))

    def pull(self, tag: str, remote: str = "") -> SnapshotInfo:
        """Downloads ``tag`` (and what this host lacks of its chain) from the
        daemon's remote; verified before it is visible."""
        return self._c._rpc(self._c._snap.PullSnapshot, snapshot_pb2.PullSnapshotRequest(remote=remote, tag=tag))

    def list_remote(self) -> List[RemoteSnapshot]:
        """The snapshots the daemon's remote holds."""
        resp = self._c._rpc(self._c._snap.ListRemoteSnapshots, snapshot_pb2.ListRemoteSnapshotsRequest())
        return list(resp.snapshots)


class Sandboxes:
    """``client.sandboxes``: find and kill running sandboxes."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, snapshot_tag: str = "") -> List["Sandbox"]:
        resp = self._c._rpc(self._c._sb.ListSandboxes, sandbox_pb2.ListSandboxesRequest(snapshot_tag=snapshot_tag))
        return [Sandbox(self._c, info) for info in resp.sandboxes]

    def get(self, sandbox_id: str) -> "Sandbox":
        return Sandbox(self._c, self._c._rpc(self._c._sb.GetSandbox, sandbox_pb2.GetSandboxRequest(id=sandbox_id)))

    def kill(
        self, ids: Optional[Iterable[str]] = None, *, snapshot_tag: Optional[str] = None, all: bool = False
    ) -> List[str]:
        """Kills sandboxes by id, every child of ``snapshot_tag``, or ``all``; returns the ids killed."""
        return list(self._c._rpc(self._c._sb.DeleteSandboxes, c.kill_request(ids, snapshot_tag, all)).deleted)

    def events(self, *, sandbox_id: str = "", workspace: str = "", snapshot_tag: str = "") -> "EventStream":
        """Lifecycle events as they happen (created, exited, killed, ...)."""
        req = sandbox_pb2.WatchEventsRequest(sandbox_id=sandbox_id, workspace=workspace, snapshot_tag=snapshot_tag)
        return EventStream(self._c._rpc.stream(self._c._sb.WatchEvents, req, timeout=None))


class EventStream:
    """An endless iterator of Event messages; :meth:`cancel` ends it."""

    def __init__(self, stream: _Typed) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[Event]:
        return self._stream

    def cancel(self) -> None:
        self._stream.cancel()


class Sandbox:
    """A running child VM. Also a context manager that kills it on exit."""

    def __init__(self, client: Client, info: SandboxInfo) -> None:
        self._c = client
        self.info = info
        self.id: str = info.id
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"<forkd.Sandbox {self.id} of {self.info.snapshot_tag!r}>"

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def refresh(self) -> SandboxInfo:
        """Fetches the sandbox's current record (status, last activity, ...)."""
        self.info = self._c._rpc(self._c._sb.GetSandbox, sandbox_pb2.GetSandboxRequest(id=self.id))
        return self.info

    def exec(
        self,
        args: c.Args,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        *,
        stdin: Optional[c.Data] = None,
        check: bool = False,
    ) -> ExecResult:
        """Runs a command to completion. ``args`` is an argv list, or a string
        run with ``sh -c``. ``timeout`` is in seconds (daemon default: 60).
        With ``check`` a failing command raises CommandError."""
        req = c.exec_request(self.id, args, timeout, env, cwd, stdin)
        resp = self._c._rpc(self._c._sb.Exec, req, timeout=c.deadline(self._c._rpc.timeout, timeout or 60))
        res = ExecResult._from_pb(resp)
        return res.check() if check else res

    def exec_stream(
        self,
        args: c.Args,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        *,
        stdin: Optional[c.Data] = None,
    ) -> "ExecStream":
        """Runs a command and yields ``(stream, bytes)`` pairs ("stdout" or
        "stderr") as output arrives; afterwards ``.result`` holds the exit."""
        req = c.exec_request(self.id, args, timeout, env, cwd, stdin)
        return ExecStream(self._c._rpc.stream(self._c._sb.ExecStream, req, timeout=c.deadline(self._c._rpc.timeout, timeout or 60)))

    def eval(self, code: str, timeout: Optional[float] = None, *, check: bool = False) -> EvalResult:
        """Evaluates Python in the sandbox's warm interpreter; names persist
        between calls. ``result`` is the repr of the last expression."""
        req = sandbox_pb2.EvalRequest(id=self.id, code=code, timeout_secs=c.whole_seconds(timeout))
        resp = self._c._rpc(self._c._sb.Eval, req, timeout=c.deadline(self._c._rpc.timeout, timeout or 60))
        res = EvalResult._from_pb(resp)
        return res.check() if check else res

    def ping(self) -> PingResult:
        return self._c._rpc(self._c._sb.Ping, sandbox_pb2.PingRequest(id=self.id))

    def renew(self, ttl_secs: int = 0) -> SandboxInfo:
        """Sets a new TTL counted from now (0 = none) and marks the sandbox active."""
        req = sandbox_pb2.RenewSandboxRequest(id=self.id, ttl_secs=ttl_secs)
        self.info = self._c._rpc(self._c._sb.RenewSandbox, req)
        return self.info

    def branch(self, tag: Optional[str] = None, mode: str = "diff", *, wait: bool = True) -> SnapshotInfo:
        """Snapshots this running sandbox (it keeps running). ``mode`` "diff"
        stores only pages written since its parent; "full" a flat copy."""
        return self._c._rpc(self._c._sb.Branch, c.branch_request(self.id, tag, mode, wait))

    def kill(self) -> None:
        """Kills the sandbox. Killing one that is already gone succeeds."""
        self._c._rpc(self._c._sb.DeleteSandbox, sandbox_pb2.DeleteSandboxRequest(id=self.id))


class SandboxGroup(List[Sandbox]):
    """Sandboxes forked together; as a context manager, kills them all on exit."""

    def __enter__(self) -> "SandboxGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> List[str]:
        if not self:
            return []
        client = self[0]._c
        return client.sandboxes.kill([sb.id for sb in self])


class ExecStream:
    """Output of a streaming exec: iterate for ``(stream, bytes)`` pairs."""

    def __init__(self, stream: _Typed) -> None:
        self._stream = stream
        self.result: Optional[ExecResult] = None

    def __iter__(self) -> Iterator[Tuple[str, bytes]]:
        out: List[bytes] = []
        err: List[bytes] = []
        for ev in self._stream:
            kind, value = c.exec_event(ev)
            if kind == "stdout":
                out.append(value)
                yield kind, value
            elif kind == "stderr":
                err.append(value)
                yield kind, value
            elif kind == "exit":
                self.result = ExecResult._from_pb(
                    value,
                    stdout=b"".join(out).decode(errors="replace"),
                    stderr=b"".join(err).decode(errors="replace"),
                )
        if self.result is None:
            raise ForkdError("exec stream ended without an exit status")

    def wait(self) -> ExecResult:
        """Consumes the rest of the stream and returns the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    @property
    def exit_code(self) -> Optional[int]:
        return None if self.result is None else self.result.exit_code

    def cancel(self) -> None:
        self._stream.cancel()


class Files:
    """``sandbox.files``: the guest's filesystem (absolute paths)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def read(self, path: str) -> bytes:
        c_ = self._sb._c
        req = sandbox_pb2.ReadFileRequest(id=self._sb.id, path=path)
        return b"".join(chunk.data for chunk in c_._rpc.stream(c_._sb.ReadFile, req))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: c.Data, mode: int = 0o644) -> FileInfo:
        """Writes the whole file (staged, then renamed into place); ``str`` is UTF-8 encoded."""
        c_ = self._sb._c
        return c_._rpc(c_._sb.WriteFile, c.write_requests(self._sb.id, path, data, mode))

    def list(self, path: str = "/") -> List[FileInfo]:
        c_ = self._sb._c
        return list(c_._rpc(c_._sb.ListFiles, sandbox_pb2.ListFilesRequest(id=self._sb.id, path=path)).entries)

    def stat(self, path: str) -> FileInfo:
        c_ = self._sb._c
        return c_._rpc(c_._sb.StatFile, sandbox_pb2.StatFileRequest(id=self._sb.id, path=path))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except NotFoundError:
            return False

    def remove(self, path: str, *, recursive: bool = False) -> None:
        c_ = self._sb._c
        c_._rpc(c_._sb.RemoveFile, sandbox_pb2.RemoveFileRequest(id=self._sb.id, path=path, recursive=recursive))


class Workspaces:
    """``client.workspaces``: long-lived named sandboxes that suspend and resume."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, snapshot_tag: str, **opts: Any) -> WorkspaceInfo:
        return self._c._rpc(self._c._ws.CreateWorkspace, c.workspace_request(name, snapshot_tag, opts))

    def get(self, name: str) -> WorkspaceInfo:
        return self._c._rpc(self._c._ws.GetWorkspace, workspace_pb2.GetWorkspaceRequest(name=name))

    def list(self) -> List[WorkspaceInfo]:
        return list(self._c._rpc(self._c._ws.ListWorkspaces, workspace_pb2.ListWorkspacesRequest()).workspaces)

    def suspend(self, name: str) -> WorkspaceInfo:
        return self._c._rpc(self._c._ws.SuspendWorkspace, workspace_pb2.SuspendWorkspaceRequest(name=name))

    def resume(self, name: str) -> WorkspaceInfo:
        return self._c._rpc(self._c._ws.ResumeWorkspace, workspace_pb2.ResumeWorkspaceRequest(name=name))

    def delete(self, name: str) -> DeleteWorkspaceResult:
        return self._c._rpc(self._c._ws.DeleteWorkspace, workspace_pb2.DeleteWorkspaceRequest(name=name))
