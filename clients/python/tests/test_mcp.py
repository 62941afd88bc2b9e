"""`forkd mcp` driven by the official MCP SDK's stdio client, against a real
daemon: the tool list and argument schemas, errors as tool errors, and (with
FORKD_E2E=1) a whole session with real microVMs.

The CLI binary is $FORKD_CLI_BIN, else the cargo target dir's debug/forkd
($CARGO_TARGET_DIR or <repo>/target); a missing binary fails the tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

import forkd

from .conftest import E2E_TAG, REPO, TOKEN, Daemon
from .mcp_stdio import run_bounded, stdio_session, text_of

#: The tools `forkd mcp` must offer, by these exact names.
TOOLS = {
    "list_snapshots",
    "create_snapshot",
    "spawn_sandboxes",
    "list_sandboxes",
    "get_sandbox",
    "kill_sandbox",
    "exec_command",
    "start_process",
    "list_processes",
    "read_process_output",
    "send_stdin",
    "kill_process",
    "eval_code",
    "read_file",
    "write_file",
    "list_files",
    "branch_sandbox",
    "wait_for_text",
}

#: Bound on one whole MCP session, so a hung server fails the test instead
#: of the run.
SESSION_TIMEOUT = float(os.environ.get("FORKD_MCP_TEST_TIMEOUT", "600"))


def cli_bin() -> Path:
    env = os.environ.get("FORKD_CLI_BIN")
    if env:
        p = Path(env)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        p = target / "debug" / "forkd"
    if not p.is_file():
        pytest.fail(f"forkd not found at {p}: run `cargo build -p forkd` or set FORKD_CLI_BIN")
    return p


@contextlib.asynccontextmanager
async def mcp_session(daemon: Daemon, token: Optional[str] = TOKEN) -> AsyncIterator[ClientSession]:
    """`forkd mcp` as an MCP client starts a stdio server: a child process
    configured only through the environment the CLI reads."""
    env = {"FORKD_URL": daemon.url}
    if token is not None:
        env["FORKD_TOKEN"] = token
    async with stdio_session(str(cli_bin()), ["mcp"], env, "forkd mcp") as session:
        yield session


def run(coro: Any) -> Any:
    return run_bounded(coro, SESSION_TIMEOUT)


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict:
    """A tool call that must succeed; its answer as JSON."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool}({arguments}) failed: {text_of(result)}"
    answer = json.loads(text_of(result))
    # The same object comes as structured content for programs.
    assert result.structured_content == answer
    return answer


