"""Debian's Chromium for the browser tests: found, or the test module skipped (failed in CI).

Call :func:`require_chromium` at module level: it returns the browser's path and Playwright's
async API. Playwright drives this browser through ``executable_path``; it downloads none.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

# Flags for a sandboxed, offline machine: no first-run UI, no calls home.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> tuple[str, ModuleType]:
    """Chromium's path and ``playwright.async_api``; skips the module without them (fails
    under CI, where the browser tests are required)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for the browser tests (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
    try:
        api = importlib.import_module("playwright.async_api")
    except ImportError as error:
        reason = f"Playwright is not installed (pip install playwright): {error}"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs it: {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return chromium, api
