"""E2B's own Python SDKs (`e2b` and `e2b-code-interpreter`, pinned by
scripts/test-clients.sh), unchanged,
against a real forkd daemon and real microVMs, configured only with its
documented environment variables: E2B_API_URL (forkd's /e2b), E2B_SANDBOX_URL
(forkd's address) and E2B_API_KEY (a forkd token). A template is a forkd
snapshot tag.

Runs with FORKD_E2E=1 (it forks VMs).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.request
from typing import Iterator, List

import pytest

from .conftest import E2E, TOKEN, Daemon

import e2b
from e2b import (
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.filesystem.filesystem import FileType

ALICE = "aLiCe-7q2Wm9xZ3vB5nK8pR4tY6uJ1"
BOB = "bOb-5hG8jK2mN6qS9vX3zC7fD1wE4r"
TEMPLATE = "e2b-base"


def share(d: Daemon, tag: str) -> None:
    """Lets every tenant start sandboxes from an admin's snapshot."""
    req = urllib.request.Request(
        f"{d.url}/v1/snapshots/{tag}/share",
        data=json.dumps({"shared": True}).encode(),
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=30).read()


@pytest.fixture(scope="module")
def e2b_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if not E2E:
        pytest.skip("needs microVMs: set FORKD_E2E=1")
    tokens = tmp_path_factory.mktemp("e2b") / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nname = "alice"\nrole = "tenant"\ntoken = "{ALICE}"\n\n'
        f'[[tokens]]\nname = "bob"\nrole = "tenant"\ntoken = "{BOB}"\n'
    )
    tokens.chmod(0o600)
    d = Daemon(extra_args=["--tokens-file", str(tokens)])
    try:
        image = os.environ.get("FORKD_E2E_IMAGE", "python")
        with d.client() as c:
            c.snapshots.create(TEMPLATE, image=image, timeout=900)
        share(d, TEMPLATE)
        yield d
    finally:
        d.stop()


@pytest.fixture
def e2b_env(e2b_daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """The SDK configured the way a user would: three environment variables."""
    monkeypatch.setenv("E2B_API_URL", f"{e2b_daemon.url}/e2b")
    monkeypatch.setenv("E2B_SANDBOX_URL", e2b_daemon.url)
    monkeypatch.setenv("E2B_API_KEY", ALICE)
    for var in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return e2b_daemon


@pytest.fixture
def sbx(e2b_env: Daemon) -> Iterator[Sandbox]:
    s = Sandbox.create(template=TEMPLATE, timeout=600, metadata={"suite": "e2b", "who": "alice"})
    try:
        yield s
    finally:
        s.kill()


def test_commands(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo hello; echo oops >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hello\n", "oops\n")

    seen: List[str] = []
    r = sbx.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    assert "".join(seen) == "line1\nline2\nline3\n"

    r = sbx.commands.run("echo $GREETING from $(pwd)", envs={"GREETING": "hi"}, cwd="/tmp")
    assert r.stdout == "hi from /tmp\n"

    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo bad >&2; exit 3")
    assert ei.value.exit_code == 3
    assert ei.value.stderr == "bad\n"

    # In the background: listed, fed stdin, waited for.
    h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
    assert any(p.pid == h.pid for p in sbx.commands.list())
    sbx.commands.send_stdin(h.pid, "abc\n")
    assert h.wait().stdout == "got:abc\n"

    # Input as a stream (a client-streaming call), then stdin closed.
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, iter(["one\n", b"two\n"]))
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "one\ntwo\n"

    # And killed.
    h = sbx.commands.run("sleep 600", background=True)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code != 0
    assert all(p.pid != h.pid for p in sbx.commands.list())
    assert sbx.commands.kill(999999) is False


def test_pty(sbx: Sandbox) -> None:
    out = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    h_iter_deadline = time.monotonic() + 60
    # One generator over the stream for the whole test (a dropped one would
    # close the stream).
    events = iter(h)

    def collect_until(marker: bytes) -> None:
        for _, _, pty in events:
            if pty:
                out.extend(pty)
            if marker in out or time.monotonic() > h_iter_deadline:
                return

    # The marker is computed, so the echoed command line does not match it.
    sbx.pty.send_stdin(h.pid, b"stty size; echo MARK$((1))\n")
    collect_until(b"MARK1\r\n")
    assert b"24 80" in out
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; echo MARK$((2))\n")
    collect_until(b"MARK2\r\n")
    assert b"30 100" in out
    assert sbx.pty.kill(h.pid) is True


def test_files(sbx: Sandbox) -> None:
    info = sbx.files.write("/tmp/e2b/a.txt", "alpha")
    assert info.path == "/tmp/e2b/a.txt"
    assert sbx.files.read("/tmp/e2b/a.txt") == "alpha"
    assert sbx.files.read("/tmp/e2b/a.txt", format="bytes") == b"alpha"
    assert sbx.files.exists("/tmp/e2b/a.txt")
    assert not sbx.files.exists("/tmp/e2b/nope")
    st = sbx.files.get_info("/tmp/e2b/a.txt")
    assert (st.name, st.type, st.size) == ("a.txt", FileType.FILE, 5)
    assert sbx.files.make_dir("/tmp/e2b/sub/deeper") is True
    assert sbx.files.make_dir("/tmp/e2b/sub/deeper") is False
    sbx.files.write_files([
        {"path": "/tmp/e2b/sub/one.txt", "data": "1"},
        {"path": "/tmp/e2b/sub/two.txt", "data": b"2"},
    ])
    names = sorted(e.name for e in sbx.files.list("/tmp/e2b"))
    assert names == ["a.txt", "sub"]
    deep = sorted(e.path for e in sbx.files.list("/tmp/e2b", depth=2))
    assert "/tmp/e2b/sub/one.txt" in deep and "/tmp/e2b/sub/deeper" in deep
    moved = sbx.files.rename("/tmp/e2b/a.txt", "/tmp/e2b/b.txt")
    assert moved.path == "/tmp/e2b/b.txt"
    assert sbx.files.read("/tmp/e2b/b.txt") == "alpha"
    sbx.files.remove("/tmp/e2b/sub")
    assert not sbx.files.exists("/tmp/e2b/sub/one.txt")
    with pytest.raises(NotFoundException):
        sbx.files.read("/tmp/e2b/missing.txt")

    w = sbx.files.watch_dir("/tmp/e2b")
    try:
        sbx.files.write("/tmp/e2b/watched.txt", "x")
        events = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e.name == "watched.txt" for e in events):
            events += w.get_new_events()
            time.sleep(0.2)
        assert any(e.name == "watched.txt" for e in events), events
    finally:
        w.stop()


