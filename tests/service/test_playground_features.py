"""The playground's money, history and code, in a real Chromium against a real server on the
tiny preset: the cost of a run and the key's balance as the API states them, a cancel shown as
refunded (not a failure) with the balance restored, a model switch that starts blank, the key's
gallery whose tiles reload a run's parameters into the form, and the "Copy as code" box, whose
snippets (curl, the segmind SDK, the openai SDK) are taken from the page and run as shown."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.processes import Server
from tests.service.browser import NEEDS_CHROMIUM, chromium_page, field, watch

pytestmark = [NEEDS_CHROMIUM, pytest.mark.slow]

BAD_RED = "rgb(179, 38, 30)"  # --bad in playground.css
# Quotes, a dollar sign, a backslash and non-ASCII: what breaks code quoted carelessly.
PROMPT = 'it\'s a "quoted" $HOME lighthouse \\ at dusk, ünïcödé 灯台'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Iterator[Server]:
    """History keeps prompts here, so each run's prompt can be checked as the server got it."""
    srv = Server(
        data_dir=tmp_path_factory.mktemp("data"),
        cache_dir=shared_cache,
        extra_env={"QWENSERVE_HISTORY_KEEP_PROMPTS": "true"},
    )
    srv.start()
    yield srv
    srv.stop()


def credits(server: Server, key: str) -> float:
    response = httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key})
    value: float = response.json()["credits"]
    return value


def job_status(server: Server, key: str, request_id: str) -> dict[str, Any]:
    url = f"{server.url}/v2/requests/{request_id}/status"
    body: dict[str, Any] = httpx.get(url, headers={"x-api-key": key}).json()
    return body


def balance_shows(page: Any, usd: float) -> None:
    """Wait until the page's balance is ``usd``."""
    page.wait_for_function(
        "usd => Math.abs(Number(document.getElementById('balance').dataset.usd) - usd) < 1e-9",
        arg=usd,
        timeout=15_000,
    )


def status_is(page: Any, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('status-text').textContent === t", arg=text, timeout=60_000
    )


def model_is(page: Any, model: str) -> None:
    """Pick ``model`` and wait for its form."""
    field(page, "Model").select_option(model)
    page.wait_for_function("m => document.getElementById('run-form').dataset.slug === m", arg=model)


def loaded(page: Any, model: str, request_id: str) -> None:
    """Wait until a tile's click has put request ``request_id`` (of ``model``) into the form."""
    page.wait_for_function(
        "([m, id]) => document.getElementById('run-form').dataset.slug === m"
        " && document.getElementById('form-note').textContent.includes(id)",
        arg=[model, request_id],
    )


def generate(page: Any, model: str, **values: str) -> None:
    model_is(page, model)
    for label, value in values.items():
        field(page, label.replace("_", " ").capitalize()).fill(value)
    page.get_by_role("button", name="Generate").click()


def test_cost_balance_cancel_and_a_model_switch(server: Server) -> None:
    key = server.create_key(credits=1.0)
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(f"{server.url}/")
        field(page, "API key").fill(key)
        balance_shows(page, 1.0)
        assert page.locator("#balance").inner_text() == "Balance: $1.00"

        # A run: its cost is the job's, and the balance goes down by it.
        generate(
            page, "qwen-image-2512", prompt="a fox", width="256", height="256", steps="2", seed="5"
        )
        status_is(page, "Completed")
        request_id = page.locator("dd[data-fact=request]").inner_text()
        cost = job_status(server, key, request_id)["metrics"]["cost"]
        assert cost == pytest.approx(0.05)
        shown = page.locator("dd[data-fact=cost]")
        assert float(shown.get_attribute("data-usd")) == cost and shown.inner_text() == "$0.05"
        assert credits(server, key) == pytest.approx(1.0 - cost)
        balance_shows(page, credits(server, key))
        assert page.locator("#balance").inner_text() == "Balance: $0.95"

        # Another model: the last run's result and status go.
        field(page, "Model").select_option("qwen-image")
        status_is(page, "Nothing submitted yet.")
        assert page.locator("#result").is_hidden() and page.locator("#result-facts dd").count() == 0

        # A cancel: said as refunded (no red, no banner), and the balance is back.
        before = credits(server, key)
        generate(page, "qwen-image", prompt="a slow fox", steps="50")
        page.wait_for_function(
            "() => /^Step \\d+ of 50$/.test(document.getElementById('status-text').textContent)"
        )
        balance_shows(page, before - 0.121)  # held at submit
        page.get_by_role("button", name="Cancel").click()
        status_is(page, "Cancelled — refunded")
        assert page.locator("#status").get_attribute("data-tone") == "cancelled"
        assert page.locator("#status-text").evaluate("e => getComputedStyle(e).color") != BAD_RED
        assert "Nothing was charged" in page.locator("#status-detail").inner_text()
        assert page.locator("#banner").is_hidden() and page.locator("#cancel").is_hidden()
        balance_shows(page, before)
        assert credits(server, key) == pytest.approx(before)
        cancelled = page.locator("#gallery .tile[data-status=FAILED]")
        assert "Cancelled — refunded" in cancelled.inner_text()
        assert "$0.00" in cancelled.inner_text()
        page.screenshot(path="/tmp/playground-cancelled.png", full_page=True)

        # A model switch clears a refused submit too: its status, banner and field errors.
        model_is(page, "qwen-image-fast")
        status_is(page, "Nothing submitted yet.")
        field(page, "Prompt").fill("a fox")
        field(page, "Steps").fill("99")
        page.get_by_role("button", name="Generate").click()
        page.locator("#f-steps-error").wait_for(state="visible")
        assert page.locator("#status-text").inner_text() == "Not submitted."
        field(page, "Model").select_option("qwen-image-edit-fast")
        status_is(page, "Nothing submitted yet.")
        page.locator("#f-image").wait_for()
        assert page.locator(".field-error:visible").count() == 0
        assert page.locator("#banner").is_hidden()
    assert [e for e in errors if "400" not in e] == [], errors


