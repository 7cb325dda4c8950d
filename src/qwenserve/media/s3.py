"""Media in an S3-compatible bucket (``QWENSERVE_MEDIA=s3://BUCKET/PREFIX``).

Past one GPU, images do not belong in Redis's memory (~1.4 MB each, ~29,000 an hour at eight
images a second): every process of a cluster writes and reads them in one bucket instead, and
the job store keeps only records. Each item is one object, ``PREFIX/<media id>``, with its
content type and its expiry (``x-amz-meta-expires-at``, Unix seconds); ``get`` hides it from
then on. ``purge_expired`` (the API's sweeper) deletes the objects written more than the result
TTL ago (no item outlives its job's TTL from its write); the bucket's lifecycle rule is the
backstop (docs/DEPLOY.md).

The client is aiobotocore: async, with one pool of keep-alive connections per process. It
runs on an event loop thread of its own, so the ``MediaStore`` methods stay plain blocking
calls (what the worker threads and ``Services.call`` expect) while the requests of every
thread share the pool. Credentials come from botocore's chain (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, a profile, an instance role); endpoint and region from Settings.

Errors: a missing object is ``None`` (a 404 upstream); an unreachable or refusing bucket is
``MediaUnavailable`` (a 503, and a retried, then refunded, finish); at startup ``open`` checks
the bucket and that it may write there, else ``MediaConfigError`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from qwenserve.errors import MediaUnavailable
from qwenserve.media.storage import MediaConfigError, is_valid_media_id

log = logging.getLogger("qwenserve.media")

_T = TypeVar("_T")

SCHEME = "s3://"
EXPIRY_META = "expires-at"
PRESIGN_MAX_S = 7 * 24 * 3600
"""SigV4's limit on a presigned URL's lifetime."""
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DELETE_BATCH = 1000
_TRANSPORT_ERRORS = (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError)
"""No answer, a refused or dropped connection, a timeout (botocore wraps most of them)."""
UNREACHABLE = "the media store is unreachable"
"""What a client reads (the endpoint and the cause go to the log only)."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (empty, or ending in ``/``)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``s3://BUCKET`` or ``s3://BUCKET/PREFIX``.

        Raises:
            ValueError: not an ``s3://`` URL, or no bucket name.
        """
        if not url.startswith(SCHEME):
            raise ValueError(f"media must be s3://BUCKET/PREFIX, not {url!r}")
        bucket, _, prefix = url.removeprefix(SCHEME).partition("/")
        if not bucket:
            raise ValueError(f"media URL {url!r} names no bucket")
        prefix = prefix.strip("/")
        return cls(bucket=bucket, prefix=f"{prefix}/" if prefix else "")

    def key(self, media_id: str) -> str:
        return f"{self.prefix}{media_id}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"


class S3MediaStore:
    """A ``MediaStore`` in one bucket, shared by every process that names the same URL.

    Args:
        location: the bucket and prefix (``S3Location.parse``).
        ttl_s: the result TTL: an object written longer ago than this has expired (every
            ``expires_at`` handed to ``put`` is at most this far past the write).
        region: the bucket's region (None: botocore's chain, else us-east-1).
        endpoint_url: an S3-compatible server's URL (None: AWS, or ``AWS_ENDPOINT_URL``);
            when given, requests use path-style addressing, which every such server takes.
        connect_timeout_s, read_timeout_s: per attempt; botocore makes two attempts.
        max_connections: the keep-alive pool's size, shared by every thread.
    """

    def __init__(
        self,
        location: S3Location,
        *,
        ttl_s: float,
        region: str | None = None,
        endpoint_url: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        self.location = location
        self.ttl_s = ttl_s
        self.endpoint_url = endpoint_url
        # The longest one call may take: its attempts, each connect + read, and a margin.
        self._call_timeout_s = 2 * (connect_timeout_s + read_timeout_s) + 5.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-media", daemon=True)
        self._thread.start()
        self._exit = contextlib.AsyncExitStack()
        self._closed = False
        config = AioConfig(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "max_attempts": 2},
            max_pool_connections=max_connections,
            signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else None,
            # Checksums only where the API requires them: several S3-compatible servers refuse
            # the CRC headers newer botocore adds to every upload.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self._client: Any = self._run(self._open_client(region, endpoint_url, config))
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        url: str,
        *,
        ttl_s: float,
        region: str | None = None,
        endpoint_url: str | None = None,
    ) -> S3MediaStore:
        """Connect to ``s3://BUCKET/PREFIX`` and check it (``check``): what a process does at
        startup, so that it refuses to start rather than fail every job.

        Raises:
            MediaConfigError: a malformed URL, no credentials, credentials the server refuses,
                no such bucket, no write access, or the server cannot be reached.
        """
        try:
            location = S3Location.parse(url)
        except ValueError as error:
            raise MediaConfigError(str(error)) from None
        store = cls(location, ttl_s=ttl_s, region=region, endpoint_url=endpoint_url)
        try:
            store.check()
        except BaseException:
            store.close()
            raise
        return store

    async def _open_client(self, region: str | None, endpoint_url: str | None, config: Any) -> Any:
        session = get_session()
        region = region or session.get_config_variable("region") or "us-east-1"
        creator = session.create_client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=config
        )
        return await self._exit.enter_async_context(creator)

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the client's loop and wait for it (any thread but that one)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self._call_timeout_s)
        except FutureTimeout:
            future.cancel()
            log.warning("media store %s: no answer in %.0f s", self.location, self._call_timeout_s)
            raise MediaUnavailable(UNREACHABLE) from None

    def close(self) -> None:
        """Close the connections and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._exit.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    # -- startup --------------------------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and these credentials may read, write and delete under the
        prefix (a probe object, removed at once).

        Raises:
            MediaConfigError: what is wrong, in one line, with what to set.
        """
        self._run(self._check())

    async def _check(self) -> None:
        where, bucket = str(self.location), self.location.bucket
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        try:
            await self._client.head_bucket(Bucket=bucket)
        except NoCredentialsError:
            raise MediaConfigError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except ClientError as error:
            status = _status(error)
            if status in (401, 403):
                raise MediaConfigError(
                    f"the S3 server{at} refused the credentials for {where} (HTTP {status}): "
                    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            if status == 404:
                raise MediaConfigError(f"no bucket {bucket!r}{at}: create it first") from None
            raise MediaConfigError(f"cannot use {where}{at}: {_describe(error)}") from None
        except _TRANSPORT_ERRORS as error:
            raise MediaConfigError(f"cannot reach the S3 server{at}: {error}") from None
        probe = self.location.key(f".qwenserve-probe-{secrets.token_hex(8)}")
        try:
            await self._client.put_object(Bucket=bucket, Key=probe, Body=b"")
            await self._client.delete_object(Bucket=bucket, Key=probe)
        except ClientError as error:
            raise MediaConfigError(
                f"these S3 credentials may not write and delete under {where} ({_describe(error)})"
            ) from None
        except _TRANSPORT_ERRORS as error:
            raise MediaConfigError(f"cannot reach the S3 server{at}: {error}") from None

    # -- MediaStore -----------------------------------------------------------------------

    def put(self, media_id: str, data: bytes, content_type: str, *, expires_at: float) -> None:
        """Store ``data`` until ``expires_at``.

        Raises:
            ValueError: the id is outside the media id charset.
            MediaUnavailable: the bucket cannot be reached or refused the write.
        """
        if not is_valid_media_id(media_id):
            raise ValueError(f"invalid media id {media_id!r}")
        self._run(
            self._guarded(
                "put",
                self._client.put_object(
                    Bucket=self.location.bucket,
                    Key=self.location.key(media_id),
                    Body=bytes(data),
                    ContentType=content_type,
                    Metadata={EXPIRY_META: repr(float(expires_at))},
                ),
            )
        )

    def get(self, media_id: str, *, now: float) -> tuple[bytes, str] | None:
        """The bytes and content type; None when unknown, malformed, missing or expired.

        Raises:
            MediaUnavailable: the bucket cannot be reached.
        """
        if not is_valid_media_id(media_id):
            return None
        return self._run(self._guarded("get", self._get(media_id, now)))

    async def _get(self, media_id: str, now: float) -> tuple[bytes, str] | None:
        try:
            answer = await self._client.get_object(
                Bucket=self.location.bucket, Key=self.location.key(media_id)
            )
        except ClientError as error:
            if _is_missing(error):
                return None
            raise
        async with answer["Body"] as body:
            if _expires_at(answer) <= now:
                return None  # the headers said so: the body is not downloaded
            data = await body.read()
        return bytes(data), str(answer.get("ContentType") or "application/octet-stream")

    def delete(self, media_id: str) -> None:
        """Delete ``media_id``'s object; a no-op when there is none.

        Raises:
            MediaUnavailable: the bucket cannot be reached.
        """
        if not is_valid_media_id(media_id):
            return
        self._run(
            self._guarded(
                "delete",
                self._client.delete_object(
                    Bucket=self.location.bucket, Key=self.location.key(media_id)
                ),
            )
        )

    def purge_expired(self, *, now: float) -> int:
        """Delete the items written more than ``ttl_s`` before ``now`` (expired, since no item
        outlives its TTL from its write); returns how many went. Only keys that are media ids
        directly under the prefix are touched: nothing else in a shared bucket.

        Raises:
            MediaUnavailable: the bucket cannot be reached.
        """
        return self._run(self._guarded("purge", self._purge(now)))

    async def _purge(self, now: float) -> int:
        cutoff = now - self.ttl_s
        expired: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.location.bucket, Prefix=self.location.prefix, Delimiter="/"
        )
        async for page in pages:
            for item in page.get("Contents", ()):
                key = str(item["Key"])
                name = key[len(self.location.prefix) :]
                written = item["LastModified"].timestamp()
                if written <= cutoff and (
                    is_valid_media_id(name) or name.startswith(".qwenserve-probe-")
                ):
                    expired.append(key)
        for start in range(0, len(expired), _DELETE_BATCH):
            batch = expired[start : start + _DELETE_BATCH]
            await self._client.delete_objects(
                Bucket=self.location.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
        return len(expired)

    # -- presigned URLs (QWENSERVE_MEDIA_URLS=presigned) ------------------------------------

    def presigned_url(self, media_id: str, *, now: float) -> str | None:
        """A URL that GETs the item straight from the bucket until the item expires; None when
        it is unknown, missing or expired (checked first, so a 404 stays ours and clear).

        Raises:
            MediaUnavailable: the bucket cannot be reached.
        """
        if not is_valid_media_id(media_id):
            return None
        return self._run(self._guarded("presign", self._presign(media_id, now)))

    async def _presign(self, media_id: str, now: float) -> str | None:
        key = self.location.key(media_id)
        try:
            head = await self._client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as error:
            if _is_missing(error):
                return None
            raise
        remaining_s = _expires_at(head) - now
        if remaining_s <= 0:
            return None
        url: str = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.location.bucket, "Key": key},
            ExpiresIn=max(1, min(math.ceil(remaining_s), PRESIGN_MAX_S)),
        )
        return url

    async def _guarded(self, what: str, call: Coroutine[Any, Any, _T]) -> _T:
        """``call``, with the bucket's failures as ``MediaUnavailable`` (the cause logged)."""
        try:
            return await call
        except ClientError as error:
            log.warning("media store %s: %s failed: %s", self.location, what, _describe(error))
            raise MediaUnavailable(UNREACHABLE) from error
        except _TRANSPORT_ERRORS as error:
            log.warning("media store %s: %s failed: %s", self.location, what, error)
            raise MediaUnavailable(UNREACHABLE) from error


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_missing(error: ClientError) -> bool:
    return _status(error) == 404 or error.response.get("Error", {}).get("Code") in _MISSING_CODES


def _describe(error: ClientError) -> str:
    details = error.response.get("Error", {})
    code, message = details.get("Code", "?"), details.get("Message", "")
    return f"HTTP {_status(error)} {code}" + (f": {message}" if message else "")


def _expires_at(answer: dict[str, Any]) -> float:
    """The item's expiry from its metadata; an object without one counts as expired."""
    raw = (answer.get("Metadata") or {}).get(EXPIRY_META)
    try:
        return float(raw) if raw is not None else 0.0
    except ValueError:
        return 0.0


__all__ = ["S3Location", "S3MediaStore"]
