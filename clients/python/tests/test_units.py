"""Pure client logic: error mapping, results, request building."""

from __future__ import annotations

import grpc
import pytest

import forkd
from forkd import _common, errors
from forkd._gen.forkd.v1 import sandbox_pb2


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code,cls",
    [
        (grpc.StatusCode.NOT_FOUND, forkd.NotFoundError),
        (grpc.StatusCode.UNAUTHENTICATED, forkd.AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, forkd.PermissionDeniedError),
        (grpc.StatusCode.INVALID_ARGUMENT, forkd.InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, forkd.InvalidArgumentError),
        (grpc.StatusCode.ALREADY_EXISTS, forkd.ConflictError),
        (grpc.StatusCode.FAILED_PRECONDITION, forkd.ConflictError),
        (grpc.StatusCode.ABORTED, forkd.ConflictError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, forkd.ResourceExhaustedError),
        (grpc.StatusCode.UNIMPLEMENTED, forkd.UnimplementedError),
        (grpc.StatusCode.UNAVAILABLE, forkd.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, forkd.DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, forkd.ForkdError),
        (grpc.StatusCode.UNKNOWN, forkd.ForkdError),
    ],
)
def test_error_mapping(code: grpc.StatusCode, cls: type) -> None:
    e = errors.from_rpc_error(FakeRpcError(code, "why"))
    assert type(e) is cls
    assert e.code == code
    assert e.message == "why"
    assert str(e) == f"{code.name}: why"


def test_exec_result_check() -> None:
    ok = forkd.ExecResult(stdout="hi\n", stderr="", exit_code=0)
    assert ok.ok and ok.check() is ok
    bad = forkd.ExecResult(stdout="", stderr="boom\n", exit_code=3)
    with pytest.raises(forkd.CommandError, match="exited with 3: boom") as ei:
        bad.check()
    assert ei.value.result is bad
    timed = forkd.ExecResult(stdout="", stderr="", exit_code=-1, signal=9, timed_out=True)
    assert not timed.ok
    with pytest.raises(forkd.CommandError, match="timed out"):
        timed.check()


def test_eval_result_check() -> None:
    assert forkd.EvalResult("2", "", 0, "", "").check().result == "2"
    with pytest.raises(forkd.CommandError, match="ZeroDivisionError"):
        forkd.EvalResult("", "ZeroDivisionError: division by zero", 1, "", "").check()


def test_argv() -> None:
    assert _common.argv("echo hi | wc -c") == ["sh", "-c", "echo hi | wc -c"]
    assert _common.argv(("ls", "/")) == ["ls", "/"]
    with pytest.raises(TypeError):
        _common.argv([])
    with pytest.raises(TypeError):
        _common.argv(["ls", 1])  # type: ignore[list-item]


def test_exec_request() -> None:
    r = _common.exec_request("sb-x", ["env"], 2.5, {"A": "1"}, "/tmp", "in")
    assert (list(r.args), r.timeout_secs, dict(r.env), r.cwd, r.stdin) == (["env"], 3, {"A": "1"}, "/tmp", b"in")
    assert _common.exec_request("sb-x", ["true"], None, None, None, None).timeout_secs == 0
    with pytest.raises(ValueError):
        _common.exec_request("sb-x", ["true"], 0, None, None, None)


def test_write_requests_chunking() -> None:
    data = bytes(range(256)) * ((3 * _common.WRITE_CHUNK) // 256 + 1)
    msgs = list(_common.write_requests("sb-x", "/f", data, 0o600))
    assert len(msgs) == 4
    assert (msgs[0].id, msgs[0].path, msgs[0].mode) == ("sb-x", "/f", 0o600)
    assert all(m.id == "" and m.path == "" for m in msgs[1:])
    assert b"".join(m.data for m in msgs) == data
    empty = list(_common.write_requests("sb-x", "/f", b"", 0o644))
    assert len(empty) == 1 and empty[0].path == "/f"


def test_fork_request() -> None:
    r = _common.fork_request("py", 3, {"labels": {"a": "b"}, "network": "none", "cpu_quota": None})
    assert (r.snapshot_tag, r.n, dict(r.labels), r.network) == ("py", 3, {"a": "b"}, "none")
    assert r.HasField("n")


def test_branch_request() -> None:
    r = _common.branch_request("sb-x", None, "full", True)
    assert (r.tag, r.mode, r.wait) == ("", "full", True)
    with pytest.raises(ValueError):
        _common.branch_request("sb-x", None, "bogus", True)


def test_exec_event() -> None:
    assert _common.exec_event(sandbox_pb2.ExecEvent(stdout=b"a")) == ("stdout", b"a")
    assert _common.exec_event(sandbox_pb2.ExecEvent(stderr=b"b")) == ("stderr", b"b")
    kind, value = _common.exec_event(sandbox_pb2.ExecEvent(exit=sandbox_pb2.ExecResponse(exit_code=4)))
    assert kind == "exit" and value.exit_code == 4