def tile(page: Any, request_id: str) -> Any:
    return page.locator(f'#gallery .tile[data-request-id="{request_id}"]')


def test_gallery_lists_the_runs_and_a_click_reloads_one(server: Server) -> None:
    key = server.create_key(credits=1.0)
    # A run made elsewhere (curl, an SDK): in the gallery too.
    elsewhere = httpx.post(
        f"{server.url}/v1/qwen-image-fast",
        headers={"x-api-key": key},
        json={"prompt": "a cat", "steps": 1, "seed": 11},
        timeout=120,
    )
    assert elsewhere.status_code == 200
    elsewhere_id = elsewhere.headers["x-request-id"]
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(f"{server.url}/")
        field(page, "API key").fill(key)
        tile(page, elsewhere_id).wait_for()
        generate(
            page,
            "qwen-image-2512",
            prompt="a fox in the snow",
            width="256",
            height="320",
            steps="3",
            seed="77",
        )
        status_is(page, "Completed")
        request_id = page.locator("dd[data-fact=request]").inner_text()
        tile(page, request_id).locator("img").wait_for()  # listed after the run, with its image
        ids = page.locator("#gallery .tile").evaluate_all("ts => ts.map(t => t.dataset.requestId)")
        assert ids == [request_id, elsewhere_id], "newest first"
        assert tile(page, request_id).locator(".tile-cost").inner_text() == "$0.05"
        assert tile(page, request_id).locator(".tile-prompt").inner_text() == "a fox in the snow"

        # Another model and prompt, then a click: the run's model and parameters come back.
        model_is(page, "qwen-image-fast")
        field(page, "Prompt").fill("something else")
        tile(page, request_id).click()
        loaded(page, "qwen-image-2512", request_id)
        assert field(page, "Prompt").input_value() == "a fox in the snow"
        assert [field(page, n).input_value() for n in ("Width", "Height", "Steps", "Seed")] == [
            "256",
            "320",
            "3",
            "77",
        ]
        assert '"prompt": "a fox in the snow"' in page.locator("#code-curl code").text_content()

        # Another browser (nothing kept there): what the API keeps: the model, the prompt (this
        # server keeps prompts), the seed and size.
        other = page.context.browser.new_context().new_page()
        watch(other, errors)
        other.goto(f"{server.url}/")
        field(other, "API key").fill(key)
        tile(other, request_id).locator("img").wait_for()
        tile(other, request_id).click()
        loaded(other, "qwen-image-2512", request_id)
        assert [field(other, n).input_value() for n in ("Width", "Height", "Seed")] == [
            "256",
            "320",
            "77",
        ]
        assert field(other, "Prompt").input_value() == "a fox in the snow"
        assert field(other, "Steps").input_value() == "6", "not kept anywhere: the default"
        assert "not sent from this browser" in other.locator("#form-note").inner_text()
        tile(other, elsewhere_id).locator("img").wait_for()
        tile(other, elsewhere_id).click()
        loaded(other, "qwen-image-fast", elsewhere_id)
        assert field(other, "Seed").input_value() == "11"
        assert field(other, "Prompt").input_value() == "a cat"
        other.screenshot(path="/tmp/playground-gallery.png", full_page=True)
        page.screenshot(path="/tmp/playground-final.png", full_page=True)
    assert errors == [], errors


# --- the code box ------------------------------------------------------------------------------


def code(page: Any, lang: str) -> str:
    text: str = page.locator(f"#code-{lang} code").text_content()
    return text


def curl_body(curl: str) -> Any:
    """The JSON a curl command sends with ``-d``, read as a shell reads it."""
    command = "\n".join(line for line in curl.splitlines() if not line.startswith("#"))
    argv = shlex.split(command.replace("\\\n", " "))
    return json.loads(argv[argv.index("-d") + 1])


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def seed_of(server: Server, key: str, request_id: str) -> int:
    url = f"{server.url}/v2/requests/{request_id}"
    seed: int = httpx.get(url, headers={"x-api-key": key}, timeout=10).json()["seed"]
    return seed


