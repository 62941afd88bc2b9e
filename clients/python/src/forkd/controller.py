"""``Controller``: the reference forkd SDK's controller API over this client.

Code written against the reference forkd's ``Controller`` (snapshots and
sandboxes as plain dicts, failures as ``ControllerError`` with an HTTP
status) runs here unchanged: each method calls :class:`forkd.Client` and
reshapes the answer into the dict the reference returns.

    from forkd import Controller, ControllerError

    ctl = Controller()                  # $FORKD_URL, $FORKD_TOKEN
    [child] = ctl.spawn_sandboxes("py", n=1)
    print(ctl.exec_command(child["id"], ["hostname"])["stdout"])
    ctl.kill_sandbox(child["id"])

What differs (documented per method, and in docs/migrating.md): a
branch defaults to ``mode="full"`` as the reference's does, and
``mode="live"`` is a diff branch (the lowest pause this daemon has);
killing a sandbox that is gone succeeds; and the spawn options this daemon
has no counterpart for (``live_fork``, ``hugepages``, ``prewarm``) raise
ControllerError (409, FAILED_PRECONDITION, as the daemon answers
``live_fork``) naming what to do instead. New code is better served by
:class:`forkd.Client`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union
from urllib.parse import quote

import grpc

from .client import Client, Sandbox
from .errors import ForkdError
from .types import SandboxInfo, SnapshotInfo

__all__ = ["Controller", "ControllerError"]

#: The HTTP status the REST API answers for each gRPC code (docs/rest.md).
_HTTP_STATUS: Dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _http_status(code: Optional[grpc.StatusCode]) -> int:
    """The HTTP status the REST API gives ``code`` (500 for the rest;
    0 for an error raised by the client itself)."""
    if code is None:
        return 0
    return _HTTP_STATUS.get(code, 500)


class ControllerError(ForkdError, RuntimeError):
    """A failed Controller call.

    As in the reference SDK, ``status`` is the HTTP status (404 missing, 409
    conflict or not available here, ...; 0 when no call was made), ``body``
    the JSON error body (``{"error": message, "code": "NOT_FOUND"}``, as the
    REST API sends it) and ``url`` the REST route of the call (``method`` its
    HTTP method). As every :class:`forkd.ForkdError`, it also has ``code``
    (the gRPC status code), ``code_name`` and ``message``.
    """

    def __init__(
        self, status: int, body: Any, url: str, code: Optional[grpc.StatusCode] = None, method: str = ""
    ) -> None:
        if isinstance(body, dict):
            message = str(body.get("error", "") or json.dumps(body))
            if code is None and body.get("code") in grpc.StatusCode.__members__:
                code = grpc.StatusCode[body["code"]]
        else:
            message = str(body)
        super().__init__(message, code)
        self.status = status
        self.body = body
        self.url = url
        self.method = method

    def __str__(self) -> str:
        route = f"{self.method} {self.url}" if self.method else self.url
        name = f" {self.code_name}" if self.code is not None else ""
        return f"{route}: HTTP {self.status}{name}: {self.message}"

    @classmethod
    def _of(cls, code: grpc.StatusCode, message: str, url: str, method: str) -> "ControllerError":
        return cls(_http_status(code), {"error": message, "code": code.name}, url, code, method)


def _no_counterpart(url: str, what: str) -> ControllerError:
    """A reference option this daemon has no counterpart for: refused as
    the daemon refuses ``live_fork`` (FAILED_PRECONDITION, 409)."""
    return ControllerError._of(grpc.StatusCode.FAILED_PRECONDITION, what, url, "POST")


class Controller:
    """The reference forkd SDK's controller, over :class:`forkd.Client`.

    ``base_url`` defaults to ``$FORKD_URL``, else ``http://127.0.0.1:8889``;
    ``token`` to ``$FORKD_TOKEN`` (then ``$FORKD_TOKEN_FILE`` and, for a
    loopback URL, the daemon's own token file, as :class:`forkd.Client`).
    ``timeout`` (seconds) bounds each call; a command's own
    ``timeout_secs`` stretches it. Close it (or use it as a context manager)
    to release the connection.
    """

    def __init__(self, base_url: Optional[str] = None, token: Optional[str] = None, timeout: float = 60.0) -> None:
        try:
            self._client = Client(base_url, token, timeout=timeout)
        except ForkdError as e:
            raise ControllerError(0, {"error": e.message}, base_url or "") from e
        self.base_url: str = self._client.url
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"forkd.Controller({self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Controller":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- snapshots ------------------------------------------------

    def list_snapshots(self) -> List[Dict[str, Any]]:
        """Every snapshot, oldest first: dicts with ``tag``, ``dir``,
        ``created_at_unix``, ``status`` and, for branches, ``branched_from``,
        ``pause_ms``, ``diff_ms``, ``diff_physical_bytes`` and
        ``diff_logical_bytes``."""
        with self._call("GET", "/v1/snapshots"):
            return [_snapshot(s) for s in self._client.snapshots.list()]

    def delete_snapshot(self, tag: str) -> None:
        """Deletes a snapshot. One that diff branches are layered on is
        refused (409); delete those first, or use
        ``forkd.Client().snapshots.delete(tag, cascade=True)``."""
        with self._call("DELETE", f"/v1/snapshots/{_seg(tag)}"):
            self._client.snapshots.delete(tag)

    # --- sandboxes ------------------------------------------------

    def spawn_sandboxes(
        self,
        snapshot_tag: str,
        n: int = 1,
        per_child_netns: bool = False,
        memory_limit_mib: Optional[int] = None,
        prewarm: bool = False,
        live_fork: bool = False,
        hugepages: bool = False,
    ) -> List[Dict[str, Any]]:
        """Forks ``n`` children of ``snapshot_tag`` (all or nothing); returns
        their sandbox dicts.

        ``per_child_netns`` gives each child its own network namespace and
        NIC (network "nat", no egress unless allowed). ``live_fork``,
        ``hugepages`` and ``prewarm`` raise ControllerError (409): see their
        messages.
        """
        path = "/v1/sandboxes"
        url = self.base_url + path
        if live_fork:
            raise _no_counterpart(
                url,
                "live_fork: this daemon forks from saved snapshots only; branch the running sandbox "
                "(branch_sandbox(id, mode='diff')) and spawn from the branch",
            )
        if hugepages:
            raise _no_counterpart(
                url,
                "hugepages: children map the snapshot's memory file from the page cache, which huge pages "
                "cannot back; drop the argument",
            )
        if prewarm:
            raise _no_counterpart(
                url,
                "prewarm (faulting in guest pages for a faster first branch) has no counterpart here: drop it, "
                "diff branches write only the pages a sandbox wrote; to keep children ready for the "
                "next fork use forkd.Client().fork(tag, n, prewarm=True)",
            )
        opts: Dict[str, Any] = {}
        if per_child_netns:
            opts.update(per_child_netns=True, network="nat")
        if memory_limit_mib is not None:
            opts["memory_limit_mib"] = memory_limit_mib
        with self._call("POST", path):
            return [_sandbox(sb.info) for sb in self._client.fork(snapshot_tag, n, **opts)]

    def list_sandboxes(self) -> List[Dict[str, Any]]:
        """Every sandbox the daemon tracks, oldest first."""
        with self._call("GET", "/v1/sandboxes"):
            return [_sandbox(sb.info) for sb in self._client.sandboxes.list()]

    def get_sandbox(self, sandbox_id: str) -> Dict[str, Any]:
        """One sandbox's dict: ``id``, ``snapshot_tag``, ``netns`` and
        ``guest_addr`` (None without a NIC), ``created_at_unix``, ``pid``,
        ``memory_limit_mib`` (None when unlimited) and ``has_branched``."""
        with self._call("GET", f"/v1/sandboxes/{_seg(sandbox_id)}"):
            return _sandbox(self._client.sandboxes.get(sandbox_id).info)

    def kill_sandbox(self, sandbox_id: str) -> None:
        """Kills a sandbox; one that is not there is a 404, as in the REST API."""
        path = f"/v1/sandboxes/{_seg(sandbox_id)}"
        with self._call("DELETE", path):
            self._handle(sandbox_id)  # checks the id
            killed = self._client.sandboxes.kill([sandbox_id])
        if not killed:
            raise ControllerError._of(
                grpc.StatusCode.NOT_FOUND, f"sandbox {sandbox_id} not found", self.base_url + path, "DELETE"
            )

    def branch_sandbox(
        self,
        sandbox_id: str,
        tag: Optional[str] = None,
        diff: bool = False,
        measure_diff: bool = False,
        mode: Optional[str] = None,
        wait: bool = True,
    ) -> Dict[str, Any]:
        """Snapshots a running sandbox (it keeps running) as ``tag``
        (generated when None); returns the new snapshot's dict.

        ``mode`` is "full" (the default, as in the reference: a flat copy,
        independent of the parent) or "diff" (only the pages written since
        the parent, layered on it; ``diff=True`` says the same). "live" is a
        diff branch: this daemon has no UFFD live branch, and a diff branch
        is its lowest pause. ``measure_diff`` takes a full branch: every
        branch reports ``diff_physical_bytes`` here. With ``wait=False`` the
        call returns once the source runs again, the snapshot still
        ``status="writing"``.
        """
        path = f"/v1/sandboxes/{_seg(sandbox_id)}/branch"
        url = self.base_url + path
        if mode is not None and diff:
            raise ControllerError._of(grpc.StatusCode.INVALID_ARGUMENT, "give mode or diff=True, not both", url, "POST")
        chosen = mode if mode is not None else ("diff" if diff else "full")
        if chosen == "live":
            chosen = "diff"
        if measure_diff and chosen == "diff":
            raise ControllerError._of(
                grpc.StatusCode.INVALID_ARGUMENT,
                "measure_diff goes with a full branch, not with mode='diff'",
                url,
                "POST",
            )
        with self._call("POST", path):
            return _snapshot(self._handle(sandbox_id).branch(tag, chosen, wait=wait))

    def exec_command(
        self, sandbox_id: str, args: Union[str, Sequence[str]], timeout_secs: int = 30
    ) -> Dict[str, Any]:
        """Runs ``args`` (argv; a string is run with ``sh -c``) in the sandbox
        to completion; returns ``{stdout, stderr, exit_code}`` (exit_code -1
        when a signal or the timeout ended it)."""
        with self._call("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/exec"):
            r = self._handle(sandbox_id).exec(args if isinstance(args, str) else list(args), timeout=timeout_secs)
            return {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}

    def eval_code(self, sandbox_id: str, code: str) -> Dict[str, Any]:
        """Evaluates Python in the sandbox's warm interpreter; returns
        ``{result, error, exit_code}``: ``result`` the repr of the last
        expression, ``error`` the traceback or None."""
        with self._call("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/eval"):
            r = self._handle(sandbox_id).eval(code)
            return {"result": r.result, "error": r.error or None, "exit_code": r.exit_code}

    def ping_sandbox(self, sandbox_id: str) -> Dict[str, Any]:
        """A round trip to the guest agent: ``{pong, latency_ms,
        uptime_secs, runtime_ready}``."""
        with self._call("POST", f"/v1/sandboxes/{_seg(sandbox_id)}/ping"):
            p = self._handle(sandbox_id).ping()
            return {
                "pong": p.ok,
                "latency_ms": p.latency_ms,
                "uptime_secs": p.uptime_secs,
                "runtime_ready": p.runtime_ready,
            }

    # --- internals ------------------------------------------------

    @contextmanager
    def _call(self, method: str, path: str) -> Iterator[None]:
        """Runs the block as the call ``method path`` of the REST API: its
        errors are raised as ControllerError naming that route."""
        url = self.base_url + path
        try:
            yield
        except ControllerError:
            raise
        except ForkdError as e:
            code = e.code
            body: Dict[str, Any] = {"error": e.message}
            if code is not None:
                body["code"] = code.name
            raise ControllerError(_http_status(code), body, url, code, method) from e
        except (TypeError, ValueError) as e:  # the client's own argument checks
            raise ControllerError._of(grpc.StatusCode.INVALID_ARGUMENT, str(e), url, method) from e

    def _handle(self, sandbox_id: str) -> Sandbox:
        """A handle on a sandbox by id, without fetching it."""
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise ValueError(f"invalid sandbox id {sandbox_id!r}")
        return Sandbox(self._client, SandboxInfo(id=sandbox_id))

def _snapshot(s: SnapshotInfo) -> Dict[str, Any]:
    """The reference's SnapshotInfo: ``branched_from`` and the branch figures
    only for branches, as it omits them for built snapshots."""
    d: Dict[str, Any] = {
        "tag": s.tag,
        "dir": s.dir,
        "created_at_unix": s.created_at_unix,
        "status": s.status,
    }
    if s.branched_from:
        d.update(
            branched_from=s.branched_from,
            pause_ms=s.pause_ms,
            diff_ms=s.diff_ms,
            # Guest memory the source wrote since its snapshot: what a diff
            # branch stores, what a full one would have stored as a diff.
            diff_physical_bytes=s.diff_physical_bytes,
            diff_logical_bytes=s.diff_logical_bytes,
        )
    return d


def _sandbox(s: SandboxInfo) -> Dict[str, Any]:
    """The reference's SandboxInfo."""
    return {
        "id": s.id,
        "snapshot_tag": s.snapshot_tag,
        "netns": s.netns or None,
        "guest_addr": s.guest_addr or None,
        "created_at_unix": s.created_at_unix,
        "pid": s.pid or None,
        "memory_limit_mib": s.memory_limit_mib or None,
        "has_branched": s.has_branched,
    }


def _seg(v: str) -> str:
    """A path segment of a REST route, for error URLs."""
    return quote(str(v), safe="")
