"""Runs the Python examples of clients/python/README.md verbatim.

Each fenced ```python block is preceded by an HTML comment saying when it
can run: ``<!-- readme-test: always -->`` against any daemon, or
``<!-- readme-test: e2e -->`` only where microVMs can be forked. The blocks
read FORKD_URL and FORKD_TOKEN, as a reader's program would.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

import pytest

from .conftest import Daemon

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)\n```", re.S)


def blocks() -> List[Tuple[str, str]]:
    found = BLOCK.findall(README.read_text())
    return [(kind, code) for kind, code in found]


def test_readme_has_examples() -> None:
    kinds = [k for k, _ in blocks()]
    assert kinds.count("always") >= 1 and kinds.count("e2e") >= 1, kinds
    assert set(kinds) <= {"always", "e2e"}
    # Every python block is marked, so none escapes testing.
    assert README.read_text().count("```python") == len(kinds)


def _exec(code: str, url: str, token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    monkeypatch.setenv("FORKD_URL", url)
    monkeypatch.setenv("FORKD_TOKEN", token)
    monkeypatch.delenv("FORKD_TOKEN_FILE", raising=False)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return capsys.readouterr().out


@pytest.mark.parametrize("index", [i for i, (k, _) in enumerate(blocks()) if k == "always"])
def test_readme_example(index: int, daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = _exec(blocks()[index][1], daemon.url, daemon.token or "", monkeypatch, capsys)
    assert "NOT_FOUND" in out and "wrong token" in out, out


@pytest.mark.e2e
@pytest.mark.parametrize("index", [i for i, (k, _) in enumerate(blocks()) if k == "e2e"])
def test_readme_example_e2e(index: int, e2e_daemon: Daemon, e2e_snapshot, monkeypatch, capsys) -> None:
    out = _exec(blocks()[index][1], e2e_daemon.url, e2e_daemon.token or "", monkeypatch, capsys)
    assert out.strip(), "the example printed nothing"
    # Nothing the examples forked is left running.
    with e2e_daemon.client() as c:
        assert c.sandboxes.list() == []
