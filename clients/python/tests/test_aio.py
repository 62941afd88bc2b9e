"""The asyncio client against a real daemon (no VM needed). Each test runs
its own event loop with asyncio.run, so no pytest plugin is required."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import pytest

import forkd
import forkd.aio

from .conftest import Daemon


def run(daemon: Daemon, body: Callable[[forkd.aio.Client], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        kw.setdefault("token", daemon.token)
        async with forkd.aio.Client(daemon.url, **kw) as c:
            return await body(c)

    return asyncio.run(main())


def test_version_and_lists(daemon: Daemon) -> None:
    async def body(c: forkd.aio.Client) -> None:
        v = await c.version()
        assert v.api == "v1"
        assert await c.snapshots.list() == []
        assert await c.sandboxes.list() == []
        assert await c.workspaces.list() == []
        # Calls run concurrently on one channel.
        got = await asyncio.gather(*(c.version() for _ in range(8)))
        assert {g.api for g in got} == {"v1"}

    run(daemon, body)


def test_typed_errors(daemon: Daemon) -> None:
    async def body(c: forkd.aio.Client) -> None:
        with pytest.raises(forkd.NotFoundError):
            await c.snapshots.get("nope")
        with pytest.raises(forkd.InvalidArgumentError):
            await c.snapshots.create("../etc", wait=False)
        with pytest.raises(forkd.NotFoundError, match='snapshot "nope"'):
            await c.workspaces.create("w1", "nope")
        with pytest.raises(forkd.ConflictError, match="live_fork"):
            await c.fork("py", live_fork=True)
        with pytest.raises(forkd.ConflictError, match="--remote"):
            await c.snapshots.push("py")
        with pytest.raises(forkd.ConflictError, match="--remote"):
            await c.snapshots.list_remote()
        with pytest.raises(forkd.NotFoundError, match="no-such-snapshot"):
            async for _ in c.snapshots.export("no-such-snapshot"):
                pass  # pragma: no cover
        with pytest.raises(forkd.NotFoundError):
            await c.fork("nope", n=2)
        with pytest.raises(forkd.NotFoundError):
            async with c.sandbox("nope"):
                pass  # pragma: no cover
        with pytest.raises(forkd.ConflictError, match="live_fork"):
            await c.fork("nope", live_fork=True)
        with pytest.raises(forkd.NotFoundError):
            await forkd.aio.Sandbox(c, forkd.types.SandboxInfo(id="sb-aaaaaaaaaaaa")).renew(60)

    run(daemon, body)


def test_process_and_watch_calls_on_unknown_sandbox(daemon: Daemon) -> None:
    async def body(c: forkd.aio.Client) -> None:
        ghost = forkd.aio.Sandbox(c, forkd.types.SandboxInfo(id="sb-aaaaaaaaaaaa"))
        with pytest.raises(forkd.NotFoundError):
            await ghost.start_process(["sleep", "1"], tag="t")
        with pytest.raises(forkd.NotFoundError):
            await ghost.processes()
        with pytest.raises(forkd.NotFoundError):
            await ghost.attach("t").wait()
        with pytest.raises(forkd.NotFoundError):
            await ghost.signal(1, "TERM")
        with pytest.raises(forkd.NotFoundError):
            await ghost.send_stdin("t", b"x", close=True)
        with pytest.raises(forkd.NotFoundError):
            await ghost.close_stdin("t")
        with pytest.raises(forkd.NotFoundError):
            await ghost.resize("t", 24, 80)
        with pytest.raises(forkd.NotFoundError):
            await ghost.exec_interactive(["sh"], pty=(24, 80))
        with pytest.raises(forkd.NotFoundError):
            async with ghost.exec_interactive(["sh"]):
                pass  # pragma: no cover
        with pytest.raises(forkd.NotFoundError):
            await ghost.watch("/tmp")
        # Arguments are checked when the call is made, before any await.
        with pytest.raises(ValueError):
            ghost.exec_interactive(["sh"], pty=(0, 80))
        with pytest.raises(ValueError):
            ghost.watch("relative")

    run(daemon, body)


def test_wrong_token(daemon: Daemon) -> None:
    async def body(c: forkd.aio.Client) -> None:
        with pytest.raises(forkd.AuthenticationError):
            await c.snapshots.list()

    run(daemon, body, token="wrong-but-long-enough-0123456789")


def test_deadline(daemon: Daemon) -> None:
    async def body(c: forkd.aio.Client) -> None:
        with pytest.raises(forkd.DeadlineExceededError):
            async for _ in c.sandboxes.events():
                pass  # pragma: no cover

    run(daemon, body, timeout=0.5)
