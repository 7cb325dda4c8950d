"""A real headless Chromium for the playground's tests (Playwright driving Debian's ``chromium``
binary; ``.ci/run`` installs it): the page used as a person would, its script errors collected."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = (
    os.environ.get("QWENSERVE_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium; CI installs it)"
)


def field(page: Any, label: str) -> Any:
    """The control whose label is exactly ``label`` (as a person finds it)."""
    return page.get_by_label(label, exact=True)


@contextmanager
def chromium_page(errors: list[str], **context_args: Any) -> Iterator[Any]:
    """A page in a fresh headless Chromium; script errors and console errors go to ``errors``.
    ``page.context.browser.new_context()`` gives a second, separate browser profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra's playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000}, **context_args)
            page = context.new_page()
            watch(page, errors)
            yield page
        finally:
            browser.close()


def watch(page: Any, errors: list[str]) -> None:
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
