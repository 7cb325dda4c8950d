"""What a client reads when the server itself fails (issue 13): a stable sentence, never the
store's address or an internal exception's name; the details go to the logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from qwenserve.errors import InferenceError
from qwenserve.store.redis import RedisStore
from tests.redis_server import RedisServer, require_redis_server
from tests.service.helpers import body_for
from tests.service.inprocess import make_harness


async def test_a_redis_outage_is_a_503_that_hides_the_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis_server()
    server = RedisServer().start()
    store = RedisStore.from_url(server.url, namespace="outage")
    try:
        async for api in make_harness(store, tmp_path):
            server.stop()
            with caplog.at_level(logging.WARNING, logger="qwenserve.store"):
                response = await api.http.post(
                    "/v2/qwen-image-fast", json=body_for("qwen-image-fast"), headers=api.headers()
                )
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error == "the job store is unavailable; retry later"
            assert "Retry-After" in response.headers and int(response.headers["Retry-After"]) >= 1
            port = server.url.rsplit(":", 1)[-1].split("/")[0]
            assert port not in response.text and "127.0.0.1" not in response.text
            assert any(port in record.getMessage() for record in caplog.records), "logged"
    finally:
        store.close()
        server.stop()


def test_an_engine_failure_reads_as_a_sentence_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("torch")
    from qwenserve.runtime.run import run_pipeline
    from qwenserve.runtime.sizes import SizePlan

    def broken(**_: Any) -> Any:
        raise RuntimeError("The size of tensor a (4096) must match the size of tensor b (8192)")

    with (
        caplog.at_level(logging.ERROR, logger="qwenserve.runtime"),
        pytest.raises(InferenceError) as caught,
    ):
        run_pipeline(
            broken,  # type: ignore[arg-type]
            {"generator": None},
            SizePlan(64, 64, 64, 64),
            total_steps=2,
            on_step=None,
            should_cancel=None,
            free_memory=lambda: None,
            device_type="cpu",
        )
    assert caught.value.message == "generation failed: the engine could not run this request"
    assert "RuntimeError" in caplog.text and "size of tensor a" in caplog.text
