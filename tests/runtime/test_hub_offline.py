"""``--weights hub`` without internet: a clear error in seconds, never a hang.

Only loopback addresses are used: a port that refuses connections, a server that accepts and
never answers, and one that answers.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.errors import InferenceError
from qwenserve.runtime import Engine, EngineConfig
from qwenserve.runtime.hub_access import HubSettings, probe_endpoint, require_cached


@pytest.fixture
def refused_endpoint() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A loopback server that completes the TCP handshake (the kernel's backlog does) and
    never sends a byte, like a firewall that swallows traffic."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def answering_endpoint() -> Iterator[str]:
    """A loopback HTTP server that answers every request with 404."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_endpoint_says_to_go_offline(refused_endpoint: str) -> None:
    with pytest.raises(InferenceError) as caught:
        probe_endpoint(refused_endpoint, timeout_s=2.0)
    assert f"cannot reach {refused_endpoint}" in caught.value.message
    assert "set HF_HUB_OFFLINE=1" in caught.value.message


def test_a_silent_endpoint_fails_in_bounded_time(silent_endpoint: str) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceError, match=r"no answer in time.*HF_HUB_OFFLINE=1"):
        probe_endpoint(silent_endpoint, timeout_s=0.5)
    assert time.monotonic() - started < 5.0


def test_an_answering_endpoint_passes(answering_endpoint: str) -> None:
    probe_endpoint(answering_endpoint, timeout_s=2.0)  # a 404 is an answer: the hub is there


def test_offline_names_the_missing_repo_and_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(InferenceError) as caught:
        require_cached("Qwen/Qwen-Image", cache)
    assert "Qwen/Qwen-Image" in caught.value.message
    assert str(cache) in caught.value.message

    # The same repo, once in the cache as huggingface_hub lays it out, passes.
    snapshot = cache / "models--Qwen--Qwen-Image" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--Qwen--Qwen-Image" / "refs").mkdir()
    (cache / "models--Qwen--Qwen-Image" / "refs" / "main").write_text("a" * 40)
    require_cached("Qwen/Qwen-Image", cache)


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_the_engine_checks_before_loading_from_the_hub(
    offline: bool, refused_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a served worker meets when a job needs a base that is not loaded yet.
    settings = HubSettings(endpoint=refused_endpoint, offline=offline, cache_dir=tmp_path)
    monkeypatch.setattr(HubSettings, "current", classmethod(lambda cls: settings))
    engine = Engine(EngineConfig(weights="hub", cache_dir=tmp_path / "unused"))
    expected = "is not in the Hugging Face cache" if offline else "cannot reach"
    with pytest.raises(InferenceError, match=expected):
        engine.load("qwen-image")


# --- the commands: print the reason and exit non-zero, promptly -------------------------------


def _hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QWENSERVE_"))}
    if "PYTHONPATH" in env:  # the child runs elsewhere: keep this checkout's sources first
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(part).resolve()) for part in env["PYTHONPATH"].split(os.pathsep) if part
        )
    env.update(HF_HOME=str(tmp_path / "hf-home"), QWENSERVE_DATA_DIR=str(tmp_path / "data"))
    env["COLUMNS"] = "1000"  # rich wraps long lines at the terminal width
    env.update(extra)
    return env


COMMANDS = {
    "serve": ["serve", "--weights", "hub", "--port", "0"],
    "worker": ["worker", "--weights", "hub"],
    "run": ["run", "qwen-image", "--weights", "hub", "--prompt", "a fox", "--out"],
}


def _qwenserve(
    command: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    args = [*COMMANDS[command], *([str(tmp_path / "x.png")] if command == "run" else [])]
    return subprocess.run(
        [sys.executable, "-m", "qwenserve.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_refuse_an_unreachable_hub(
    command: str, refused_endpoint: str, tmp_path: Path
) -> None:
    env = _hub_env(tmp_path, HF_ENDPOINT=refused_endpoint)
    done = _qwenserve(command, env, tmp_path)
    assert done.returncode != 0
    assert f"cannot reach {refused_endpoint}" in done.stderr
    assert "set HF_HUB_OFFLINE=1" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_serve_does_not_hang_on_a_silent_hub(silent_endpoint: str, tmp_path: Path) -> None:
    started = time.monotonic()
    done = _qwenserve("serve", _hub_env(tmp_path, HF_ENDPOINT=silent_endpoint), tmp_path)
    assert done.returncode != 0
    assert "no answer in time" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert time.monotonic() - started < 60


def test_run_offline_names_the_repo_missing_from_the_cache(tmp_path: Path) -> None:
    env = _hub_env(tmp_path, HF_HUB_OFFLINE="1")
    done = _qwenserve("run", env, tmp_path)
    assert done.returncode != 0
    assert "Qwen/Qwen-Image is not in the Hugging Face cache" in done.stderr
    assert str(tmp_path / "hf-home" / "hub") in done.stderr
