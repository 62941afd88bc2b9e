"""The sync client against a real daemon, for everything that needs no VM."""

from __future__ import annotations

import json
import socket
import urllib.request

import grpc
import pytest

import forkd
from forkd import _common

from .conftest import TOKEN, Daemon


def test_version(client: forkd.Client, daemon: Daemon) -> None:
    v = client.version()
    assert v.api == "v1"
    assert v.backend == "qemu"
    assert v.accel in ("kvm", "tcg")
    assert v.version
    assert v.data_dir == str(daemon.data_dir.resolve())
    assert v.sandboxes == 0


def test_list_snapshots_empty(client: forkd.Client) -> None:
    assert client.snapshots.list() == []
    assert client.snapshots.list(status="ready") == []


def test_list_sandboxes_and_workspaces_empty(client: forkd.Client) -> None:
    assert client.sandboxes.list() == []
    assert client.workspaces.list() == []
    assert client.sandboxes.kill(all=True) == []


def test_wrong_token_is_an_authentication_error(daemon: Daemon) -> None:
    with forkd.Client(daemon.url, token="wrong-but-long-enough-0123456789") as c:
        with pytest.raises(forkd.AuthenticationError) as ei:
            c.snapshots.list()
    assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert ei.value.code_name == "UNAUTHENTICATED"
    assert "invalid bearer token" in ei.value.message


