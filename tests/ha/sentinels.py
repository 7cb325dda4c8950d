"""A real Redis primary, one replica and three Sentinels on free loopback ports, for the HA tests.

::

    with SentinelCluster(tmp_path) as cluster:
        url = cluster.url                       # redis+sentinel://127.0.0.1:P1,…/qs/0
        cluster.kill_primary()                  # SIGKILL; the Sentinels promote the replica
        cluster.wait_for_failover()             # until they name the new primary
        cluster.restart_old_primary()           # it comes back and is made the new replica

Sentinels are ``redis-server CONFIG --sentinel`` with a generated config (each rewrites its
own), fast timings (``down-after-milliseconds`` 1000) and quorum 2.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.redis_server import RedisServer, _free_port, _ping, require_redis_server

SERVICE = "qs"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
READY_TIMEOUT_S = 30.0
FAILOVER_WAIT_S = 30.0
NO_SYNC_DELAY = ["--repl-diskless-sync-delay", "0"]
"""Whichever server is primary sends a (re)joining replica its data at once, not after the
default 5 s wait for more replicas to join: every cluster start and replica rejoin was 5 s."""


class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``SERVICE`` on ``primary_port``."""

    def __init__(self, binary: str, dir: Path, primary_port: int) -> None:
        self.binary = binary
        self.dir = dir
        self.primary_port = primary_port
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a chosen port may be taken before we bind
            self.port = _free_port()
            config = self.dir / "sentinel.conf"
            config.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.process = subprocess.Popen(
                [self.binary, str(config), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and self.process.poll() is None:
                if _ping(self.port):
                    return self
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"sentinel did not start:\n{self.logs()}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def logs(self) -> str:
        log = self.dir / "sentinel.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


class SentinelCluster:
    """A primary, a replica of it, and three Sentinels that know both and each other."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.binary = require_redis_server()
        self.primary = RedisServer(dir=dir / "a", binary=self.binary, extra_args=NO_SYNC_DELAY)
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelProcess] = []

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{SERVICE}/0"

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, *([self.replica] if self.replica else [])]

    def start(self) -> SentinelCluster:
        self.primary.start()
        self.replica = RedisServer(
            dir=self.dir / "b",
            binary=self.binary,
            extra_args=[*NO_SYNC_DELAY, "--replicaof", "127.0.0.1", str(self.primary.port)],
        ).start()
        assert self.primary.port is not None
        self.sentinels = [
            SentinelProcess(self.binary, self.dir / f"sentinel{i}", self.primary.port).start()
            for i in range(3)
        ]
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until the replica is in sync and every Sentinel sees it and the two others (a
        failover needs the quorum and a known replica)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._ready():
                return
            time.sleep(0.2)
        raise RuntimeError("the Sentinels did not converge:\n" + self.sentinels[0].logs())

    def _ready(self) -> bool:
        assert self.replica is not None
        replica = redis.Redis(port=self.replica.port, decode_responses=True)
        try:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        finally:
            replica.close()
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                state = client.sentinel_master(SERVICE)
            finally:
                client.close()
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    def primary_address(self) -> tuple[str, int]:
        """Where the Sentinels say the primary is now."""
        client = self.sentinels[0].client()
        try:
            host, port = client.sentinel_get_master_addr_by_name(SERVICE)
        finally:
            client.close()
        return str(host), int(port)

    def current_primary(self) -> RedisServer:
        port = self.primary_address()[1]
        return next(server for server in self.servers if server.port == port)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary; returns it (dead)."""
        dead = self.current_primary()
        dead.kill()
        return dead

    def wait_for_failover(self, old: RedisServer, timeout_s: float = FAILOVER_WAIT_S) -> float:
        """Until the Sentinels name another primary and it takes writes; returns the seconds."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            try:
                port = self.primary_address()[1]
            except redis.RedisError:
                port = old.port
            if port != old.port:
                client = redis.Redis(port=port, decode_responses=True)
                try:
                    if client.info("replication").get("role") == "master":
                        return time.monotonic() - began
                except redis.RedisError:
                    pass
                finally:
                    client.close()
            time.sleep(0.1)
        raise AssertionError(f"no failover in {timeout_s}s:\n{self.sentinels[0].logs()}")

    def restart_as_replica(self, old: RedisServer, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start a dead primary again (empty: no persistence here) once every Sentinel has
        ended the failover and names the new primary, and wait until they have made it a
        replica of the new primary, in sync.

        Not sooner, as DEPLOY.md tells an operator: a Sentinel still holding the old
        configuration (its failover timed out on a loaded machine, or the new one has not
        reached it) sees the old primary alive again and makes the promoted replica a replica
        of it: an empty primary, and every write since the failover gone."""
        deadline = time.monotonic() + timeout_s
        while not self._failover_ended(old):
            if time.monotonic() > deadline:
                raise AssertionError(
                    "the Sentinels did not all end the failover:\n"
                    + "\n".join(s.logs()[-3000:] for s in self.sentinels)
                )
            time.sleep(0.2)
        old.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            client = redis.Redis(port=old.port, decode_responses=True)
            try:
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.2)
        raise AssertionError(f"the old primary did not rejoin:\n{old.logs()}")

    def _failover_ended(self, old: RedisServer) -> bool:
        """Every Sentinel names the same primary, not ``old``, with no failover in progress."""
        named = set()
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                state = client.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if "failover_in_progress" in str(state.get("flags", "")).split(","):
                return False
            named.add(int(state["port"]))
        return len(named) == 1 and old.port not in named

    def reset(self) -> None:
        """Make a cluster that a test has used as good as new, for the next test: the replica
        running again and in sync, the data gone. Only for tests that never kill the primary (a
        failover cannot be undone): raises AssertionError when the primary has moved."""
        assert self.replica is not None
        assert self.primary_address()[1] == self.primary.port, "the primary moved: not reusable"
        if not self.replica.running:
            self.replica.start()
        primary = redis.Redis(port=self.primary.port, decode_responses=True)
        try:
            primary.flushall()
            # Until the replica has applied everything up to the flush (WAIT counts it).
            deadline = time.monotonic() + READY_TIMEOUT_S
            while int(primary.wait(1, 1000)) < 1:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the replica did not resync:\n{self.replica.logs()}")
        finally:
            primary.close()
        self._wait_ready()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
