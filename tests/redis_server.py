"""A real ``redis-server`` on a free loopback port, for the store and cluster tests.

::

    with RedisServer() as server:          # --save "" --appendonly no, in a temp dir
        client = redis.Redis.from_url(server.url)

    durable = RedisServer(appendonly=True, dir=tmp_path / "redis")
    durable.start(); durable.restart(); durable.kill(); durable.start(); durable.stop()

The port and the data folder stay the same across ``restart()`` and ``kill()`` + ``start()``, so
a client's URL keeps working and an append-only file is replayed. A temp folder made here is
deleted by ``stop()``.

The one place the tests look for the binary: ``redis_server_binary()`` (``redis-server`` on
PATH, or the path in ``QWENSERVE_TEST_REDIS_SERVER``). Tests that need it call
``require_redis_server()`` (or carry ``needs_redis``), which skips with what to install, or
fails when ``QWENSERVE_REQUIRE_REDIS=1`` (CI, where a silent skip would hide the Redis suite).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest

MISSING = (
    "needs redis-server on PATH (e.g. apt-get install redis-server, brew install redis), or its "
    "path in QWENSERVE_TEST_REDIS_SERVER"
)
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


def redis_server_binary() -> str | None:
    """The redis-server executable to run, or None when there is none."""
    named = os.environ.get("QWENSERVE_TEST_REDIS_SERVER")
    if named:
        return shutil.which(named)
    return shutil.which("redis-server")


def redis_required() -> bool:
    """True when a missing redis-server must fail the tests rather than skip them."""
    return os.environ.get("QWENSERVE_REQUIRE_REDIS", "").lower() in ("1", "true", "yes")


def require_redis_server() -> str:
    """The binary, else skip the calling test (fail it under ``QWENSERVE_REQUIRE_REDIS=1``)."""
    binary = redis_server_binary()
    if binary is None:
        if redis_required():
            pytest.fail(MISSING + " (QWENSERVE_REQUIRE_REDIS is set)")
        pytest.skip(MISSING)
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    """True once the server answers PING with PONG (not LOADING, not refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process: ``start()``, ``stop()``, ``kill()`` (SIGKILL), ``restart()``.

    Args:
        port: the port to listen on; a free one is chosen on the first start when None.
        appendonly: write an append-only file, so data survives restarts.
        appendfsync: when the append-only file is fsynced: ``everysec`` (Redis' default: a kill
            -9 may lose the last second) or ``always`` (before each reply: an acknowledged write
            survives a kill -9).
        dir: the data folder; a temp folder (removed by ``stop()``) when None.
        binary: the redis-server executable (default: ``redis_server_binary()``).
        extra_args: more command-line options (``["--replicaof", "127.0.0.1", "6379"]``).
    """

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        dir: Path | None = None,
        binary: str | None = None,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.dir = Path(dir) if dir is not None else None
        self.binary = binary
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._own_dir = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port until it is started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; raises RuntimeError if it cannot."""
        if self.running:
            return self
        if self.binary is None:
            self.binary = redis_server_binary()
            if self.binary is None:
                raise RuntimeError(MISSING)
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="qwenserve-redis-"))
            self._own_dir = True
        self.dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else 5):  # a chosen port may be taken before we bind
            if not fixed_port:
                self.port = _free_port()
            if self._spawn():
                return self
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.logs()}")

    def _spawn(self) -> bool:
        assert self.dir is not None and self.port is not None and self.binary is not None
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: most likely the port was taken
            if _ping(self.port):
                return True
            time.sleep(0.02)
        self._terminate()
        return False

    def logs(self) -> str:
        log = self.dir / "redis.log" if self.dir is not None else None
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def _terminate(self) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no chance to flush; ``start()`` again replays what reached the disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def restart(self) -> RedisServer:
        """A clean shutdown and a start on the same port and folder."""
        self._terminate()
        return self.start()

    def stop(self) -> None:
        """Stop the server and remove the temp folder if this object made it."""
        self._terminate()
        if self._own_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self._own_dir = False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


needs_redis = pytest.mark.skipif(
    redis_server_binary() is None and not redis_required(), reason=MISSING
)
"""A mark for tests that start their own servers: skipped (or failing) as above."""
