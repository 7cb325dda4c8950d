"""API keys: generated once, shown once, stored only as a SHA-256 hash, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from qwenserve.catalog import MODELS
from qwenserve.errors import Forbidden, InvalidRequest, Unauthenticated
from qwenserve.store.base import ApiKey, Store

KEY_PREFIX = "qs_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_api_key(
    store: Store,
    *,
    name: str,
    credits_usd: float,
    rpm: int,
    models: Sequence[str] = (),
    now: float,
) -> tuple[str, ApiKey]:
    """Make and store a new key; returns (the plaintext, shown once; the stored record)."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise InvalidRequest(
            f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(MODELS))}",
            field="models",
        )
    if credits_usd < 0:
        raise InvalidRequest("credits must not be negative", field="credits")
    if rpm < 0:
        raise InvalidRequest("rpm must not be negative", field="rpm")
    plaintext = generate_key()
    key = ApiKey(
        id="key_" + secrets.token_hex(6),
        key_hash=hash_key(plaintext),
        name=name,
        balance_usd=credits_usd,
        rpm=rpm,
        models=tuple(models),
        created_at=now,
    )
    store.create_key(key)
    return plaintext, key


def authenticate(store: Store, presented: str | None) -> ApiKey:
    """The key behind ``presented``; Unauthenticated when missing, unknown or revoked."""
    if not presented:
        raise Unauthenticated("missing API key: send it in the x-api-key header")
    digest = hash_key(presented)
    key = store.key_by_hash(digest)
    # The lookup is by hash already; compare again in constant time so a store that matched
    # loosely (a prefix index, a collation) can never let a different key through.
    if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked:
        raise Unauthenticated("invalid API key")
    return key


def authorize(key: ApiKey, slug: str) -> None:
    """Forbidden when the key is limited to models that do not include ``slug``."""
    if key.models and slug not in key.models:
        raise Forbidden(f"this API key may not use {slug} (allowed: {', '.join(key.models)})")
