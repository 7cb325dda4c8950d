"""README.md, executed: every shell and Python block that talks to a server runs here, as
written, against one real `qwenserve serve` on the tiny preset, and what it prints or writes is
checked. A block that is not meant to run says so in its fence (```` ```bash norun ````).

The server is the README's own quick start (``qwenserve serve &`` and ``keys create``), run by
bash in a fresh ``HOME`` (so ``~/.qwenserve`` is this test's) with ``QWENSERVE_PORT`` on a free
port; the blocks after it get the ``SEGMIND_API_KEY`` it exported (tests/service/
readme_harness.py, which lists what it rewrites). Input images a block opens (``bottle.png``)
are made in its working folder. The webhook receiver's fragment (``python norun``) runs on the
delivery that arrives. The scale-out block's machines run here on a local redis-server
(``Readme.run_machines``). Blocks run in README order (later ones list the requests earlier
ones made).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from tests.redis_server import RedisServer, require_redis_server
from tests.service.readme_blocks import README as README_PATH
from tests.service.readme_blocks import Block, readme_blocks
from tests.service.readme_harness import QUICK_START, SCALE_OUT_STORE, Ran, Readme, png, quick_start

BLOCKS = readme_blocks()
VERIFY_FRAGMENT = "Webhook(secret).verify("


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[Readme]:
    [quick] = [b for b in BLOCKS if QUICK_START in b.text]
    with quick_start(quick, tmp_path_factory.mktemp("readme"), shared_cache) as started:
        yield started


# --- what each runnable block must print or write, keyed by a line of it --------------------


def _sdk(ran: Ran, readme: Readme) -> None:
    status, output, inference_time = ran.stdout.split()
    assert status == "COMPLETED" and "/media/" in output and float(inference_time) > 0
    fox = ran.image("fox.webp")
    assert fox.format == "WEBP" and fox.size == (768, 512)


def _own_client(ran: Ran, readme: Readme) -> None:
    statuses = [line.split()[0] for line in ran.stdout.splitlines()]
    assert statuses and set(statuses) <= {"QUEUED", "PROCESSING", "COMPLETED"}, ran.stdout
    assert ran.image("lighthouse.png").format == "PNG"


def _cli(ran: Ran, readme: Readme) -> None:
    assert ran.image("a.png").format == "PNG"


def _idempotent(ran: Ran, readme: Readme) -> None:
    [first] = ran.json_objects()
    assert first["status"] == "QUEUED" and first["request_id"], first
    before = readme.get("/v1/get-user-credits").json()["credits"]
    again = readme.run(_block("Idempotency-Key: order-1234"))
    assert again.json_objects() == [first], "the same again: the same request_id"
    assert readme.get("/v1/get-user-credits").json()["credits"] == before, "no second charge"


def _openai(ran: Ran, readme: Readme) -> None:
    assert ran.image("kite.png").format == "PNG"
    events = ran.stdout.split()
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


def _webhook(ran: Ran, readme: Readme) -> None:
    """The ending is POSTed to the URL, signed: the README's receiver fragment verifies it."""
    [queued] = ran.json_objects()
    assert queued["status"] == "QUEUED", queued
    request_headers, raw_body = readme.hooks.wait()
    [fragment] = [b for b in BLOCKS if VERIFY_FRAGMENT in b.text]
    names: dict[str, Any] = {
        "secret": readme.webhook_secret(),
        "raw_body": raw_body,
        "request_headers": request_headers,
    }
    exec(fragment.text, names)
    payload = names["payload"]
    assert payload["request_id"] == queued["request_id"] and payload["status"] == "COMPLETED"
    assert "webhook" not in payload, "the body is GET /v2/requests/{id}'s, less its webhook"
    names["request_headers"] = {**request_headers, "webhook-id": "msg_forged"}
    with pytest.raises(WebhookVerificationError, match="signature"):
        exec(fragment.text, names)


def _history(ran: Ran, readme: Readme) -> None:
    listed, page = ran.json_objects()
    rows = listed["data"]
    assert isinstance(rows, list) and rows, "the examples above made qwen-image-fast images"
    assert {(r["status"], r["model"]) for r in rows} == {("COMPLETED", "qwen-image-fast")}
    assert isinstance(page["data"], list) and len(page["data"]) == 1, page


