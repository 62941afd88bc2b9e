"""Processes, terminals and file watches against real microVMs: detached
processes with attach, signals and stdin; interactive exec on a PTY;
file-system events. Runs only with FORKD_E2E=1."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Iterable, Iterator, List, Tuple

import pytest

import forkd
import forkd.aio

from .conftest import E2E_TAG, Daemon

pytestmark = pytest.mark.e2e

#: Prints "tick 0", "tick 1", ... five times a second until stopped.
COUNTER = 'i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.2; done'


def read_until(chunks: Iterable[Tuple[str, bytes]], needle: bytes) -> Tuple[bytes, List[str]]:
    """Output (and the streams it came on) up to the chunk holding ``needle``;
    the process's own timeout ends the stream if it never comes."""
    seen, kinds = b"", []
    for kind, data in chunks:
        seen += data
        kinds.append(kind)
        if needle in seen:
            return seen, kinds
    raise AssertionError(f"{needle!r} never arrived; got {seen!r}")


async def aread_until(chunks: AsyncIterator[Tuple[str, bytes]], needle: bytes) -> bytes:
    seen = b""
    async for _, data in chunks:
        seen += data
        if needle in seen:
            return seen
    raise AssertionError(f"{needle!r} never arrived; got {seen!r}")


def events_until(events: Iterator[forkd.FileEvent], done: Callable[[forkd.FileEvent], bool]) -> List[Tuple[str, str]]:
    """(kind, path) of each event up to the one ``done`` accepts, with
    repeats in a row (several writes of one file) folded."""
    out: List[Tuple[str, str]] = []
    for ev in events:
        item = (ev.kind, ev.path)
        if not out or out[-1] != item:
            out.append(item)
        if done(ev):
            return out
    raise AssertionError(f"the watch ended early: {out}")


