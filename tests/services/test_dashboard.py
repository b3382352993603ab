"""The live dashboard on the real services: Redis, the S3 gateway, the monitor (dashboard port set), a trainer
and an evaluator as processes on loopback, and headless Chromium watching an experiment run.

The page is opened before the experiment exists and never reloaded: the experiment must appear, a stage
that completes during the test must raise the page's count of completed stages, and the figures must be
drawn from the committed records, all by the page's own polling.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_common.client import MonitorClient
from service_common.local_servers import free_port
from slmcl.config.spec import spec_from_dict
from tests.browser import Browser, assert_not_blank, browser  # noqa: F401 - browser is a fixture
from tests.conftest import tiny_spec_dict
from tests.services.conftest import Trio

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT_TIMEOUT = 600.0


class Services(Trio):
    """The trio with the monitor's dashboard on its own loopback port."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        port = free_port()
        super().__init__(env, logs, evaluators=1,
                         monitor_env={"SLMCL_DASHBOARD_PORT": str(port), "SLMCL_DASHBOARD_HOST": "127.0.0.1"})
        self.dashboard = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.dashboard + path, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def services(module_service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    s = Services({**module_service_env, "SLMCL_TORCH_THREADS": "1"}, tmp_path_factory.mktemp("dash") / "logs")
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _wait(browser: Browser, condition: str, services: Services, timeout: float = EXPERIMENT_TIMEOUT) -> Any:  # noqa: F811
    try:
        return browser.wait_until(condition, timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{services.tail()}") from None


def test_dashboard_follows_a_running_experiment(services: Services, browser: Browser,  # noqa: F811 - fixture
                                                tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    browser.open(services.dashboard + "/")
    _wait(browser, "document.getElementById('no-experiments').hidden === false", services, 60)
    browser.js("window.__notReloaded = true;")  # gone if the page were ever reloaded

    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "x",
                                         training={"max_examples": 12, "batch_size": 1, "grad_accum": 1}))
    exp_id = MonitorClient(services.monitor_address).submit(spec).id

    # The experiment appears in the list and is shown below it, without a reload.
    _wait(browser, f"document.querySelector('#experiments tr[data-id=\"{exp_id}\"]') !== null", services, 60)
    _wait(browser, "document.body.dataset.stagesDone !== undefined", services, 60)
    first = int(browser.js("return document.getElementById('stages-done').textContent;"))
    assert first < 2, "both stages were committed before the page first showed the experiment: nothing to watch"
    # A stage completes during the test: the count rises, on the same page.
    _wait(browser, f"+document.getElementById('stages-done').textContent > {first}", services)
    _wait(browser, "document.getElementById('state').textContent === 'succeeded'"
                   " && document.getElementById('stages-done').textContent === '2'", services)
    assert browser.js("return window.__notReloaded === true;"), "the page was reloaded"
    assert browser.js("return document.querySelector('#experiments tbody tr td:nth-child(5)').textContent;") == "2/2"

    # The figures hold data points drawn from the records (not the "no data yet" placeholder).
    counts = browser.js("""return {
        kl: document.querySelectorAll('#fig-kl circle.pt').length,
        avg: document.querySelectorAll('#fig-avg circle.pt').length,
        stability: document.querySelectorAll('#fig-stability circle.pt').length,
        cells: document.querySelectorAll('#fig-matrices rect.cell:not(.missing)').length,
        loss: document.querySelectorAll('#fig-loss polyline, #fig-loss circle.pt').length,
        empty: document.querySelectorAll('#detail .empty').length};""")
    assert counts["avg"] == 3 and counts["cells"] == 3 * 2 and counts["kl"] == 3, counts  # base + 2 stages
    assert counts["stability"] == 3 * 3 and counts["loss"] > 0 and counts["empty"] == 0, counts
    errors = browser.errors(browser.console())
    assert not errors, errors
    browser.js("document.getElementById('fig-kl').scrollIntoView();")
    assert_not_blank(browser.screenshot())

    # The API behind it: the same numbers, and the errors a client can cause.
    status, body = services.get(f"/api/experiments/{exp_id}")
    assert status == 200 and body["stages_done"] == 2 and body["experiment"]["state"] == "succeeded"
    assert services.get("/api/experiments/20990101-000000-ffffff")[0] == 404
    assert services.get("/api/experiments/not.an.id")[0] == 400
