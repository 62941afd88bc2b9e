"""What the sync and asyncio clients share: where the daemon is, how to
authenticate, and how ergonomic arguments become request messages."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path
from collections import deque
from typing import Any, Deque, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import grpc

from ._gen.forkd.v1 import sandbox_pb2, snapshot_pb2, workspace_pb2
from .errors import ForkdError
from .types import ExecResult, FileEvent, ProcessInfo

DEFAULT_URL = "http://127.0.0.1:8889"

#: Bytes per WriteFile message; well under the daemon's 16 MiB message limit.
WRITE_CHUNK = 1 << 20

#: Most stdin bytes per SendStdin call (the daemon's limit) and per
#: interactive stdin message.
STDIN_CHUNK = 1 << 20

#: Terminal rows and columns, each 1-1000.
MAX_PTY = 1000

#: Extra time a call's gRPC deadline gets beyond the command timeout it
#: carries, so the daemon's own timeout (and its clean result) wins the race.
DEADLINE_GRACE = 30.0

CHANNEL_OPTIONS: List[Tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]

Args = Union[str, Sequence[str]]
Data = Union[bytes, bytearray, memoryview, str]
PathLike = Union[str, "os.PathLike[str]"]
#: A process of a sandbox: its pid, its tag, or its ProcessInfo.
ProcessRef = Union[int, str, ProcessInfo]
#: A signal: a number (``signal.SIGTERM`` works) or a name ("TERM", "SIGINT", "kill").
Sig = Union[int, str]
#: A terminal size: (rows, cols).
PtyArg = Tuple[int, int]


@dataclass(frozen=True)
class Target:
    """A parsed daemon URL."""

    address: str  # host:port as gRPC wants it
    secure: bool
    url: str  # normalised, for messages


def parse_url(raw: str) -> Target:
    """Accepts ``http://HOST:PORT``, ``https://HOST:PORT`` or a bare
    ``HOST:PORT`` (plain HTTP, as the CLI does)."""
    raw = raw.strip()
    if not raw:
        raise ForkdError("the daemon URL is empty")
    url = raw if "://" in raw else f"http://{raw}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ForkdError(f"unsupported URL {raw!r}: use http://HOST:PORT or https://HOST:PORT")
    if not parts.hostname:
        raise ForkdError(f"URL {raw!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ForkdError(f"URL {raw!r} must not have a path: gRPC is served at the root")
    secure = parts.scheme == "https"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError as e:
        raise ForkdError(f"URL {raw!r}: {e}") from None
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return Target(address=f"{host}:{port}", secure=secure, url=url.rstrip("/"))


DEFAULT_TOKEN_FILE = "/var/lib/forkd/token"


def _read_token_file(path: str, what: str) -> str:
    try:
        st = os.stat(path)
        mode = st.st_mode
        # A group that is the caller's own (a pod's fsGroup) shares nothing.
        if mode & 0o007 or (mode & 0o070 and st.st_gid != os.getegid()):
            raise ForkdError(
                f"{what} {path} may be read by others (mode {mode & 0o7777:04o}); "
                f"only its owner may read it: run `chmod 600 {path}`"
            )
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ForkdError(f"{what} {path}: {e}") from None
    if not text:
        # An empty token file is a mistake worth reporting, not "no auth".
        raise ForkdError(f"{what} {path} is empty")
    return text


def is_loopback_address(address: str) -> bool:
    """True for ``host:port`` naming this host (localhost, 127/8, ::1)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token: Optional[str], target: Optional[Target] = None) -> Optional[str]:
    """The explicit token, else FORKD_TOKEN, else the contents of
    FORKD_TOKEN_FILE, else, for a loopback URL, the daemon's own token file
    (/var/lib/forkd/token) when this user may read it."""
    if token is not None:
        token = token.strip()
        return token or None
    env = os.environ.get("FORKD_TOKEN", "").strip()
    if env:
        return env
    path = os.environ.get("FORKD_TOKEN_FILE", "").strip()
    if path:
        return _read_token_file(path, "FORKD_TOKEN_FILE")
    if target is not None and is_loopback_address(target.address) and os.access(DEFAULT_TOKEN_FILE, os.R_OK):
        return _read_token_file(DEFAULT_TOKEN_FILE, "token file")
    return None


