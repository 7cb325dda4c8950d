"""Fixtures every test folder may use."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache (tiny preset, fetched LoRAs) for every server and worker in the session."""
    return tmp_path_factory.mktemp("model-cache")