def test_process_detached_attach_signal(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        p = sb.start_process(COUNTER, tag="counter", timeout=120)
        assert (p.tag, p.args, p.running, p.pty, p.exit) == ("counter", ("sh", "-c", COUNTER), True, False, None)
        assert p.pid > 1 and p.started_unix_ms > 0
        listed = {q.tag: q for q in sb.processes()}
        assert listed["counter"].pid == p.pid and listed["counter"].running
        with pytest.raises(forkd.ConflictError):  # tags are unique in the sandbox
            sb.start_process(["true"], tag="counter")

        # The replay starts at the first line; then the output is live.
        with sb.attach("counter") as stream:
            seen, kinds = read_until(stream, b"tick 3\n")
            assert seen.startswith(b"tick 0\ntick 1\n") and set(kinds) == {"stdout"}
            assert stream.info is not None and stream.info.pid == p.pid and stream.dropped == 0
            sb.signal("counter", "TERM")
            r = stream.wait()
        assert (r.exit_code, r.signal, r.ok) == (-1, 15, False)
        assert r.stdout.startswith("tick 0\ntick 1\ntick 2\ntick 3\n")

        # It is remembered after its exit, and still attachable (by pid).
        gone = {q.pid: q for q in sb.processes()}[p.pid]
        assert not gone.running and gone.exit is not None and gone.exit.signal == 15
        assert gone.output_bytes == len(r.stdout.encode())
        again = sb.attach(p.pid).wait()
        assert again.signal == 15 and again.stdout == r.stdout
        # From its output_bytes on there is nothing left to see.
        assert sb.attach(gone, from_offset=gone.output_bytes).wait().stdout == ""
        assert sb.attach(p, from_offset=len(b"tick 0\n")).wait().stdout.startswith("tick 1\n")


def test_process_ring_buffer(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        p = sb.start_process("head -c 1500000 /dev/zero | tr '\\0' x; echo end", timeout=60)
        sb.attach(p).wait()  # until it has exited
        total = 1500000 + len("end\n")
        replay = sb.attach(p)
        r = replay.wait()
        # The last 1 MiB is kept; what came before is counted as dropped.
        assert replay.info is not None and replay.info.output_bytes == total
        assert (replay.dropped, len(r.stdout)) == (total - (1 << 20), 1 << 20)
        assert r.stdout.endswith("xxend\n")
        tail = sb.attach(p, from_offset=total - 6)
        assert (tail.wait().stdout, tail.dropped) == ("xxend\n", 0)


def test_process_signal_by_number_and_unknown_names(e2e_client: forkd.Client, e2e_snapshot) -> None:
    import signal

    with e2e_client.sandbox(E2E_TAG) as sb:
        p = sb.start_process(["sleep", "60"], timeout=120)
        sb.signal(p, signal.SIGKILL)
        assert sb.attach(p).wait().signal == 9
        with pytest.raises(forkd.NotFoundError):
            sb.signal("no-such-process", "TERM")
        with pytest.raises(forkd.NotFoundError):
            sb.attach(99999).wait()
        q = sb.start_process(["sleep", "60"], timeout=120)
        with pytest.raises(forkd.InvalidArgumentError):
            sb.signal(q, "NOT-A-SIGNAL")
        sb.signal(q, "kill")


def test_process_stdin(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        head = sb.start_process(["head", "-n", "2"], stdin=True, timeout=60)
        assert head.stdin_open
        sb.send_stdin(head, "one\n")
        sb.send_stdin(head, b"two\n")
        r = sb.attach(head).wait()
        assert (r.exit_code, r.stdout, r.stderr) == (0, "one\ntwo\n", "")

        # cat ends when its stdin does.
        sb.start_process(["cat"], stdin=True, tag="cat", timeout=60)
        sb.send_stdin("cat", "no newline")
        info = sb.close_stdin("cat")
        assert not info.stdin_open
        r = sb.attach("cat").wait()
        assert (r.exit_code, r.stdout) == (0, "no newline")

        wc = sb.start_process(["wc", "-c"], stdin=True, timeout=60)
        big = b"x" * (3 * (1 << 20) + 11)  # several SendStdin calls
        sb.send_stdin(wc, big, close=True)
        assert sb.attach(wc).wait().stdout.strip() == str(len(big))


def test_process_pty_size_and_resize(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        p = sb.start_process(["sh", "-c", "stty size; read line; stty size"], pty=(24, 80), tag="tty", timeout=60)
        assert p.pty and p.stdin_open
        with sb.attach("tty") as stream:
            _, kinds = read_until(stream, b"24 80")
            assert set(kinds) == {"pty"}
            assert sb.resize("tty", 40, 120).pty
            sb.send_stdin("tty", "\n")
            r = stream.wait()
        assert r.exit_code == 0 and "40 120" in r.stdout, r


def test_process_interactive_pty_shell(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        with sb.exec_interactive(["sh"], pty=(24, 80), tag="shell", timeout=120) as term:
            assert term.info is not None and term.info.pty and term.info.tag == "shell" and term.pid
            assert [q.pid for q in sb.processes() if q.tag == "shell"] == [term.pid]
            term.send("stty size\n")
            read_until(term, b"24 80")
            term.resize(50, 132)
            term.send("stty size\n")
            read_until(term, b"50 132")
            term.send("exit 3\n")
            r = term.wait()
        assert r.exit_code == 3 and "50 132" in r.stdout
        with pytest.raises(forkd.ForkdError, match="exited"):
            term.send("too late\n")


def test_process_interactive_pipes_signal_and_detach(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        cat = sb.exec_interactive(["cat"], timeout=60)
        assert cat.info is not None and not cat.info.pty
        cat.send("hello\n")
        assert read_until(cat, b"hello\n")[1] == ["stdout"]
        cat.close_stdin()
        r = cat.wait()
        assert (r.exit_code, r.stdout) == (0, "hello\n")

        sleeper = sb.exec_interactive(["sleep", "60"], timeout=120)
        sleeper.signal("INT")
        assert sleeper.wait().signal == 2

        # Leaving the block detaches; the process keeps running.
        with sb.exec_interactive(["sh", "-c", "read x; echo got $x"], tag="later", timeout=60) as first:
            pass
        assert first.result is None
        sb.send_stdin("later", "it\n")
        assert sb.attach("later").wait().stdout == "got it\n"

        with pytest.raises(forkd.NotFoundError):
            sb.exec_interactive(["true"], pty=(24, 80), tag="later2", cwd="/no/such/dir")


def test_process_watch_files(e2e_client: forkd.Client, e2e_snapshot) -> None:
    with e2e_client.sandbox(E2E_TAG) as sb:
        sb.exec("mkdir -p /tmp/w", check=True)
        with sb.watch("/tmp/w") as events:
            sb.exec("echo hi > /tmp/w/a", check=True)
            assert events_until(events, lambda e: e.kind == "write") == [
                ("create", "/tmp/w/a"),
                ("write", "/tmp/w/a"),
            ]
            sb.exec("mv /tmp/w/a /tmp/w/b && mkdir /tmp/w/d", check=True)
            seen: List[forkd.FileEvent] = []
            for ev in events:
                seen.append(ev)
                if ev.is_dir:
                    break
            assert [(e.kind, e.path, e.from_, e.is_dir) for e in seen] == [
                ("rename", "/tmp/w/b", "/tmp/w/a", False),
                ("create", "/tmp/w/d", "", True),
            ]
            # Directories created under the watch are watched too.
            sb.exec("echo x > /tmp/w/d/inner && chmod 600 /tmp/w/d/inner && rm /tmp/w/b", check=True)
            assert events_until(events, lambda e: e.kind == "remove") == [
                ("create", "/tmp/w/d/inner"),
                ("write", "/tmp/w/d/inner"),
                ("chmod", "/tmp/w/d/inner"),
                ("remove", "/tmp/w/b"),
            ]
        # Not recursive: changes below the directory are not reported.
        with sb.watch("/tmp/w", recursive=False) as events:
            sb.exec("touch /tmp/w/d/deep && touch /tmp/w/top", check=True)
            assert next(iter(events)) == forkd.FileEvent("create", "/tmp/w/top")
        with pytest.raises(forkd.NotFoundError):
            sb.watch("/tmp/no-such-dir")


def test_process_aio(e2e_daemon: Daemon, e2e_snapshot) -> None:
    async def main() -> None:
        async with forkd.aio.Client(e2e_daemon.url, token=e2e_daemon.token) as c:
            async with c.sandbox(E2E_TAG) as sb:
                p = await sb.start_process(COUNTER, tag="counter", timeout=120)
                assert [q.tag for q in await sb.processes()] == ["counter"]
                async with sb.attach("counter") as stream:
                    assert (await aread_until(stream, b"tick 2\n")).startswith(b"tick 0\n")
                    assert stream.pid == p.pid
                    await sb.signal(p, "TERM")
                    r = await stream.wait()
                assert (r.exit_code, r.signal) == (-1, 15)

                head = await sb.start_process(["head", "-n", "2"], stdin=True, timeout=60)
                await sb.send_stdin(head, "one\n")
                await sb.send_stdin(head, "two\n")
                r = await sb.attach(head).wait()
                assert (r.exit_code, r.stdout) == (0, "one\ntwo\n")
                cat = await sb.start_process(["cat"], stdin=True, timeout=60)
                await sb.send_stdin(cat, "abc")
                assert not (await sb.close_stdin(cat)).stdin_open
                assert (await sb.attach(cat).wait()).stdout == "abc"

                tty = await sb.start_process(["sh", "-c", "read line; stty size"], pty=(24, 80), timeout=60)
                await sb.resize(tty, 33, 99)
                await sb.send_stdin(tty, "\n")
                assert "33 99" in (await sb.attach(tty).wait()).stdout

                async with sb.exec_interactive(["sh"], pty=(24, 80), timeout=120) as term:
                    assert term.info is not None and term.info.pty
                    await term.send("stty size\n")
                    await aread_until(term, b"24 80")
                    await term.resize(30, 90)
                    await term.send("stty size\n")
                    await aread_until(term, b"30 90")
                    await term.send("exit 4\n")
                    assert (await term.wait()).exit_code == 4
                term2 = await sb.exec_interactive(["cat"], timeout=60)
                await term2.send(b"piped")
                await term2.close_stdin()
                assert (await term2.wait()).stdout == "piped"
                sleeper = await sb.exec_interactive(["sleep", "60"], timeout=120)
                await sleeper.signal(2)
                assert (await sleeper.wait()).signal == 2

                await sb.exec("mkdir -p /tmp/aw", check=True)
                async with sb.watch("/tmp/aw") as events:
                    await sb.exec("echo hi > /tmp/aw/f && rm /tmp/aw/f", check=True)
                    seen: List[Tuple[str, str]] = []
                    async for ev in events:
                        if not seen or seen[-1] != (ev.kind, ev.path):
                            seen.append((ev.kind, ev.path))
                        if ev.kind == "remove":
                            break
                    assert seen == [("create", "/tmp/aw/f"), ("write", "/tmp/aw/f"), ("remove", "/tmp/aw/f")]
                with pytest.raises(forkd.NotFoundError):
                    await sb.watch("/tmp/no-such-dir")
                with pytest.raises(forkd.NotFoundError):
                    await sb.exec_interactive(["true"], cwd="/no/such/dir")

    asyncio.run(main())
