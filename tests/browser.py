"""A real headless Chromium for the dashboard's tests, driven by Playwright.

The browser is Debian's `chromium` package where it is installed (`.ci/run` installs it; `$CONCLAVE_CHROMIUM` names
another binary), else the one `playwright install chromium` downloads. With neither, the tests fail and say so:
a dashboard test is not skipped.

Every page records its console errors and uncaught exceptions, and screenshots go to `$CONCLAVE_ARTEFACTS`
(default `test-artefacts/` in the working directory), kept after the run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ARTEFACTS = Path(os.environ.get("CONCLAVE_ARTEFACTS", "test-artefacts"))


def chromium_path() -> str | None:
    """Debian's chromium (or $CONCLAVE_CHROMIUM); None: Playwright's own browser."""
    return os.environ.get("CONCLAVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright):
    try:
        return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
    except Exception as exc:
        raise RuntimeError(f"no browser for the dashboard's tests ({exc}): `apt-get install chromium` (Debian, "
                           f"Ubuntu: `chromium-browser`), or `playwright install chromium`") from None


@dataclass
class Watched:
    """A page and what went wrong in it: console errors and uncaught exceptions."""

    page: object
    errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_page(browser, url: str, key: str | None = None, width: int = 1280) -> Watched:
    """A new browser context (its own storage) with the dashboard at `url`; the key, if any, already in its session
    storage, as if the user had typed it."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    if key is not None:
        context.add_init_script(f"sessionStorage.setItem('conclave-api-key', {key!r})")
    page = context.new_page()
    watched = Watched(page)
    page.on("console", lambda message: watched.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.goto(url)
    return watched