def test_lifecycle_pause_resume_and_fork(e2b_env: Daemon) -> None:
    s = Sandbox.create(template=TEMPLATE, timeout=600, metadata={"suite": "life"})
    try:
        assert s.is_running()
        s.set_timeout(900)
        info = s.get_info()
        assert info.sandbox_id == s.sandbox_id
        assert info.metadata == {"suite": "life"}
        assert (info.end_at - info.started_at).total_seconds() > 600
        listed = Sandbox.list(query=e2b.SandboxQuery(metadata={"suite": "life"})).next_items()
        assert [x.sandbox_id for x in listed] == [s.sandbox_id]
        m = s.get_metrics()
        assert len(m) == 1
        assert m[0].cpu_count >= 1 and 0 <= m[0].cpu_used_pct <= 100
        assert 0 < m[0].mem_used < m[0].mem_total
        assert 0 < m[0].disk_used <= m[0].disk_total
        again = Sandbox.connect(s.sandbox_id)
        assert again.commands.run("echo via-connect").stdout == "via-connect\n"

        s.files.write("/root/keep.txt", "kept")
        bg = s.commands.run("sleep 1000", background=True)
        assert s.pause() is True
        assert not s.is_running()
        assert s.pause() is False
        assert Sandbox.get_info(s.sandbox_id).state.value == "paused"
        resumed = Sandbox.connect(s.sandbox_id, timeout=600)
        assert resumed.files.read("/root/keep.txt") == "kept"
        assert any(p.pid == bg.pid for p in resumed.commands.list())

        snap = resumed.create_snapshot()
        child = Sandbox.create(template=snap.snapshot_id, timeout=300)
        try:
            assert child.files.read("/root/keep.txt") == "kept"
        finally:
            child.kill()
        forks = resumed.fork(count=2)
        try:
            assert len(forks) == 2
            for f in forks:
                assert isinstance(f, Sandbox), f
                assert f.files.read("/root/keep.txt") == "kept"
                assert f.sandbox_id != s.sandbox_id
        finally:
            for f in forks:
                if isinstance(f, Sandbox):
                    f.kill()
    finally:
        assert s.kill() is True
    assert not s.is_running()
    assert s.kill() is False


