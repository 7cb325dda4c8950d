"""API keys end to end against a real SQLite store: create, authenticate, authorize, revoke."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenserve.accounts.keys import (
    KEY_PREFIX,
    authenticate,
    authorize,
    create_api_key,
    generate_key,
    hash_key,
)
from qwenserve.errors import Forbidden, InvalidRequest, Unauthenticated
from qwenserve.store.sqlite import SqliteStore
from tests.store.contract import START_S


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "accounts.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(db_path)
    yield opened
    opened.close()


def test_generated_keys_are_prefixed_long_and_unique() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) >= len(KEY_PREFIX) + 43  # 32 random bytes, base64url


def test_hash_is_sha256_hex() -> None:
    assert hash_key("qs_abc") == hashlib.sha256(b"qs_abc").hexdigest()
    assert hash_key("qs_abc") != hash_key("qs_abd")


def test_create_then_authenticate(store: SqliteStore) -> None:
    plaintext, key = create_api_key(
        store, name="alice", credits_usd=5.0, rpm=30, models=["qwen-image"], now=START_S
    )
    assert key.name == "alice" and key.balance_usd == 5.0 and key.rpm == 30
    assert key.models == ("qwen-image",)
    assert key.created_at == START_S
    assert authenticate(store, plaintext) == key


def test_only_the_hash_is_stored(store: SqliteStore, db_path: Path) -> None:
    plaintext, key = create_api_key(store, name="bob", credits_usd=1.0, rpm=0, now=START_S)
    assert key.key_hash == hash_key(plaintext)
    secret_part = plaintext.removeprefix(KEY_PREFIX).encode()
    for path in db_path.parent.iterdir():
        assert secret_part not in path.read_bytes(), path


@pytest.mark.parametrize("presented", [None, ""])
def test_missing_key(store: SqliteStore, presented: str | None) -> None:
    with pytest.raises(Unauthenticated, match="missing API key") as caught:
        authenticate(store, presented)
    assert caught.value.field == "x-api-key"
    assert caught.value.http_status == 401


def test_unknown_key(store: SqliteStore) -> None:
    create_api_key(store, name="carol", credits_usd=1.0, rpm=0, now=START_S)
    with pytest.raises(Unauthenticated, match="invalid API key"):
        authenticate(store, generate_key())


def test_revoked_key_is_refused(store: SqliteStore) -> None:
    plaintext, key = create_api_key(store, name="dave", credits_usd=1.0, rpm=0, now=START_S)
    assert store.revoke_key(key.id)
    with pytest.raises(Unauthenticated, match="invalid API key"):
        authenticate(store, plaintext)


def test_revocation_from_another_store_takes_effect(store: SqliteStore, db_path: Path) -> None:
    """The CLI revokes through its own connection while the server keeps running."""
    plaintext, key = create_api_key(store, name="erin", credits_usd=1.0, rpm=0, now=START_S)
    assert authenticate(store, plaintext).id == key.id
    cli = SqliteStore(db_path)
    try:
        assert cli.revoke_key(key.id)
    finally:
        cli.close()
    with pytest.raises(Unauthenticated):
        authenticate(store, plaintext)


def test_create_validates(store: SqliteStore) -> None:
    with pytest.raises(InvalidRequest, match="no-such-model") as caught:
        create_api_key(store, name="x", credits_usd=1.0, rpm=0, models=["no-such-model"], now=0)
    assert caught.value.field == "models"
    with pytest.raises(InvalidRequest) as caught:
        create_api_key(store, name="x", credits_usd=-1.0, rpm=0, now=0)
    assert caught.value.field == "credits_usd"
    with pytest.raises(InvalidRequest) as caught:
        create_api_key(store, name="x", credits_usd=float("nan"), rpm=0, now=0)
    assert caught.value.field == "credits_usd"
    with pytest.raises(InvalidRequest) as caught:
        create_api_key(store, name="x", credits_usd=1.0, rpm=-1, now=0)
    assert caught.value.field == "rpm"
    assert store.list_keys() == []


def test_authorize(store: SqliteStore) -> None:
    _, limited = create_api_key(
        store, name="f", credits_usd=1.0, rpm=0, models=["qwen-image-fast"], now=START_S
    )
    _, unrestricted = create_api_key(store, name="g", credits_usd=1.0, rpm=0, now=START_S)
    authorize(limited, "qwen-image-fast")
    authorize(unrestricted, "qwen-image")
    authorize(unrestricted, "qwen-image-edit-fast")
    with pytest.raises(Forbidden, match="qwen-image-2512") as caught:
        authorize(limited, "qwen-image-2512")
    assert caught.value.http_status == 403
