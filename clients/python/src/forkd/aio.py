"""The asyncio forkd client (grpc.aio), mirroring :mod:`forkd.client`.

Every method that talks to the daemon is a coroutine. ``client.fork`` and
``client.sandbox`` can be awaited or used directly with ``async with``::

    async with forkd.aio.Client() as client:
        async with client.fork("py", n=3) as sandboxes:
            results = await asyncio.gather(*(sb.exec(["hostname"]) for sb in sandboxes))
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Deque,
    Generator,
    Generic,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import grpc
import grpc.aio

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
from .errors import DeadlineExceededError, ForkdError, NotFoundError, SnapshotFailedError, error_class, from_rpc_error
from .types import (
    DeleteSnapshotResult,
    DeleteWorkspaceResult,
    EvalResult,
    Event,
    ExecResult,
    FileEvent,
    FileInfo,
    PingResult,
    PoolInfo,
    ProcessInfo,
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
C = TypeVar("C", "Sandbox", "SandboxGroup")
H = TypeVar("H", "InteractiveProcess", "FileWatch")


class _Rpc:
    def __init__(self, token: Optional[str], timeout: Optional[float]) -> None:
        self.metadata = c.metadata(token)
        self.timeout = timeout

    async def __call__(self, method: Callable[..., Awaitable[T]], request: Any, timeout: Optional[float] = None) -> T:
        try:
            return await method(request, metadata=self.metadata, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def stream(
        self, method: Callable[..., Any], request: Any, timeout: Optional[float] = None, *, bounded: bool = True
    ) -> "_Typed":
        """A streaming call. ``timeout`` None means the client default, or
        no deadline at all when not ``bounded`` (a call that lasts as long
        as a process). ``request`` None opens a call written with ``write``."""
        if timeout is None and bounded:
            timeout = self.timeout
        if request is None:
            return _Typed(method(metadata=self.metadata, timeout=timeout))
        return _Typed(method(request, metadata=self.metadata, timeout=timeout))


class _Typed:
    """A server stream whose errors surface as ForkdError while iterating."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._it: Optional[AsyncIterator[Any]] = None

    def __aiter__(self) -> "_Typed":
        return self

    async def __anext__(self) -> Any:
        if self._it is None:
            self._it = self.call.__aiter__()
        try:
            return await self._it.__anext__()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def cancel(self) -> None:
        self.call.cancel()


class _Spawn(Generic[C]):
    """What ``fork``/``sandbox`` return: await it for the result, or use it
    with ``async with`` to have the sandboxes killed on exit."""

    def __init__(self, make: Callable[[], Awaitable[C]]) -> None:
        self._make: Callable[[], Awaitable[C]] = make
        self._value: Optional[C] = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._make().__await__()

    async def __aenter__(self) -> C:
        self._value = await self._make()
        return self._value

    async def __aexit__(self, *exc: object) -> None:
        if self._value is not None:
            await self._value.kill()


class _Opening(Generic[H]):
    """What ``exec_interactive``/``watch`` return: await it for the handle,
    or use it with ``async with`` to have the handle closed on exit."""

    def __init__(self, make: Callable[[], Awaitable[H]]) -> None:
        self._make: Callable[[], Awaitable[H]] = make
        self._value: Optional[H] = None

    def __await__(self) -> Generator[Any, None, H]:
        return self._make().__await__()

    async def __aenter__(self) -> H:
        self._value = await self._make()
        return self._value

    async def __aexit__(self, *exc: object) -> None:
        if self._value is not None:
            self._value.close()