def test_missing_token_is_an_authentication_error(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    monkeypatch.delenv("FORKD_TOKEN_FILE", raising=False)
    monkeypatch.setattr(_common, "DEFAULT_TOKEN_FILE", "/nonexistent/forkd-token")
    with forkd.Client(daemon.url) as c:
        with pytest.raises(forkd.AuthenticationError, match="missing bearer token"):
            c.version()


def test_health_is_open_without_token(daemon: Daemon) -> None:
    with urllib.request.urlopen(f"{daemon.url}/healthz", timeout=10) as r:
        assert json.load(r) == {"ok": True}


def test_get_missing_snapshot_is_not_found(client: forkd.Client) -> None:
    with pytest.raises(forkd.NotFoundError) as ei:
        client.snapshots.get("nope")
    assert ei.value.code_name == "NOT_FOUND"
    assert '"nope"' in ei.value.message
    assert isinstance(ei.value, forkd.ForkdError)


def test_bad_tag_is_invalid_argument(client: forkd.Client) -> None:
    with pytest.raises(forkd.InvalidArgumentError, match="invalid tag"):
        client.snapshots.create("../etc", image="python", wait=False)
    with pytest.raises(forkd.InvalidArgumentError):
        client.snapshots.get("../etc")
    # It is also a ValueError, for callers that validate generically.
    with pytest.raises(ValueError):
        client.snapshots.delete("..")


def test_what_the_backend_cannot_do_names_what_is_missing(client: forkd.Client) -> None:
    with pytest.raises(forkd.ConflictError, match="live_fork needs a VMM") as ei:
        client.fork("py", live_fork=True)
    assert ei.value.code_name == "FAILED_PRECONDITION"
    with pytest.raises(forkd.ConflictError, match="hugepages"):
        client.fork("py", hugepages=True)


def test_remote_needs_a_configured_remote(client: forkd.Client) -> None:
    with pytest.raises(forkd.ConflictError, match="--remote"):
        client.snapshots.push("py", "file:///tmp/forkd-push")
    with pytest.raises(forkd.ConflictError, match="--remote"):
        client.snapshots.pull("py")
    with pytest.raises(forkd.ConflictError, match="--remote"):
        client.snapshots.list_remote()


def test_workspace_errors(client: forkd.Client) -> None:
    with pytest.raises(forkd.NotFoundError, match='snapshot "nope"'):
        client.workspaces.create("w1", "nope")
    with pytest.raises(forkd.NotFoundError, match='workspace "w1"'):
        client.workspaces.get("w1")
    with pytest.raises(forkd.NotFoundError):
        client.workspaces.suspend("w1")
    with pytest.raises(forkd.InvalidArgumentError):
        client.workspaces.get("bad/name")
    # Options become request fields (the daemon names the one it refuses).
    with pytest.raises(forkd.InvalidArgumentError, match="network"):
        client.workspaces.create("w1", "nope", network="bridge")
    with pytest.raises(TypeError, match="bogus"):
        client.workspaces.create("w1", "nope", bogus=1)


def test_streaming_errors_are_typed(client: forkd.Client) -> None:
    # The error of a server stream arrives while iterating, not at the call.
    chunks = client.snapshots.export("anything")
    with pytest.raises(forkd.NotFoundError, match="anything"):
        list(chunks)


def test_client_streaming_errors_are_typed(client: forkd.Client) -> None:
    # Not an archive: refused as such, typed as INVALID_ARGUMENT.
    with pytest.raises(forkd.InvalidArgumentError, match="zstd"):
        client.snapshots.import_("t", [b"abc", b"def"])


def test_fork_of_missing_snapshot_is_not_found(client: forkd.Client) -> None:
    with pytest.raises(forkd.NotFoundError, match="nope"):
        client.fork("nope", n=2)
    with pytest.raises(forkd.NotFoundError):
        with client.sandbox("nope"):
            pass  # pragma: no cover


def test_fork_options_reach_the_daemon(client: forkd.Client) -> None:
    # The daemon refuses these options before looking the snapshot up,
    # naming them: proof that each keyword became its request field.
    with pytest.raises(forkd.ConflictError, match="live_fork"):
        client.fork("nope", live_fork=True)
    with pytest.raises(forkd.InvalidArgumentError, match="network"):
        client.fork("nope", network="bogus")


def test_fork_arguments_are_checked_locally(client: forkd.Client) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        client.fork("py", no_such_option=1)
    with pytest.raises(ValueError):
        client.fork("py", n=0)


def test_sandbox_calls_on_unknown_ids(client: forkd.Client) -> None:
    with pytest.raises(forkd.NotFoundError):
        client.sandboxes.get("sb-aaaaaaaaaaaa")
    with pytest.raises(forkd.InvalidArgumentError, match="sb-"):
        client.sandboxes.get("nope")
    ghost = forkd.Sandbox(client, forkd.types.SandboxInfo(id="sb-aaaaaaaaaaaa"))
    with pytest.raises(forkd.NotFoundError):
        ghost.renew(60)
    with pytest.raises(forkd.NotFoundError):
        ghost.exec(["true"])
    ghost.kill()  # killing a gone sandbox succeeds


def test_process_and_watch_calls_on_unknown_sandbox(client: forkd.Client) -> None:
    ghost = forkd.Sandbox(client, forkd.types.SandboxInfo(id="sb-aaaaaaaaaaaa"))
    with pytest.raises(forkd.NotFoundError):
        ghost.start_process(["sleep", "1"], tag="t")
    with pytest.raises(forkd.NotFoundError):
        ghost.processes()
    with pytest.raises(forkd.NotFoundError):
        ghost.attach("t").wait()
    with pytest.raises(forkd.NotFoundError):
        ghost.signal(1, "TERM")
    with pytest.raises(forkd.NotFoundError):
        ghost.send_stdin("t", b"x", close=True)
    with pytest.raises(forkd.NotFoundError):
        ghost.close_stdin("t")
    with pytest.raises(forkd.NotFoundError):
        ghost.resize("t", 24, 80)
    with pytest.raises(forkd.NotFoundError):
        ghost.exec_interactive(["sh"], pty=(24, 80))
    with pytest.raises(forkd.NotFoundError):
        ghost.watch("/tmp")


def test_process_arguments_are_checked_locally() -> None:
    # An unreachable daemon: every refusal below happens before a call.
    with forkd.Client("http://127.0.0.1:1", token=TOKEN) as c:
        sb = forkd.Sandbox(c, forkd.types.SandboxInfo(id="sb-aaaaaaaaaaaa"))
        with pytest.raises(TypeError):
            sb.start_process([])
        with pytest.raises(ValueError, match="1-1000"):
            sb.start_process("true", pty=(0, 80))
        with pytest.raises(ValueError):
            sb.start_process("true", tag="")
        with pytest.raises(ValueError):
            sb.start_process("true", timeout=0)
        with pytest.raises(ValueError):
            sb.attach(0)
        with pytest.raises(ValueError):
            sb.attach("t", from_offset=-1)
        with pytest.raises(ValueError, match="1-64"):
            sb.signal("t", 99)
        with pytest.raises(ValueError):
            sb.resize("t", 24, 0)
        with pytest.raises(ValueError):
            sb.exec_interactive("sh", pty=(24, 5000))
        with pytest.raises(ValueError, match="absolute"):
            sb.watch("relative/dir")


def test_environment_configuration(daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("FORKD_URL", daemon.url)
    monkeypatch.setenv("FORKD_TOKEN", TOKEN)
    with forkd.Client() as c:
        assert c.url == daemon.url
        assert c.version().api == "v1"
    monkeypatch.delenv("FORKD_TOKEN")
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    tf.chmod(0o600)
    monkeypatch.setenv("FORKD_TOKEN_FILE", str(tf))
    with forkd.Client() as c:
        assert c.snapshots.list() == []
    # An explicit argument wins over the environment.
    with forkd.Client(token="another-token-that-is-long-enough") as c:
        with pytest.raises(forkd.AuthenticationError):
            c.snapshots.list()


def test_loopback_urls_read_the_daemons_token_file(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    monkeypatch.delenv("FORKD_TOKEN_FILE", raising=False)
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    tf.chmod(0o600)
    monkeypatch.setattr(_common, "DEFAULT_TOKEN_FILE", str(tf))
    with forkd.Client(daemon.url) as c:
        assert c.snapshots.list() == []
    # Never sent to a daemon elsewhere.
    assert _common.resolve_token(None, _common.parse_url("http://10.1.2.3:8889")) is None
    assert _common.resolve_token(None, _common.parse_url("http://localhost:8889")) == TOKEN
    # A file others may read is refused with the fix.
    tf.chmod(0o644)
    with pytest.raises(forkd.ForkdError, match="chmod 600"):
        forkd.Client(daemon.url)
    monkeypatch.setenv("FORKD_TOKEN_FILE", str(tf))
    with pytest.raises(forkd.ForkdError, match="chmod 600"):
        forkd.Client("http://10.1.2.3:1")


def test_empty_token_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    tf = tmp_path / "token"
    tf.write_text("  \n")
    monkeypatch.setenv("FORKD_TOKEN_FILE", str(tf))
    with pytest.raises(forkd.ForkdError, match="empty"):
        forkd.Client("http://127.0.0.1:1")


def test_unreachable_daemon_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with forkd.Client(f"http://127.0.0.1:{port}", token=TOKEN, timeout=10) as c:
            with pytest.raises(forkd.UnavailableError):
                c.version()


def test_timeout_is_deadline_exceeded(daemon: Daemon) -> None:
    # The event stream never ends by itself, so the client's default
    # deadline is what stops it.
    with daemon.client(timeout=0.5) as c:
        events = c.sandboxes.events()
        with pytest.raises(forkd.DeadlineExceededError):
            for _ in events:
                pass  # pragma: no cover


@pytest.mark.parametrize(
    "raw,address,secure",
    [
        ("http://127.0.0.1:8889", "127.0.0.1:8889", False),
        ("127.0.0.1:9000", "127.0.0.1:9000", False),
        ("https://forkd.example:8443/", "forkd.example:8443", True),
        ("https://forkd.example", "forkd.example:443", True),
        ("http://[::1]:8889", "[::1]:8889", False),
    ],
)
def test_parse_url(raw: str, address: str, secure: bool) -> None:
    t = _common.parse_url(raw)
    assert (t.address, t.secure) == (address, secure)


@pytest.mark.parametrize("raw", ["", "ftp://host:1", "http://host:1/v1", "http://:80", "http://h:notaport"])
def test_parse_url_refuses(raw: str) -> None:
    with pytest.raises(forkd.ForkdError):
        _common.parse_url(raw)


def test_ca_cert_needs_https(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(forkd.ForkdError, match="not an https"):
        forkd.Client("http://127.0.0.1:1", ca_cert=ca)
    with pytest.raises(forkd.ForkdError, match="CA certificate"):
        forkd.Client("https://127.0.0.1:1", ca_cert=tmp_path / "missing.pem")
