"""`qwenserve run --server URL`: against a real server, writes the image; Ctrl-C cancels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.processes import Server


def remote_run(server: Server, key: str, out: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "qwenserve.cli.main", "run", "qwen-image-fast"),
        *("--server", server.url, "--api-key", key, "--prompt", "a lighthouse"),
        *("--param", "steps=2", "--param", "seed=7", "--out", str(out), *extra),
    ]


def credits_of(server: Server, key: str) -> float:
    response = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key})
    return float(response.json()["credits"])


def test_remote_run_writes_the_image(server: Server, tmp_path: Path) -> None:
    key = server.create_key(credits=1.0)
    out = tmp_path / "remote.png"
    done = subprocess.run(
        remote_run(server, key, out), capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (256, 256)
    assert "seed 7" in done.stderr and "submitted" in done.stderr
    assert credits_of(server, key) == pytest.approx(1.0 - 0.02)


def test_remote_run_refuses_a_bad_field_before_sending(server: Server, tmp_path: Path) -> None:
    key = server.create_key(credits=1.0)
    done = subprocess.run(
        remote_run(server, key, tmp_path / "x.png", "--param", "steps=99"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "steps" in done.stderr
    assert credits_of(server, key) == pytest.approx(1.0), "nothing sent, nothing charged"


def test_remote_run_ctrl_c_cancels_the_job(make_server: object, tmp_path: Path) -> None:
    idle: Server = make_server("--workers", "0")  # type: ignore[operator]
    idle.start()  # no worker: the job waits in the queue until cancelled
    key = idle.create_key(credits=1.0)
    process = subprocess.Popen(
        remote_run(idle, key, tmp_path / "never.png"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    request_id = None
    while request_id is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if "submitted" in line:
            request_id = line.split("submitted", 1)[1].split()[0]
    assert request_id, "the CLI never said what it submitted"
    time.sleep(0.5)  # into the polling loop
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(30) == 130, rest
    assert "cancelled" in rest
    status = httpx.get(
        f"{idle.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}
    ).json()
    assert status["status"] == "FAILED" and status["error"].startswith("cancelled")
    assert credits_of(idle, key) == pytest.approx(1.0), "refunded"
    assert not (tmp_path / "never.png").exists()
