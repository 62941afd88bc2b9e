"""The synchronous forkd client (gRPC)."""

from __future__ import annotations

import os
import queue
import time
from collections import deque
from typing import Any, Callable, Deque, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

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
    FileEvent,
    FileInfo,
    PingResult,
    ProcessInfo,
    PoolInfo,
    PushResult,
    RemoteSnapshot,
    SandboxInfo,
    SnapshotInfo,
    VersionInfo,
    WorkspaceInfo,
)

__all__ = [
    "Client",
    "Sandbox",
    "SandboxGroup",
    "Files",
    "ExecStream",
    "ProcessStream",
    "InteractiveProcess",
    "FileWatch",
    "Snapshots",
    "Sandboxes",
    "Workspaces",
]

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

    def stream(
        self, method: Callable[..., Any], request: Any, timeout: Optional[float] = None, *, bounded: bool = True
    ) -> "_Typed":
        """A streaming call. ``timeout`` None means the client default, or
        no deadline at all when not ``bounded`` (a call that lasts as long
        as a process)."""
        if timeout is None and bounded:
            timeout = self.timeout
        call = method(request, metadata=self.metadata, timeout=timeout)
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

    def pools(self) -> List[PoolInfo]:
        """Hot pools of the snapshots you may fork from: children ready,
        being made, kept, and their network."""
        return list(self._c._rpc(self._c._snap.ListPools, snapshot_pb2.ListPoolsRequest()).pools)

    def set_pool(self, tag: str, target: int, *, network: str = "none") -> PoolInfo:
        """Keeps ``target`` hot children of ``tag`` (0 empties the pool),
        made with ``network`` "none" or "nat". Admins only."""
        req = snapshot_pb2.SetPoolRequest(tag=tag, target=target, network=network)
        return self._c._rpc(self._c._snap.SetPool, req)


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

    def start_process(
        self,
        args: c.Args,
        *,
        tag: Optional[str] = None,
        pty: Optional[c.PtyArg] = None,
        stdin: bool = False,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> ProcessInfo:
        """Starts a detached process: it keeps running after this call and
        when clients go away; read its output with :meth:`attach`.

        ``tag`` names it for later calls (else use its pid); ``pty=(rows,
        cols)`` runs it on a terminal; ``stdin=True`` keeps its stdin open
        for :meth:`send_stdin`; ``timeout`` (seconds, default none) kills it.
        """
        req = c.start_process_request(self.id, args, tag, pty, stdin, env, cwd, timeout)
        return ProcessInfo._from_pb(self._c._rpc(self._c._sb.StartProcess, req))

    def processes(self) -> List[ProcessInfo]:
        """Processes started with :meth:`start_process` or
        :meth:`exec_interactive`, running and recently exited."""
        resp = self._c._rpc(self._c._sb.ListProcesses, sandbox_pb2.ListProcessesRequest(id=self.id))
        return [ProcessInfo._from_pb(p) for p in resp.processes]

    def attach(self, process: c.ProcessRef, from_offset: int = 0) -> "ProcessStream":
        """A process's output: what is still buffered (from ``from_offset``),
        then live until it exits. Iterate for ``(stream, bytes)`` pairs
        ("stdout", "stderr" or "pty"); ``.result`` holds the exit afterwards."""
        req = c.attach_request(self.id, process, from_offset)
        return ProcessStream(self._c._rpc.stream(self._c._sb.AttachProcess, req, bounded=False))

    def signal(self, process: c.ProcessRef, sig: c.Sig) -> ProcessInfo:
        """Sends a signal to the process's group: a number or a name
        ("TERM", "SIGINT", "kill", ``signal.SIGKILL``)."""
        req = sandbox_pb2.SignalProcessRequest(id=self.id, process=c.process_ref(process), signal=c.signal_arg(sig))
        return ProcessInfo._from_pb(self._c._rpc(self._c._sb.SignalProcess, req))

    def send_stdin(self, process: c.ProcessRef, data: c.Data, *, close: bool = False) -> ProcessInfo:
        """Writes to the process's stdin (its terminal, for a PTY); ``close``
        ends stdin after the data. ``str`` is UTF-8 encoded."""
        info: Optional[sandbox_pb2.ProcessInfo] = None
        for req in c.stdin_requests(self.id, process, data, close):
            info = self._c._rpc(self._c._sb.SendStdin, req)
        assert info is not None
        return ProcessInfo._from_pb(info)

    def close_stdin(self, process: c.ProcessRef) -> ProcessInfo:
        """Ends the process's stdin (it reads end of file)."""
        req = sandbox_pb2.CloseStdinRequest(id=self.id, process=c.process_ref(process))
        return ProcessInfo._from_pb(self._c._rpc(self._c._sb.CloseStdin, req))

    def resize(self, process: c.ProcessRef, rows: int, cols: int) -> ProcessInfo:
        """Sets the terminal size of a process on a PTY."""
        req = sandbox_pb2.ResizePtyRequest(id=self.id, process=c.process_ref(process), size=c.pty_size(rows, cols))
        return ProcessInfo._from_pb(self._c._rpc(self._c._sb.ResizePty, req))

    def exec_interactive(
        self,
        args: c.Args,
        *,
        pty: Optional[c.PtyArg] = None,
        tag: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "InteractiveProcess":
        """Starts a command and returns a handle to talk to it: ``send``,
        ``close_stdin``, ``resize``, ``signal``; iterate it for output and
        ``wait()`` for the exit. ``pty=(rows, cols)`` runs it on a terminal.
        ``timeout`` (seconds) kills it; by default it has no limit.

        The command is a process of the sandbox: closing the handle (or
        leaving its ``with`` block) detaches, and it keeps running.
        """
        start = c.interactive_start(self.id, args, pty, tag, env, cwd, timeout)
        deadline = None if timeout is None else c.deadline(self._c._rpc.timeout, timeout)
        return InteractiveProcess(self._c._rpc, self._c._sb.ExecInteractive, start, deadline)

    def watch(self, path: str, recursive: bool = True) -> "FileWatch":
        """Changes under the guest directory ``path`` as they happen (also
        in directories below it unless ``recursive=False``): an endless
        iterator of FileEvent; :meth:`FileWatch.cancel` (or leaving its
        ``with`` block) ends it. Returns once the daemon has accepted the
        watch."""
        req = c.watch_request(self.id, path, recursive)
        return FileWatch(self._c._rpc.stream(self._c._sb.WatchFiles, req), req.path)

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


class ProcessStream:
    """Output of a process (:meth:`Sandbox.attach`): iterate for ``(stream,
    bytes)`` pairs, stream being "stdout", "stderr" or "pty". ``info`` is
    the process as it was when the stream began, ``dropped`` the bytes
    that were no longer buffered, and ``result`` the exit, with the output
    this stream saw (PTY output in ``stdout``), once it has ended.

    Iteration may stop and resume; :meth:`cancel` (or leaving a ``with``
    block) stops following the process without affecting it.
    """

    def __init__(self, stream: _Typed) -> None:
        self._stream = stream
        self._out = c.ProcessOutput()
        self._done = False

    @property
    def info(self) -> Optional[ProcessInfo]:
        return self._out.info

    @property
    def pid(self) -> Optional[int]:
        return None if self._out.info is None else self._out.info.pid

    @property
    def dropped(self) -> int:
        return self._out.dropped

    @property
    def result(self) -> Optional[ExecResult]:
        return self._out.result

    @property
    def exit_code(self) -> Optional[int]:
        return None if self._out.result is None else self._out.result.exit_code

    def __iter__(self) -> "ProcessStream":
        return self

    def _event(self) -> bool:
        """Reads one event; False once the stream has ended (it is read to
        its very end, past the exit, so that the call completes)."""
        if self._done:
            return False
        try:
            ev = next(self._stream)
        except StopIteration:
            self._done = True
            self._ended()
            self._out.finish()
            return False
        except ForkdError:
            self._done = True
            self._ended()
            raise
        self._out.feed(ev)
        return True

    def _ended(self) -> None:
        """The stream is over (for the request side of subclasses)."""

    def __next__(self) -> Tuple[str, bytes]:
        while not self._out.pending:
            if not self._event():
                raise StopIteration
        return self._out.pending.popleft()

    def _until_started(self) -> None:
        """Reads events until the process handle arrives (output that comes
        first stays queued for iteration)."""
        while self._out.info is None and self._out.result is None:
            if not self._event():
                return

    def wait(self) -> ExecResult:
        """Consumes the rest of the output and returns the exit."""
        for _ in self:
            pass
        assert self._out.result is not None
        return self._out.result

    def cancel(self) -> None:
        self._stream.cancel()

    def __enter__(self) -> "ProcessStream":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.cancel()


_CLOSED = None  # the request queue's end marker


def _drain(requests: "queue.Queue[Optional[sandbox_pb2.ExecInput]]") -> Iterator[sandbox_pb2.ExecInput]:
    """The request stream of an interactive exec. It holds the queue, not
    the handle, so a dropped handle is collected (and its __del__ ends this)."""
    while True:
        msg = requests.get()
        if msg is _CLOSED:
            return
        yield msg


class InteractiveProcess(ProcessStream):
    """A command started with :meth:`Sandbox.exec_interactive`: write to it
    with :meth:`send`, :meth:`close_stdin`, :meth:`resize` and
    :meth:`signal`; iterate it for output (as :class:`ProcessStream`) and
    :meth:`wait` for the exit. ``info`` (and ``pid``) is known on return.

    :meth:`close` (or leaving a ``with`` block) detaches: the process keeps
    running and can be attached again by pid or tag.
    """

    def __init__(
        self, rpc: _Rpc, method: Callable[..., Any], start: sandbox_pb2.ExecInput, timeout: Optional[float]
    ) -> None:
        # gRPC reads the request iterator on a thread of its own; the
        # methods below only queue messages for it.
        self._requests: "queue.Queue[Optional[sandbox_pb2.ExecInput]]" = queue.Queue()
        self._requests.put(start)
        self._closed = False
        super().__init__(rpc.stream(method, _drain(self._requests), timeout, bounded=False))
        try:
            self._until_started()
        except BaseException:
            self.close()
            raise

    def _put(self, msg: sandbox_pb2.ExecInput) -> None:
        if self._out.result is not None:
            raise ForkdError("the process has exited")
        if self._closed:
            raise ForkdError("the interactive session is closed")
        self._requests.put(msg)

    def send(self, data: c.Data) -> None:
        """Writes to the process's stdin (its terminal, for a PTY); ``str``
        is UTF-8 encoded."""
        for part in c.chunks(data):
            if part:
                self._put(sandbox_pb2.ExecInput(stdin=part))

    def close_stdin(self) -> None:
        """Ends the process's stdin (it reads end of file)."""
        self._put(sandbox_pb2.ExecInput(eof=True))

    def resize(self, rows: int, cols: int) -> None:
        """Sets the terminal size (PTY only)."""
        self._put(sandbox_pb2.ExecInput(resize=c.pty_size(rows, cols)))

    def signal(self, sig: c.Sig) -> None:
        """Signals the process's group: a number or a name ("INT", "TERM", ...)."""
        self._put(sandbox_pb2.ExecInput(signal=c.signal_arg(sig)))

    def _ended(self) -> None:
        self._requests.put(_CLOSED)

    def close(self) -> None:
        """Detaches: stops the stream; the process keeps running."""
        if not self._closed:
            self._closed = True
            self._requests.put(_CLOSED)
            if not self._done:
                ProcessStream.cancel(self)

    cancel = close

    def __enter__(self) -> "InteractiveProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped handle detaches; never leave gRPC's request thread
        # blocked on the queue.
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class FileWatch:
    """File-system changes under a guest directory (:meth:`Sandbox.watch`):
    an endless iterator of :class:`~forkd.types.FileEvent`, in the order
    they happened; :meth:`cancel` (from any thread) or leaving a ``with``
    block ends it."""

    def __init__(self, stream: _Typed, path: str) -> None:
        self._stream = stream
        self.path = path
        self._pending: "Deque[FileEvent]" = deque()
        self._cancelled = False
        call = stream.call
        # The response headers mean the daemon has accepted the watch; a
        # refusal (no such directory, ...) ends the call before them.
        call.initial_metadata()
        if call.done() and call.code() != grpc.StatusCode.OK:
            raise from_rpc_error(call)

    def __iter__(self) -> "FileWatch":
        return self

    def __next__(self) -> FileEvent:
        while not self._pending:
            try:
                batch = next(self._stream)
            except ForkdError as e:
                if self._cancelled and e.code == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise
            self._pending.extend(c.file_events(batch, self.path))
        return self._pending.popleft()

    def cancel(self) -> None:
        self._cancelled = True
        self._stream.cancel()

    close = cancel

    def __enter__(self) -> "FileWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


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
