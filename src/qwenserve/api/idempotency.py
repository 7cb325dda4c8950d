"""The ``Idempotency-Key`` header of a submit: read and checked, and the body's canonical hash.

A client that retries a submit (a lost reply, a dropped connection) sends the same key: within
``IDEMPOTENCY_TTL_S`` the store answers with the job the first submit made, charging nothing
(``Store.submit``). The body is compared through a hash of the *validated* request and its
slug, so spelling differences that validate to the same request (a default written out, key
order) are the same body. A seed the server drew (none or -1 sent) is left out of the hash: two
identical bodies without a seed are the same request, and the replay answers with the first
job's seed.
"""

from __future__ import annotations

import hashlib
import json
import secrets

from fastapi import Request

from qwenserve.catalog import GenerationRequest
from qwenserve.catalog.validate import RANDOM_SEED_CEILING
from qwenserve.errors import InvalidRequest
from qwenserve.store.base import Idempotency
from qwenserve.store.rules import IDEMPOTENCY_HEADER

MAX_KEY_CHARS = 255


def header_value(request: Request) -> str | None:
    """The request's ``Idempotency-Key``, or None when it has none.

    Raises:
        InvalidRequest: naming the header, when it is empty, longer than 255 characters, or
            holds anything but printable ASCII.
    """
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_KEY_CHARS or not all(" " <= c <= "~" for c in value):
        raise InvalidRequest(
            f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters",
            field=IDEMPOTENCY_HEADER,
        )
    return value


class SeedRecorder:
    """A validation seed source that remembers whether it was asked (the client sent none)."""

    def __init__(self) -> None:
        self.drawn = False

    def __call__(self) -> int:
        self.drawn = True
        return secrets.randbelow(RANDOM_SEED_CEILING + 1)


def for_request(
    key: str, slug: str, request: GenerationRequest, *, seed_drawn: bool
) -> Idempotency:
    """The store's idempotency record of ``request`` to ``slug`` under ``key``."""
    fields = request.to_dict()
    if seed_drawn:
        fields["seed"] = None
    canonical = json.dumps(
        {"slug": slug, "request": fields}, sort_keys=True, separators=(",", ":"), default=str
    )
    return Idempotency(key=key, body_hash=hashlib.sha256(canonical.encode()).hexdigest())
