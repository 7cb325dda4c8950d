"""Fixtures for the high-availability tests: a fresh Sentinel-watched pair for a test that kills
its primary (``sentinel_cluster``), and one pair per module, emptied between tests, for tests
that only kill and restart the replica (``replica_cluster``: a cluster takes ~5 s to converge)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ha.sentinels import SentinelCluster


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    """A primary, its replica and three Sentinels on free ports (skips without redis-server)."""
    with SentinelCluster(tmp_path / "redis") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def _module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    with SentinelCluster(tmp_path_factory.mktemp("redis")) as cluster:
        yield cluster


@pytest.fixture
def replica_cluster(_module_cluster: SentinelCluster) -> SentinelCluster:
    """The module's cluster with no data and its replica up and in sync; a test taking it may
    kill the replica, never the primary (``reset`` fails the next test if the primary moved)."""
    _module_cluster.reset()
    return _module_cluster