def resolve_ca(ca_cert: Union[None, bytes, PathLike]) -> Optional[bytes]:
    """PEM bytes of the CA to trust: given directly, as a path, or via FORKD_CA_CERT."""
    if isinstance(ca_cert, (bytes, bytearray)):
        return bytes(ca_cert)
    path = os.fspath(ca_cert) if ca_cert is not None else os.environ.get("FORKD_CA_CERT", "").strip()
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ForkdError(f"CA certificate {path}: {e}") from None


def channel_credentials(target: Target, ca: Optional[bytes]) -> Optional[grpc.ChannelCredentials]:
    if not target.secure:
        if ca is not None:
            raise ForkdError(f"a CA certificate was given but {target.url} is not an https:// URL")
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca)


def metadata(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def argv(args: Args) -> List[str]:
    """A string is a shell command line (run with ``sh -c``); a sequence is argv."""
    if isinstance(args, str):
        return ["sh", "-c", args]
    out = list(args)
    if not out or not all(isinstance(a, str) for a in out):
        raise TypeError("args must be a non-empty sequence of strings, or a shell command string")
    return out


def whole_seconds(timeout: Optional[float]) -> int:
    if timeout is None:
        return 0
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    return int(math.ceil(timeout))


def deadline(default: Optional[float], command_timeout: Optional[float] = None) -> Optional[float]:
    """gRPC deadline for a call: the client default, stretched to outlast a
    command timeout the call carries."""
    if command_timeout is None:
        return default
    need = command_timeout + DEADLINE_GRACE
    return need if default is None else max(default, need)


def exec_request(
    sandbox_id: str,
    args: Args,
    timeout: Optional[float],
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Optional[Data],
) -> sandbox_pb2.ExecRequest:
    return sandbox_pb2.ExecRequest(
        id=sandbox_id,
        args=argv(args),
        timeout_secs=whole_seconds(timeout),
        env=dict(env or {}),
        cwd=cwd or "",
        stdin=as_bytes(stdin) if stdin is not None else b"",
    )


def as_bytes(data: Data) -> bytes:
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


def write_requests(sandbox_id: str, path: str, data: Data, mode: int) -> Iterator[sandbox_pb2.WriteFileRequest]:
    """The WriteFile stream: the first message carries id, path and mode."""
    blob = as_bytes(data)
    yield sandbox_pb2.WriteFileRequest(id=sandbox_id, path=path, data=blob[:WRITE_CHUNK], mode=mode)
    for off in range(WRITE_CHUNK, len(blob), WRITE_CHUNK):
        yield sandbox_pb2.WriteFileRequest(data=blob[off : off + WRITE_CHUNK])


def import_requests(tag: str, chunks: Iterable[bytes]) -> Iterator[snapshot_pb2.ImportSnapshotRequest]:
    first = True
    for c in chunks:
        yield snapshot_pb2.ImportSnapshotRequest(tag=tag if first else "", data=c)
        first = False
    if first:
        yield snapshot_pb2.ImportSnapshotRequest(tag=tag)


_FORK_FIELDS = frozenset(
    f.name for f in sandbox_pb2.CreateSandboxesRequest.DESCRIPTOR.fields if f.name not in ("snapshot_tag", "n")
)
_WORKSPACE_FIELDS = frozenset(
    f.name for f in workspace_pb2.CreateWorkspaceRequest.DESCRIPTOR.fields if f.name not in ("name", "snapshot_tag")
)


def _checked(opts: Mapping[str, Any], allowed: frozenset, what: str) -> dict:
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise TypeError(f"{what}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return {k: v for k, v in opts.items() if v is not None}


def fork_request(tag: str, n: int, opts: Mapping[str, Any]) -> sandbox_pb2.CreateSandboxesRequest:
    """CreateSandboxesRequest from keyword options named like its fields
    (memory_limit_mib, cpu_quota, network, labels, ttl_secs, ...)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return sandbox_pb2.CreateSandboxesRequest(snapshot_tag=tag, n=n, **_checked(opts, _FORK_FIELDS, "fork"))


def workspace_request(name: str, snapshot_tag: str, opts: Mapping[str, Any]) -> workspace_pb2.CreateWorkspaceRequest:
    return workspace_pb2.CreateWorkspaceRequest(
        name=name, snapshot_tag=snapshot_tag, **_checked(opts, _WORKSPACE_FIELDS, "workspaces.create")
    )


def branch_request(sandbox_id: str, tag: Optional[str], mode: str, wait: bool) -> sandbox_pb2.BranchRequest:
    if mode not in ("diff", "full"):
        raise ValueError(f"mode must be 'diff' or 'full', not {mode!r}")
    return sandbox_pb2.BranchRequest(id=sandbox_id, tag=tag or "", mode=mode, wait=wait)


def kill_request(
    ids: Optional[Iterable[str]], snapshot_tag: Optional[str], all: bool
) -> sandbox_pb2.DeleteSandboxesRequest:
    return sandbox_pb2.DeleteSandboxesRequest(ids=list(ids or []), snapshot_tag=snapshot_tag or "", all=all)


def create_snapshot_request(
    tag: str,
    image: str,
    vcpus: int,
    mem_mib: int,
    warm_timeout: Optional[float],
    warm_eval: str,
    volumes: Optional[Sequence[str]],
    labels: Optional[Mapping[str, str]],
) -> snapshot_pb2.CreateSnapshotRequest:
    return snapshot_pb2.CreateSnapshotRequest(
        tag=tag,
        image=image,
        vcpus=vcpus,
        mem_mib=mem_mib,
        warm_timeout_secs=whole_seconds(warm_timeout),
        warm_eval=warm_eval,
        volumes=list(volumes or []),
        labels=dict(labels or {}),
    )


def exec_event(ev: sandbox_pb2.ExecEvent) -> Tuple[str, Any]:
    """("stdout"|"stderr", bytes) or ("exit", ExecResponse)."""
    which = ev.WhichOneof("event")
    if which == "stdout":
        return "stdout", ev.stdout
    if which == "stderr":
        return "stderr", ev.stderr
    if which == "exit":
        return "exit", ev.exit
    return "", None


def pty_size(rows: int, cols: int) -> sandbox_pb2.PtySize:
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"pty {name} must be an int, not {type(v).__name__}")
        if not 1 <= v <= MAX_PTY:
            raise ValueError(f"pty {name} must be 1-{MAX_PTY}, not {v}")
    return sandbox_pb2.PtySize(rows=rows, cols=cols)


def pty_arg(pty: Optional[PtyArg]) -> Optional[sandbox_pb2.PtySize]:
    """``(rows, cols)`` as a PtySize; None stays None (no terminal)."""
    if pty is None:
        return None
    try:
        rows, cols = pty
    except (TypeError, ValueError):
        raise TypeError(f"pty must be a (rows, cols) pair, not {pty!r}") from None
    return pty_size(rows, cols)


def process_ref(process: ProcessRef) -> str:
    """The daemon's name for a process: its pid (digits) or its tag."""
    if isinstance(process, ProcessInfo):
        return str(process.pid)
    if isinstance(process, bool) or not isinstance(process, (int, str)):
        raise TypeError(f"a process is a pid, a tag or a ProcessInfo, not {type(process).__name__}")
    if isinstance(process, int):
        if process < 1:
            raise ValueError(f"pid must be positive, not {process}")
        return str(process)
    if not process:
        raise ValueError("the process tag is empty")
    return process


def signal_arg(sig: Sig) -> str:
    """A signal as the daemon takes it: "15", "TERM", "SIGINT", ..."""
    if isinstance(sig, bool) or not isinstance(sig, (int, str)):
        raise TypeError(f"a signal is a number or a name, not {type(sig).__name__}")
    if isinstance(sig, int):
        if not 1 <= sig <= 64:
            raise ValueError(f"signal numbers are 1-64, not {sig}")
        return str(int(sig))
    name = sig.strip()
    if not name:
        raise ValueError("the signal name is empty")
    return name


def optional_tag(tag: Optional[str]) -> str:
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise ValueError(f"tag must be a non-empty string, not {tag!r}")
    return tag or ""


def start_process_request(
    sandbox_id: str,
    args: Args,
    tag: Optional[str],
    pty: Optional[PtyArg],
    stdin: bool,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    timeout: Optional[float],
) -> sandbox_pb2.StartProcessRequest:
    return sandbox_pb2.StartProcessRequest(
        id=sandbox_id,
        args=argv(args),
        env=dict(env or {}),
        cwd=cwd or "",
        tag=optional_tag(tag),
        pty=pty_arg(pty),
        stdin=stdin,
        timeout_secs=whole_seconds(timeout),
    )


def interactive_start(
    sandbox_id: str,
    args: Args,
    pty: Optional[PtyArg],
    tag: Optional[str],
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    timeout: Optional[float],
) -> sandbox_pb2.ExecInput:
    """The first ExecInteractive message: the command (timeout None = no limit)."""
    req = sandbox_pb2.ExecRequest(
        id=sandbox_id,
        args=argv(args),
        timeout_secs=whole_seconds(timeout),
        env=dict(env or {}),
        cwd=cwd or "",
        pty=pty_arg(pty),
        tag=optional_tag(tag),
    )
    return sandbox_pb2.ExecInput(start=req)


def chunks(data: Data) -> List[bytes]:
    """``data`` in STDIN_CHUNK pieces; at least one (possibly empty)."""
    blob = as_bytes(data)
    return [blob[off : off + STDIN_CHUNK] for off in range(0, len(blob), STDIN_CHUNK)] or [b""]


def stdin_requests(sandbox_id: str, process: ProcessRef, data: Data, close: bool) -> List[sandbox_pb2.SendStdinRequest]:
    """SendStdin calls for ``data``; only the last one closes stdin."""
    ref = process_ref(process)
    parts = chunks(data)
    return [
        sandbox_pb2.SendStdinRequest(id=sandbox_id, process=ref, data=p, close=close and i == len(parts) - 1)
        for i, p in enumerate(parts)
    ]


def attach_request(sandbox_id: str, process: ProcessRef, from_offset: int) -> sandbox_pb2.AttachProcessRequest:
    if isinstance(from_offset, bool) or not isinstance(from_offset, int):
        raise TypeError(f"from_offset must be an int, not {type(from_offset).__name__}")
    if from_offset < 0:
        raise ValueError(f"from_offset must not be negative, not {from_offset}")
    return sandbox_pb2.AttachProcessRequest(id=sandbox_id, process=process_ref(process), from_offset=from_offset)


def watch_request(sandbox_id: str, path: str, recursive: bool) -> sandbox_pb2.WatchFilesRequest:
    path = os.fspath(path)
    if not path.startswith("/"):
        raise ValueError(f"the watched path must be absolute, not {path!r}")
    return sandbox_pb2.WatchFilesRequest(id=sandbox_id, path=path, recursive=recursive)


def file_events(batch: sandbox_pb2.FileEvents, root: str) -> List[FileEvent]:
    """One FileEvents message as FileEvents, an "overflow" marker first when
    events were lost before them."""
    out = [FileEvent(kind="overflow", path=root)] if batch.overflow else []
    out.extend(FileEvent._from_pb(e) for e in batch.events)
    return out


class ProcessOutput:
    """Bookkeeping of an ExecEvent stream of a process (attach, interactive):
    the process (``started``), the bytes lost to the ring buffer
    (``dropped``), the output, and the exit."""

    def __init__(self) -> None:
        self.info: Optional[ProcessInfo] = None
        self.dropped = 0
        self.result: Optional[ExecResult] = None
        self.pending: Deque[Tuple[str, bytes]] = deque()
        self._out: List[bytes] = []
        self._err: List[bytes] = []

    def feed(self, ev: sandbox_pb2.ExecEvent) -> None:
        """Takes one event; output is queued in ``pending``."""
        which = ev.WhichOneof("event")
        if which in ("stdout", "stderr", "pty"):
            data: bytes = getattr(ev, which)
            if data:
                (self._err if which == "stderr" else self._out).append(data)
                self.pending.append((which, data))
        elif which == "started":
            self.info = ProcessInfo._from_pb(ev.started)
        elif which == "dropped":
            self.dropped += ev.dropped
        elif which == "exit":
            self.result = ExecResult._from_pb(
                ev.exit,
                stdout=b"".join(self._out).decode(errors="replace"),
                stderr=b"".join(self._err).decode(errors="replace"),
            )

    def finish(self) -> None:
        """The stream ended: it must have carried the exit."""
        if self.result is None:
            raise ForkdError("process output ended without an exit status")
