"""API keys: generated once, shown once, stored only as a SHA-256 hash, checked in constant time.

Credits and rate limits are not checked here: they are enforced by ``Store.submit`` in the same
atomic step that enqueues the job, so two requests can never both spend the last cent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from collections.abc import Sequence

from qwenserve.catalog import MODELS
from qwenserve.errors import Forbidden, InvalidRequest, Unauthenticated
from qwenserve.store.base import ApiKey, Store

KEY_PREFIX = "qs_"
KEY_HEADER = "x-api-key"


def generate_key() -> str:
    """A new secret: the prefix (so leaked keys are recognisable) and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """A webhook signing secret: ``whsec_`` and 32 random bytes in base64 (Standard Webhooks)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def webhook_secret(store: Store, key_id: str, *, rotate: bool = False) -> str | None:
    """The key's webhook signing secret, made on first need (or anew with ``rotate``); None
    when there is no such key."""
    return store.webhook_secret(key_id, candidate=new_webhook_secret(), rotate=rotate)


def hash_key(plaintext: str) -> str:
    """The SHA-256 hex digest the store keeps instead of the key (keys are random, no salt)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_api_key(
    store: Store,
    *,
    name: str,
    credits_usd: float,
    rpm: int,
    models: Sequence[str] = (),
    now: float,
    max_queued: int = 0,
    weight: float = 1.0,
    max_running: int = 0,
) -> tuple[str, ApiKey]:
    """Make and store a new key.

    Args:
        name: a label for people; not unique.
        credits_usd: the starting balance (>= 0).
        rpm: requests per minute allowed (0: unlimited).
        models: slugs the key may use (empty: every model).
        now: creation time, Unix seconds.
        max_queued: the most jobs the key may have queued at once (0: no limit).
        weight: its share of the GPUs against other waiting keys (> 0; fair queuing).
        max_running: the most jobs the key may have running at once (0: no limit).

    Returns:
        The plaintext key (show it once; it is not stored) and the stored record.

    Raises:
        InvalidRequest: an unknown model, negative or non-finite credits, negative rpm.
    """
    unknown = [slug for slug in models if slug not in MODELS]
    if unknown:
        raise InvalidRequest(
            f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(MODELS))}",
            field="models",
        )
    if not math.isfinite(credits_usd) or credits_usd < 0:
        raise InvalidRequest(
            f"credits must be a non-negative amount of USD, got {credits_usd}", field="credits_usd"
        )
    if rpm < 0:
        raise InvalidRequest(f"rpm must be 0 (unlimited) or more, got {rpm}", field="rpm")
    if max_queued < 0:
        raise InvalidRequest(
            f"max_queued must be 0 (unlimited) or more, got {max_queued}", field="max_queued"
        )
    if not math.isfinite(weight) or weight <= 0:
        raise InvalidRequest(f"weight must be more than 0, got {weight}", field="weight")
    if max_running < 0:
        raise InvalidRequest(
            f"max_running must be 0 (unlimited) or more, got {max_running}", field="max_running"
        )
    plaintext = generate_key()
    key = ApiKey(
        id="key_" + secrets.token_hex(6),
        key_hash=hash_key(plaintext),
        name=name,
        balance_usd=credits_usd,
        rpm=rpm,
        models=tuple(dict.fromkeys(models)),
        created_at=now,
        max_queued=max_queued,
        weight=weight,
        max_running=max_running,
    )
    store.create_key(key)
    webhook_secret(store, key.id)  # made with the key, so `keys create` can show it
    return plaintext, key


def authenticate(store: Store, presented: str | None) -> ApiKey:
    """The key behind ``presented``.

    Raises:
        Unauthenticated: no key was presented, or it is unknown or revoked.
    """
    if not presented:
        raise Unauthenticated("missing API key: send it in the x-api-key header", field=KEY_HEADER)
    digest = hash_key(presented)
    key = store.key_by_hash(digest)
    # The lookup is by hash already; comparing again in constant time means a backend that
    # matched loosely (a collation, a prefix index) can never let a different key through.
    if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked:
        raise Unauthenticated("invalid API key", field=KEY_HEADER)
    return key


def authorize(key: ApiKey, slug: str) -> None:
    """Check that ``key`` may run ``slug``.

    Raises:
        Forbidden: the key is limited to models that do not include ``slug``.
    """
    if key.models and slug not in key.models:
        raise Forbidden(
            f"this API key may not use the model {slug} (allowed: {', '.join(key.models)})",
            field="model",
        )
