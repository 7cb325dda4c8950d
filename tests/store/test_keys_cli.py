"""`qwenserve keys create --max-queued` and `qwenserve keys update` on a SQLite data dir: the
limits land in the store (where every submit reads them), and bad values change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenserve.backends import open_backend
from qwenserve.cli.main import main
from qwenserve.config import Settings
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


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_update_credits_sets_the_balance_in_one_step(
    kind: str,
    data_dir: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--credits`` is the balance afterwards, whatever was charged before, set together with
    the other values (one ``Store.update_key``, no read-then-top-up window), on both stores."""
    if kind == "redis":
        request.getfixturevalue("redis_client")  # an emptied server
        args = ["--data-dir", str(data_dir), "--store", request.getfixturevalue("redis_url")]
    else:
        args = ["--data-dir", str(data_dir)]
    assert main(["keys", "create", "--credits", "2", *args]) == 0
    settings = Settings.model_validate(
        {"data_dir": data_dir, "store": args[-1] if kind == "redis" else "sqlite"}
    )
    backend = open_backend(settings)
    try:
        [key] = backend.store.list_keys()
        assert backend.store.topup(key.id, -0.75) == 1.25  # as a charge would
        assert main(["keys", "update", key.id, "--credits", "7.5", "--rpm", "9", *args]) == 0
        assert "balance $7.500000, rpm 9" in capsys.readouterr().out
        after = backend.store.get_key(key.id)
        assert after is not None and (after.balance_usd, after.rpm) == (7.5, 9)
        assert main(["keys", "update", key.id, "--credits", "0", *args]) == 0
        zero = backend.store.get_key(key.id)
        assert zero is not None and zero.balance_usd == 0.0
    finally:
        backend.close()
