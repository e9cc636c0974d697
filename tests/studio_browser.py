"""Helpers for driving the studio in a real, headless Chromium (the browser test and the docs' screenshot).

``find_browser()`` says where Chromium and its driver are, or why they cannot be used;
``running_studio()`` serves a ``Studio`` on a free local port in a thread; ``chromium()`` starts
the headless browser through selenium with an explicit chromedriver path (selenium's own driver
manager would try to download one, which fails offline).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")


def find_browser() -> tuple[str | None, str | None, str]:
    """``(browser, driver, reason)``: both paths, or Nones and why (for ``pytest.skip``)."""
    if os.environ.get("MUSEFORMER_BROWSER_TEST") == "0":
        return None, None, "MUSEFORMER_BROWSER_TEST=0"
    browser = os.environ.get("MUSEFORMER_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("MUSEFORMER_CHROMEDRIVER") or next(
        (d for d in (shutil.which(n) or (n if Path(n).is_file() else None) for n in DRIVERS) if d), None)
    if browser is None or driver is None:
        missing = " and ".join(w for w, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        return None, None, f"{missing} not found (Debian: apt-get install chromium chromium-driver, or " \
                           "tools/install-browser.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, None, "selenium is not installed (pip install -e '.[dev]')"
    return browser, driver, ""


@contextlib.contextmanager
def running_studio(studio) -> Iterator[str]:
    """Serve ``studio`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its URL."""
    import uvicorn

    from museformer.studio.app import _listen, create_app, url_of

    sock = _listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(studio), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        studio.close()
        sock.close()


@contextlib.contextmanager
def chromium(browser: str, driver: str, downloads: Path, width: int = 1300, height: int = 1000):
    """A headless Chromium (selenium WebDriver) that saves downloads into ``downloads``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    web = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        web.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        web.set_script_timeout(60)
        yield web
    finally:
        web.quit()


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    """Poll ``condition()`` until it is truthy; its value (AssertionError naming ``what`` on timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def generate_on_page(web, url: str, **fields) -> None:
    """Open the page, fill the given fields (element id -> value), press Generate."""
    from selenium.webdriver.common.by import By

    web.get(url)
    wait_for(lambda: web.execute_script("return document.body.dataset.ready") == "1", 30, "the page to load")
    for name, value in fields.items():
        box = web.find_element(By.ID, name)
        box.clear()
        box.send_keys(str(value))
    web.find_element(By.ID, "generate").click()
