"""Headless Chromium for the tests that open a page: the HTML report, the monitor's live dashboard.

Selenium drives the Debian packages' ``/usr/bin/chromium`` through ``/usr/bin/chromedriver``, both named
explicitly so that selenium-manager never looks for a driver on the network. A missing browser fails the
test (``make test`` installs the packages): a page that was never opened must not pass as checked.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("SLMCL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SLMCL_CHROMEDRIVER", "/usr/bin/chromedriver")
MISSING = ("headless Chromium is not installed ({path} missing): `make test` installs it "
           "(apt-get install chromium chromium-driver)")


class Browser:
    """One headless Chromium window: open a page, read its console, take screenshots, wait on the DOM."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        for path in (CHROMIUM, CHROMEDRIVER):
            if not os.path.exists(path):
                raise RuntimeError(MISSING.format(path=path))
        self._profile = tempfile.mkdtemp(prefix="slmcl-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", f"--user-data-dir={self._profile}",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    "--hide-scrollbars", "--force-device-scale-factor=1"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver: Any = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(60)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def console(self) -> list[dict[str, Any]]:
        """The console entries logged since the last call (the driver hands each out once)."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")
        return entries

    @staticmethod
    def errors(entries: list[dict[str, Any]]) -> list[str]:
        return [str(e.get("message")) for e in entries if e.get("level") == "SEVERE"]

    def screenshot(self) -> bytes:
        png: bytes = self.driver.get_screenshot_as_png()
        return png

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_until(self, condition: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
        """Poll ``return (<condition>)`` in the page until it is truthy; its value, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.driver.execute_script(f"return ({condition});")
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page condition not met in {timeout:.0f} s: {condition}")
            time.sleep(interval)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)


# --------------------------------------------------------------------------- is a screenshot blank


def _pixels_pil(png: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    raw = img.tobytes()
    return img.width, img.height, [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _pixels_zlib(png: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) decoded with zlib alone."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        chunk = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, "only 8-bit RGB(A) non-interlaced"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * channels
    prev, pixels = bytearray(stride), []
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            line[i] = (line[i] + (0, a, b, (a + b) // 2, _paeth(a, b, c))[ftype]) & 0xFF
        pixels += [tuple(line[i:i + 3]) for i in range(0, stride, channels)]
        prev = line
    return width, height, pixels


def pixel_stats(png: bytes) -> dict[str, float]:
    """Size, number of distinct colours and the variance of grey levels of a PNG (PIL when installed)."""
    try:
        width, height, pixels = _pixels_pil(png)
    except ImportError:
        width, height, pixels = _pixels_zlib(png)
    grey = [(299 * p[0] + 587 * p[1] + 114 * p[2]) / 1000 for p in pixels]
    mean = sum(grey) / len(grey)
    return {"width": width, "height": height, "colours": len(set(pixels)),
            "variance": sum((g - mean) ** 2 for g in grey) / len(grey)}


def assert_not_blank(png: bytes, min_colours: int = 16, min_variance: float = 50.0) -> dict[str, float]:
    """A page with drawn figures has many colours and real contrast; a blank or one-colour page has neither."""
    stats = pixel_stats(png)
    assert stats["colours"] >= min_colours and stats["variance"] >= min_variance, f"blank screenshot: {stats}"
    return stats


@pytest.fixture()
def browser() -> Iterator[Browser]:
    """A fresh headless Chromium per test; never skipped: without the packages the test fails saying why."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.fail(MISSING.format(path=path), pytrace=False)
    b = Browser()
    try:
        yield b
    finally:
        b.close()
