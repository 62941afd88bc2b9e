"""The published reference MCP server, `forkd-mcp` 0.2.1 from PyPI (another
project of the same name, written against the reference daemon's REST API),
run unchanged over stdio by the official MCP SDK's client against this daemon
with real microVMs.

Every one of its eleven tools is called: each call either succeeds with the
fields its documentation promises or fails with the HTTP status the reference
daemon gives in that case. So an agent set up with the reference's MCP server
can be pointed at forkd as it is.

The server needs mcp 1.x while these tests pin mcp 2.x, so it lives in a venv
of its own, made by scripts/test-clients.sh, which exports the path of its
`forkd-mcp` script as $FORKD_REFERENCE_MCP. Like the other VM tests this runs
only with FORKD_E2E=1; then a missing server fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from mcp import ClientSession
from mcp.types import TextContent

import forkd

from .conftest import E2E_TAG, Daemon
from .mcp_stdio import run_bounded, stdio_session, text_of

pytestmark = pytest.mark.e2e

#: The reference server's tools, by these exact names.
REFERENCE_TOOLS = {
    "list_snapshots",
    "spawn_sandboxes",
    "branch_sandbox",
    "create_snapshot",
    "wait_for_text",
    "list_sandboxes",
    "get_sandbox",
    "kill_sandbox",
    "exec_command",
    "eval_code",
    "ping_sandbox",
}

#: Bound on the whole MCP session, so a hung server fails the test instead
#: of the run.
SESSION_TIMEOUT = float(os.environ.get("FORKD_MCP_TEST_TIMEOUT", "900"))

#: Snapshots this test makes, children first (the order they are deleted in).
TAG = "refmcp"
FULL_BRANCH = "refmcp-b1"
LIVE_BRANCH = "refmcp-b2"
DIFF_BRANCH = "refmcp-b0"
OUR_TAGS = (LIVE_BRANCH, DIFF_BRANCH, FULL_BRANCH, TAG)


def guest_dir() -> Path:
    """Where the test daemon finds its kernel and images: the daemon is
    started with --guest-dir $FORKD_GUEST_DIR when set, and its data dir is
    fresh, so otherwise it uses /var/lib/forkd/guest."""
    return Path(os.environ.get("FORKD_GUEST_DIR") or "/var/lib/forkd/guest")


def reference_server() -> str:
    """The reference server's `forkd-mcp` script. Called from the test body,
    which runs only with FORKD_E2E=1 (the e2e_daemon fixture skips it
    otherwise); there a missing server is a failure, never a skip."""
    path = os.environ.get("FORKD_REFERENCE_MCP", "")
    if not (path and os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(
            f"FORKD_REFERENCE_MCP={path!r} is not an executable: run scripts/test-clients.sh, which installs "
            "forkd-mcp==0.2.1 into a venv of its own and exports the path of its forkd-mcp script"
        )
    return path


@contextlib.asynccontextmanager
async def reference_session(server: str, daemon: Daemon) -> AsyncIterator[ClientSession]:
    """The reference server as an MCP client starts it: a stdio child
    configured only through the environment variables it documents."""
    env = {
        "FORKD_URL": daemon.url,
        "FORKD_TOKEN": daemon.token or "",
        # Its default (60 s) is short for a branch of a VM under emulation;
        # SESSION_TIMEOUT bounds the test anyway.
        "FORKD_HTTP_TIMEOUT": "600",
    }
    async with stdio_session(server, [], env, "forkd-mcp") as session:
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict:
    """A call of a tool that returns an object, which must succeed."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool}({arguments}) failed: {text_of(result)}"
    answer = result.structured_content
    assert isinstance(answer, dict), result
    # The same object as text, for clients that read only that.
    assert json.loads(text_of(result)) == answer
    return answer