async def call_error(session: ClientSession, tool: str, arguments: dict) -> str:
    """A tool call that must fail as a tool error (not a protocol error)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool}({arguments}) succeeded: {text_of(result)}"
    return text_of(result)


# --- without VMs -------------------------------------------------------------


def test_tools_and_their_schemas(daemon: Daemon) -> None:
    async def main() -> None:
        async with mcp_session(daemon) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert TOOLS <= set(tools), TOOLS - set(tools)
            for name, tool in tools.items():
                assert tool.description and len(tool.description) > 40, name
                schema = tool.input_schema
                assert schema["type"] == "object", (name, schema)
                for arg, prop in schema.get("properties", {}).items():
                    assert prop.get("description"), f"{name}.{arg} has no description"
            exec_schema = tools["exec_command"].input_schema
            assert exec_schema["required"] == ["sandbox_id"]
            assert {"args", "command", "timeout_secs", "env", "cwd"} <= set(exec_schema["properties"])
            read_schema = tools["read_process_output"].input_schema
            assert read_schema["properties"]["wait_ms"]["default"] == 1000
            assert tools["kill_process"].input_schema["properties"]["signal"]["default"] == "KILL"
            # Read-only tools say so, so clients may run them without asking.
            assert tools["list_sandboxes"].annotations.read_only_hint is True
            assert tools["kill_sandbox"].annotations.destructive_hint is True
            # A daemon without snapshots: an empty listing, not an error.
            assert await call(session, "list_snapshots") == {"snapshots": []}
            assert await call(session, "list_sandboxes", snapshot_tag="nope") == {"sandboxes": []}

    run(main())


def test_bad_arguments_are_tool_errors(daemon: Daemon) -> None:
    async def main() -> None:
        async with mcp_session(daemon) as session:
            # Unknown sandbox: the daemon's NOT_FOUND, passed on with its message.
            err = await call_error(session, "get_sandbox", {"sandbox_id": "sb-doesnotexist0"})
            assert err.startswith("NOT_FOUND: "), err
            assert "sb-doesnotexist0" in err
            err = await call_error(session, "exec_command", {"sandbox_id": "sb-doesnotexist0", "command": "true"})
            assert err.startswith("NOT_FOUND: "), err
            # Not an id at all: refused by the daemon's name check.
            err = await call_error(session, "get_sandbox", {"sandbox_id": "../etc"})
            assert err.startswith("INVALID_ARGUMENT: "), err
            # Missing and unknown fields, wrong types: refused before any call.
            err = await call_error(session, "get_sandbox", {})
            assert err.startswith("INVALID_ARGUMENT: get_sandbox: "), err
            assert "sandbox_id" in err
            err = await call_error(session, "get_sandbox", {"sandbox_id": "sb-a", "sandbox": "sb-a"})
            assert err.startswith("INVALID_ARGUMENT: ") and "sandbox" in err, err
            err = await call_error(session, "spawn_sandboxes", {"snapshot_tag": "py", "n": "many"})
            assert err.startswith("INVALID_ARGUMENT: "), err
            err = await call_error(session, "exec_command", {"sandbox_id": "sb-a"})
            assert err.startswith("INVALID_ARGUMENT: ") and "command" in err, err
            err = await call_error(session, "exec_command", {"sandbox_id": "sb-a", "args": ["ls"], "command": "ls"})
            assert err.startswith("INVALID_ARGUMENT: "), err
            err = await call_error(session, "read_process_output", {"sandbox_id": "sb-a", "process": 1, "wait_ms": 10**6})
            assert err.startswith("INVALID_ARGUMENT: ") and "wait_ms" in err, err
            err = await call_error(session, "spawn_sandboxes", {"snapshot_tag": "missing"})
            assert err.startswith("NOT_FOUND: "), err
            # The session is still usable after all of that.
            assert await call(session, "list_sandboxes") == {"sandboxes": []}

    run(main())


def test_a_wrong_token_is_a_tool_error(daemon: Daemon) -> None:
    async def main() -> None:
        async with mcp_session(daemon, token="wrong-token-but-long-enough-0123") as session:
            err = await call_error(session, "list_snapshots", {})
            assert err.split(":")[0] in ("UNAUTHENTICATED", "PERMISSION_DENIED"), err

    run(main())


def test_streamable_http(daemon: Daemon) -> None:
    env = {"FORKD_URL": daemon.url, "FORKD_TOKEN": TOKEN, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    # Whoever reaches a non-loopback port drives the daemon: refused unless asked for.
    refused = subprocess.run(
        [str(cli_bin()), "mcp", "--http", "0.0.0.0:0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "--insecure-bind" in refused.stderr, refused

    proc = subprocess.Popen(
        [str(cli_bin()), "mcp", "--http", "127.0.0.1:0"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().strip()
        assert line.startswith("forkd mcp: listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        assert url.endswith("/mcp")

        async def main() -> None:
            async with streamable_http_client(url) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    tools = {t.name for t in (await session.list_tools()).tools}
                    assert TOOLS <= tools
                    err = await call_error(session, "get_sandbox", {"sandbox_id": "sb-doesnotexist0"})
                    assert err.startswith("NOT_FOUND: "), err

        run(main())

        # A browser page (it sends Origin) may not drive the daemon.
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
        req = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                "Origin": "http://evil.example",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as refused_origin:
            urllib.request.urlopen(req, timeout=30)
        assert refused_origin.value.code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- with real microVMs ----------------------------------------------------------


async def read_until_exit(session: ClientSession, sandbox_id: str, process: Any, deadline_s: float = 60) -> dict:
    """Follows a process's output by offset until it exits; returns the
    concatenated output and the last answer."""
    offset, stdout, stderr = 0, "", ""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        r = await call(
            session, "read_process_output", sandbox_id=sandbox_id, process=process, from_offset=offset, wait_ms=2000
        )
        assert r["next_offset"] >= offset
        offset = r["next_offset"]
        stdout += r["stdout"]
        stderr += r["stderr"]
        if r["exit"] is not None and not r["more"]:
            return {**r, "stdout": stdout, "stderr": stderr}
        assert loop.time() < end, f"process {process} did not exit: {r}"


@pytest.mark.e2e
def test_a_session_with_real_sandboxes(e2e_daemon: Daemon, e2e_snapshot: forkd.types.SnapshotInfo) -> None:
    branch_tag = "mcp-branch"

    async def main() -> None:
        async with mcp_session(e2e_daemon) as session:
            snaps = (await call(session, "list_snapshots", status="ready"))["snapshots"]
            assert E2E_TAG in [s["tag"] for s in snaps]

            spawned = await call(session, "spawn_sandboxes", snapshot_tag=E2E_TAG, n=1, ttl_secs=900)
            [sb] = spawned["sandboxes"]
            sid = sb["id"]
            assert sid.startswith("sb-") and sb["status"] == "running"
            listed = await call(session, "list_sandboxes", snapshot_tag=E2E_TAG)
            assert sid in [s["id"] for s in listed["sandboxes"]]
            assert (await call(session, "get_sandbox", sandbox_id=sid))["hostname"] == sb["hostname"]

            # exec_command: a shell string, an argv, env/cwd/stdin, a timeout.
            r = await call(session, "exec_command", sandbox_id=sid, command="echo out; echo err >&2; exit 3")
            assert (r["exit_code"], r["stdout"], r["stderr"], r["timed_out"]) == (3, "out\n", "err\n", False)
            r = await call(
                session,
                "exec_command",
                sandbox_id=sid,
                args=["sh", "-c", 'echo "$GREETING"; pwd; cat'],
                env={"GREETING": "hello"},
                cwd="/tmp",
                stdin="piped",
            )
            assert r["stdout"] == "hello\n/tmp\npiped" and r["exit_code"] == 0
            r = await call(session, "exec_command", sandbox_id=sid, args=["sleep", "30"], timeout_secs=1)
            assert r["timed_out"] is True

            # A background process followed by offset until it exits.
            p = await call(
                session,
                "start_process",
                sandbox_id=sid,
                command="for i in 1 2 3; do echo line$i; sleep 0.3; done; echo warn >&2; exit 4",
                tag="job",
            )
            assert p["tag"] == "job" and p["pid"] > 0
            done = await read_until_exit(session, sid, "job")
            assert done["stdout"] == "line1\nline2\nline3\n"
            assert done["stderr"] == "warn\n"
            assert done["exit"]["exit_code"] == 4 and done["running"] is False
            # Read again from the end: nothing new, still the exit status.
            again = await call(
                session, "read_process_output", sandbox_id=sid, process="job", from_offset=done["next_offset"]
            )
            assert (again["stdout"], again["stderr"], again["exit"]["exit_code"]) == ("", "", 4)
            # From 0 by pid: the whole output is replayed.
            replay = await call(session, "read_process_output", sandbox_id=sid, process=p["pid"], wait_ms=0)
            assert replay["stdout"] == "line1\nline2\nline3\n"
            procs = (await call(session, "list_processes", sandbox_id=sid))["processes"]
            assert "job" in [q["tag"] for q in procs]

            # stdin: a cat that echoes what it is sent, until stdin closes.
            await call(session, "start_process", sandbox_id=sid, args=["cat"], tag="echo", stdin=True)
            await call(session, "send_stdin", sandbox_id=sid, process="echo", data="hello\n")
            await call(session, "send_stdin", sandbox_id=sid, process="echo", data="bye\n", close=True)
            echoed = await read_until_exit(session, sid, "echo")
            assert echoed["stdout"] == "hello\nbye\n" and echoed["exit"]["exit_code"] == 0

            # kill_process: KILL by default.
            await call(session, "start_process", sandbox_id=sid, args=["sleep", "1000"], tag="sleeper")
            still = await call(session, "read_process_output", sandbox_id=sid, process="sleeper", wait_ms=200)
            assert still["running"] is True and still["exit"] is None
            await call(session, "kill_process", sandbox_id=sid, process="sleeper")
            killed = await read_until_exit(session, sid, "sleeper")
            assert killed["exit"]["signal"] == 9

            # Files: text and base64 round trips, listing, paging.
            w = await call(session, "write_file", sandbox_id=sid, path="/tmp/mcp.txt", content="from mcp\n")
            assert w["size"] == 9 and w["digest"].startswith("sha256:")
            r = await call(session, "read_file", sandbox_id=sid, path="/tmp/mcp.txt")
            assert (r["content"], r["truncated"]) == ("from mcp\n", False)
            page = await call(session, "read_file", sandbox_id=sid, path="/tmp/mcp.txt", offset=5, max_bytes=2)
            assert (page["content"], page["truncated"], page["next_offset"]) == ("mc", True, 7)
            blob = bytes(range(256))
            await call(
                session,
                "write_file",
                sandbox_id=sid,
                path="/tmp/blob.bin",
                content=base64.b64encode(blob).decode(),
                encoding="base64",
                mode="755",
            )
            r = await call(session, "read_file", sandbox_id=sid, path="/tmp/blob.bin", encoding="base64")
            assert base64.b64decode(r["content"]) == blob
            entries = {e["name"]: e for e in (await call(session, "list_files", sandbox_id=sid, path="/tmp"))["entries"]}
            assert entries["mcp.txt"]["size"] == 9 and not entries["mcp.txt"]["is_dir"]
            assert entries["blob.bin"]["mode"] == "0755"
            err = await call_error(session, "read_file", {"sandbox_id": sid, "path": "/tmp/no-such-file"})
            assert err.startswith("NOT_FOUND: "), err

            # wait_for_text: a file that appears later, and a marker that never does.
            await call(
                session, "start_process", sandbox_id=sid, command="sleep 1; echo 'server READY on 8000' > /tmp/ready.log"
            )
            found = await call(session, "wait_for_text", sandbox_id=sid, path="/tmp/ready.log", text="READY")
            assert found["found"] is True and found["lines"] == ["server READY on 8000"]
            err = await call_error(
                session, "wait_for_text", {"sandbox_id": sid, "path": "/tmp/ready.log", "text": "NEVER", "timeout_secs": 1}
            )
            assert err.startswith("DEADLINE_EXCEEDED: ") and "server READY" in err, err

            # eval_code: the warm interpreter keeps state between calls.
            if e2e_snapshot.runtime == "python":
                await call(session, "eval_code", sandbox_id=sid, code="x = 21")
                r = await call(session, "eval_code", sandbox_id=sid, code="print('side'); x * 2")
                assert (r["ok"], r["result"], r["stdout"]) == (True, "42", "side\n")
                r = await call(session, "eval_code", sandbox_id=sid, code="1 / 0")
                assert r["ok"] is False and "ZeroDivisionError" in r["error"]

            # branch_sandbox, then a child of the branch sees the parent's file.
            snap = await call(session, "branch_sandbox", sandbox_id=sid, tag=branch_tag)
            assert (snap["tag"], snap["status"], snap["parent_tag"]) == (branch_tag, "ready", E2E_TAG)
            [child] = (await call(session, "spawn_sandboxes", snapshot_tag=branch_tag, ttl_secs=900))["sandboxes"]
            r = await call(session, "read_file", sandbox_id=child["id"], path="/tmp/mcp.txt")
            assert r["content"] == "from mcp\n"

            # kill_sandbox: gone afterwards, and killing again succeeds.
            for victim in (child["id"], sid):
                assert (await call(session, "kill_sandbox", sandbox_id=victim))["killed"] == [victim]
                err = await call_error(session, "get_sandbox", {"sandbox_id": victim})
                assert err.startswith("NOT_FOUND: "), err
            await call(session, "kill_sandbox", sandbox_id=sid)

    try:
        run(main())
    finally:
        # Leave the shared daemon as the other e2e tests expect it.
        with e2e_daemon.client() as c:
            for tag in (branch_tag, E2E_TAG):
                c.sandboxes.kill(snapshot_tag=tag)
            with contextlib.suppress(forkd.NotFoundError):
                c.snapshots.delete(branch_tag)
