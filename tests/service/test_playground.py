"""The playground at ``/``: its files served by the package (in-process), and the page used as a
person would, in a real headless Chromium (Playwright, Debian's ``chromium``) against a real
server on the tiny preset: key, model, form, submit, live progress, the image; an edit with an
uploaded file; a 400 shown next to its field. The money, the gallery and the code box:
test_playground_features.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qwenserve.store.base import Store
from tests.processes import Server
from tests.service.browser import CHROMIUM, NEEDS_CHROMIUM, field
from tests.service.inprocess import Harness, make_harness, open_test_store


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_test_store("sqlite", tmp_path, request)


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in make_harness(store, tmp_path):
        yield harness


async def test_page_and_assets_come_from_the_package(api: Harness) -> None:
    page = await api.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
    assert {"/playground/playground.js", "/playground/playground.css"} <= set(assets)
    assert "http" not in " ".join(re.findall(r'(?:src|href)="([^"]+)"', page.text)), "no CDN"
    # Every module the page imports, and each of theirs, is served as JavaScript.
    pending, served = ["playground.js"], set()
    while pending:
        name = pending.pop()
        script = await api.http.get(f"/playground/{name}")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"], name
        served.add(name)
        pending += set(re.findall(r'from "\./([\w.]+)"', script.text)) - served
    assert {"form.js", "follow.js", "account.js", "codebox.js", "snippets.js"} <= served
    assert (await api.http.get("/playground/../playground.py")).status_code == 404
    assert (await api.http.get("/playground/index.html")).status_code == 404, "a closed list"
    assert (await api.http.get("/docs")).status_code == 200, "/docs is still there"


async def test_server_info_names_the_weights_kind_only(api: Harness) -> None:
    response = await api.http.get("/v1/server-info")  # no key needed
    assert response.status_code == 200
    info = response.json()
    assert info["weights"] == "tiny" and info["random_weights"] is True
    assert info["version"]


async def test_server_info_hides_a_weights_folder(store: Store, tmp_path: Path) -> None:
    async for api in make_harness(store, tmp_path, weights="/secret/models"):
        info = (await api.http.get("/v1/server-info")).json()
        assert info["weights"] == "folder" and info["random_weights"] is False
        assert "secret" not in str(info)


# --- in a browser ------------------------------------------------------------------------------


def assert_not_blank(path: Path) -> None:
    with Image.open(path) as shot:
        low, high = zip(*shot.convert("RGB").getextrema(), strict=True)
        assert low != high, f"{path} is one color"


def image_loaded(page: Any) -> Any:
    return page.wait_for_function(
        "() => { const i = document.getElementById('result-image');"
        " return !document.getElementById('result').hidden && i.complete && i.naturalWidth > 0"
        " && !document.getElementById('submit').disabled; }",
        timeout=30_000,
    )


WATCH_STATUS = """() => {
  window.seen = [];
  const status = document.getElementById('status');
  new MutationObserver(() => window.seen.push(document.getElementById('status-text').textContent))
    .observe(status, {subtree: true, childList: true, characterData: true});
}"""


@NEEDS_CHROMIUM
@pytest.mark.slow
def test_playground_in_a_browser(make_server: Callable[..., Server], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra's playwright")
    server = make_server().start()
    key = server.create_key()
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda error: errors.append(str(error)))
            urls: list[str] = []
            page.on("request", lambda request: urls.append(request.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{server.url}/")
            notice = page.locator("#notice")
            notice.wait_for(state="visible")
            assert "tiny preset" in notice.inner_text() and "noise" in notice.inner_text()

            # A wrong key: the 401 is said in the banner.
            field(page, "API key").fill("not-a-key")
            field(page, "Model").select_option("qwen-image-fast")
            field(page, "Steps").wait_for()
            page.get_by_role("button", name="Generate").click()
            page.locator("#banner").wait_for(state="visible")
            assert page.locator("#banner").inner_text().startswith("401")

            # The key is kept in the browser, in a password field.
            field(page, "API key").fill(key)
            assert field(page, "API key").get_attribute("type") == "password"
            assert page.evaluate("localStorage.getItem('qwenserve.apiKey')") == key

            # Text to image: the form is the slug's schema (labels, ranges, defaults, help).
            field(page, "Model").select_option("qwen-image-2512")
            page.locator("#f-width").wait_for()
            assert page.locator("#f-width").get_attribute("min") == "256"
            assert page.locator("#f-width").input_value() == "1024", "its default"
            assert "256 to 2048" in page.locator("#f-width-hint").inner_text()
            assert page.locator("#f-image_format").evaluate("e => e.tagName") == "SELECT"
            assert page.locator("#f-base_64").get_attribute("type") == "checkbox"
            field(page, "Prompt").fill("a lighthouse at dusk")
            field(page, "Width").fill("256")
            field(page, "Height").fill("320")
            field(page, "Steps").fill("16")
            field(page, "Seed").fill("1234")
            page.evaluate(WATCH_STATUS)
            page.get_by_role("button", name="Generate").click()
            image_loaded(page)
            seen: list[str] = page.evaluate("window.seen")
            assert any(re.fullmatch(r"Step \d+ of 16", s) for s in seen) or any(
                s.startswith(("Queued:", "Waiting")) for s in seen
            ), f"live progress shown: {seen}"
            assert page.locator("dd[data-fact=seed]").inner_text() == "1234"
            assert page.locator("dd[data-fact=size]").inner_text() == "256 × 320"
            assert page.evaluate("document.getElementById('result-image').naturalWidth") == 256
            assert "s in all" in page.locator("dd[data-fact=time]").inner_text()
            assert page.locator("#download").get_attribute("href")
            assert page.locator("#cancel").is_hidden(), "nothing left to cancel"
            shot = tmp_path / "playground-text-to-image.png"
            page.screenshot(path=str(shot), full_page=True)
            assert_not_blank(shot)

            # An edit, from an uploaded file (sent as a data: URI).
            upload = tmp_path / "input.png"
            Image.new("RGB", (96, 64), (30, 160, 90)).save(upload)
            field(page, "Model").select_option("qwen-image-edit-fast")
            page.locator("#f-image").wait_for()
            page.locator("#f-image").set_input_files(str(upload))
            page.locator(".image-field img.thumb").wait_for(state="visible")
            field(page, "Prompt").fill("make it blue")
            field(page, "Steps").fill("2")
            page.get_by_role("button", name="Generate").click()
            image_loaded(page)
            size = page.locator("dd[data-fact=size]").inner_text()
            width = page.evaluate("document.getElementById('result-image').naturalWidth")
            assert size.startswith(f"{width} × "), "the size shown is the image's"
            shot = tmp_path / "playground-edit.png"
            page.screenshot(path=str(shot), full_page=True)
            assert_not_blank(shot)

            # A value out of range: the server's 400 message appears next to that field.
            field(page, "Steps").fill("99")  # the form is novalidate: the server judges
            page.get_by_role("button", name="Generate").click()
            error = page.locator("#f-steps-error")
            error.wait_for(state="visible")
            assert "steps" in error.inner_text() and "20" in error.inner_text()
            assert field(page, "Steps").get_attribute("aria-invalid") == "true"
            assert page.locator("#banner").is_hidden(), "every message went to its field"
            shot = tmp_path / "playground-bad-value.png"
            page.screenshot(path=str(shot), full_page=True)
            assert_not_blank(shot)

            followed = [u for u in urls if "/v2/requests/" in u]
            assert any(u.endswith("/events") for u in followed), "progress from the stream"
            assert not any(u.endswith("/status") for u in followed), "no polling while it works"

            # The events stream refused (say a proxy drops it): the status is polled instead.
            page.route("**/events", lambda route: route.abort())
            field(page, "Steps").fill("2")
            page.get_by_role("button", name="Generate").click()
            image_loaded(page)
            assert page.locator("#f-steps-error").is_hidden(), "the old message went"
            assert any(u.endswith("/status") for u in urls), "followed by polling"
            assert page.locator("#banner").is_hidden()
        finally:
            browser.close()
    # The page ran without a script error; the browser reports only the refusals made above.
    expected = ("401", "400", "net::ERR_FAILED")
    assert [e for e in errors if not any(word in e for word in expected)] == [], errors
