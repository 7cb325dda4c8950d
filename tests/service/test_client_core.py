"""The client's I/O-free core: endpoints from any base URL, typed status updates, the poll loop."""

from __future__ import annotations

import pytest

from qwenserve.client import InferenceFailed, StatusUpdate
from qwenserve.client.core import Endpoints, poll_until_terminal


@pytest.mark.parametrize(
    "base",
    [
        "http://vm1:8000",
        "http://vm1:8000/",
        "http://vm1:8000/v1",
        "http://vm1:8000/v2/",
    ],
)
def test_endpoints_from_any_base(base: str) -> None:
    endpoints = Endpoints.from_base_url(base)
    assert (endpoints.v1, endpoints.v2) == ("http://vm1:8000/v1", "http://vm1:8000/v2")
    assert endpoints.cancel_url("r1") == "http://vm1:8000/v2/requests/r1/cancel"


def test_status_update_reads_the_live_fields() -> None:
    queued = StatusUpdate.from_body({"status": "QUEUED", "queue_position": 3, "eta_s": 12.5})
    assert (queued.queue_position, queued.eta_s, queued.step) == (3, 12.5, None)
    running = StatusUpdate.from_body(
        {
            "status": "PROCESSING",
            "progress": {"step": 2, "total_steps": 8, "fraction": 0.25},
            "cancel_requested": True,
        }
    )
    assert (running.step, running.total_steps, running.fraction) == (2, 8, 0.25)
    assert running.cancel_requested and not running.waiting
    # A Segmind server sends none of them: every live field is simply absent.
    plain = StatusUpdate.from_body({"status": "PROCESSING"})
    assert plain.step is None and plain.eta_s is None and plain.waiting is False


def test_poll_loop_hands_every_status_to_on_progress_then_judges_it() -> None:
    seen: list[str] = []
    loop = poll_until_terminal(
        "r1",
        timeout_s=60,
        interval_s=1,
        clock=lambda: 0.0,
        on_progress=lambda u: seen.append(u.status),
    )
    assert next(loop) == 0.0
    assert loop.send({"status": "QUEUED"}) == 1
    with pytest.raises(InferenceFailed):
        loop.send({"status": "FAILED", "error": "cancelled by its owner"})
    assert seen == ["QUEUED", "FAILED"]
