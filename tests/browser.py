"""A real headless Chromium for page tests: Debian's ``chromium`` driven by Playwright, loopback only.

Every request the page makes to a host other than loopback is aborted and recorded in
``BrowserPage.blocked``, so a test can assert that a page works with no network and loads nothing
from outside the server. Browsers are never downloaded: the system ``chromium`` is used (``.ci/run``
installs Debian's package). Without it the tests are skipped locally and fail under CI (``CI`` set).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlsplit

import pytest

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def chromium_path() -> str:
    """Path of the system Chromium, or skip (fail under CI, where ``.ci/run`` installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class BrowserPage:
    page: object                                   # playwright.sync_api.Page
    blocked: list[str] = field(default_factory=list)        # URLs refused because not loopback
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return (parts.hostname or "") in LOOPBACK_HOSTS or (parts.hostname or "").startswith("127.")


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 800)) -> Iterator[BrowserPage]:
    """A fresh page in headless Chromium whose only reachable network is loopback."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable, headless=True,
            # Name resolution fails for everything but loopback, so nothing outside can be reached
            # even by requests the route below would not see (e.g. DNS prefetch).
            args=["--no-sandbox", "--disable-dev-shm-usage",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"])
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            result = BrowserPage(page=context.new_page())

            def guard(route):
                if is_loopback(route.request.url):
                    route.continue_()
                else:
                    result.blocked.append(route.request.url)
                    route.abort("internetdisconnected")

            context.route("**/*", guard)
            result.page.on("console", lambda msg: msg.type == "error" and result.console_errors.append(msg.text))
            result.page.on("pageerror", lambda exc: result.page_errors.append(str(exc)))
            yield result
        finally:
            browser.close()