async def call_list(session: ClientSession, tool: str, **arguments: Any) -> list:
    """A call of a tool that returns a list, which must succeed."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool}({arguments}) failed: {text_of(result)}"
    # Structured content is an object, so FastMCP 1.x puts a list under "result".
    answer = result.structured_content
    assert isinstance(answer, dict) and list(answer) == ["result"], result
    assert isinstance(answer["result"], list), result
    # As text, one block per item (none for an empty list).
    blocks = [b for b in result.content if isinstance(b, TextContent)]
    assert len(blocks) == len(result.content), result
    assert [json.loads(b.text) for b in blocks] == answer["result"]
    return answer["result"]


async def call_error(session: ClientSession, tool: str, status: int, **arguments: Any) -> str:
    """A call that must fail as a tool error carrying the daemon's HTTP
    status: the reference passes httpx's HTTPStatusError on, whose message
    reads "Client error '404 Not Found' for url ..."."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool}({arguments}) succeeded: {result.structured_content}"
    text = text_of(result)
    assert f"error '{status} " in text, f"{tool}({arguments}): expected HTTP {status}: {text}"
    return text


async def wait_ready(session: ClientSession, tag: str, timeout: float = 120) -> dict:
    """Polls list_snapshots, as the reference documents for wait=False, until
    `tag` is ready."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        snap = next(s for s in await call_list(session, "list_snapshots") if s["tag"] == tag)
        if snap["status"] == "ready":
            return snap
        assert snap["status"] == "writing", snap
        assert loop.time() < end, f"{tag} not ready within {timeout} s: {snap}"
        await asyncio.sleep(0.5)


def test_every_reference_tool_against_real_sandboxes(
    e2e_daemon: Daemon, e2e_snapshot: forkd.types.SnapshotInfo
) -> None:
    server = reference_server()
    guest = guest_dir()
    kernel = str(guest / "vmlinux")
    rootfs = str(guest / "images" / "python.ext4")

    async def main() -> None:
        async with reference_session(server, e2e_daemon) as session:
            tools = {t.name for t in (await session.list_tools()).tools}
            assert tools == REFERENCE_TOOLS

            # create_snapshot as the reference documents it: kernel + rootfs,
            # rw false (its default); the call returns once the snapshot is
            # taken, ready to fork from.
            snap = await call(session, "create_snapshot", tag=TAG, kernel=kernel, rootfs=rootfs, boot_wait_secs=1)
            assert snap["tag"] == TAG, snap
            assert snap["status"] == "ready", snap
            assert "rw false has no effect" in snap["warning"], snap
            # Only the daemon's own kernel boots: 409, nothing created.
            await call_error(
                session, "create_snapshot", 409, tag="refmcp-k", kernel="/boot/vmlinuz-other", rootfs=rootfs
            )

            snaps = {s["tag"]: s for s in await call_list(session, "list_snapshots")}
            assert {E2E_TAG, TAG} <= set(snaps) and "refmcp-k" not in snaps, snaps
            for s in snaps.values():
                assert {"tag", "dir", "created_at_unix"} <= set(s), s

            # spawn_sandboxes with its defaults (memory_limit_mib 256, prewarm
            # and per_child_netns false, all sent explicitly).
            spawned = await call_list(session, "spawn_sandboxes", snapshot_tag=TAG, n=2)
            assert len(spawned) == 2, spawned
            for sb in spawned:
                assert {"id", "pid", "snapshot_tag"} <= set(sb) and sb["snapshot_tag"] == TAG, sb
            ids = [sb["id"] for sb in spawned]
            sid = ids[0]
            await call_error(session, "spawn_sandboxes", 409, snapshot_tag=TAG, live_fork=True)
            await call_error(session, "spawn_sandboxes", 404, snapshot_tag="nope")

            listed = [s["id"] for s in await call_list(session, "list_sandboxes")]
            assert set(ids) <= set(listed), listed
            assert (await call(session, "get_sandbox", sandbox_id=sid))["id"] == sid

            r = await call(session, "exec_command", sandbox_id=sid, args=["python3", "-c", "print(6*7)"])
            assert (r["stdout"], r["exit_code"]) == ("42\n", 0), r
            r = await call(session, "eval_code", sandbox_id=sid, code="6*7")
            assert r["result"] == "42", r
            assert (await call(session, "ping_sandbox", sandbox_id=sid))["pong"] is True

            # The reference's pattern: the agent reports progress in a file,
            # the orchestrator waits for a marker, then branches. (The writer
            # lets go of the command's output, so the exec returns at once.)
            await call(
                session,
                "exec_command",
                sandbox_id=sid,
                args=["sh", "-c", "(sleep 1; echo READY_TO_BRANCH > /tmp/progress.log) >/dev/null 2>&1 &"],
            )
            found = await call(
                session,
                "wait_for_text",
                sandbox_id=sid,
                path="/tmp/progress.log",
                marker="READY_TO_BRANCH",
                timeout_secs=30,
            )
            assert found["found"] is True, found
            missing = await call(
                session, "wait_for_text", sandbox_id=sid, path="/tmp/progress.log", marker="NEVER", timeout_secs=1
            )
            assert missing["found"] is False and "READY_TO_BRANCH" in missing["last_excerpt"], missing

            # Without mode, forkd takes its default, a diff branch (the
            # reference: a full one; docs/migrating.md); measure_diff is the
            # reference's measured full branch; then a live one not waited for.
            b0 = await call(session, "branch_sandbox", sandbox_id=sid, tag=DIFF_BRANCH)
            assert (b0["tag"], b0["kind"]) == (DIFF_BRANCH, "diff"), b0
            assert isinstance(b0["pause_ms"], int) and not isinstance(b0["pause_ms"], bool), b0
            b1 = await call(session, "branch_sandbox", sandbox_id=sid, tag=FULL_BRANCH, measure_diff=True)
            assert (b1["tag"], b1["kind"], b1["status"]) == (FULL_BRANCH, "full", "ready"), b1
            assert b1["diff_physical_bytes"] > 0 and b1["diff_logical_bytes"] > 0, b1
            b2 = await call(session, "branch_sandbox", sandbox_id=sid, tag=LIVE_BRANCH, mode="live", wait=False)
            assert b2["tag"] == LIVE_BRANCH and b2["status"] in ("writing", "ready"), b2
            await wait_ready(session, LIVE_BRANCH)
            # measure_diff measures a full branch; with a diff branch it is 400.
            await call_error(session, "branch_sandbox", 400, sandbox_id=sid, mode="diff", measure_diff=True)

            # A child of the live branch has the source's file.
            [child] = await call_list(session, "spawn_sandboxes", snapshot_tag=LIVE_BRANCH, n=1)
            ids.append(child["id"])
            r = await call(session, "exec_command", sandbox_id=child["id"], args=["cat", "/tmp/progress.log"])
            assert (r["stdout"], r["exit_code"]) == ("READY_TO_BRANCH\n", 0), r

            for victim in ids:
                assert await call(session, "kill_sandbox", sandbox_id=victim) == {"id": victim, "killed": True}
            await call_error(session, "kill_sandbox", 404, sandbox_id=sid)
            left = [s["id"] for s in await call_list(session, "list_sandboxes")]
            assert not set(ids) & set(left), left

    try:
        run_bounded(main(), SESSION_TIMEOUT)
    finally:
        remove_ours(e2e_daemon)


def remove_ours(daemon: Daemon) -> None:
    """Leaves the shared daemon as the other e2e tests expect it, whatever
    point the test failed at."""
    with daemon.client() as c:
        for tag in OUR_TAGS:
            c.sandboxes.kill(snapshot_tag=tag)
        for tag in OUR_TAGS:
            # A snapshot still being written cannot be deleted yet.
            with contextlib.suppress(forkd.NotFoundError, forkd.SnapshotFailedError):
                c.snapshots.wait(tag, timeout=300)
            with contextlib.suppress(forkd.NotFoundError):
                c.snapshots.delete(tag)