def test_errors_and_tenants(e2b_env: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.connect("inosuchsandbox000000")
    with pytest.raises(SandboxException):
        Sandbox.create(template="no-such-template")
    s = Sandbox.create(template=TEMPLATE, timeout=300)
    try:
        # Another tenant sees nothing of it.
        monkeypatch.setenv("E2B_API_KEY", BOB)
        with pytest.raises(NotFoundException):
            Sandbox.get_info(s.sandbox_id)
        assert Sandbox.kill(s.sandbox_id) is False
        assert all(x.sandbox_id != s.sandbox_id for x in Sandbox.list().next_items())
        # A wrong key is refused as such.
        monkeypatch.setenv("E2B_API_KEY", "wrong-key-wrong-key-wrong-key")
        with pytest.raises(AuthenticationException):
            Sandbox.list().next_items()
        monkeypatch.setenv("E2B_API_KEY", ALICE)
        assert s.is_running()
    finally:
        s.kill()


# ---- the code interpreter (e2b-code-interpreter) ---------------------------

MPL_TEMPLATE = "e2b-mpl"


@pytest.fixture(scope="module")
def mpl_template(e2b_daemon: Daemon) -> str:
    """A template whose image has matplotlib, built the way a user would."""
    from .test_mcp import cli_bin

    env = dict(os.environ, FORKD_URL=e2b_daemon.url, FORKD_TOKEN=TOKEN)
    build = subprocess.run(
        [str(cli_bin()), "image", "build", "mpl", "--from", "python", "--apt", "python3-matplotlib"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    warm = "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt"
    with e2b_daemon.client() as c:
        c.snapshots.create(MPL_TEMPLATE, image="mpl", warm_eval=warm, timeout=900)
    share(e2b_daemon, MPL_TEMPLATE)
    return MPL_TEMPLATE


def test_code_interpreter(e2b_env: Daemon, mpl_template: str) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    s = CodeSandbox.create(template=mpl_template, timeout=600)
    try:
        # State is kept between calls; the last expression is the text.
        s.run_code("x = 20")
        seen: List[str] = []
        ex = s.run_code("print('sum', x + 1)\nx * 2 + 2", on_stdout=lambda m: seen.append(m.line))
        assert ex.text == "42"
        assert ex.logs.stdout == ["sum 21\n"]
        assert seen == ["sum 21\n"]
        assert ex.error is None

        # Printed output streams while the code runs.
        arrivals: List[float] = []
        s.run_code(
            "import time\nprint('early')\ntime.sleep(2)\nprint('late')",
            on_stdout=lambda m: arrivals.append(time.monotonic()),
        )
        done = time.monotonic()
        assert len(arrivals) >= 2, arrivals
        assert done - arrivals[0] >= 1.5, "the first line came only at the end"

        # An exception comes back as an error, not a raise.
        ex = s.run_code("1 / 0")
        assert ex.error is not None
        assert ex.error.name == "ZeroDivisionError"
        assert ex.error.value == "division by zero"
        assert "Traceback" in ex.error.traceback

        # Contexts are separate namespaces.
        ctx = s.create_code_context()
        assert any(c.id == ctx.id for c in s.list_code_contexts())
        ex = s.run_code("x", context=ctx)
        assert ex.error is not None and ex.error.name == "NameError"
        s.run_code("y = 5", context=ctx)
        assert s.run_code("y", context=ctx).text == "5"
        s.restart_code_context(ctx)
        assert s.run_code("y", context=ctx).error is not None
        s.remove_code_context(ctx)
        assert all(c.id != ctx.id for c in s.list_code_contexts())

        # Environment variables for one execution.
        ex = s.run_code("import os\nos.environ.get('MY_VAR')", envs={"MY_VAR": "set"})
        assert ex.text == "'set'"

        # A matplotlib chart is a PNG result.
        ex = s.run_code("plt.plot([1, 2, 3], [4, 1, 9])\nplt.title('t')\nplt.show()")
        pngs = [r.png for r in ex.results if r.png]
        assert len(pngs) == 1, ex
        assert base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        s.kill()
