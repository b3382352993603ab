"""The architecture as a test: the core imports no service framework; the pure parts no torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import slmcl

SERVICE_FRAMEWORKS = ("grpc", "rq", "redis", "minio", "service_common", "slmcl_api")


def _modules_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _core_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(slmcl.__path__, "slmcl.")]


def _service_modules(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded
                  if m.split(".")[0] in SERVICE_FRAMEWORKS or m.split(".")[0].endswith("_service"))


def test_every_core_module_is_walked() -> None:
    """No exemptions: the CLI (which finds the client commands by entry point) is checked like the rest."""
    core = _core_modules()
    assert {"slmcl.cli.main", "slmcl.cli.__main__", "slmcl.storage.factory", "slmcl.metrics"} <= set(core)


def test_core_imports_no_service_package() -> None:
    loaded = _modules_after("; ".join(f"import {m}" for m in _core_modules()))
    leaked = _service_modules(loaded)
    assert not leaked, f"core modules import service frameworks or packages: {leaked[:5]}"


def test_opening_a_local_store_imports_no_client_library() -> None:
    loaded = _modules_after("from slmcl.storage.factory import open_store, known_schemes; "
                            "open_store('/tmp/slmcl-layering'); known_schemes()")
    assert not _service_modules(loaded)


def test_pure_modules_import_no_torch() -> None:
    loaded = _modules_after("import slmcl, slmcl.metrics, slmcl.tasks.answers, slmcl.config.spec, "
                            "slmcl.protocol.results, slmcl.storage, slmcl.cli.report")
    assert "torch" not in loaded


def test_cli_help_needs_no_torch_or_grpc() -> None:
    loaded = _modules_after("from slmcl.cli.main import build_parser; build_parser()")
    assert "torch" not in loaded and "grpc" not in loaded


def test_cli_lists_the_client_commands_from_their_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "slmcl.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "metrics", "submit", "watch", "list", "status", "results", "pull", "cancel"):
        assert f"    {command}" in out.stdout, f"`slmcl --help` lacks {command}:\n{out.stdout}"


def test_a_cli_error_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "slmcl.cli", "validate", "/nonexistent/spec.yaml"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("slmcl: error: ") and out.stderr.count("\n") == 1, out.stderr
