"""The ``Idempotency-Key`` header of a submit: read and checked, and the body's canonical hash.

A client that retries a submit (a lost reply, a dropped connection) sends the same key: within
``IDEMPOTENCY_TTL_S`` the store answers with the job the first submit made, charging nothing
(``Store.submit``). The body is compared through a hash of the *validated* request and its
slug, so spelling differences that validate to the same request (a default written out, key
order) are the same body. A seed the server drew (none or -1 sent) is left out of the hash: two
identical bodies without a seed are the same request, and the replay answers with the first
job's seed. A request that makes several jobs (OpenAI's ``n``) is one set under one key
(``for_set``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request

from qwenserve.catalog import GenerationRequest
from qwenserve.catalog.validate import RANDOM_SEED_CEILING
from qwenserve.errors import InvalidRequest
from qwenserve.store.base import Idempotency
from qwenserve.store.rules import IDEMPOTENCY_HEADER

MAX_KEY_CHARS = 255
SET_SEPARATOR = "\x1f"
"""Between a set's key and a job's index: no header value holds it (printable ASCII only)."""


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
    canonical = {"slug": slug, "request": _fields(request, seed_drawn)}
    return Idempotency(key=key, body_hash=_hash(canonical))


def for_set(
    key: str,
    slug: str,
    requests: Sequence[tuple[GenerationRequest, bool]],
    *,
    answer: Mapping[str, Any],
) -> list[Idempotency]:
    """The records of a set of jobs one ``Idempotency-Key`` covers (OpenAI's ``n`` images):
    each ``(request, seed_drawn)`` under its own store key, all with one hash of the whole set
    and of ``answer`` (how the dialect answers), so any change (``n`` too) is another body.

    The first job is stored under ``key`` itself, so the same key on a v1/v2 submit is a 409,
    not a second request; the others under ``key`` and their index, apart from any header value.
    """
    canonical = {
        "slug": slug,
        "set": [_fields(request, drawn) for request, drawn in requests],
        "answer": dict(answer),
    }
    body_hash = _hash(canonical)
    return [
        Idempotency(key=key if index == 0 else f"{key}{SET_SEPARATOR}{index}", body_hash=body_hash)
        for index in range(len(requests))
    ]


def _fields(request: GenerationRequest, seed_drawn: bool) -> dict[str, Any]:
    """What a repeat must match: the request's fields, hashed here and never stored as a job
    (``size`` is left out: validation derives it from the others)."""
    fields = dataclasses.asdict(request)
    del fields["size"]
    if seed_drawn:
        fields["seed"] = None
    return fields


def _hash(canonical: Mapping[str, Any]) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
