"""Finding a served process's engine child and watching a job from outside, for the kill -9
tests (Linux /proc)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


def engine_child(parent_pid: int, timeout_s: float = 120) -> int:
    """The pid of ``parent_pid``'s engine process (multiprocessing's spawn child), waiting
    until one is up."""
    return wait_for(
        lambda: spawned_child(parent_pid), timeout_s, f"an engine child of {parent_pid}"
    )


def spawned_child(parent_pid: int) -> int | None:
    for task in Path(f"/proc/{parent_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                return int(pid)
    return None


def maps_torch(pid: int) -> bool:
    """Whether ``pid`` has torch's native library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid) or None, 10, "its death")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def wait_for(
    probe: Callable[[], T | None],
    timeout_s: float,
    what: str,
    explain: Callable[[], str] | None = None,
) -> T:
    """``probe()``'s first truthy answer; on timeout the assertion says ``explain()`` too (the
    server's log tail: what it did instead)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None and found is not False:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s}s" + (f"\n{explain()}" if explain else ""))


def status(base_url: str, key: str, request_id: str) -> dict[str, object]:
    response = httpx.get(
        f"{base_url}/v2/requests/{request_id}/status", headers={"x-api-key": key}, timeout=10
    )
    assert response.status_code in (200, 422), response.text  # 422: it FAILED
    return dict(response.json())


def denoising(base_url: str, key: str, request_id: str) -> bool:
    """The job is PROCESSING with at least one denoising step reported (an ended job never
    will be: said at once rather than after the caller's whole wait)."""
    now = status(base_url, key, request_id)
    assert now["status"] in ("QUEUED", "PROCESSING"), f"ended before seen denoising: {now}"
    progress = now.get("progress")
    return now["status"] == "PROCESSING" and isinstance(progress, dict) and progress["step"] >= 1


def terminal(base_url: str, key: str, request_id: str) -> dict[str, object] | None:
    now = status(base_url, key, request_id)
    return now if now["status"] in ("COMPLETED", "FAILED") else None


def credits(base_url: str, key: str) -> float:
    response = httpx.get(f"{base_url}/v1/get-user-credits", headers={"x-api-key": key}, timeout=10)
    return float(response.json()["credits"])


def answers_within_a_second(base_url: str, key: str, request_id: str, for_s: float) -> int:
    """Poll the API (health, the job's status, the balance) for ``for_s`` seconds, asserting
    each answer comes within a second; returns how many answered."""
    answered = 0
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        for path in ("/healthz", f"/v2/requests/{request_id}/status", "/v1/get-user-credits"):
            started = time.monotonic()
            response = httpx.get(f"{base_url}{path}", headers={"x-api-key": key}, timeout=1.0)
            elapsed = time.monotonic() - started
            assert response.status_code == 200 and elapsed < 1.0, (path, elapsed)
            answered += 1
        time.sleep(0.1)
    return answered
