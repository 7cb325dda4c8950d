"""Real qwenserve processes (servers, workers) on free ports, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def qwenserve(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    """Run the CLI; returns stdout (raises with stderr on failure)."""
    done = subprocess.run(
        [sys.executable, "-m", "qwenserve.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"qwenserve {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


class _Child:
    """Log reading, kill -9 and graceful stop for a child process with a log file."""

    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (drain), then kill -9 if it does not exit in time."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Server(_Child):
    """One `qwenserve serve` process; restartable on the same data dir."""

    data_dir: Path
    cache_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "QWENSERVE_DATA_DIR": str(self.data_dir),
            "QWENSERVE_CACHE_DIR": str(self.cache_dir),
            "QWENSERVE_PURGE_INTERVAL_S": "0.5",
            "QWENSERVE_LOG_LEVEL": "INFO",
            **self.extra_env,
        }

    def start(self, wait: bool = True) -> Server:
        self.log_path = self.data_dir / f"server-{self.port}-{time.monotonic_ns()}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qwenserve.cli.main",
                "serve",
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy in {timeout_s}s:\n{self.logs()}")

    def terminate(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def create_key(self, *extra: str, credits: float = 100.0, rpm: int = 0) -> str:
        out = qwenserve(
            "keys",
            "create",
            "--credits",
            str(credits),
            "--rpm",
            str(rpm),
            *extra,
            # AWS_*: a server with S3 media opens (and checks) its bucket in `keys` too.
            env={k: v for k, v in self.env.items() if k.startswith(("QWENSERVE_", "AWS_"))},
        )
        return out.strip().splitlines()[-1]


@dataclass
class WorkerProcess(_Child):
    """One `qwenserve worker` process against a shared store."""

    store_url: str
    data_dir: Path
    cache_dir: Path
    args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"worker-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "QWENSERVE_DATA_DIR": str(self.data_dir),
            "QWENSERVE_CACHE_DIR": str(self.cache_dir),
            "QWENSERVE_STORE": self.store_url,
            **self.extra_env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qwenserve.cli.main", "worker", *self.args],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        return self
