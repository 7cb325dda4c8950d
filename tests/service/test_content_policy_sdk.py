"""The official `segmind` SDK, unchanged, against a real server with the content policy on:
a blocked prompt and a blocked output both raise the SDK's usual failure (InferenceFailed on
v2, SegmindError 422 on v1), with nothing charged; /metrics counts each block by kind. The
output classifier is plugged in by name (tests/policy_classifiers.py flags every image), the
way an operator plugs in their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from segmind import InferenceFailed, SegmindClient, SegmindError

from qwenserve.policy import OUTPUT_BLOCKED, PROMPT_BLOCKED
from tests.processes import Server
from tests.service.helpers import body_for
from tests.service.test_metrics import samples, value
from tests.service.test_segmind_sdk import segmind_credits


def test_blocked_prompt_and_output_fail_as_the_sdk_expects(
    make_server: Any, tmp_path: Path
) -> None:
    terms = tmp_path / "blocked.txt"
    terms.write_text("forbidden fruit\n", encoding="utf-8")
    server: Server = make_server(
        env={
            "QWENSERVE_CONTENT_POLICY": "prompt+output",
            "QWENSERVE_BLOCKED_TERMS_FILE": str(terms),
            "QWENSERVE_NSFW_CLASSIFIER": "tests.policy_classifiers:flag_everything",
        }
    )
    server.start()
    key = server.create_key(credits=10.0)
    client = SegmindClient(api_key=key, base_url=f"{server.url}/v1", timeout=120)
    slug = "qwen-image-fast"

    blocked = body_for(slug, prompt="a bowl of FORBIDDEN fruit")
    with pytest.raises(InferenceFailed) as caught:
        client.submit_async(slug, **blocked).wait(timeout=30, interval=0.1)
    assert caught.value.detail == PROMPT_BLOCKED
    assert caught.value.status_body["status"] == "FAILED"
    with pytest.raises(SegmindError) as refused:
        client.run_sync(slug, **blocked)
    assert refused.value.status == 422
    assert segmind_credits(server, key) == pytest.approx(10.0), "nothing charged"

    # An allowed prompt runs, and its output is blocked by the classifier, then refunded.
    job = client.submit_async(slug, **body_for(slug, prompt="a bowl of fruit"))
    with pytest.raises(InferenceFailed) as flagged:
        job.wait(timeout=120, interval=0.1)
    assert flagged.value.detail == OUTPUT_BLOCKED
    result = httpx.get(job.response_url, headers={"x-api-key": key}, timeout=10)
    assert result.status_code == 422 and result.json()["output"] is None
    assert segmind_credits(server, key) == pytest.approx(10.0), "a blocked output is refunded"

    page = samples(httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert value(page, "qwenserve_content_policy_blocks_total", kind="prompt") == 2
    assert value(page, "qwenserve_content_policy_blocks_total", kind="output") == 1
    logs = server.logs()
    assert "blocked by the content policy" in logs
    assert "FORBIDDEN" not in logs, "the prompt is not logged unless configured"


def test_serve_refuses_to_start_with_an_invalid_expression(
    make_server: Any, tmp_path: Path
) -> None:
    terms = tmp_path / "blocked.txt"
    terms.write_text("ok\nre:[unclosed\n", encoding="utf-8")
    server: Server = make_server(
        env={"QWENSERVE_CONTENT_POLICY": "prompt", "QWENSERVE_BLOCKED_TERMS_FILE": str(terms)}
    )
    server.start(wait=False)
    assert server.process is not None
    assert server.process.wait(60) != 0
    assert "line 2: invalid regular expression" in server.logs()