def history(server: Server, key: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/v2/requests", headers={"x-api-key": key}, timeout=10)
    data: list[dict[str, Any]] = response.json()["data"]
    return data


COMMANDS = {
    "curl": ["bash", "-c"],
    "segmind": [sys.executable, "-c"],
    "openai": [sys.executable, "-c"],
}


def run_snippets(page: Any, key: str, folder: Path, langs: list[str]) -> dict[str, str]:
    """The snippets as the page shows them, each run at once in its own copy of ``folder``
    (the one a user would run it in); what each printed."""
    env = {**os.environ, "SEGMIND_API_KEY": key}
    started = {}
    for lang in langs:
        where = folder / lang
        shutil.copytree(folder, where, ignore=shutil.ignore_patterns(*COMMANDS))
        argv = [*COMMANDS[lang], code(page, lang)]
        started[lang] = subprocess.Popen(
            argv, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    printed = {}
    for lang, process in started.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"the {lang} snippet failed:\n{out}\n{err}"
        printed[lang] = out
    return printed


def made(folder: Path, lang: str, printed: dict[str, str], price: str) -> bytes:
    """The image a snippet made: its output file, or the URL the segmind snippet printed."""
    if lang != "segmind":
        return (folder / lang / "output.png").read_bytes()
    status, cost, url = printed[lang].split()
    assert (status, cost) == ("COMPLETED", price)
    return httpx.get(url, timeout=10).content


def test_code_box_follows_the_form_and_each_snippet_runs(server: Server, tmp_path: Path) -> None:
    key = server.create_key(credits=5.0)
    errors: list[str] = []
    with chromium_page(errors, permissions=["clipboard-read", "clipboard-write"]) as page:
        page.goto(f"{server.url}/")
        field(page, "API key").fill(key)
        field(page, "Model").select_option("qwen-image-2512")
        page.locator("#f-width").wait_for()
        field(page, "Prompt").fill(PROMPT)
        field(page, "Width").fill("256")
        field(page, "Height").fill("320")
        field(page, "Steps").fill("2")
        field(page, "Seed").fill("42")
        field(page, "Image format").select_option("png")

        # The code is the form: each value as the form sends it, the key never in it.
        curl = code(page, "curl")
        assert f"{server.url}/v1/qwen-image-2512" in curl and key not in curl
        assert curl_body(curl) == {
            "prompt": PROMPT,
            "base_64": False,
            "height": 320,
            "image_format": "png",
            "quality": 90,
            "seed": 42,
            "steps": 2,
            "width": 256,
        }
        segmind = code(page, "segmind")
        assert 'client.run(\n    "qwen-image-2512",' in segmind and "steps=2," in segmind
        openai = code(page, "openai")
        assert "images.generate(" in openai and 'size="256x320"' in openai
        assert 'extra_body={"seed": 42, "steps": 2}' in openai
        field(page, "Steps").fill("3")  # the box follows each change
        assert '"steps": 3' in code(page, "curl") and "steps=3," in code(page, "segmind")
        assert '"steps": 3}' in code(page, "openai")
        page.get_by_role("tab", name="Python: openai").click()
        assert page.locator("#code-openai").is_visible() and page.locator("#code-curl").is_hidden()
        page.get_by_role("button", name="Copy").click()
        page.get_by_text("Copied.").wait_for()
        assert page.evaluate("navigator.clipboard.readText()") == code(page, "openai")

        langs = ["curl", "segmind", "openai"]
        work = tmp_path / "t2i"
        work.mkdir()
        printed = run_snippets(page, key, work, langs)
        assert {size_of(made(work, lang, printed, "0.05")) for lang in langs} == {(256, 320)}
        runs = history(server, key)
        assert [r["prompt"] for r in runs] == [PROMPT] * 3, "each got the prompt exactly"
        assert {r["model"] for r in runs} == {"qwen-image-2512"}
        assert {seed_of(server, key, r["request_id"]) for r in runs} == {42}

        # An edit from an uploaded file: each snippet reads the same file from the disk.
        work = tmp_path / "edit"
        work.mkdir()
        upload = work / "my photo.png"
        Image.new("RGB", (96, 64), (30, 160, 90)).save(upload)
        field(page, "Model").select_option("qwen-image-edit-fast")
        page.locator("#f-image").wait_for()
        page.locator("#f-image").set_input_files(str(upload))
        field(page, "Prompt").fill("make it 'blue'")
        field(page, "Steps").fill("2")
        field(page, "Seed").fill("3")
        field(page, "Image format").select_option("png")
        assert "base64 < 'my photo.png'" in code(page, "curl")
        assert 'open("my photo.png", "rb")' in code(page, "openai")
        assert "images.edit(" in code(page, "openai")
        langs = ["curl", "openai"]  # the file base64-encoded by the shell; uploaded as a file
        printed = run_snippets(page, key, work, langs)
        sizes = {size_of(made(work, lang, printed, "0.03")) for lang in langs}
        assert len(sizes) == 1 and (ratio := sizes.pop())[0] / ratio[1] == pytest.approx(1.5, 0.1)
        runs = history(server, key)[:2]
        assert [r["prompt"] for r in runs] == ["make it 'blue'"] * 2
        assert {seed_of(server, key, r["request_id"]) for r in runs} == {3}
    assert errors == [], errors