class Client:
    """An asyncio connection to a forkd daemon; see :class:`forkd.Client`
    for the arguments. Create it inside a running event loop."""

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
            self._channel = grpc.aio.insecure_channel(target.address, options=c.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target.address, creds, options=c.CHANNEL_OPTIONS)
        self._rpc = _Rpc(c.resolve_token(token, target), timeout)
        self._snap = snapshot_pb2_grpc.SnapshotServiceStub(self._channel)
        self._sb = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self._ws = workspace_pb2_grpc.WorkspaceServiceStub(self._channel)
        self._sys = system_pb2_grpc.SystemServiceStub(self._channel)
        self.snapshots = Snapshots(self)
        self.sandboxes = Sandboxes(self)
        self.workspaces = Workspaces(self)

    def __repr__(self) -> str:
        return f"forkd.aio.Client({self.url!r})"

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def version(self) -> VersionInfo:
        return await self._rpc(self._sys.GetVersion, system_pb2.GetVersionRequest())

    def fork(self, tag: str, n: int = 1, **opts: Any) -> "_Spawn[SandboxGroup]":
        """Forks ``n`` children of ``tag``; ``await`` it, or ``async with`` it
        to kill them all on exit."""
        req = c.fork_request(tag, n, opts)

        async def make() -> SandboxGroup:
            resp = await self._rpc(self._sb.CreateSandboxes, req)
            return SandboxGroup(Sandbox(self, info) for info in resp.sandboxes)

        return _Spawn(make)

    def sandbox(self, tag: str, **opts: Any) -> "_Spawn[Sandbox]":
        """Forks one child; ``async with client.sandbox(tag) as sb:`` kills it on exit."""
        req = c.fork_request(tag, 1, opts)

        async def make() -> Sandbox:
            resp = await self._rpc(self._sb.CreateSandboxes, req)
            return Sandbox(self, resp.sandboxes[0])

        return _Spawn(make)


