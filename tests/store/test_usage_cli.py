"""`qwenserve keys usage [KEY_ID] [--since --until]` on a SQLite data dir: one key's table or
every key's, with the total equal to what the keys were charged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qwenserve.cli.main import main
from qwenserve.store.sqlite import SqliteStore
from tests.store.contract import Clock, claim_one, make_job, make_key, make_result


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("QWENSERVE_STORE", "QWENSERVE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _fill(data_dir: Path) -> tuple[str, str]:
    clock = Clock(time.time() - 3600)
    store = SqliteStore(data_dir / "qwenserve.db")
    try:
        alice, bob = make_key(store, clock, balance_usd=5.0), make_key(store, clock)
        for _ in range(2):
            store.submit(make_job(alice, clock, cost_usd=0.25), rpm=0, now=clock.now)
        refunded = make_job(alice, clock, slug="qwen-image-fast", cost_usd=0.5)
        store.submit(refunded, rpm=0, now=clock.now)
        store.fail(refunded.id, None, kind="InferenceError", message="boom", now=clock.now)
        store.submit(make_job(bob, clock, cost_usd=0.125), rpm=0, now=clock.now)
        done = claim_one(store, clock)
        assert done is not None and store.complete(done.id, "w1", make_result(), now=clock.now)
    finally:
        store.close()
    return alice.id, bob.id


def _lines(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def test_one_keys_usage(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = _fill(data_dir)
    assert main(["keys", "usage", alice, "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    [images] = _lines(out, "qwen-image ")
    assert alice in images and "│ 2 " in images and "0.500000" in images
    [fast] = _lines(out, "qwen-image-fast")
    assert "│ 1 " in fast and "0.000000" in fast, "a refunded failure costs nothing"
    [total] = _lines(out, "total")
    assert "│ 3 " in total and "0.500000" in total
    assert bob not in out


def test_every_key_and_the_window(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = _fill(data_dir)
    assert main(["keys", "usage", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert alice in out and bob in out
    [total] = _lines(out, "total")
    assert "│ 4 " in total and "0.625000" in total
    assert main(["keys", "usage", "--data-dir", str(data_dir), "--until", "2000-01-01"]) == 0
    [total] = _lines(capsys.readouterr().out, "total")
    assert "│ 0 " in total
    assert main(["keys", "usage", "--data-dir", str(data_dir), "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
