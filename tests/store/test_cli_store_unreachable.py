"""A command that opens the store, pointed at a Redis where nothing listens (a free port):
one line on stderr saying where it looked and why (never the password), a non-zero exit, no
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenserve.cli.main import main
from tests.processes import free_port


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> str:
    """A redis:// URL (with a password) on a port where nothing listens."""
    monkeypatch.delenv("QWENSERVE_STORE", raising=False)
    # In this process, one reconnect try (not six, ~3.5 s of backoff) before giving up: the
    # message is what is checked, and the subprocess test keeps the real retry count.
    monkeypatch.setattr("qwenserve.store.redis.client.RECONNECT_RETRIES", 1)
    return f"redis://admin:hunter2@127.0.0.1:{free_port()}/0"


def _expected(url: str) -> str:
    where = url.replace("admin:hunter2@", "")
    return f"qwenserve: the job store at {where} cannot be reached: "


def test_status_says_it_in_one_line_and_exits_non_zero(nowhere: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWENSERVE_")}
    done = subprocess.run(
        [sys.executable, "-m", "qwenserve.cli.main", "status", "--store", nowhere],
        env={**env, "QWENSERVE_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(_expected(nowhere)), lines[0]
    assert "Connection refused" in lines[0] and "hunter2" not in lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--json"],
        ["keys", "list"],
        ["keys", "create", "--credits", "1"],
        ["keys", "usage"],
    ],
    ids=" ".join,
)
def test_every_store_command_ends_in_the_same_line(
    command: list[str], nowhere: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--store", nowhere, "--data-dir", str(tmp_path)])
    message = str(exited.value.code)
    assert message.startswith(_expected(nowhere)), message
    assert "\n" not in message and "hunter2" not in message
    assert capsys.readouterr().out == ""
