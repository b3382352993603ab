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


def test_core_imports_no_service_framework() -> None:
    core = [m.name for m in pkgutil.walk_packages(slmcl.__path__, "slmcl.")
            if m.name not in ("slmcl.cli.main",)]  # the CLI adds the client commands lazily
    loaded = _modules_after("; ".join(f"import {m}" for m in core))
    leaked = sorted(m for m in loaded if m.split(".")[0] in SERVICE_FRAMEWORKS)
    assert not leaked, f"core modules import service frameworks: {leaked[:5]}"


def test_pure_modules_import_no_torch() -> None:
    loaded = _modules_after("import slmcl, slmcl.metrics, slmcl.tasks.answers, slmcl.config.spec, slmcl.protocol.results")
    assert "torch" not in loaded


def test_cli_help_needs_no_torch_or_grpc() -> None:
    loaded = _modules_after("from slmcl.cli.main import build_parser; build_parser()")
    assert "torch" not in loaded and "grpc" not in loaded