class Snapshots:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def create(
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
        req = c.create_snapshot_request(tag, image, vcpus, mem_mib, warm_timeout, warm_eval, volumes, labels)
        snap = await self._c._rpc(self._c._snap.CreateSnapshot, req)
        return await self.wait(tag, timeout=timeout, poll_interval=poll_interval) if wait else snap

    async def wait(self, tag: str, *, timeout: Optional[float] = None, poll_interval: float = 0.5) -> SnapshotInfo:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            snap = await self.get(tag)
            if snap.status == "ready":
                return snap
            if snap.status != "writing":
                raise SnapshotFailedError(tag, snap.status_reason or f"status {snap.status!r}")
            if end is not None and time.monotonic() >= end:
                raise DeadlineExceededError(f"snapshot {tag!r} still writing after {timeout}s")
            await asyncio.sleep(poll_interval)

    async def list(self, status: str = "") -> List[SnapshotInfo]:
        resp = await self._c._rpc(self._c._snap.ListSnapshots, snapshot_pb2.ListSnapshotsRequest(status=status))
        return list(resp.snapshots)

    async def get(self, tag: str) -> SnapshotInfo:
        return await self._c._rpc(self._c._snap.GetSnapshot, snapshot_pb2.GetSnapshotRequest(tag=tag))

    async def delete(self, tag: str, *, cascade: bool = False, force: bool = False) -> DeleteSnapshotResult:
        req = snapshot_pb2.DeleteSnapshotRequest(tag=tag, cascade=cascade, force=force)
        return await self._c._rpc(self._c._snap.DeleteSnapshot, req)

    async def compact(self, tag: str, to: str) -> SnapshotInfo:
        return await self._c._rpc(self._c._snap.CompactSnapshot, snapshot_pb2.CompactSnapshotRequest(tag=tag, to=to))

    async def derive(self, from_tag: str, tag: str, args: c.Args, *, timeout: Optional[float] = None) -> SnapshotInfo:
        req = snapshot_pb2.DeriveSnapshotRequest(
            from_tag=from_tag, tag=tag, exec=c.argv(args), timeout_secs=c.whole_seconds(timeout)
        )
        return await self._c._rpc(self._c._snap.DeriveSnapshot, req, timeout=c.deadline(self._c._rpc.timeout, timeout))

    async def export(self, tag: str, *, layer_only: bool = False) -> AsyncIterator[bytes]:
        req = snapshot_pb2.ExportSnapshotRequest(tag=tag, layer_only=layer_only)
        async for chunk in self._c._rpc.stream(self._c._snap.ExportSnapshot, req):
            yield chunk.data

    async def import_(self, tag: str, chunks: Iterable[bytes]) -> SnapshotInfo:
        return await self._c._rpc(self._c._snap.ImportSnapshot, c.import_requests(tag, chunks))

    async def push(self, tag: str, remote: str = "") -> PushResult:
        return await self._c._rpc(self._c._snap.PushSnapshot, snapshot_pb2.PushSnapshotRequest(tag=tag, remote=remote))

    async def pull(self, tag: str, remote: str = "") -> SnapshotInfo:
        return await self._c._rpc(self._c._snap.PullSnapshot, snapshot_pb2.PullSnapshotRequest(remote=remote, tag=tag))

    async def list_remote(self) -> List[RemoteSnapshot]:
        resp = await self._c._rpc(self._c._snap.ListRemoteSnapshots, snapshot_pb2.ListRemoteSnapshotsRequest())
        return list(resp.snapshots)

    async def pools(self) -> List[PoolInfo]:
        """Hot pools of the snapshots you may fork from."""
        return list((await self._c._rpc(self._c._snap.ListPools, snapshot_pb2.ListPoolsRequest())).pools)

    async def set_pool(self, tag: str, target: int, *, network: str = "none") -> PoolInfo:
        """Keeps ``target`` hot children of ``tag`` (0 empties the pool),
        made with ``network`` "none" or "nat". Admins only."""
        req = snapshot_pb2.SetPoolRequest(tag=tag, target=target, network=network)
        return await self._c._rpc(self._c._snap.SetPool, req)


class Sandboxes:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def list(self, snapshot_tag: str = "") -> List["Sandbox"]:
        req = sandbox_pb2.ListSandboxesRequest(snapshot_tag=snapshot_tag)
        resp = await self._c._rpc(self._c._sb.ListSandboxes, req)
        return [Sandbox(self._c, info) for info in resp.sandboxes]

    async def get(self, sandbox_id: str) -> "Sandbox":
        info = await self._c._rpc(self._c._sb.GetSandbox, sandbox_pb2.GetSandboxRequest(id=sandbox_id))
        return Sandbox(self._c, info)

    async def kill(
        self, ids: Optional[Iterable[str]] = None, *, snapshot_tag: Optional[str] = None, all: bool = False
    ) -> List[str]:
        resp = await self._c._rpc(self._c._sb.DeleteSandboxes, c.kill_request(ids, snapshot_tag, all))
        return list(resp.deleted)

    async def events(self, *, sandbox_id: str = "", workspace: str = "", snapshot_tag: str = "") -> AsyncIterator[Event]:
        req = sandbox_pb2.WatchEventsRequest(sandbox_id=sandbox_id, workspace=workspace, snapshot_tag=snapshot_tag)
        stream = self._c._rpc.stream(self._c._sb.WatchEvents, req, timeout=None)
        try:
            async for ev in stream:
                yield ev
        finally:
            stream.cancel()


class Sandbox:
    """A running child VM; ``async with`` kills it on exit."""

    def __init__(self, client: Client, info: SandboxInfo) -> None:
        self._c = client
        self.info = info
        self.id: str = info.id
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"<forkd.aio.Sandbox {self.id} of {self.info.snapshot_tag!r}>"

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    async def refresh(self) -> SandboxInfo:
        self.info = await self._c._rpc(self._c._sb.GetSandbox, sandbox_pb2.GetSandboxRequest(id=self.id))
        return self.info

    async def exec(
        self,
        args: c.Args,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        *,
        stdin: Optional[c.Data] = None,
        check: bool = False,
    ) -> ExecResult:
        req = c.exec_request(self.id, args, timeout, env, cwd, stdin)
        resp = await self._c._rpc(self._c._sb.Exec, req, timeout=c.deadline(self._c._rpc.timeout, timeout or 60))
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
        """``async for stream, data in sb.exec_stream(...)``; ``.result`` afterwards."""
        req = c.exec_request(self.id, args, timeout, env, cwd, stdin)
        return ExecStream(
            self._c._rpc.stream(self._c._sb.ExecStream, req, timeout=c.deadline(self._c._rpc.timeout, timeout or 60))
        )

    async def start_process(
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
        """Starts a detached process; see :meth:`forkd.Sandbox.start_process`."""
        req = c.start_process_request(self.id, args, tag, pty, stdin, env, cwd, timeout)
        return ProcessInfo._from_pb(await self._c._rpc(self._c._sb.StartProcess, req))

    async def processes(self) -> List[ProcessInfo]:
        resp = await self._c._rpc(self._c._sb.ListProcesses, sandbox_pb2.ListProcessesRequest(id=self.id))
        return [ProcessInfo._from_pb(p) for p in resp.processes]

    def attach(self, process: c.ProcessRef, from_offset: int = 0) -> "ProcessStream":
        """``async for stream, data in sb.attach(p)``: buffered output, then
        live until the process exits; ``.result`` afterwards."""
        req = c.attach_request(self.id, process, from_offset)
        return ProcessStream(self._c._rpc.stream(self._c._sb.AttachProcess, req, bounded=False))

    async def signal(self, process: c.ProcessRef, sig: c.Sig) -> ProcessInfo:
        req = sandbox_pb2.SignalProcessRequest(id=self.id, process=c.process_ref(process), signal=c.signal_arg(sig))
        return ProcessInfo._from_pb(await self._c._rpc(self._c._sb.SignalProcess, req))

    async def send_stdin(self, process: c.ProcessRef, data: c.Data, *, close: bool = False) -> ProcessInfo:
        info: Optional[sandbox_pb2.ProcessInfo] = None
        for req in c.stdin_requests(self.id, process, data, close):
            info = await self._c._rpc(self._c._sb.SendStdin, req)
        assert info is not None
        return ProcessInfo._from_pb(info)

    async def close_stdin(self, process: c.ProcessRef) -> ProcessInfo:
        req = sandbox_pb2.CloseStdinRequest(id=self.id, process=c.process_ref(process))
        return ProcessInfo._from_pb(await self._c._rpc(self._c._sb.CloseStdin, req))

    async def resize(self, process: c.ProcessRef, rows: int, cols: int) -> ProcessInfo:
        req = sandbox_pb2.ResizePtyRequest(id=self.id, process=c.process_ref(process), size=c.pty_size(rows, cols))
        return ProcessInfo._from_pb(await self._c._rpc(self._c._sb.ResizePty, req))

    def exec_interactive(
        self,
        args: c.Args,
        *,
        pty: Optional[c.PtyArg] = None,
        tag: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "_Opening[InteractiveProcess]":
        """Starts a command to talk to; ``await`` it for the handle, or
        ``async with`` it to detach on exit (the process keeps running).
        See :meth:`forkd.Sandbox.exec_interactive`."""
        start = c.interactive_start(self.id, args, pty, tag, env, cwd, timeout)
        deadline = None if timeout is None else c.deadline(self._c._rpc.timeout, timeout)

        async def make() -> InteractiveProcess:
            p = InteractiveProcess(self._c._rpc.stream(self._c._sb.ExecInteractive, None, deadline, bounded=False))
            try:
                await p._write(start)
                await p._until_started()
            except BaseException:
                p.close()
                raise
            return p

        return _Opening(make)

    def watch(self, path: str, recursive: bool = True) -> "_Opening[FileWatch]":
        """File-system changes under ``path``; ``await`` it (or ``async
        with`` it, to cancel on exit) for an endless async iterator of
        FileEvent. It is ready once the daemon has accepted the watch."""
        req = c.watch_request(self.id, path, recursive)

        async def make() -> FileWatch:
            w = FileWatch(self._c._rpc.stream(self._c._sb.WatchFiles, req), req.path)
            try:
                await w._ready()
            except BaseException:
                w.close()
                raise
            return w

        return _Opening(make)

    async def eval(self, code: str, timeout: Optional[float] = None, *, check: bool = False) -> EvalResult:
        req = sandbox_pb2.EvalRequest(id=self.id, code=code, timeout_secs=c.whole_seconds(timeout))
        resp = await self._c._rpc(self._c._sb.Eval, req, timeout=c.deadline(self._c._rpc.timeout, timeout or 60))
        res = EvalResult._from_pb(resp)
        return res.check() if check else res

    async def ping(self) -> PingResult:
        return await self._c._rpc(self._c._sb.Ping, sandbox_pb2.PingRequest(id=self.id))

    async def renew(self, ttl_secs: int = 0) -> SandboxInfo:
        req = sandbox_pb2.RenewSandboxRequest(id=self.id, ttl_secs=ttl_secs)
        self.info = await self._c._rpc(self._c._sb.RenewSandbox, req)
        return self.info

    async def branch(self, tag: Optional[str] = None, mode: str = "diff", *, wait: bool = True) -> SnapshotInfo:
        return await self._c._rpc(self._c._sb.Branch, c.branch_request(self.id, tag, mode, wait))

    async def kill(self) -> None:
        await self._c._rpc(self._c._sb.DeleteSandbox, sandbox_pb2.DeleteSandboxRequest(id=self.id))


class SandboxGroup(List[Sandbox]):
    """Sandboxes forked together; ``async with`` kills them all on exit."""

    async def __aenter__(self) -> "SandboxGroup":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    async def kill(self) -> List[str]:
        if not self:
            return []
        return await self[0]._c.sandboxes.kill([sb.id for sb in self])


class ExecStream:
    """``async for stream, data in ...`` yields ("stdout"|"stderr", bytes)."""

    def __init__(self, stream: _Typed) -> None:
        self._stream = stream
        self.result: Optional[ExecResult] = None

    async def __aiter__(self) -> AsyncIterator[Tuple[str, bytes]]:
        out: List[bytes] = []
        err: List[bytes] = []
        async for ev in self._stream:
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

    async def wait(self) -> ExecResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    @property
    def exit_code(self) -> Optional[int]:
        return None if self.result is None else self.result.exit_code

    def cancel(self) -> None:
        self._stream.cancel()


class ProcessStream:
    """``async for stream, data in ...`` yields ("stdout"|"stderr"|"pty",
    bytes); ``info``, ``dropped`` and ``result`` as in
    :class:`forkd.ProcessStream`. Iteration may stop and resume."""

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

    def __aiter__(self) -> "ProcessStream":
        return self

    async def _event(self) -> bool:
        """Reads one event; False once the stream has ended (it is read to
        its very end, past the exit, so that the call completes)."""
        if self._done:
            return False
        try:
            ev = await self._stream.__anext__()
        except StopAsyncIteration:
            self._done = True
            self._out.finish()
            return False
        except ForkdError:
            self._done = True
            raise
        self._out.feed(ev)
        return True

    async def __anext__(self) -> Tuple[str, bytes]:
        while not self._out.pending:
            if not await self._event():
                raise StopAsyncIteration
        return self._out.pending.popleft()

    async def _until_started(self) -> None:
        while self._out.info is None and self._out.result is None:
            if not await self._event():
                return

    async def wait(self) -> ExecResult:
        async for _ in self:
            pass
        assert self._out.result is not None
        return self._out.result

    def cancel(self) -> None:
        self._stream.cancel()

    async def __aenter__(self) -> "ProcessStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._done:
            self.cancel()


class InteractiveProcess(ProcessStream):
    """A command started with :meth:`Sandbox.exec_interactive`; its methods
    are coroutines that write to the call. :meth:`close` detaches (the
    process keeps running)."""

    def __init__(self, stream: _Typed) -> None:
        super().__init__(stream)
        self._closed = False

    async def _write(self, msg: sandbox_pb2.ExecInput) -> None:
        if self._out.result is not None:
            raise ForkdError("the process has exited")
        if self._closed:
            raise ForkdError("the interactive session is closed")
        try:
            await self._stream.call.write(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        except asyncio.InvalidStateError:
            raise ForkdError("the interactive session has ended") from None

    async def send(self, data: c.Data) -> None:
        for part in c.chunks(data):
            if part:
                await self._write(sandbox_pb2.ExecInput(stdin=part))

    async def close_stdin(self) -> None:
        await self._write(sandbox_pb2.ExecInput(eof=True))

    async def resize(self, rows: int, cols: int) -> None:
        await self._write(sandbox_pb2.ExecInput(resize=c.pty_size(rows, cols)))

    async def signal(self, sig: c.Sig) -> None:
        await self._write(sandbox_pb2.ExecInput(signal=c.signal_arg(sig)))

    def close(self) -> None:
        """Detaches: stops the stream; the process keeps running."""
        if not self._closed:
            self._closed = True
            if not self._done:
                ProcessStream.cancel(self)

    cancel = close

    async def __aenter__(self) -> "InteractiveProcess":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class FileWatch:
    """``async for event in ...`` yields :class:`~forkd.types.FileEvent`
    without end; :meth:`close` (or leaving ``async with``) ends it."""

    def __init__(self, stream: _Typed, path: str) -> None:
        self._stream = stream
        self.path = path
        self._pending: Deque[FileEvent] = deque()
        self._cancelled = False

    async def _ready(self) -> None:
        call = self._stream.call
        # The response headers mean the daemon has accepted the watch; a
        # refusal (no such directory, ...) ends the call before them.
        await call.initial_metadata()
        if call.done():
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise error_class(code)(await call.details() or code.name, code)

    def __aiter__(self) -> "FileWatch":
        return self

    async def __anext__(self) -> FileEvent:
        while not self._pending:
            try:
                batch = await self._stream.__anext__()
            except ForkdError as e:
                if self._cancelled and e.code == grpc.StatusCode.CANCELLED:
                    raise StopAsyncIteration from None
                raise
            except asyncio.CancelledError:
                if self._cancelled:
                    raise StopAsyncIteration from None
                raise
            self._pending.extend(c.file_events(batch, self.path))
        return self._pending.popleft()

    def close(self) -> None:
        self._cancelled = True
        self._stream.cancel()

    cancel = close


class Files:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def read(self, path: str) -> bytes:
        c_ = self._sb._c
        req = sandbox_pb2.ReadFileRequest(id=self._sb.id, path=path)
        parts = [chunk.data async for chunk in c_._rpc.stream(c_._sb.ReadFile, req)]
        return b"".join(parts)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: c.Data, mode: int = 0o644) -> FileInfo:
        c_ = self._sb._c
        return await c_._rpc(c_._sb.WriteFile, c.write_requests(self._sb.id, path, data, mode))

    async def list(self, path: str = "/") -> List[FileInfo]:
        c_ = self._sb._c
        resp = await c_._rpc(c_._sb.ListFiles, sandbox_pb2.ListFilesRequest(id=self._sb.id, path=path))
        return list(resp.entries)

    async def stat(self, path: str) -> FileInfo:
        c_ = self._sb._c
        return await c_._rpc(c_._sb.StatFile, sandbox_pb2.StatFileRequest(id=self._sb.id, path=path))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
            return True
        except NotFoundError:
            return False

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        c_ = self._sb._c
        req = sandbox_pb2.RemoveFileRequest(id=self._sb.id, path=path, recursive=recursive)
        await c_._rpc(c_._sb.RemoveFile, req)


class Workspaces:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def create(self, name: str, snapshot_tag: str, **opts: Any) -> WorkspaceInfo:
        return await self._c._rpc(self._c._ws.CreateWorkspace, c.workspace_request(name, snapshot_tag, opts))

    async def get(self, name: str) -> WorkspaceInfo:
        return await self._c._rpc(self._c._ws.GetWorkspace, workspace_pb2.GetWorkspaceRequest(name=name))

    async def list(self) -> List[WorkspaceInfo]:
        resp = await self._c._rpc(self._c._ws.ListWorkspaces, workspace_pb2.ListWorkspacesRequest())
        return list(resp.workspaces)

    async def suspend(self, name: str) -> WorkspaceInfo:
        return await self._c._rpc(self._c._ws.SuspendWorkspace, workspace_pb2.SuspendWorkspaceRequest(name=name))

    async def resume(self, name: str) -> WorkspaceInfo:
        return await self._c._rpc(self._c._ws.ResumeWorkspace, workspace_pb2.ResumeWorkspaceRequest(name=name))

    async def delete(self, name: str) -> DeleteWorkspaceResult:
        return await self._c._rpc(self._c._ws.DeleteWorkspace, workspace_pb2.DeleteWorkspaceRequest(name=name))