def _usage(ran: Ran, readme: Readme) -> None:
    [usage] = ran.json_objects()
    total = usage["total"]
    assert isinstance(total, dict) and total["count"] >= 5 and total["cost_usd"] > 0, usage
    models = {row["model"] for row in usage["data"]}
    assert {"qwen-image", "qwen-image-fast", "qwen-image-2512"} <= models


def _scale_out(ran: Ran, readme: Readme) -> None:
    """`qwenserve status` shows the worker the block started, its models, idle."""
    assert "workers" in ran.stdout and "oldest waiting job: none" in ran.stdout, ran.stdout
    [row] = [line for line in ran.stdout.splitlines() if "qwen-image, qwen-image-fast" in line]
    assert "idle" in row, ran.stdout


EXPECTATIONS: dict[str, Callable[[Ran, Readme], None]] = {
    'client.run("qwen-image-fast"': _sdk,
    "from qwenserve.client import QwenServeClient": _own_client,
    "qwenserve run qwen-image-fast --server": _cli,
    "Idempotency-Key: order-1234": _idempotent,
    "from openai import OpenAI": _openai,
    "?webhook=https://example.com/hook": _webhook,
    "v2/requests?status=completed": _history,
    "v1/usage?since=": _usage,
    f"--store {SCALE_OUT_STORE} --workers 0": _scale_out,
}
INPUT_FILES = {"bottle.png": png((30, 90, 200)), "beach.png": png((230, 200, 120))}


def _block(marker: str) -> Block:
    [block] = [b for b in BLOCKS if b.kind and marker in b.text]
    return block


def _expectation(block: Block) -> Callable[[Ran, Readme], None] | None:
    matches = [check for marker, check in EXPECTATIONS.items() if marker in block.text]
    assert len(matches) <= 1, f"{block.id}: more than one expectation matches"
    return matches[0] if matches else None


RUNNABLE = [b for b in BLOCKS if b.kind and not b.norun and QUICK_START not in b.text]


def test_every_block_runs_or_says_it_does_not() -> None:
    """A shell or Python block either runs here (with a check of what it prints or writes) or
    is marked ``norun``; every expectation still finds its block."""
    assert any(QUICK_START in b.text for b in BLOCKS), "the quick start starts the server"
    unchecked = [b.id for b in RUNNABLE if _expectation(b) is None]
    assert not unchecked, f"runnable README blocks with no expectation here: {unchecked}"
    for marker in EXPECTATIONS:
        assert len([b for b in RUNNABLE if marker in b.text]) == 1, marker
    runs = {b.kind for b in RUNNABLE}
    assert runs == {"bash", "python"}, "both kinds run"


def test_ci_runs_the_readme_test_command() -> None:
    """The README's install-and-test line (not run here: it installs) is exactly what CI runs,
    and it installs torch from the pin the README explains."""
    [install] = [b for b in BLOCKS if "python -m pytest" in b.text and b.norun]
    [command] = [line for line in install.text.splitlines() if "python -m pytest" in line]
    ci = (README_PATH.parent / ".ci" / "run").read_text()
    assert command in ci.splitlines(), f"{command!r} is not a line of .ci/run"
    assert command.startswith("pip install torch==2.13.0 ")
    readme = README_PATH.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme, "the CPU build elsewhere"


def test_quick_start_leaves_a_server_and_a_key(readme: Readme) -> None:
    assert readme.key.startswith("qs_"), "keys are shown as qs_… in the README"
    assert (Path(readme.env["HOME"]) / ".qwenserve").is_dir(), "data in ~/.qwenserve"
    credits = readme.get("/v1/get-user-credits")
    assert credits.status_code == 200 and credits.json()["credits"] == 10.0


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block(readme: Readme, block: Block) -> None:
    for name, data in INPUT_FILES.items():
        if name in block.text:
            (readme.work / name).write_bytes(data)
    if SCALE_OUT_STORE in block.text:
        require_redis_server()
        with RedisServer() as redis_server:
            ran = readme.run_machines(block, redis_server.url)
    else:
        ran = readme.run(block)
    assert ran.returncode == 0, f"{block.id} failed:\n{ran.stdout}\n{ran.stderr}"
    for answer in ran.json_objects():
        assert answer.get("error") is None, f"{block.id}: {answer}"
    check = _expectation(block)
    assert check is not None
    check(ran, readme)
