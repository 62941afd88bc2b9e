"""Runs the curl examples of docs/rest.md against a real daemon.

An example is a ```sh block preceded by ``<!-- rest-test: always -->`` (runs
against any daemon) or ``<!-- rest-test: e2e -->`` (needs a forked sandbox,
FORKD_E2E=1), and followed by a ```json block with the documented answer
(NDJSON: one object per line) or a ```text block (raw output, compared
exactly). The ``<!-- rest-test: setup -->`` block is
run first, with its URL and token replaced by the test daemon's.

Answers carry timestamps, digests and ids, so they are compared by shape:
the same keys at every level, the same JSON types, empty lists where the
document shows one, and the exact error ``code`` for error bodies.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, List, Tuple

import pytest

import forkd

from .conftest import E2E_TAG, Daemon

DOC = Path(__file__).resolve().parents[3] / "docs" / "rest.md"
EXAMPLE = re.compile(r"<!-- rest-test: (\w+) -->\n```sh\n(.*?)\n```\n(?:```(json|text)\n(.*?)\n```)?", re.S)
DOC_URL = "FORKD_URL=http://127.0.0.1:8889"
DOC_TOKEN = "FORKD_TOKEN=$(cat /var/lib/forkd/token)"


def examples() -> List[Tuple[str, str, Tuple[str, str]]]:
    """(kind, command, (answer format "json"|"text", documented answer))."""
    return [(k, cmd, (fmt, resp)) for k, cmd, fmt, resp in EXAMPLE.findall(DOC.read_text())]


def setup_block(url: str, token: str) -> str:
    blocks = [cmd for k, cmd, _ in examples() if k == "setup"]
    assert len(blocks) == 1, "docs/rest.md needs exactly one setup block"
    block = blocks[0]
    assert DOC_URL in block and DOC_TOKEN in block, block
    return block.replace(DOC_URL, f"FORKD_URL={url}").replace(DOC_TOKEN, f"FORKD_TOKEN='{token}'")


def parse_lines(text: str) -> List[Any]:
    """One JSON value, or NDJSON (one value per line)."""
    text = text.strip()
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def same_shape(doc: Any, got: Any, where: str = "$") -> None:
    if isinstance(doc, dict):
        assert isinstance(got, dict), f"{where}: expected an object, got {got!r}"
        assert set(got) == set(doc), f"{where}: keys {sorted(got)} != documented {sorted(doc)}"
        for k in doc:
            if k == "code":
                assert got[k] == doc[k], f"{where}.code: {got[k]!r} != documented {doc[k]!r}"
            same_shape(doc[k], got[k], f"{where}.{k}")
    elif isinstance(doc, list):
        assert isinstance(got, list), f"{where}: expected an array, got {got!r}"
        if not doc:
            assert got == [], f"{where}: documented empty, got {got!r}"
        for i, item in enumerate(got):
            same_shape(doc[0], item, f"{where}[{i}]")
    elif isinstance(doc, bool):
        assert isinstance(got, bool), f"{where}: expected a boolean, got {got!r}"
    elif isinstance(doc, (int, float)):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{where}: expected a number, got {got!r}"
    elif isinstance(doc, str):
        assert isinstance(got, str), f"{where}: expected a string, got {got!r}"
    else:
        assert got == doc, f"{where}: {got!r} != {doc!r}"


def run_example(cmd: str, answer: Tuple[str, str], url: str, token: str, extra_env: dict) -> None:
    fmt, documented = answer
    assert shutil.which("curl"), "curl is needed to run the REST examples"
    script = "set -eu\n" + setup_block(url, token) + "\n" + cmd + "\n"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **extra_env}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr}"
    assert documented, "a tested example needs a documented ```json or ```text answer"
    if fmt == "text":
        # Raw output (file bytes): compared exactly, up to trailing newlines.
        assert out.stdout.rstrip("\n") == documented.rstrip("\n"), out.stdout
        return
    got_lines, doc_lines = parse_lines(out.stdout), parse_lines(documented)
    assert got_lines, f"no answer: {out.stderr}"
    if len(doc_lines) == 1:
        assert len(got_lines) == 1, f"expected one JSON value, got {out.stdout!r}"
        same_shape(doc_lines[0], got_lines[0])
    else:
        # NDJSON: each line has the shape of the documented line with its keys.
        for line in got_lines:
            candidates = [d for d in doc_lines if isinstance(d, dict) and set(d) == set(line)]
            assert candidates, f"line {line!r} matches no documented line"
            same_shape(candidates[0], line)


def test_doc_has_examples() -> None:
    kinds = [k for k, _, _ in examples()]
    assert set(kinds) <= {"setup", "always", "e2e"}, kinds
    assert kinds.count("always") >= 10 and kinds.count("e2e") >= 8, kinds


def test_shape_check_rejects_differences() -> None:
    # The comparison itself must be able to fail.
    same_shape({"a": [1], "code": "NOT_FOUND"}, {"a": [2, 3], "code": "NOT_FOUND"})
    for doc, got in [
        ({"a": 1}, {"a": 1, "b": 2}),
        ({"a": 1}, {"a": "1"}),
        ([], [1]),
        ({"code": "NOT_FOUND"}, {"code": "INVALID_ARGUMENT"}),
        ({"ok": True}, {"ok": 1}),
    ]:
        with pytest.raises(AssertionError):
            same_shape(doc, got)


@pytest.mark.parametrize("index", [i for i, (k, _, _) in enumerate(examples()) if k == "always"])
def test_rest_example(index: int, daemon: Daemon) -> None:
    _, cmd, documented = examples()[index]
    run_example(cmd, documented, daemon.url, daemon.token or "", {})


@pytest.mark.e2e
@pytest.mark.parametrize("index", [i for i, (k, _, _) in enumerate(examples()) if k == "e2e"])
def test_rest_example_e2e(index: int, e2e_daemon: Daemon, e2e_snapshot) -> None:
    _, cmd, documented = examples()[index]
    with e2e_daemon.client() as c:
        with c.sandbox(E2E_TAG) as sb:
            sb.files.write("/tmp/hello.txt", b"hello")
            try:
                run_example(cmd, documented, e2e_daemon.url, e2e_daemon.token or "", {"SANDBOX": sb.id})
            finally:
                for ws in c.workspaces.list():
                    c.workspaces.delete(ws.name)
                # Branch examples leave snapshots; keep only the shared one.
                for snap in c.snapshots.list():
                    if snap.tag != E2E_TAG and snap.parent_tag == E2E_TAG and not snap.dependents:
                        try:
                            c.snapshots.delete(snap.tag)
                        except forkd.ForkdError:
                            pass
