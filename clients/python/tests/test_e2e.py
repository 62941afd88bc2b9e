"""The whole sandbox life cycle against real microVMs: fork, exec, streaming
exec, eval, files, branch, kill. Runs only with FORKD_E2E=1."""

from __future__ import annotations

import asyncio
import time

import pytest

import forkd
import forkd.aio

from .conftest import E2E_TAG, Daemon

pytestmark = pytest.mark.e2e


def test_snapshot_is_ready(e2e_client: forkd.Client, e2e_snapshot) -> None:
    snap = e2e_client.snapshots.get(E2E_TAG)
    assert snap.status == "ready"
    assert snap.kind == "base"
    assert [s.tag for s in e2e_client.snapshots.list(status="ready")].count(E2E_TAG) == 1


def test_fork_exec_and_kill(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.fork(E2E_TAG, n=2, labels={"suite": "py"}) as sandboxes:
        assert len(sandboxes) == 2
        ids = {sb.id for sb in sandboxes}
        assert len(ids) == 2
        for sb in sandboxes:
            assert sb.info.status == "running"
            assert dict(sb.info.labels) == {"suite": "py"}
            r = sb.exec(["hostname"])
            assert r.ok, r
            # Every child gets its own identity before it is reported running.
            assert r.stdout.strip() == sb.info.hostname
        listed = {sb.id for sb in e2e_client.sandboxes.list(snapshot_tag=E2E_TAG)}
        assert ids <= listed
    # Leaving the block killed both.
    for i in ids:
        with pytest.raises(forkd.NotFoundError):
            e2e_client.sandboxes.get(i)


def test_exec_details(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        r = sb.exec("echo out; echo err >&2; exit 7")
        assert (r.stdout, r.stderr, r.exit_code, r.ok) == ("out\n", "err\n", 7, False)
        with pytest.raises(forkd.CommandError, match="exited with 7"):
            sb.exec("exit 7", check=True)
        r = sb.exec(["sh", "-c", 'echo "$GREETING"; pwd; cat'], env={"GREETING": "hello"}, cwd="/tmp", stdin=b"piped")
        assert r.stdout == "hello\n/tmp\npiped"
        r = sb.exec(["sleep", "30"], timeout=1)
        assert r.timed_out and not r.ok
        assert sb.ping().ok
    with pytest.raises(forkd.NotFoundError):
        sb.exec(["true"])


def test_exec_stream_yields_as_output_arrives(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        stream = sb.exec_stream("echo first; sleep 3; echo second >&2; sleep 1; echo third")
        start = time.monotonic()
        seen = []
        for kind, data in stream:
            seen.append((kind, data, time.monotonic() - start))
        assert [(k, d) for k, d, _ in seen] == [("stdout", b"first\n"), ("stderr", b"second\n"), ("stdout", b"third\n")]
        # "first" arrived while the command was still sleeping, not at the end.
        assert seen[0][2] < seen[1][2] - 2.0
        assert stream.result is not None and stream.result.exit_code == 0
        assert stream.result.stdout == "first\nthird\n"
        assert sb.exec_stream("exit 3").wait().exit_code == 3


def test_eval(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        if e2e_snapshot.runtime != "python":
            r = sb.eval("1 + 1")
            assert not r.ok and r.error
            pytest.skip(f"image {e2e_snapshot.image!r} has no warm Python runtime")
        assert sb.eval("x = 41").ok
        r = sb.eval("x + 1")
        assert r.ok and r.result == "42"
        r = sb.eval("print('side'); 'value'")
        assert r.stdout == "side\n" and r.result == "'value'"
        r = sb.eval("1 / 0")
        assert not r.ok and "ZeroDivisionError" in r.error
        with pytest.raises(forkd.CommandError):
            sb.eval("1 / 0", check=True)


def test_files(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        blob = bytes(range(256)) * 10_000  # 2.5 MiB: several chunks each way
        info = sb.files.write("/tmp/blob.bin", blob, mode=0o600)
        assert info.size == len(blob) and info.digest.startswith("sha256:")
        assert sb.files.read("/tmp/blob.bin") == blob
        sb.files.write("/tmp/note.txt", "héllo")
        assert sb.files.read_text("/tmp/note.txt") == "héllo"
        assert sb.exec(["cat", "/tmp/note.txt"]).stdout == "héllo"
        names = {f.name for f in sb.files.list("/tmp")}
        assert {"blob.bin", "note.txt"} <= names
        st = sb.files.stat("/tmp/blob.bin")
        assert st.size == len(blob) and not st.is_dir and st.mode & 0o777 == 0o600
        sb.files.remove("/tmp/note.txt")
        assert not sb.files.exists("/tmp/note.txt")
        with pytest.raises(forkd.NotFoundError):
            sb.files.read("/tmp/note.txt")
        with pytest.raises(forkd.InvalidArgumentError):
            sb.files.read("relative/path")
        sb.exec("mkdir -p /tmp/d/e && touch /tmp/d/e/f", check=True)
        sb.files.remove("/tmp/d", recursive=True)
        assert not sb.files.exists("/tmp/d")


def test_branch_and_fork_from_branch(e2e_client: forkd.Client, e2e_snapshot) -> None:
    tag = "py-branch"
    with e2e_client.sandbox(E2E_TAG) as sb:
        sb.files.write("/tmp/state", b"from the parent")
        snap = sb.branch(tag)
        assert (snap.tag, snap.status, snap.kind, snap.parent_tag) == (tag, "ready", "diff", E2E_TAG)
        # The source keeps running.
        assert sb.exec(["true"]).ok
    try:
        with e2e_client.fork(tag, n=2) as children:
            for child in children:
                assert child.files.read("/tmp/state") == b"from the parent"
        with pytest.raises(forkd.ConflictError):
            e2e_client.snapshots.delete(E2E_TAG)  # it has a dependent now
    finally:
        deleted = e2e_client.snapshots.delete(tag)
        assert list(deleted.deleted) == [tag]


def test_kill(e2e_client: forkd.Client, e2e_snapshot) -> None:
    sb = e2e_client.sandbox(E2E_TAG)
    assert sb.refresh().status == "running"
    sb.kill()
    sb.kill()  # idempotent
    with pytest.raises(forkd.NotFoundError):
        sb.refresh()
    group = e2e_client.fork(E2E_TAG, n=2)
    assert sorted(e2e_client.sandboxes.kill(snapshot_tag=E2E_TAG)) == sorted(s.id for s in group)


def test_aio_life_cycle(e2e_daemon: Daemon, e2e_snapshot) -> None:
    async def main() -> None:
        async with forkd.aio.Client(e2e_daemon.url, token=e2e_daemon.token) as c:
            async with c.fork(E2E_TAG, n=2) as sandboxes:
                results = await asyncio.gather(*(sb.exec(["hostname"]) for sb in sandboxes))
                assert [r.stdout.strip() for r in results] == [sb.info.hostname for sb in sandboxes]
                sb = sandboxes[0]
                chunks = [(k, d) async for k, d in sb.exec_stream("echo a; echo b >&2")]
                assert sorted(chunks) == [("stderr", b"b\n"), ("stdout", b"a\n")]
                await sb.files.write("/tmp/x", b"async")
                assert await sb.files.read("/tmp/x") == b"async"
                assert [f.name for f in await sb.files.list("/tmp") if f.name == "x"] == ["x"]
            ids = [s.id for s in sandboxes]
            for i in ids:
                with pytest.raises(forkd.NotFoundError):
                    await c.sandboxes.get(i)

    asyncio.run(main())


def test_ttl_and_renew(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG, ttl_secs=300) as sb:
        assert sb.info.ttl_secs == 300
        first_expiry = sb.info.expires_at_unix
        assert first_expiry > 0
        info = sb.renew(600)
        assert info.ttl_secs == 600 and info.expires_at_unix >= first_expiry + 299
        assert sb.info is info
        assert sb.renew(0).expires_at_unix == 0


def test_workspace_life_cycle(e2e_client: forkd.Client, e2e_snapshot) -> None:
    name = "pyws"
    ws = e2e_client.workspaces.create(name, E2E_TAG, labels={"k": "v"})
    try:
        assert (ws.status, ws.source_snapshot_tag, dict(ws.labels)) == ("running", E2E_TAG, {"k": "v"})
        sb = e2e_client.sandboxes.get(ws.live_sandbox_id)
        assert sb.info.workspace == name
        sb.files.write("/tmp/keep", b"kept across suspend")
        with pytest.raises(forkd.ConflictError):
            e2e_client.workspaces.create(name, E2E_TAG)
        ws = e2e_client.workspaces.suspend(name)
        assert ws.status == "suspended" and ws.state_tag and not ws.live_sandbox_id
        with pytest.raises(forkd.NotFoundError):
            sb.refresh()
        ws = e2e_client.workspaces.resume(name)
        assert ws.status == "running" and ws.live_sandbox_id != sb.id
        resumed = e2e_client.sandboxes.get(ws.live_sandbox_id)
        assert resumed.files.read("/tmp/keep") == b"kept across suspend"
        assert [w.name for w in e2e_client.workspaces.list()] == [name]
        assert e2e_client.workspaces.get(name).live_sandbox_id == resumed.id
    finally:
        gone = e2e_client.workspaces.delete(name)
    assert ws.state_tag in gone.deleted_snapshots
    with pytest.raises(forkd.NotFoundError):
        e2e_client.workspaces.get(name)
    # The source snapshot is never deleted with a workspace.
    assert e2e_client.snapshots.get(E2E_TAG).status == "ready"


def test_hot_pool(e2e_daemon: Daemon, e2e_client: forkd.Client, e2e_snapshot) -> None:
    pool = e2e_client.snapshots.set_pool(E2E_TAG, 1)
    assert (pool.tag, pool.target, pool.network) == (E2E_TAG, 1, "none")
    deadline = time.monotonic() + 120
    while [p.ready for p in e2e_client.snapshots.pools() if p.tag == E2E_TAG] != [1]:
        assert time.monotonic() < deadline, e2e_client.snapshots.pools()
        time.sleep(0.2)
    try:
        with e2e_client.fork(E2E_TAG) as sandboxes:
            assert sandboxes[0].info.spawn_phases.pooled
            assert sandboxes[0].exec(["hostname"]).stdout.strip() == sandboxes[0].info.hostname
    finally:
        pool = e2e_client.snapshots.set_pool(E2E_TAG, 0)
    assert pool.target == 0

    async def main() -> None:
        async with forkd.aio.Client(e2e_daemon.url, token=e2e_daemon.token) as c:
            with pytest.raises(forkd.InvalidArgumentError):
                await c.snapshots.set_pool(E2E_TAG, 1, network="bridge")
            assert all(p.target == 0 for p in await c.snapshots.pools())

    asyncio.run(main())
