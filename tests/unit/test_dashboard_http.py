"""The dashboard's HTTP side on a stand-in source: routes, status codes, the token rule, read-only.

No Redis, no store: ``FakeSource`` answers what ``ControlSource`` reads from Control. The real services
behind it are in tests/services/test_dashboard.py.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor_service.dashboard import COOKIE, DashboardServer, check_bind, start_dashboard
from service_common.auth import AuthConfigError
from slmcl.errors import NotFoundError
from slmcl.protocol.records import StageRecord

REPO = Path(__file__).resolve().parents[2]
TOKEN = "dashboard-test-token-0123456789"
EXP = "20260101-000000-abcdef"


def _record(step: int) -> StageRecord:
    return StageRecord(run_id="a.b-s1", order=["a", "b"], seed=1, step=step,
                       checkpoint_task="base" if step == 0 else "ab"[step - 1], model="m",
                       scores={"a": {"accuracy": 0.5, "correct": 1, "total": 2},
                               "b": {"accuracy": 0.25 * step, "correct": 0, "total": 4}},
                       stability={"kl_to_base_mean": 0.1 * step})


class FakeSource:
    def __init__(self) -> None:
        self.records_list = [_record(0), _record(1)]
        self.state = "running"
        self.fail = False
        self.record_reads = 0

    def list_ids(self) -> list[str]:
        return [EXP]

    def experiment(self, exp_id: str) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("secret internals /srv/slmcl/x.py line 3")
        if exp_id != EXP:
            raise NotFoundError(f"no experiment {exp_id!r}")
        return {"id": EXP, "name": "demo", "state": self.state, "error": "", "created_at": 1.0, "updated_at": 2.0,
                "model": "m", "runs": [{"run_id": "a.b-s1", "stages_total": 2,
                                        "stages_evaluated": len(self.records_list) - 1}]}

    def stage_keys(self, exp_id: str) -> list[str]:
        return [f"runs/{r.run_id}/stage-{r.step}.json" for r in self.records_list]

    def records(self, exp_id: str) -> list[StageRecord]:
        self.record_reads += 1
        return list(self.records_list)

    def spec(self, exp_id: str) -> dict[str, Any]:
        return {"orders": [["a", "b"]]}

    def events(self, exp_id: str, count: int) -> list[dict[str, Any]]:
        return [{"kind": "train_step", "run_id": "a.b-s1", "step": "2", "task": "b",
                 "data": {"step": 3, "total_steps": 8, "loss": 1.5}}]


def _serve(source: FakeSource, env: dict[str, str]) -> Iterator[tuple[DashboardServer, FakeSource]]:
    server = start_dashboard(source, "127.0.0.1", 0, env)
    try:
        yield server, source
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def open_server() -> Iterator[tuple[DashboardServer, FakeSource]]:
    yield from _serve(FakeSource(), {})


@pytest.fixture()
def token_server() -> Iterator[tuple[DashboardServer, FakeSource]]:
    yield from _serve(FakeSource(), {"SLMCL_TOKENS": TOKEN})


def _get(server: DashboardServer, path: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_page_and_script_are_served_with_a_strict_policy(open_server: tuple[DashboardServer, FakeSource]) -> None:
    server, _ = open_server
    status, headers, body = _get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="/static/dashboard.js"' in body and b"http" not in body.replace(b"http-equiv", b"")  # no network
    assert "default-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    status, headers, body = _get(server, "/static/dashboard.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"fetch(" in body
    status, headers, body = _get(server, "/static/dashboard.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


def test_list_has_state_and_live_progress(open_server: tuple[DashboardServer, FakeSource]) -> None:
    server, _ = open_server
    status, _, body = _get(server, "/api/experiments")
    (exp,) = json.loads(body)["experiments"]
    assert status == 200 and (exp["id"], exp["name"], exp["state"]) == (EXP, "demo", "running")
    assert (exp["stages_done"], exp["stages_total"]) == (1, 2)
    assert exp["progress"]["a.b-s1"]["training"] == {"stage": 2, "task": "b", "step": 3, "total_steps": 8,
                                                     "loss": 1.5}


def test_detail_is_rebuilt_only_when_a_stage_is_committed(open_server: tuple[DashboardServer, FakeSource]) -> None:
    server, source = open_server
    status, headers, body = _get(server, f"/api/experiments/{EXP}")
    assert status == 200 and json.loads(body)["stages_done"] == 1
    etag = headers["etag"]
    status, _, body = _get(server, f"/api/experiments/{EXP}", headers={"If-None-Match": etag})
    assert status == 304 and body == b"" and source.record_reads == 1
    source.records_list.append(_record(2))
    status, headers, body = _get(server, f"/api/experiments/{EXP}", headers={"If-None-Match": etag})
    assert status == 200 and headers["etag"] != etag and json.loads(body)["stages_done"] == 2
    assert source.record_reads == 2


@pytest.mark.parametrize(("path", "code"), [
    ("/api/experiments/20990101-000000-ffffff", 404),  # well formed, unknown
    ("/api/experiments/..", 400), ("/api/experiments/a.b", 400), ("/api/experiments/", 400),
    ("/api/experiments/%2e%2e", 400), ("/api/experiments/x/y", 404), ("/nope", 404), ("/static/../dashboard.py", 404),
])
def test_bad_and_unknown_ids(open_server: tuple[DashboardServer, FakeSource], path: str, code: int) -> None:
    status, headers, body = _get(open_server[0], path)
    assert status == code and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]


def test_read_only_and_no_traceback(open_server: tuple[DashboardServer, FakeSource]) -> None:
    server, source = open_server
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = _get(server, "/api/experiments", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
    source.fail = True
    status, _, body = _get(server, f"/api/experiments/{EXP}")
    assert status == 500 and b"secret internals" not in body and b"Traceback" not in body


def test_a_token_is_needed_when_tokens_are_configured(token_server: tuple[DashboardServer, FakeSource]) -> None:
    server, _ = token_server
    assert _get(server, "/api/experiments")[0] == 401
    assert _get(server, "/", headers={"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    assert _get(server, "/?token=wrong-token-wrong-token")[0] == 401
    assert _get(server, "/api/experiments", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    status, headers, _ = _get(server, f"/?token={TOKEN}")
    assert status == 303 and headers["location"] == "/"  # the token leaves the address bar
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN}") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert _get(server, "/api/experiments", headers={"Cookie": f"{COOKIE}={TOKEN}"})[0] == 200
    assert _get(server, "/api/experiments", headers={"Cookie": f"{COOKIE}=not-it-not-it-not-it"})[0] == 401


def test_bind_rule_follows_grpc_auth() -> None:
    with pytest.raises(AuthConfigError, match="refusing to serve the dashboard on 0.0.0.0"):
        check_bind("0.0.0.0", {})
    with pytest.raises(AuthConfigError):
        check_bind("::", {})
    assert check_bind("127.0.0.1", {}) == () and check_bind("::1", {}) == ()
    assert check_bind("0.0.0.0", {"SLMCL_AUTH": "off"}) == ()
    assert check_bind("0.0.0.0", {"SLMCL_TOKENS": TOKEN}) == (TOKEN,)


@pytest.mark.integration  # starts the monitor's process (no server behind it)
def test_the_monitor_refuses_an_open_dashboard_off_loopback(tmp_path: Path) -> None:
    """The process exits with the rule's message before it serves anything (no Redis needed to get there)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLMCL_TOKENS", "SLMCL_TOKEN", "SLMCL_TOKENS_FILE", "SLMCL_AUTH")}
    env.update(SLMCL_STORE_URL=str(tmp_path / "store"), SLMCL_REDIS_URL="redis://127.0.0.1:1/0",
               SLMCL_DASHBOARD_HOST="0.0.0.0", SLMCL_DASHBOARD_PORT="0")
    proc = subprocess.run([sys.executable, "-m", "monitor_service", "--host", "127.0.0.1", "--port", "0"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "refusing to serve the dashboard on 0.0.0.0" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
