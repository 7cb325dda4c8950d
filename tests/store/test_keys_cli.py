"""`qwenserve keys create --max-queued` and `qwenserve keys update` on a SQLite data dir: the
limits land in the store (where every submit reads them), and bad values change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenserve.cli.main import main
from qwenserve.store.sqlite import SqliteStore


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("QWENSERVE_STORE", "QWENSERVE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _only_key_id(data_dir: Path) -> str:
    store = SqliteStore(data_dir / "qwenserve.db")
    try:
        [key] = store.list_keys()
        return key.id
    finally:
        store.close()


def test_create_with_max_queued_then_update_every_limit(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data-dir", str(data_dir)]
    assert main(["keys", "create", "--credits", "2", "--rpm", "5", "--max-queued", "3", *args]) == 0
    key_id = _only_key_id(data_dir)
    assert "max queued 3" in capsys.readouterr().err
    assert main(["keys", "update", key_id, "--max-queued", "0", "--rpm", "9", *args]) == 0
    assert main(["keys", "update", key_id, "--credits", "7.5", *args]) == 0
    out = capsys.readouterr().out
    assert "balance $7.500000, rpm 9, max queued unlimited" in out
    store = SqliteStore(data_dir / "qwenserve.db")
    try:
        key = store.get_key(key_id)
    finally:
        store.close()
    assert key is not None
    assert (key.balance_usd, key.rpm, key.max_queued) == (7.5, 9, 0)


def test_update_refuses_bad_values_and_unknown_keys(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data-dir", str(data_dir)]
    assert main(["keys", "create", "--max-queued", "4", *args]) == 0
    key_id = _only_key_id(data_dir)
    assert main(["keys", "update", key_id, "--max-queued", "-1", *args]) == 2
    assert main(["keys", "update", key_id, "--credits", "nan", *args]) == 2
    assert main(["keys", "update", key_id, *args]) == 2
    assert "nothing to change" in capsys.readouterr().err
    assert main(["keys", "update", "key_missing", "--rpm", "1", *args]) == 1
    store = SqliteStore(data_dir / "qwenserve.db")
    try:
        key = store.get_key(key_id)
    finally:
        store.close()
    assert key is not None and key.max_queued == 4


def test_create_and_update_weight_and_max_running(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data-dir", str(data_dir)]
    assert main(["keys", "create", "--weight", "3", "--max-running", "2", *args]) == 0
    key_id = _only_key_id(data_dir)
    assert "weight 3, max running 2" in capsys.readouterr().err
    assert main(["keys", "update", key_id, "--weight", "0", *args]) == 2
    assert main(["keys", "update", key_id, "--max-running", "-1", *args]) == 2
    assert main(["keys", "update", key_id, "--weight", "0.5", "--max-running", "0", *args]) == 0
    assert "weight 0.5, max running unlimited" in capsys.readouterr().out
    store = SqliteStore(data_dir / "qwenserve.db")
    try:
        key = store.get_key(key_id)
    finally:
        store.close()
    assert key is not None and (key.weight, key.max_running) == (0.5, 0)
