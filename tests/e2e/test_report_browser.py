"""The HTML report in a real browser: headless Chromium opens it from disk (file://, no server, no network).

The report is the one tests/e2e/test_report.py builds (its fixtures are imported: the same tiny two-order,
two-seed experiment). What only a browser can tell: the page loads without a console error, every figure
decodes to an image of its declared size, and the rendered page is not blank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import Browser, assert_not_blank, browser  # noqa: F401 - browser is a fixture
from tests.e2e.test_report import report, results  # noqa: F401 - fixtures, shared with that module

pytestmark = pytest.mark.slow


def test_report_renders_in_chromium(report: Path, browser: Browser) -> None:  # noqa: F811 - the fixtures
    browser.open((report / "index.html").resolve().as_uri())
    browser.wait_until("document.readyState === 'complete'")
    images = browser.js("""return [...document.querySelectorAll('img, svg')].map(e => e.tagName === 'IMG'
        ? {tag: 'img', alt: e.alt, complete: e.complete, w: e.naturalWidth, h: e.naturalHeight,
           declared: [+e.getAttribute('width'), +e.getAttribute('height')]}
        : {tag: 'svg', alt: e.id, complete: true, w: e.getBBox().width, h: e.getBBox().height});""")
    assert len(images) >= 5, images  # kl_vs_accuracy, avg_accuracy, stability, a matrix and a loss figure
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, f"figure did not render: {img}"
    # The PNG's own size is what the page declares (figures.FigureFile.size): nothing scaled or cropped.
    assert all(img["declared"] == [img["w"], img["h"]] for img in images if img["tag"] == "img")
    errors = browser.errors(browser.console())
    assert not errors, errors
    # Scrolled to the first figure, so that the screenshot holds a plot, not only the page's text.
    browser.js("document.querySelector('figure').scrollIntoView();")
    assert_not_blank(browser.screenshot())
