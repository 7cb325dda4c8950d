"""Webhooks: POST a job's ending to the URL its submit named, signed, retried, at least once.

``WebhookDispatcher`` runs on its own threads (never a worker's) on every API node. Each round:

1. turn each job ending into a pending delivery record (``Store.enqueue_webhooks``: one per job,
   idempotent, the store's persisted cursor ``Store.webhook_cursor`` moved in the same step).
   The endings come from the process's one event-log reader (``EventFollower``; ``follow_from``
   subscribes it, and an ending pokes a round): the dispatcher does not page through the log
   itself. It keeps the persisted cursor for durability only: once at start, and again after a
   round that failed (the fed events of that round may be lost with it), it reads the log from
   that cursor to its end, so an ending that happened while no node was up, or just before a
   kill -9, is still delivered. A dispatcher not fed by a reader reads from the cursor each
   round;
2. claim the deliveries that are due under a lease (``Store.claim_webhooks``) long enough for
   every attempt of the claim, so with several nodes each is sent by one at a time, and a node
   that dies mid-send leaves it to the others when the lease runs out (a restarted single-node
   server takes its leases back at once: ``Store.release_webhook_leases``);
3. send each: the body is the request's ``GET /v2/requests/{id}`` body, rendered from the job
   by the same pure builder the API answers with (``notify/bodies.py``; ``delivery_body``: no
   HTTP layer involved), kept from the first attempt so every retry sends the same bytes, signed per
   Standard Webhooks (``webhook-id`` is the ending's event id on every attempt,
   ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``
   with the key's ``whsec_`` secret). The host is resolved and every address checked by the
   SSRF guard (``media.fetch``) unless private URLs are allowed, the connection goes to the
   checked address, redirects are not followed, and one deadline bounds the whole attempt;
4. record the attempt (``Store.record_webhook_attempt``): 2xx delivered; a timeout, connection
   error, 408, 429 or 5xx is retried after ``backoff_s * 2**(n-1)`` (capped, with jitter) until
   ``max_age_s`` after the ending; anything else (other statuses, a refused address) fails it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook

from qwenserve.accounts.keys import webhook_secret
from qwenserve.errors import InvalidRequest, QwenServeError
from qwenserve.jobs import JobEvent
from qwenserve.media.deadline import DeadlineTransport
from qwenserve.media.fetch import IPAddress, UrlFetcher, is_public_address
from qwenserve.media.storage import MediaStore
from qwenserve.notify.bodies import render, result_body, wants_base64
from qwenserve.notify.follower import EventFollower
from qwenserve.store.base import Store
from qwenserve.store.webhooks import DeliveryStatus, WebhookAttempt, WebhookDelivery

log = logging.getLogger("qwenserve.webhooks")

RETRIED_STATUSES = frozenset({408, 429})
READ_LIMIT = 500
MAX_URL_CHARS = 2048


def signature_headers(secret: str, msg_id: str, timestamp: float, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    at = datetime.fromtimestamp(int(timestamp), tz=UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }


def delivery_body(
    store: Store, media: MediaStore, *, base_url: str, clock: Callable[[], float] = time.time
) -> Callable[[str], str | None]:
    """What a delivery POSTs for a job: its ``GET /v2/requests/{id}`` body (less the
    ``webhook`` field), rendered from the job as the API renders it; None once the job (or the
    image a base64 body carries) is gone. ``base_url``: how clients reach the API."""

    def build(job_id: str) -> str | None:
        now = clock()
        job = store.get_job(job_id, now=now)
        if job is None:
            return None
        image: bytes | None = None
        if job.result is not None and wants_base64(job):
            stored = media.get(job.result.media_id, now=now)
            if stored is None:
                return None
            image = stored[0]
        return render(result_body(job, base_url=base_url, image=image))

    return build


@dataclass(frozen=True)
class WebhookPolicy:
    """How deliveries are sent and retried (``Settings.webhook_*``)."""

    timeout_s: float = 10.0
    """The most one attempt takes: connect, send and read the answer."""
    backoff_s: float = 5.0
    """The first retry's delay; each next one doubles, up to ``max_backoff_s``, with jitter."""
    max_backoff_s: float = 3600.0
    max_age_s: float = 24 * 3600.0
    """No retry is scheduled later than this after the job ended."""
    lease_s: float = 60.0
    """The shortest lease of a claim; longer when the claimed attempts could take longer."""
    allow_private: bool = False

    def retry_delay_s(self, attempts: int, rng: random.Random) -> float:
        """The delay after the ``attempts``-th failed attempt: exponential, half of it jitter."""
        delay = min(self.max_backoff_s, self.backoff_s * 2.0 ** max(0, attempts - 1))
        return delay / 2 + rng.uniform(0, delay / 2)


