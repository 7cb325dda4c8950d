"""Admission fixes a job's slug and output size once, and the job carries them typed through the
store (SQLite and a real redis-server) to the worker's claim, its status and its ending."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qwenserve.catalog import OutputSize, SizeKind
from qwenserve.jobs import Job
from qwenserve.store.base import Store
from tests.service.inprocess import Harness, make_harness, open_test_store


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store(request.param, tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


def _stored(api: Harness, request_id: str) -> Job:
    job = api.store.get_job(request_id, now=api.clock.now)
    assert job is not None
    return job


@pytest.mark.parametrize(
    ("slug", "body", "size"),
    [
        ("qwen-image", {"aspect_ratio": "9:16"}, OutputSize(SizeKind.RATIO, 928 * 1664, 928, 1664)),
        ("qwen-image-fast", {}, OutputSize(SizeKind.RATIO, 1328 * 1328, 1328, 1328)),
        (
            "qwen-image-2512",
            {"width": 300, "height": 260},
            OutputSize(SizeKind.EXPLICIT, 300 * 260, 300, 260),
        ),
        # An edit that follows its input: all admission can fix is that, and the area.
        ("qwen-image-edit-fast", {}, OutputSize(SizeKind.INPUT, 1024 * 1024)),
    ],
)
async def test_admission_fixes_the_size_and_the_store_keeps_it(
    api: Harness, slug: str, body: dict[str, object], size: OutputSize
) -> None:
    request_id = await api.submit(slug, **body)
    job = _stored(api, request_id)
    assert (job.slug, job.request.slug, job.size) == (slug, slug, size)
    claimed = api.claim(slug)
    assert claimed.id == request_id and claimed.request == job.request
    api.complete(claimed.id)
    done = _stored(api, request_id)
    assert done.request == job.request and done.size == size


async def test_a_base64_request_answers_with_its_image_inline(api: Harness) -> None:
    """The status reads the typed request's ``base64`` (no raw params anywhere)."""
    request_id = await api.submit("qwen-image-fast", base64=True)
    claimed = api.claim("qwen-image-fast")
    assert claimed.request.base64 is True
    api.complete(claimed.id)
    body = (await api.http.get(f"/v2/requests/{request_id}", headers=api.headers())).json()
    assert body["status"] == "COMPLETED" and not str(body["output"]).startswith("http")
