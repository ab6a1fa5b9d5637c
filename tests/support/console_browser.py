"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium, for
the console's browser test; screenshots go to ``artifacts/screenshots/`` (kept by CI)."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .pipeline import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "artifacts" / "screenshots"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def missing() -> str | None:
    """What this machine lacks for the browser test, or None."""
    lacking = []
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        lacking.append("chromium")
    if shutil.which("chromedriver") is None and not Path(CHROMEDRIVER).exists():
        lacking.append("chromedriver (Debian's chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        lacking.append("selenium (pip install -e '.[test]')")
    return ", ".join(lacking) or None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium with a fresh profile, closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cscart-fm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(shutil.which("chromedriver") or CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Screenshots:
    """Numbered screenshots of one test: ``console-01-login.png``, ..."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.taken: list[Path] = []
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SCREENSHOTS.glob(f"{prefix}-*.png"):
            old.unlink()

    def take(self, driver: Any, step: str) -> Path:
        name = re.sub(r"[^a-z0-9-]+", "-", step.lower()).strip("-")
        path = SCREENSHOTS / f"{self.prefix}-{len(self.taken) + 1:02d}-{name}.png"
        driver.save_screenshot(str(path))
        self.taken.append(path)
        return path
