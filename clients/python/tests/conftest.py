"""Fixtures that run the client against a real forkd-server process.

The daemon binary comes from $FORKD_SERVER_BIN, else the cargo target dir
($CARGO_TARGET_DIR or <repo>/target). A missing binary fails the tests that
need it rather than skipping them: a green run must mean the client was
really exercised.

Tests that need microVMs run only with FORKD_E2E=1; they share one daemon and
one snapshot (tag "py", image $FORKD_E2E_IMAGE, default "python").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

import forkd

REPO = Path(__file__).resolve().parents[3]
#: Passes the daemon's token checks (>= 16 bytes, not a placeholder).
TOKEN = "tKq2r9VfX81mWz4LcN7pHs0dJy5uBe3a"
E2E = os.environ.get("FORKD_E2E") == "1"
E2E_TAG = "py"


def server_bin() -> Path:
    env = os.environ.get("FORKD_SERVER_BIN")
    if env:
        p = Path(env)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        p = target / "debug" / "forkd-server"
    if not p.is_file():
        pytest.fail(f"forkd-server not found at {p}: run `cargo build -p forkd-server` or set FORKD_SERVER_BIN")
    return p


class Daemon:
    """A forkd-server on an ephemeral loopback port with a token file."""

    def __init__(self, extra_args: Optional[list] = None, token: Optional[str] = TOKEN) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="forkd-py-"))
        self.data_dir = self.tmp / "data"
        self.token = token
        args = [str(server_bin()), "--bind", "127.0.0.1:0", "--data-dir", str(self.data_dir), "--log", "warn"]
        if token is not None:
            tf = self.tmp / "token"
            tf.write_text(token)
            tf.chmod(0o600)
            args += ["--token-file", str(tf)]
        if os.environ.get("FORKD_GUEST_DIR"):
            args += ["--guest-dir", os.environ["FORKD_GUEST_DIR"]]
        args += extra_args or []
        self.log = open(self.tmp / "stderr.log", "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log)
        self.url = self._wait_listening()

    def _wait_listening(self, timeout: float = 180.0) -> str:
        found: list = []

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if not found and line.startswith("forkd-server listening on "):
                    found.append(line.rsplit(" ", 1)[1])
            # Keep draining so the daemon never blocks on a full pipe.

        threading.Thread(target=read, daemon=True).start()
        end = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"forkd-server exited with {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"forkd-server did not print its address within {timeout}s: {self.stderr()}")
            time.sleep(0.05)
        return found[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        self.log.flush()
        return (self.tmp / "stderr.log").read_text(errors="replace")[-4000:]

    def client(self, **kw: object) -> forkd.Client:
        kw.setdefault("token", self.token)
        return forkd.Client(self.url, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Sandboxes outlive the daemon by design (they are adopted on the
            # next start); a test daemon must not leave VMs behind.
            try:
                with self.client(timeout=30) as c:
                    c.sandboxes.kill(all=True)
            except forkd.ForkdError:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """A fresh daemon per test module, so state from one module (snapshots,
    sandboxes) never leaks into another's expectations."""
    d = Daemon()
    yield d
    d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[forkd.Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture(scope="session")
def e2e_daemon() -> Iterator[Daemon]:
    if not E2E:
        pytest.skip("needs microVMs: set FORKD_E2E=1 (guest assets from scripts/build-guest.sh)")
    d = Daemon()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def e2e_snapshot(e2e_daemon: Daemon) -> forkd.types.SnapshotInfo:
    """The shared snapshot every VM test forks from, created once."""
    image = os.environ.get("FORKD_E2E_IMAGE", "python")
    timeout = float(os.environ.get("FORKD_E2E_TIMEOUT", "900"))
    with e2e_daemon.client() as c:
        return c.snapshots.create(E2E_TAG, image=image, timeout=timeout)


@pytest.fixture
def e2e_client(e2e_daemon: Daemon) -> Iterator[forkd.Client]:
    with e2e_daemon.client() as c:
        yield c