class WebhookDispatcher:
    """Follows the log, enqueues deliveries and sends them (see the module docstring).

    Args:
        store: where deliveries and the cursor live.
        body_for: the JSON body of a job's ``GET /v2/requests/{id}`` (None: the job is gone).
        policy: timeouts, backoff, retention, the SSRF switch.
        poll_s: seconds between rounds when nothing pokes it.
        clock: Unix seconds (injected in tests).
        address_policy: which resolved addresses may be connected to (tests narrow it).
        concurrency: deliveries sent at once.
    """

    def __init__(
        self,
        store: Store,
        *,
        body_for: Callable[[str], str | None],
        policy: WebhookPolicy | None = None,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        address_policy: Callable[[IPAddress], bool] = is_public_address,
        concurrency: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.store = store
        self.body_for = body_for
        self.policy = policy or WebhookPolicy()
        self.poll_s = poll_s
        self.clock = clock
        self.owner = f"webhooks-{uuid.uuid4().hex[:12]}"
        self._guard = UrlFetcher(
            allow_private=self.policy.allow_private,
            timeout_s=self.policy.timeout_s,
            address_policy=address_policy,
        )
        self._rng = random.Random()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="qwenserve-webhook")
        self._concurrency = concurrency
        self._claim_limit = concurrency * 4
        # The claimed deliveries are sent ``concurrency`` at a time, each attempt bounded by the
        # timeout: the lease must outlast them all (and a margin), or another node would take
        # and send one that this node is still about to send.
        waves = -(-self._claim_limit // concurrency)
        self._lease_s = max(self.policy.lease_s, (waves + 1) * self.policy.timeout_s)
        self._transport = transport
        self._ssl_context = httpx.create_ssl_context()
        self._fed: list[JobEvent] | None = None  # None: not fed by a reader (read each round)
        self._fed_lock = threading.Lock()
        self._catch_up = True
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwenserve-webhooks", daemon=True)

    def start(self) -> WebhookDispatcher:
        self._thread.start()
        return self

    def poke(self) -> None:
        """Run a round now (a job just ended)."""
        self._wake.set()

    def follow_from(self, follower: EventFollower) -> None:
        """Take the log's events from ``follower`` (the process's one reader) instead of reading
        the log each round; an ending makes it run a round at once. Call before ``start``."""
        with self._fed_lock:
            self._fed = []
        follower.subscribe(self.on_event)

    def on_event(self, event: JobEvent) -> None:
        """The reader's subscriber: keep the event for the next round (endings poke it)."""
        with self._fed_lock:
            if self._fed is not None:
                self._fed.append(event)
        if event.type.is_terminal:
            self.poke()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)

    def follow(self) -> int:
        """Turn every job ending handed over since the last round (or, unfed, at start and
        after a failed round: in the log after the persisted cursor) into a delivery; returns
        how many were added."""
        with self._fed_lock:
            fed, catch_up = self._fed, self._catch_up
            if fed is not None:
                self._fed = []
            self._catch_up = fed is None
        if fed is not None and not catch_up:
            try:
                if not any(event.type.is_terminal for event in fed):
                    return 0
                return self.store.enqueue_webhooks(fed, cursor=fed[-1].id, now=self.clock())
            except Exception:
                self._catch_up = True  # these endings are after the persisted cursor: reread
                raise
        try:
            return self._read_from_cursor()
        except Exception:
            self._catch_up = True
            raise

    def _read_from_cursor(self) -> int:
        added = 0
        while True:
            events = self.store.events(after=self.store.webhook_cursor(), limit=READ_LIMIT)
            if not events:
                return added
            added += self.store.enqueue_webhooks(events, cursor=events[-1].id, now=self.clock())
            if len(events) < READ_LIMIT:
                return added

    def round(self) -> int:
        """One round: follow the log, then send every due delivery; returns attempts made."""
        self.follow()
        due = self.store.claim_webhooks(
            self.owner, lease_s=self._lease_s, now=self.clock(), limit=self._claim_limit
        )
        return sum(1 for _ in self._pool.map(self.deliver, due))

    def deliver(self, delivery: WebhookDelivery) -> DeliveryStatus:
        """Make one attempt at ``delivery`` (claimed by this dispatcher) and record it."""
        body = delivery.body if delivery.body is not None else self.body_for(delivery.job_id)
        started = self.clock()
        if body is None:
            attempt = WebhookAttempt(at=started, error="the request expired before delivery")
            return self._record(delivery, attempt, DeliveryStatus.FAILED, body="")
        attempt, retry = self._send(delivery, body, started)
        if attempt.status_code is not None and 200 <= attempt.status_code < 300:
            status = DeliveryStatus.DELIVERED
        elif retry:
            status = DeliveryStatus.PENDING
        else:
            status = DeliveryStatus.FAILED
        next_at: float | None = None
        if status is DeliveryStatus.PENDING:
            delay_s = self.policy.retry_delay_s(len(delivery.attempts) + 1, self._rng)
            next_at = self.clock() + delay_s
            if next_at > delivery.created_at + self.policy.max_age_s:
                status, next_at = DeliveryStatus.FAILED, None
        return self._record(delivery, attempt, status, body=body, next_at=next_at)

    def _record(
        self,
        delivery: WebhookDelivery,
        attempt: WebhookAttempt,
        status: DeliveryStatus,
        *,
        body: str,
        next_at: float | None = None,
    ) -> DeliveryStatus:
        recorded = self.store.record_webhook_attempt(
            delivery.job_id,
            self.owner,
            attempt,
            status=status,
            next_attempt_at=next_at,
            body=body,
            now=self.clock(),
        )
        outcome = attempt.status_code if attempt.status_code is not None else attempt.error
        log.info(
            "webhook %s attempt %d: %s -> %s%s",
            delivery.job_id,
            len(delivery.attempts) + 1,
            outcome,
            status.value,
            "" if recorded else " (lease lost; not recorded)",
        )
        return status

    def _send(
        self, delivery: WebhookDelivery, body: str, now: float
    ) -> tuple[WebhookAttempt, bool]:
        """One POST; returns the attempt and whether a failure is worth retrying."""
        secret = webhook_secret(self.store, delivery.key_id)
        if secret is None:
            return WebhookAttempt(at=now, error="the API key no longer exists"), False
        deadline = time.monotonic() + self.policy.timeout_s
        with self._client(deadline) as client:
            return self._post(client, delivery, body, secret, now, deadline)

    def _client(self, deadline: float) -> httpx.Client:
        """A client for one attempt: every connect, header and body read ends by ``deadline``
        (a receiver that drips its answer cannot hold a sender thread past it)."""
        return httpx.Client(
            trust_env=False,  # an environment proxy would connect to a host we did not check
            follow_redirects=False,
            transport=self._transport or DeadlineTransport(deadline, ssl_context=self._ssl_context),
        )

    def _post(
        self,
        client: httpx.Client,
        delivery: WebhookDelivery,
        body: str,
        secret: str,
        now: float,
        deadline: float,
    ) -> tuple[WebhookAttempt, bool]:
        try:
            url = httpx.URL(delivery.url)
            host = url.raw_host.decode("ascii")
            port = url.port or (443 if url.scheme == "https" else 80)
            addresses = self._guard.resolve_allowed(host, port, field="webhook")
        except InvalidRequest as error:  # refused by the SSRF guard: never retried
            return WebhookAttempt(at=now, error=error.message), False
        except QwenServeError as unresolved:  # the name does not resolve (now)
            return WebhookAttempt(at=now, error=unresolved.message), True
        except (httpx.InvalidURL, ValueError):
            return WebhookAttempt(at=now, error="not a valid URL"), False
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "qwenserve-webhooks/1",
            "Host": url.netloc.decode("ascii"),
            **signature_headers(secret, delivery.event_id, now, body),
        }
        failed = "could not connect"
        for address in addresses:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return WebhookAttempt(at=now, error="timed out"), True
            try:
                response = client.post(
                    url.copy_with(host=address, fragment=None),
                    content=body.encode("utf-8"),
                    headers=headers,
                    extensions={"sni_hostname": host},
                    timeout=httpx.Timeout(remaining_s),
                )
            except httpx.ConnectError:
                continue  # the host's next checked address
            except httpx.TimeoutException:
                return WebhookAttempt(at=now, error="timed out"), True
            except httpx.HTTPError as failure:
                failed = f"connection failed: {type(failure).__name__}"
                break
            code = response.status_code
            return WebhookAttempt(at=now, status_code=code), code in RETRIED_STATUSES or code >= 500
        return WebhookAttempt(at=now, error=failed), True

    def _run(self) -> None:
        failing = False
        while not self._closed.is_set():
            try:
                self.round()
                failing = False
            except Exception as error:  # the store is away: try again next round
                if not failing:
                    log.warning("webhooks: round failed (%s); retrying", error)
                failing = True
            self._wake.wait(self.poll_s)
            self._wake.clear()
