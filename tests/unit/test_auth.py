"""service_common.auth against real gRPC servers in this process: tokens, TLS, the loopback rule, the
model policy of parse_spec_json and the trainer's load_spec, and no pickle anywhere in our code."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from service_common import auth
from service_common.auth import (
    AuthConfigError,
    ModelPolicy,
    TokenChecker,
    add_port,
    aio_client_channel,
    aio_server_interceptors,
    client_channel,
    client_token,
    is_local_address,
    server_interceptors,
    server_tokens,
)
from service_common.datasets import parse_spec_json
from service_common.grpc_server import channel, status_for
from slmcl.config.spec import EMBEDDED_MODEL, ModelSpec, spec_from_dict
from slmcl.errors import PermissionDeniedError
from tests.conftest import REPO, tiny_spec_dict

TOKEN = "unit-test-token-0123456789abcdef"
AUTH_VARS = (auth.TOKENS_ENV, auth.TOKEN_ENV, auth.TOKENS_FILE_ENV, auth.TOKEN_FILE_ENV, auth.AUTH_ENV,
             auth.TLS_CERT_ENV, auth.TLS_KEY_ENV, auth.TLS_CA_ENV, auth.TLS_SERVER_NAME_ENV,
             auth.ALLOW_REMOTE_CODE_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No auth setting of the developer's shell (nor ~/.config/slmcl/token) leaks into these tests."""
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def self_signed_cert(d: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost and 127.0.0.1 (openssl CLI), its key, both PEM."""
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


# --- a real server with one unary and one streaming method (raw bytes) -------------------------------------

def _echo_handlers() -> grpc.GenericRpcHandler:
    def unary(request: bytes, _context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    def stream(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"1:" + request
        yield b"2:" + request

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })


def _health(server: Any) -> None:
    from grpc_health.v1 import health, health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)


@pytest.fixture()
def sync_server() -> Iterator[Any]:
    servers = []

    def start(address: str = "127.0.0.1:0") -> int:
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=server_interceptors())
        server.add_generic_rpc_handlers((_echo_handlers(),))
        _health(server)
        port = add_port(server, address)
        server.start()
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.stop(None)


def _calls(ch: grpc.Channel) -> tuple[bytes, list[bytes]]:
    unary = ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
    stream = list(ch.unary_stream("/test.Echo/Stream")(b"hi", timeout=10))
    return unary, stream


def _health_status(ch: grpc.Channel) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _code(fn: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def test_tokens_guard_every_method_but_health(sync_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.TOKENS_ENV, f"other-token-abcdefghijklmnop, {TOKEN}")
    port = sync_server()
    addr = f"127.0.0.1:{port}"
    with grpc.insecure_channel(addr) as bare:
        assert _health_status(bare) == 1  # SERVING, no token needed
        assert _code(lambda: bare.unary_unary("/test.Echo/Unary")(b"x", timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: list(bare.unary_stream("/test.Echo/Stream")(b"x", timeout=10))) == \
            grpc.StatusCode.UNAUTHENTICATED
    with client_channel(addr, token="wrong-token-but-long-enough") as wrong:
        with pytest.raises(grpc.RpcError) as info:
            _calls(wrong)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in info.value.details()
    with client_channel(addr, token=TOKEN) as good:
        assert _calls(good) == (b"echo:hi", [b"1:hi", b"2:hi"])
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)  # grpc_server.channel: the environment's token
    with channel(addr) as ch:
        assert _calls(ch)[0] == b"echo:hi"


def test_tokens_file_with_comments(tmp_path: Path, sync_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# rotated 2026-01\n{TOKEN}  # alice\n\nsecond-token-abcdefghijklmnop\n")
    monkeypatch.setenv(auth.TOKENS_FILE_ENV, str(tokens))
    assert server_tokens() == (TOKEN, "second-token-abcdefghijklmnop")
    port = sync_server()
    with client_channel(f"127.0.0.1:{port}", token="second-token-abcdefghijklmnop") as ch:
        assert _calls(ch)[0] == b"echo:hi"


def test_short_tokens_and_unreadable_files_stop_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.TOKENS_ENV, "changeme")
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        server_interceptors()
    monkeypatch.delenv(auth.TOKENS_ENV)
    monkeypatch.setenv(auth.TOKENS_FILE_ENV, str(tmp_path / "absent"))
    with pytest.raises(AuthConfigError, match="SLMCL_TOKENS_FILE"):
        server_interceptors()


def test_client_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client_token() is None
    monkeypatch.setenv(auth.TOKENS_ENV, "server-side-token-0123456789")
    assert client_token() == "server-side-token-0123456789"  # a service calling its peers
    home_file = tmp_path / "home" / ".config" / "slmcl" / "token"
    home_file.parent.mkdir(parents=True)
    home_file.write_text("home-token-0123456789abcdef\n")
    assert client_token() == "home-token-0123456789abcdef"
    named = tmp_path / "tok"
    named.write_text("# mine\nfile-token-0123456789abcdef\n")
    monkeypatch.setenv(auth.TOKEN_FILE_ENV, str(named))
    assert client_token() == "file-token-0123456789abcdef"
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    assert client_token() == TOKEN


def test_checker_compares_all_tokens_and_wants_bearer() -> None:
    c = TokenChecker([TOKEN, "x" * 40])
    assert c.check([("authorization", f"Bearer {TOKEN}")]) is None
    assert c.check([("authorization", "Bearer " + "x" * 40)]) is None
    assert c.check([("authorization", f"Basic {TOKEN}")]) is not None
    assert c.check([("authorization", "Bearer " + TOKEN[:-1])]) == "invalid token"
    assert "SLMCL_TOKEN" in (c.check([]) or "")


def test_no_token_serves_loopback_only(sync_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [is_local_address(a) for a in ("127.0.0.1:1", "[::1]:1", "localhost:1", "unix:/tmp/s", "0.0.0.0:1",
                                          "[::]:1", "10.0.0.5:1")] == [True] * 4 + [False] * 3
    port = sync_server("127.0.0.1:0")  # no token, loopback: open (the tests' and a laptop's case)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert _calls(ch)[0] == b"echo:hi"
    with pytest.raises(AuthConfigError, match="SLMCL_TOKENS"):
        sync_server("0.0.0.0:0")
    monkeypatch.setenv(auth.AUTH_ENV, "off")
    assert sync_server("0.0.0.0:0") > 0
    monkeypatch.setenv(auth.AUTH_ENV, "")
    monkeypatch.setenv(auth.TOKENS_ENV, TOKEN)
    assert sync_server("0.0.0.0:0") > 0


def test_tls_with_a_self_signed_certificate(tmp_path: Path, sync_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_cert(tmp_path / "tls")
    monkeypatch.setenv(auth.TLS_CERT_ENV, str(cert))
    monkeypatch.setenv(auth.TLS_KEY_ENV, str(key))
    monkeypatch.setenv(auth.TOKENS_ENV, TOKEN)
    port = sync_server()
    monkeypatch.delenv(auth.TOKENS_ENV)  # else this process, as a client, would send the token it accepts
    addr = f"localhost:{port}"
    with grpc.insecure_channel(addr) as plain:  # a plaintext client cannot talk to a TLS port
        assert _code(lambda: _health_status(plain)) == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setenv(auth.TLS_CA_ENV, str(cert))
    with client_channel(addr) as no_token:
        assert _health_status(no_token) == 1
        assert _code(lambda: _calls(no_token)) == grpc.StatusCode.UNAUTHENTICATED
    with client_channel(addr, token=TOKEN) as ch:
        assert _calls(ch) == (b"echo:hi", [b"1:hi", b"2:hi"])
    other, _ = self_signed_cert(tmp_path / "other")
    monkeypatch.setenv(auth.TLS_CA_ENV, str(other))  # a server whose certificate we do not trust
    with client_channel(addr, token=TOKEN) as untrusted:
        assert _code(lambda: _calls(untrusted)) == grpc.StatusCode.UNAVAILABLE
    monkeypatch.delenv(auth.TLS_KEY_ENV)
    with pytest.raises(AuthConfigError, match="SLMCL_TLS_KEY"):
        sync_server()


def test_aio_server_and_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor's shape: a grpc.aio server with aio_server_interceptors, bound by add_port."""
    monkeypatch.setenv(auth.TOKENS_ENV, TOKEN)

    async def unary(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return b"aio:" + request

    async def stream(request: bytes, _context: grpc.aio.ServicerContext) -> Any:
        yield b"s:" + request

    async def main() -> dict[str, Any]:
        server = grpc.aio.server(interceptors=aio_server_interceptors())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
        port = add_port(server, "127.0.0.1:0")
        await server.start()
        out: dict[str, Any] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as bare:
                unary_call = bare.unary_unary("/test.Echo/Unary")
                stream_call = bare.unary_stream("/test.Echo/Stream")
                for name, call in (("unary", lambda: unary_call(b"x", timeout=10)),
                                   ("stream", lambda: _drain(stream_call(b"x", timeout=10)))):
                    try:
                        await call()
                    except grpc.aio.AioRpcError as exc:
                        out[name] = exc.code()
            async with aio_client_channel(f"127.0.0.1:{port}", token=TOKEN) as ch:
                out["ok"] = await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
                out["ok_stream"] = await _drain(ch.unary_stream("/test.Echo/Stream")(b"x", timeout=10))
            with client_channel(f"127.0.0.1:{port}", token=TOKEN) as sync_ch:  # a sync client of an aio server
                out["sync"] = await asyncio.to_thread(sync_ch.unary_unary("/test.Echo/Unary"), b"y", timeout=10)
        finally:
            await server.stop(None)
        return out

    out = asyncio.run(main())
    assert out == {"unary": grpc.StatusCode.UNAUTHENTICATED, "stream": grpc.StatusCode.UNAUTHENTICATED,
                   "ok": b"aio:x", "ok_stream": [b"s:x"], "sync": b"aio:y"}


async def _drain(call: Any) -> list[bytes]:
    return [m async for m in call]


# --- the model policy -----------------------------------------------------------------------------------------

def remote_code_model(d: Path, marker: Path) -> Path:
    """A model folder whose auto_map names a Python file that, once imported, writes ``marker``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (d / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    return d


def test_policy_defaults_and_allowlist(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (models / "escape").symlink_to(outside)
    default = ModelPolicy.from_env({})
    default.check(ModelSpec(name=EMBEDDED_MODEL))
    default.check(ModelSpec(name="HuggingFaceTB/SmolLM2-135M-Instruct"))
    with pytest.raises(PermissionDeniedError, match="SLMCL_MODEL_ALLOWLIST"):
        default.check(ModelSpec(name=str(models / "m")))
    with pytest.raises(PermissionDeniedError, match="model.trust_remote_code.*SLMCL_ALLOW_REMOTE_CODE=1"):
        default.check(ModelSpec(name="HuggingFaceTB/SmolLM2-135M-Instruct", trust_remote_code=True))

    listed = ModelPolicy.from_env({auth.MODEL_ALLOWLIST_ENV: f"{models}, HuggingFaceTB/*"})
    listed.check(ModelSpec(name=str(models / "m")))
    listed.check(ModelSpec(name="HuggingFaceTB/SmolLM2-360M"))
    listed.check(ModelSpec(name=EMBEDDED_MODEL))
    for name in ("Qwen/Qwen2.5-0.5B", str(outside), str(models / "escape"), str(models / ".." / "elsewhere"),
                 str(models) + "-sibling"):
        with pytest.raises(PermissionDeniedError, match="SLMCL_MODEL_ALLOWLIST"):
            listed.check(ModelSpec(name=name))
    with pytest.raises(AuthConfigError, match="absolute"):
        ModelPolicy.from_env({auth.MODEL_ALLOWLIST_ENV: "./models"})
    allowed = ModelPolicy.from_env({auth.MODEL_ALLOWLIST_ENV: str(models), auth.ALLOW_REMOTE_CODE_ENV: "1"})
    allowed.check(ModelSpec(name=str(models / "m"), trust_remote_code=True))


def test_parse_spec_json_refuses_remote_code_before_touching_the_folder(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "MARKER"
    folder = remote_code_model(tmp_path / "models" / "evil", marker)
    monkeypatch.setenv(auth.MODEL_ALLOWLIST_ENV, str(tmp_path / "models"))
    raw = tiny_spec_dict(folder, data_dir, tmp_path / "out", model={"name": str(folder), "trust_remote_code": True})
    text = spec_from_dict(raw).to_json()
    with pytest.raises(PermissionDeniedError, match="SLMCL_ALLOW_REMOTE_CODE") as info:
        parse_spec_json(text)
    assert status_for(info.value) == grpc.StatusCode.PERMISSION_DENIED
    monkeypatch.setenv(auth.MODEL_ALLOWLIST_ENV, str(tmp_path / "other"))
    raw["model"]["trust_remote_code"] = False
    with pytest.raises(PermissionDeniedError, match="SLMCL_MODEL_ALLOWLIST"):
        parse_spec_json(spec_from_dict(raw).to_json())
    assert not marker.exists()


def test_trainer_load_spec_checks_a_stored_spec_again(tmp_path: Path, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Defense in depth: a spec written to the store by anyone is refused by the worker that reads it."""
    from service_common.settings import Settings
    from slmcl.protocol import layout
    from slmcl.storage.local import LocalStore
    from trainer_service.jobs import load_spec

    marker = tmp_path / "MARKER"
    folder = remote_code_model(tmp_path / "models" / "evil", marker)
    monkeypatch.setenv(auth.MODEL_ALLOWLIST_ENV, str(tmp_path / "models"))
    store = LocalStore(tmp_path / "store")
    spec = spec_from_dict(tiny_spec_dict(folder, data_dir, tmp_path / "out",
                                         model={"name": str(folder), "trust_remote_code": True}))
    store.put_bytes(f"{layout.experiment_prefix('e1')}/{layout.SPEC_JSON}", spec.to_json().encode())
    with pytest.raises(PermissionDeniedError, match="trust_remote_code"):
        load_spec(store, Settings(work_dir=str(tmp_path / "work")), "e1")
    assert not marker.exists()


# --- no pickle on any wire, queue or file ---------------------------------------------------------------------

CODE = ("slmcl", "service_common", "trainer_service", "evaluator_service", "monitor_service", "scripts", "bench",
        "docker", "tests")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
RQ_CLASSES = {"Queue", "Worker", "SimpleWorker", "Job"}
RQ_LOOKUPS = {"fetch", "fetch_many", "create", "all"}  # class methods that read or write pickled job data


def _py_files() -> Iterator[Path]:
    for top in CODE:
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def _name(node: ast.expr) -> str:
    return f"{_name(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _pickle_uses(tree: ast.AST, check_rq: bool = True) -> list[tuple[int, str]]:
    """Imports of pickling modules, torch.load without weights_only=True, np.load(allow_pickle=True), torch.save,
    and RQ queues, workers and job look-ups without an explicit JSONSerializer (RQ's default pickles)."""
    found = []
    rq_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rq":
            rq_names |= {a.asname or a.name for a in node.names if a.name in RQ_CLASSES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLING_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            fn = _name(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if fn.endswith("torch.load") and not _is_const(kw.get("weights_only"), True):
                found.append((node.lineno, f"{fn} without weights_only=True"))
            if fn.endswith("torch.save") or fn.endswith("read_pickle"):
                found.append((node.lineno, fn))
            if fn.endswith(("np.load", "numpy.load")) and "allow_pickle" in kw and not _is_const(kw["allow_pickle"],
                                                                                                  False):
                found.append((node.lineno, f"{fn}(allow_pickle=...)"))
            parts = fn.split(".")
            rq_call = parts[0] in rq_names and (len(parts) == 1 or parts[-1] in RQ_LOOKUPS)
            if check_rq and rq_call and "serializer" not in kw:
                found.append((node.lineno, f"RQ {fn}(...) without serializer=JSONSerializer"))
            if "serializer" in kw and _name(kw["serializer"]).split(".")[-1] not in ("JSONSerializer", "serializer"):
                found.append((node.lineno, f"serializer={_name(kw['serializer'])}"))
    return found


def test_the_checker_finds_what_it_looks_for() -> None:
    src = ("import pickle\nfrom rq import Queue, Worker\nfrom rq.job import Job\nimport torch, queue\n"
           "torch.load('x')\ntorch.load('y', weights_only=True)\nQueue('q', connection=c)\n"
           "Job.fetch('j', connection=c)\nWorker.all(connection=c, serializer=JSONSerializer)\n"
           "queue.Queue()\ntorch.save(m, 'x.pt')\nimport joblib.numpy_pickle\n")
    assert sorted(line for line, _ in _pickle_uses(ast.parse(src))) == [1, 5, 7, 8, 11, 12]


def test_no_pickle_in_first_party_code() -> None:
    """Tests may build RQ fixtures as they like; pickle itself is banned from them too."""
    offenders = []
    for path in _py_files():
        tree = ast.parse(path.read_text(), str(path))
        for line, what in _pickle_uses(tree, check_rq="tests" not in path.relative_to(REPO).parts):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not offenders, "pickle-capable serialization in our code:\n" + "\n".join(offenders)
