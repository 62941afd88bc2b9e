"""forkd.Controller, the reference forkd SDK's controller API, against a real
daemon: its errors and refusals without VMs, then (FORKD_E2E=1) the
reference's scenario with real microVMs. clients/typescript/test/
controller.test.ts replays the same scenario."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

import forkd
from forkd import Controller, ControllerError

from .conftest import E2E_TAG, Daemon

GHOST = "sb-aaaaaaaaaaaa"  # well formed, never issued

SANDBOX_KEYS = {"id", "snapshot_tag", "netns", "guest_addr", "created_at_unix", "pid", "memory_limit_mib", "has_branched"}


@pytest.fixture
def ctl(daemon: Daemon) -> Iterator[Controller]:
    with Controller(daemon.url, token=daemon.token) as c:
        yield c


def test_exported_from_the_package() -> None:
    assert forkd.Controller is Controller
    # Caught as the reference's (a RuntimeError) and as every forkd error.
    assert issubclass(ControllerError, RuntimeError)
    assert issubclass(ControllerError, forkd.ForkdError)


def test_empty_lists(ctl: Controller) -> None:
    assert ctl.list_snapshots() == []
    assert ctl.list_sandboxes() == []


def test_unknown_sandbox_is_a_404(ctl: Controller, daemon: Daemon) -> None:
    for call in (
        lambda: ctl.get_sandbox(GHOST),
        lambda: ctl.exec_command(GHOST, ["true"]),
        lambda: ctl.eval_code(GHOST, "1"),
        lambda: ctl.ping_sandbox(GHOST),
        lambda: ctl.branch_sandbox(GHOST, tag="never"),
    ):
        with pytest.raises(ControllerError) as ei:
            call()
        e = ei.value
        assert e.status == 404 and e.code == grpc.StatusCode.NOT_FOUND, e
        assert e.body == {"error": e.message, "code": "NOT_FOUND"}
        assert e.url.startswith(f"{daemon.url}/v1/sandboxes/{GHOST}")
        assert GHOST in str(e) and "HTTP 404" in str(e)
    # As in the REST API, killing a sandbox that is not there is a 404.
    with pytest.raises(ControllerError) as ei:
        ctl.kill_sandbox(GHOST)
    assert (ei.value.status, ei.value.method) == (404, "DELETE")


def test_daemon_refusals_keep_their_status(ctl: Controller, daemon: Daemon) -> None:
    with pytest.raises(ControllerError) as ei:
        ctl.spawn_sandboxes("nope", n=1)
    assert (ei.value.status, ei.value.body["code"], ei.value.url) == (404, "NOT_FOUND", f"{daemon.url}/v1/sandboxes")
    with pytest.raises(ControllerError) as ei:
        ctl.delete_snapshot("nope")
    assert (ei.value.status, ei.value.url) == (404, f"{daemon.url}/v1/snapshots/nope")
    with pytest.raises(ControllerError) as ei:
        ctl.spawn_sandboxes("../etc")
    assert ei.value.status == 400 and ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ControllerError) as ei:
        ctl.spawn_sandboxes("py", n=0)
    assert ei.value.status == 400
    with pytest.raises(ControllerError) as ei:
        ctl.exec_command("not-an-id", ["true"])
    assert ei.value.status == 400


@pytest.mark.parametrize(
    "call,says",
    [
        (lambda c: c.spawn_sandboxes("py", live_fork=True), "spawn from the branch"),
        (lambda c: c.spawn_sandboxes("py", hugepages=True), "drop the argument"),
        (lambda c: c.spawn_sandboxes("py", prewarm=True), "forkd.Client().fork(tag, n, prewarm=True)"),
    ],
)
def test_reference_options_without_counterpart_are_refused(ctl: Controller, call, says: str) -> None:
    with pytest.raises(ControllerError) as ei:
        call(ctl)
    e = ei.value
    assert (e.status, e.code, e.body["code"]) == (409, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert says in e.message


def test_live_branch_is_a_diff_branch(ctl: Controller) -> None:
    # Accepted (and sent as mode "diff"): only the unknown sandbox fails.
    with pytest.raises(ControllerError) as ei:
        ctl.branch_sandbox(GHOST, mode="live", wait=False)
    assert ei.value.status == 404


def test_conflicting_branch_options_are_400(ctl: Controller) -> None:
    for kw in (
        {"mode": "full", "diff": True},
        {"diff": True, "measure_diff": True},
        {"mode": "diff", "measure_diff": True},
        {"mode": "live", "measure_diff": True},
        {"mode": "sideways"},
    ):
        with pytest.raises(ControllerError) as ei:
            ctl.branch_sandbox(GHOST, **kw)  # type: ignore[arg-type]
        assert ei.value.status == 400, kw


def test_url_and_token_from_the_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKD_URL", daemon.url)
    monkeypatch.setenv("FORKD_TOKEN", daemon.token or "")
    monkeypatch.delenv("FORKD_TOKEN_FILE", raising=False)
    with Controller() as c:
        assert c.base_url == daemon.url
        assert c.list_sandboxes() == []
    monkeypatch.setenv("FORKD_TOKEN", "wrong-but-long-enough-0123456789")
    with Controller() as c, pytest.raises(ControllerError) as ei:
        c.list_snapshots()
    assert (ei.value.status, ei.value.code) == (401, grpc.StatusCode.UNAUTHENTICATED)


def test_a_bad_url_is_a_controller_error() -> None:
    with pytest.raises(ControllerError, match="must not have a path"):
        Controller("http://127.0.0.1:1/v1")


def test_reference_constructor_shape() -> None:
    # The reference's (status, body, url); the code comes from the body.
    e = ControllerError(409, {"error": "tag taken", "code": "ALREADY_EXISTS"}, "http://h/v1/snapshots")
    assert (e.status, e.code, e.message, e.url) == (409, grpc.StatusCode.ALREADY_EXISTS, "tag taken", "http://h/v1/snapshots")
    assert ControllerError(500, "boom", "u").message == "boom"


@pytest.mark.e2e
def test_reference_scenario(e2e_daemon: Daemon, e2e_snapshot) -> None:
    ctl = Controller(e2e_daemon.url, token=e2e_daemon.token, timeout=300)
    data_dir = e2e_daemon.data_dir.resolve()
    branches = []
    try:
        snaps = {s["tag"]: s for s in ctl.list_snapshots()}
        base = snaps[E2E_TAG]
        assert base["dir"] == str(data_dir / "snapshots" / E2E_TAG) and Path(base["dir"]).is_dir()
        assert base["status"] == "ready" and base["created_at_unix"] > 0
        assert "branched_from" not in base

        children = ctl.spawn_sandboxes(E2E_TAG, n=2)
        assert len(children) == 2 and all(set(ch) == SANDBOX_KEYS for ch in children)
        a, b = (ch["id"] for ch in children)
        assert a != b and {ch["snapshot_tag"] for ch in children} == {E2E_TAG}
        # No NIC without per_child_netns: no address, no namespace.
        assert all(ch["pid"] and ch["guest_addr"] is None and ch["netns"] is None for ch in children)
        assert not any(ch["has_branched"] for ch in children)
        assert {a, b} <= {s["id"] for s in ctl.list_sandboxes()}
        assert ctl.get_sandbox(a)["id"] == a

        r = ctl.exec_command(a, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_secs=30)
        assert r == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}
        p = ctl.ping_sandbox(b)
        assert p["pong"] is True and p["latency_ms"] > 0
        if e2e_snapshot.runtime == "python":
            assert p["runtime_ready"] is True
            assert ctl.eval_code(a, "6 * 7") == {"result": "42", "error": None, "exit_code": 0}
            bad = ctl.eval_code(a, "1 / 0")
            assert "ZeroDivisionError" in bad["error"] and bad["result"] == ""
        else:  # an image without the warm interpreter answers with an error
            assert ctl.eval_code(a, "6 * 7")["error"]

        # Branch (diff and the reference's default, full) after writing a
        # marker; a child of each branch sees it.
        assert ctl.exec_command(a, ["sh", "-c", "echo from-a > /tmp/marker"])["exit_code"] == 0
        t = int(time.time())
        diff = ctl.branch_sandbox(a, tag=f"ctl-diff-{t}", diff=True)
        branches.append(diff["tag"])
        assert diff["tag"] == f"ctl-diff-{t}" and diff["branched_from"] == a
        assert diff["status"] == "ready" and diff["dir"] == str(data_dir / "snapshots" / diff["tag"])
        assert diff["diff_logical_bytes"] > 0 and diff["pause_ms"] >= 0 and diff["diff_ms"] >= 0
        full = ctl.branch_sandbox(a, tag=f"ctl-full-{t}")
        branches.append(full["tag"])
        assert full["branched_from"] == a and full["status"] == "ready"
        # Without mode the branch is full, as in the reference.
        with e2e_daemon.client() as c:
            assert [c.snapshots.get(t).kind for t in branches] == ["diff", "full"]
        # The source keeps running.
        assert ctl.exec_command(a, ["cat", "/tmp/marker"])["stdout"] == "from-a\n"
        assert ctl.get_sandbox(a)["has_branched"] is True
        ctl.kill_sandbox(a)
        ctl.kill_sandbox(b)

        listed = {s["tag"] for s in ctl.list_snapshots()}
        assert {diff["tag"], full["tag"]} <= listed
        for tag in (diff["tag"], full["tag"]):
            [g] = ctl.spawn_sandboxes(tag)
            assert g["snapshot_tag"] == tag
            assert ctl.exec_command(g["id"], ["cat", "/tmp/marker"])["stdout"] == "from-a\n"
            ctl.kill_sandbox(g["id"])
        assert not {a, b} & {s["id"] for s in ctl.list_sandboxes()}

        # Killed is gone: a Controller error, as the reference raises.
        with pytest.raises(ControllerError) as ei:
            ctl.exec_command(a, ["true"])
        assert ei.value.status == 404 and ei.value.code == grpc.StatusCode.NOT_FOUND

        for tag in list(branches):
            ctl.delete_snapshot(tag)
            branches.remove(tag)
        tags = {s["tag"] for s in ctl.list_snapshots()}
        assert E2E_TAG in tags and not {diff["tag"], full["tag"]} & tags
    finally:
        with e2e_daemon.client() as c:
            c.sandboxes.kill(all=True)
            for tag in branches:
                c.snapshots.delete(tag, cascade=True)
        ctl.close()
