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


def test_pty_size() -> None:
    assert _common.pty_arg(None) is None
    size = _common.pty_arg((24, 80))
    assert size is not None and (size.rows, size.cols) == (24, 80)
    assert (_common.pty_size(1, 1000).rows, _common.pty_size(1, 1000).cols) == (1, 1000)
    for bad in [(0, 80), (24, 1001), (-1, 5)]:
        with pytest.raises(ValueError, match="1-1000"):
            _common.pty_arg(bad)
    for bad_type in [(24.0, 80), ("24", "80"), (True, 80)]:
        with pytest.raises(TypeError):
            _common.pty_arg(bad_type)  # type: ignore[arg-type]
    for not_a_pair in [24, (24,), (24, 80, 1)]:
        with pytest.raises(TypeError, match="pair"):
            _common.pty_arg(not_a_pair)  # type: ignore[arg-type]


def test_process_ref() -> None:
    assert _common.process_ref(42) == "42"
    assert _common.process_ref("counter") == "counter"
    assert _common.process_ref("42") == "42"  # digits name a pid, as the daemon reads them
    info = forkd.ProcessInfo(
        pid=7, tag="t", args=("sh",), cwd="/", pty=False, stdin_open=False,
        started_unix_ms=1, output_bytes=0, running=True,
    )
    assert _common.process_ref(info) == "7"
    with pytest.raises(ValueError):
        _common.process_ref(0)
    with pytest.raises(ValueError):
        _common.process_ref("")
    with pytest.raises(TypeError):
        _common.process_ref(True)
    with pytest.raises(TypeError):
        _common.process_ref(4.2)  # type: ignore[arg-type]


def test_signal_arg() -> None:
    import signal

    assert _common.signal_arg(9) == "9"
    assert _common.signal_arg(signal.SIGTERM) == "15"
    assert _common.signal_arg("INT") == "INT"
    assert _common.signal_arg(" SIGKILL ") == "SIGKILL"
    for bad in (0, 65, -9):
        with pytest.raises(ValueError, match="1-64"):
            _common.signal_arg(bad)
    with pytest.raises(ValueError):
        _common.signal_arg("  ")
    with pytest.raises(TypeError):
        _common.signal_arg(None)  # type: ignore[arg-type]


def test_start_process_request() -> None:
    r = _common.start_process_request("sb-x", "sleep 1", "bg", (30, 100), True, {"A": "1"}, "/tmp", 1.5)
    assert (list(r.args), r.tag, r.pty.rows, r.pty.cols, r.stdin, dict(r.env), r.cwd, r.timeout_secs) == (
        ["sh", "-c", "sleep 1"], "bg", 30, 100, True, {"A": "1"}, "/tmp", 2,
    )
    r = _common.start_process_request("sb-x", ["cat"], None, None, False, None, None, None)
    assert (r.tag, r.HasField("pty"), r.stdin, r.timeout_secs) == ("", False, False, 0)  # 0 = no limit
    with pytest.raises(ValueError):
        _common.start_process_request("sb-x", ["cat"], "", None, False, None, None, None)


def test_interactive_start() -> None:
    msg = _common.interactive_start("sb-x", ["sh"], (24, 80), "term", None, None, None)
    assert msg.WhichOneof("input") == "start"
    s = msg.start
    assert (s.id, list(s.args), s.pty.rows, s.pty.cols, s.tag, s.timeout_secs) == ("sb-x", ["sh"], 24, 80, "term", 0)
    assert not _common.interactive_start("sb-x", "cat", None, None, None, None, 5).start.HasField("pty")


def test_stdin_requests_chunking() -> None:
    data = b"x" * (2 * _common.STDIN_CHUNK + 5)
    reqs = _common.stdin_requests("sb-x", "cat", data, True)
    assert [len(r.data) for r in reqs] == [_common.STDIN_CHUNK, _common.STDIN_CHUNK, 5]
    assert [r.close for r in reqs] == [False, False, True]
    assert {r.process for r in reqs} == {"cat"}
    only_close = _common.stdin_requests("sb-x", 12, b"", True)
    assert [(r.process, r.data, r.close) for r in only_close] == [("12", b"", True)]
    assert _common.stdin_requests("sb-x", "cat", "héllo", False)[0].data == "héllo".encode()


def test_attach_and_watch_requests() -> None:
    r = _common.attach_request("sb-x", "counter", 10)
    assert (r.process, r.from_offset) == ("counter", 10)
    with pytest.raises(ValueError):
        _common.attach_request("sb-x", "counter", -1)
    w = _common.watch_request("sb-x", "/tmp", False)
    assert (w.path, w.recursive) == ("/tmp", False)
    with pytest.raises(ValueError, match="absolute"):
        _common.watch_request("sb-x", "tmp", True)


def test_file_events() -> None:
    K = sandbox_pb2.FileEvent.Kind
    batch = sandbox_pb2.FileEvents(
        events=[
            sandbox_pb2.FileEvent(kind=K.CREATE, path="/w/a"),
            sandbox_pb2.FileEvent(kind=K.RENAME, path="/w/b", **{"from": "/w/a"}),
            sandbox_pb2.FileEvent(kind=K.CREATE, path="/w/d", is_dir=True),
        ],
        overflow=True,
    )
    assert _common.file_events(batch, "/w") == [
        forkd.FileEvent("overflow", "/w"),
        forkd.FileEvent("create", "/w/a"),
        forkd.FileEvent("rename", "/w/b", from_="/w/a"),
        forkd.FileEvent("create", "/w/d", is_dir=True),
    ]
    assert [e.kind for e in _common.file_events(sandbox_pb2.FileEvents(events=[
        sandbox_pb2.FileEvent(kind=k) for k in (K.WRITE, K.REMOVE, K.CHMOD)
    ]), "/")] == ["write", "remove", "chmod"]


def test_process_output() -> None:
    out = _common.ProcessOutput()
    info = sandbox_pb2.ProcessInfo(pid=3, tag="t", args=["cat"], running=True, output_bytes=9)
    for ev in [
        sandbox_pb2.ExecEvent(started=info),
        sandbox_pb2.ExecEvent(dropped=4),
        sandbox_pb2.ExecEvent(stdout=b"ab"),
        sandbox_pb2.ExecEvent(stderr=b"e"),
        sandbox_pb2.ExecEvent(stdout=b""),
        sandbox_pb2.ExecEvent(pty=b"c"),
    ]:
        out.feed(ev)
    assert out.info is not None and (out.info.pid, out.info.tag, out.info.args, out.info.exit) == (3, "t", ("cat",), None)
    assert out.dropped == 4
    assert list(out.pending) == [("stdout", b"ab"), ("stderr", b"e"), ("pty", b"c")]
    with pytest.raises(forkd.ForkdError, match="without an exit"):
        out.finish()
    out.feed(sandbox_pb2.ExecEvent(exit=sandbox_pb2.ExecResponse(exit_code=-1, signal=15)))
    out.finish()
    assert out.result == forkd.ExecResult(stdout="abc", stderr="e", exit_code=-1, signal=15)
    done = forkd.ProcessInfo._from_pb(
        sandbox_pb2.ProcessInfo(pid=3, exit=sandbox_pb2.ExecResponse(exit_code=0), running=False)
    )
    assert done.exit is not None and done.exit.ok and not done.running
