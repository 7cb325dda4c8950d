"""Fixtures for the S3 media tests: a real SeaweedFS (tests/s3_server.py) on free ports.

``seaweed`` is one server for the whole folder (most tests only need a bucket, each under its
own prefix); a test that stops the server takes ``own_seaweed``, its own, so nothing else sees
the outage, or ``outage_seaweed``, one per module for such tests, running again at each start.
``s3_env`` puts the AWS variables in this process's environment, as an operator's shell would.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.media.s3 import S3MediaStore
from tests.s3_server import SeaweedServer, require_weed


def _running(dir: Path) -> Iterator[SeaweedServer]:
    """A SeaweedFS in ``dir`` for as long as the fixture lasts (skips without ``weed``)."""
    require_weed()
    with SeaweedServer(dir=dir) as server:
        yield server


@pytest.fixture(scope="package")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from _running(tmp_path_factory.mktemp("seaweed"))


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedServer]:
    yield from _running(tmp_path / "seaweed")


@pytest.fixture(scope="module")
def _module_outage_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from _running(tmp_path_factory.mktemp("outage-seaweed"))


@pytest.fixture
def outage_seaweed(_module_outage_seaweed: SeaweedServer) -> SeaweedServer:
    """A server only this module's outage tests share (one start instead of one per test):
    running at the start of each (started again if a failed test left it stopped)."""
    if not _module_outage_seaweed.running:
        _module_outage_seaweed.start()
    return _module_outage_seaweed


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own: tests sharing the bucket never see each other's objects."""
    return f"t-{secrets.token_hex(4)}"


def open_store(server: SeaweedServer, prefix: str, *, ttl_s: float = 60.0) -> S3MediaStore:
    """An ``S3MediaStore`` on ``server``'s bucket under ``prefix``, opened (and checked) the way
    a process does at startup; needs the AWS variables set (``use_credentials``)."""
    return S3MediaStore.open(
        server.media_url(prefix), ttl_s=ttl_s, region="us-east-1", endpoint_url=server.endpoint_url
    )


def use_credentials(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Put the AWS variables in the environment (where botocore's credential chain reads them)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
