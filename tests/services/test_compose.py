"""The deployment files, checked without a Docker engine.

- docker-compose.yml (and the CPU override) against the compose-spec JSON schema
  (check-jsonschema's vendored copy, research/infra.md §5);
- consistency with the repository: build contexts, Dockerfile targets and COPY sources exist and
  reach a clean clone (not git-ignored, not docker-ignored); every `python -m X` names a package
  with a __main__; every ${VAR} is documented in .env.example; every SLMCL_* variable a service
  gets is one the code reads; no secret literal;
- the shape that scaling and the CPU override rely on: the evaluator has no host port and no
  container_name, ports agree between command, healthcheck, SLMCL_EVALUATORS and the published
  port, GPU reservations exist in the base file and are gone once docker-compose.cpu.yml is merged
  (with compose's merge rules, `!reset` included, re-implemented here);
- docker/healthcheck.py, the containers' health probe, against a real gRPC health server and Redis.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "docker-compose.yml"
CPU = REPO / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
CODE_DIRS = ("slmcl", "service_common", "trainer_service", "evaluator_service", "monitor_service")
SLMCL_SERVICES = ("trainer", "evaluator", "monitor")
SECRET_KEY_RE = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN|CREDENTIAL", re.I)
APP_DIR = "/app"  # WORKDIR of the images


# --- compose YAML with its merge tags ---------------------------------------------------------------

class _Reset:
    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class _Override:
    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus compose's `!reset` and `!override` tags."""


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: _Override(_construct_any(loader, node)))


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - safe loader subclass


def plain(value: Any) -> Any:
    """The file as a schema sees it: `!reset` keys dropped, `!override` values unwrapped."""
    if isinstance(value, _Override):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [plain(v) for v in value if v is not RESET]
    return value


def merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """docker compose -f base -f over: mappings merge, sequences append, except command,
    entrypoint and healthcheck.test (replaced); `!reset` removes, `!override` replaces."""
    if isinstance(over, _Override):
        return plain(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, (*path, key))
            else:
                out[key] = plain(value)
        return out
    if isinstance(base, list) and isinstance(over, list):
        if path[-1:] in (("command",), ("entrypoint",)) or path[-2:] == ("healthcheck", "test"):
            return plain(over)
        return base + plain(over)
    return plain(over)


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load(BASE)


@pytest.fixture(scope="module")
def cpu_merged(base: dict[str, Any]) -> dict[str, Any]:
    return merge(base, load(CPU))


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    assert CHECK_JSONSCHEMA.exists(), f"{CHECK_JSONSCHEMA} missing: make dev-setup installs check-jsonschema"
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


# --- Dockerfile parsing -------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def copy_sources(args: str) -> tuple[list[str], str, dict[str, str]]:
    words = exec_form(args)
    flags = {w.split("=", 1)[0]: (w.split("=", 1) + [""])[1] for w in words if w.startswith("--")}
    rest = [w for w in words if not w.startswith("--")]
    return rest[:-1], rest[-1], flags


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (ARGs before the first FROM are stage '')."""
    result: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for word, args in dockerfile_instructions(path):
        if word == "FROM":
            parts = args.split()
            if "AS" in parts:
                current = parts[parts.index("AS") + 1]
            elif "as" in parts:
                current = parts[parts.index("as") + 1]
            else:
                current = args
            result[current] = []
        result[current].append((word, args))
    return result


def built_dockerfiles(base: dict[str, Any]) -> dict[str, tuple[Path, Path, str | None]]:
    out = {}
    for name, svc in base["services"].items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (REPO / build.get("context", ".")).resolve()
        out[name] = (context, context / build.get("dockerfile", "Dockerfile"), build.get("target"))
    return out


# --- .dockerignore ----------------------------------------------------------------------------------

def dockerignore_excludes(context: Path, rel: str) -> bool:
    """Docker's rules, for the patterns we use: last matching pattern wins, '!' re-includes,
    a pattern matching a parent directory matches everything below it, '**/' any depth."""
    ignore = context / ".dockerignore"
    if not ignore.exists():
        return False
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in ignore.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if pat.startswith("**/"):
            tail = pat[3:]
            hit = any(fnmatch.fnmatchcase("/".join(parts[i:j]), tail)
                      for j in range(1, len(parts) + 1) for i in range(j))
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) and p.count("/") == pat.count("/") for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


def git_ignored(paths: list[str]) -> list[str]:
    if not (REPO / ".git").exists():
        return []
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if line]


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


# --- helpers on the compose model ----------------------------------------------------------------------

def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def arg_value(command: list[str], flag: str) -> str | None:
    for i, word in enumerate(command):
        if word == flag and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def python_module(command: list[str]) -> str | None:
    if len(command) >= 3 and Path(command[0]).name.startswith("python") and command[1] == "-m":
        return command[2]
    return None


def module_exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return ((((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or [])


def read_by_code() -> str:
    return "\n".join(p.read_text(errors="replace") for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def published(port_spec: Any) -> tuple[str | None, str | None, int]:
    """(host ip, host port, container port) of a short- or long-syntax port."""
    if isinstance(port_spec, dict):
        return port_spec.get("host_ip"), port_spec.get("published"), int(port_spec["target"])
    parts = str(port_spec).rsplit("/", 1)[0]
    # ${A:-x}:${B:-y}:target -- split on ':' outside ${...}
    fields = re.findall(r"(?:\$\{[^}]*\}|[^:])+", parts)
    target = int(fields[-1])
    host = fields[-2] if len(fields) >= 2 else None
    ip = fields[-3] if len(fields) >= 3 else None
    return ip, host, target


# === schema ============================================================================================

def test_compose_file_passes_the_compose_spec_schema() -> None:
    proc = check_jsonschema(BASE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cpu_override_and_merged_model_pass_the_schema(tmp_path: Path, cpu_merged: dict[str, Any]) -> None:
    # check-jsonschema's YAML parser does not know compose's `!reset` tag, so the override is
    # validated as compose sees it (tags resolved), and so is the merged application model.
    assert "!reset" in CPU.read_text(), "the CPU override is expected to remove the GPU reservation with !reset"
    override = tmp_path / "docker-compose.cpu.resolved.yml"
    override.write_text(yaml.safe_dump(plain(load(CPU)), sort_keys=False))
    merged = tmp_path / "docker-compose.merged.yml"
    merged.write_text(yaml.safe_dump(cpu_merged, sort_keys=False))
    for path in (override, merged):
        proc = check_jsonschema(path)
        assert proc.returncode == 0, f"{path.name}: {proc.stdout}{proc.stderr}"


def test_schema_check_rejects_an_unknown_key(tmp_path: Path, base: dict[str, Any]) -> None:
    """The validator is live: a misspelt key fails."""
    bad = json.loads(json.dumps(base))
    bad["services"]["evaluator"]["helthcheck"] = {"test": ["CMD", "true"]}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad))
    proc = check_jsonschema(path)
    assert proc.returncode != 0 and "helthcheck" in proc.stdout + proc.stderr


# === repository consistency ============================================================================

def test_build_contexts_dockerfiles_and_targets_exist(base: dict[str, Any]) -> None:
    builds = built_dockerfiles(base)
    assert set(SLMCL_SERVICES) <= set(builds), "trainer, evaluator and monitor are built from this repo"
    for name, (context, dockerfile, target) in builds.items():
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        assert target is None or target in stages(dockerfile), f"{name}: no stage '{target}' in {dockerfile}"


def test_build_args_are_declared_and_torch_flavours_exist(base: dict[str, Any], cpu_merged: dict[str, Any]) -> None:
    for model in (base, cpu_merged):
        for name, (_, dockerfile, _) in built_dockerfiles(model).items():
            all_stages = stages(dockerfile)
            declared = {a.split("=", 1)[0] for st in all_stages.values() for w, a in st if w == "ARG"}
            args = model["services"][name]["build"].get("args") or {}
            assert set(args) <= declared, f"{name}: build args {set(args) - declared} not declared in {dockerfile}"
            if "TORCH_FLAVOR" in args:
                assert f"torch-{args['TORCH_FLAVOR']}" in all_stages, f"{name}: no stage torch-{args['TORCH_FLAVOR']}"


def test_every_copy_source_exists_and_reaches_a_clean_clone(base: dict[str, Any]) -> None:
    checked: list[str] = []
    for context, dockerfile, _ in built_dockerfiles(base).values():
        for stage, instructions in stages(dockerfile).items():
            for word, args in instructions:
                if word not in ("COPY", "ADD"):
                    continue
                sources, _, flags = copy_sources(args)
                if "--from" in flags:  # built in the image (the gRPC stubs), not from the repo
                    continue
                for src in sources:
                    path = context / src
                    assert path.exists(), f"{dockerfile.name} [{stage}]: COPY {src}: missing from the repo"
                    contents = files_under(path)
                    assert contents, f"{dockerfile.name} [{stage}]: COPY {src}: nothing in it"
                    for f in contents:
                        rel = f.relative_to(context).as_posix()
                        assert not dockerignore_excludes(context, rel), (
                            f"COPY {src}: {rel} is excluded by .dockerignore")
                    checked += [f.relative_to(REPO).as_posix() for f in contents]
    ignored = git_ignored(sorted(set(checked)))
    assert not ignored, f"git-ignored, so absent from a clean clone, but the images COPY them: {ignored[:10]}"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    for rel in (".env", ".venv/bin/python", ".git/HEAD", ".stack/pids.json", "runs/x/matrix.json", "slmcl_api/v1/x.py"):
        assert dockerignore_excludes(REPO, rel), f"{rel} would be sent to the Docker daemon"
    assert ".env" in (REPO / ".gitignore").read_text().split(), ".env must be git-ignored"


def test_commands_name_python_modules_that_exist(base: dict[str, Any]) -> None:
    seen = set()
    for name, svc in base["services"].items():
        command = svc.get("command")
        if isinstance(command, list) and python_module(command):
            module = python_module(command)
            assert module_exists(module), f"{name}: `python -m {module}`: no {module}/__main__.py in the repo"
            seen.add(name)
    for _, dockerfile, _ in built_dockerfiles(base).values():
        for stage, instructions in stages(dockerfile).items():
            for word, args in instructions:
                if word == "CMD":
                    module = python_module(exec_form(args))
                    assert module and module_exists(module), f"{dockerfile.name} [{stage}]: CMD {args}"
                    assert any(w == "COPY" and a.split()[0].rstrip("/") == module for w, a in instructions), \
                        f"{dockerfile.name} [{stage}]: runs {module} without copying it"
    assert seen >= set(SLMCL_SERVICES)


def test_healthchecks_run_files_the_images_contain(base: dict[str, Any]) -> None:
    copied = set()
    for _, dockerfile, _ in built_dockerfiles(base).values():
        for instructions in stages(dockerfile).values():
            for word, args in instructions:
                if word == "COPY" and "--from" not in args:
                    sources, dest, _ = copy_sources(args)
                    copied |= {f"{APP_DIR}/{dest}".rstrip("/") for _ in sources}
    for name in (*SLMCL_SERVICES, "redis", "minio"):
        test = (base["services"][name].get("healthcheck") or {}).get("test")
        assert test, f"{name} has no healthcheck"
        if name in SLMCL_SERVICES:
            assert test[:2] == ["CMD", "python"], test
            script = test[2]
            assert script in copied, f"{name}: healthcheck runs {script}, which no COPY puts in the image"
            assert (REPO / script.removeprefix(APP_DIR + "/")).is_file()


def test_every_interpolated_variable_is_documented_in_env_example() -> None:
    documented = set(re.findall(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    for path in (BASE, CPU):
        text = re.sub(r"^\s*#.*$", "", path.read_text(), flags=re.M)  # comments
        text = text.replace("$$", "")  # $$ is a literal $, left to the container's shell
        used = (set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
                | set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text)))
        assert used or path == CPU, path
        assert used <= documented, f"{path.name}: {sorted(used - documented)} not in .env.example"


def test_every_slmcl_variable_given_to_a_service_is_read_by_the_code(base: dict[str, Any],
                                                                     cpu_merged: dict[str, Any]) -> None:
    code = read_by_code()
    given: dict[str, set[str]] = {}
    for model in (base, cpu_merged):
        for name, svc in model["services"].items():
            for key in env_of(svc):
                if key.startswith("SLMCL_"):
                    given.setdefault(key, set()).add(name)
    for _, dockerfile, _ in built_dockerfiles(base).values():
        for word, args in (i for st in stages(dockerfile).values() for i in st):
            if word == "ENV":
                for key in re.findall(r"(SLMCL_[A-Z0-9_]+)=", args):
                    given.setdefault(key, set()).add(dockerfile.name)
    unread = {k: sorted(v) for k, v in given.items() if f'"{k}"' not in code and f"'{k}'" not in code}
    assert not unread, f"set for services but read nowhere in {CODE_DIRS}: {unread}"


def test_no_secret_literals(base: dict[str, Any]) -> None:
    for path in (BASE, CPU):
        for name, svc in load(path)["services"].items():
            for key, value in env_of(plain(svc)).items():
                if SECRET_KEY_RE.search(key):
                    assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), \
                        f"{path.name}: {name}.{key} must be ${{VAR:?...}} from .env (no literal, no default)"
    # .env.example holds placeholders only
    example = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    for key, value in example.items():
        if re.search(r"SECRET|PASSWORD|TOKEN", key):
            assert "change-me" in value, f".env.example: {key} should be an obvious placeholder"


def mounts_of(svc: dict[str, Any]) -> dict[str, str | None]:
    """container path -> named volume (None: an anonymous volume)."""
    out: dict[str, str | None] = {}
    for vol in svc.get("volumes") or []:
        parts = vol.split(":") if isinstance(vol, str) else [vol.get("source"), vol["target"]]
        if len(parts) == 1:
            out[parts[0]] = None
        else:
            out[parts[1]] = parts[0]
    return out


def volume_for(mounts: dict[str, str | None], path: str) -> tuple[bool, str | None]:
    for target, source in mounts.items():
        if path == target or path.startswith(target + "/"):
            return True, source
    return False, None


def test_caches_and_work_dirs_are_on_volumes(base: dict[str, Any]) -> None:
    declared = set(base.get("volumes") or {})
    for name in SLMCL_SERVICES:
        svc = base["services"][name]
        mounts = mounts_of(svc)
        assert all(src is None or src in declared for src in mounts.values()), f"{name}: undeclared volume"
        env = env_of(svc)
        on, source = volume_for(mounts, env["SLMCL_WORK_DIR"])
        assert None not in mounts.values(), f"{name}: anonymous volumes are orphaned by every down/up"
        # Per container, gone with it: replicas (--scale) must not share one (the evaluator replaces an
        # adapter folder another process could be reading), and nothing there outlives a stage.
        tmpfs = svc.get("tmpfs") or []
        assert env["SLMCL_WORK_DIR"] in [e.split(":")[0] for e in tmpfs], f"{name}: the work dir must be a tmpfs"
        if name in ("trainer", "evaluator"):  # they load models; the monitor runs none (TORCH_FLAVOR=none)
            for var in ("SLMCL_CACHE_DIR", "HF_HOME"):
                on, source = volume_for(mounts, env[var])
                assert on and source in declared, f"{name}: {var}={env[var]} must be on the shared model-cache volume"
    assert base["services"]["monitor"]["build"]["args"]["TORCH_FLAVOR"] == "none"


def test_backing_services_and_start_order(base: dict[str, Any]) -> None:
    svcs = base["services"]
    assert svcs["redis"]["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(svcs["redis"]["command"]) and svcs["redis"]["volumes"]
    assert "--requirepass" in " ".join(svcs["redis"]["command"]), "Redis must require its password"
    for name in ("monitor", "evaluator"):
        assert "SLMCL_TOKENS" in env_of(svcs[name]), f"{name}: every gRPC call needs a token"
    assert svcs["minio"]["image"].startswith("minio/minio") and svcs["minio"]["volumes"]
    assert svcs["minio-init"]["image"].startswith("minio/mc")
    assert svcs["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in SLMCL_SERVICES:
        deps = svcs[name]["depends_on"]
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    for name in ("trainer", "monitor"):
        assert svcs[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


# === scaling, ports, GPUs ==============================================================================

def test_evaluator_is_scalable(base: dict[str, Any]) -> None:
    ev = base["services"]["evaluator"]
    assert "ports" not in ev, "a fixed host port breaks --scale evaluator=N"
    assert "container_name" not in ev, "a container_name breaks --scale evaluator=N"
    assert "replicas" not in (ev.get("deploy") or {}), "the replica count comes from --scale"
    for name in ("trainer", "monitor"):
        assert "container_name" not in base["services"][name]


def test_ports_agree_between_commands_healthchecks_and_addresses(base: dict[str, Any]) -> None:
    svcs = base["services"]
    ev_port = int(arg_value(svcs["evaluator"]["command"], "--port"))
    mon_port = int(arg_value(svcs["monitor"]["command"], "--port"))
    assert arg_value(svcs["evaluator"]["command"], "--host") == "0.0.0.0"
    assert arg_value(svcs["monitor"]["command"], "--host") == "0.0.0.0"
    assert port_of(svcs["evaluator"]["healthcheck"]["test"][-1]) == ev_port
    assert port_of(svcs["monitor"]["healthcheck"]["test"][-1]) == mon_port
    mon_env = env_of(svcs["monitor"])
    assert mon_env["SLMCL_EVALUATORS"] == f"dns:///evaluator:{ev_port}", "the monitor must find every replica by DNS"
    assert str(ev_port) in [str(p) for p in svcs["evaluator"].get("expose", [])]
    targets = [published(p)[2] for p in svcs["monitor"]["ports"]]
    dash_port = int(env_of(svcs["monitor"])["SLMCL_DASHBOARD_PORT"])
    assert targets == [mon_port, dash_port], f"monitor publishes {targets}, listens on {mon_port} and {dash_port}"
    dash_ip, dash_host_port, _ = published(svcs["monitor"]["ports"][1])
    assert dash_ip == "127.0.0.1" and dash_host_port and "DASHBOARD_PORT" in dash_host_port  # loopback only
    ip, host_port, _ = published(svcs["monitor"]["ports"][0])
    assert host_port and "MONITOR_PORT" in host_port
    for name in SLMCL_SERVICES:
        assert port_of(env_of(svcs[name])["SLMCL_MONITOR_ADDRESS"]) == mon_port


def test_gpu_reservations_in_the_base_file(base: dict[str, Any]) -> None:
    for name in ("trainer", "evaluator"):
        devices = gpu_devices(base["services"][name])
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], (name, devices)
        assert env_of(base["services"][name])["SLMCL_DEVICE"] == "cuda"
        assert base["services"][name]["build"]["args"]["TORCH_FLAVOR"] == "gpu"
    assert not gpu_devices(base["services"]["monitor"])


def test_cpu_override_removes_gpu_reservations(base: dict[str, Any], cpu_merged: dict[str, Any]) -> None:
    for name in ("trainer", "evaluator"):
        svc = cpu_merged["services"][name]
        assert not gpu_devices(svc), f"{name} still reserves a GPU with the CPU override"
        assert env_of(svc)["SLMCL_DEVICE"] == "cpu"
        assert svc["build"]["args"]["TORCH_FLAVOR"] == "cpu"
        # the rest of the service is untouched by the override
        assert svc["healthcheck"] == base["services"][name]["healthcheck"]
        assert svc["depends_on"] == base["services"][name]["depends_on"]
        assert env_of(svc)["SLMCL_S3_SECRET_KEY"] == env_of(base["services"][name])["SLMCL_S3_SECRET_KEY"]
    assert set(cpu_merged["services"]) == set(base["services"])


def test_merge_helper_follows_compose_rules() -> None:
    b = {"a": {"x": [1], "y": 1, "command": ["p", "1"]}, "d": {"devices": [1]}}
    o = yaml.load("a: {x: [2], command: [q]}\nd: {devices: !reset []}\n", Loader=ComposeLoader)  # noqa: S506
    assert merge(b, o) == {"a": {"x": [1, 2], "y": 1, "command": ["q"]}, "d": {}}
    o = yaml.load("a: !override {z: 1}\n", Loader=ComposeLoader)  # noqa: S506
    assert merge(b, o)["a"] == {"z": 1}


def test_image_requirements_are_pinned_by_requirements_txt() -> None:
    requirements = (REPO / "requirements.txt").read_text()
    # the stubs stage installs grpcio-tools with requirements.txt as its constraint
    assert re.search(r"^grpcio-tools==\S+$", requirements, re.M), "requirements.txt must pin grpcio-tools"
    assert re.search(r"pip install (--no-cache-dir )?-c requirements\.txt grpcio-tools\b",
                     (REPO / "docker" / "Dockerfile").read_text())
    pin = re.search(r"^torch==(\S+)", requirements, re.M).group(1)
    text = (REPO / "docker" / "requirements-torch.txt").read_text()
    assert re.search(rf"^torch=={re.escape(pin)}$", text, re.M), f"docker/requirements-torch.txt must pin torch=={pin}"
    assert "https://download.pytorch.org/whl/" in (REPO / "docker" / "Dockerfile").read_text()  # the default index


# === docker/healthcheck.py =============================================================================

HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_healthcheck_grpc_against_a_real_health_server() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from service_common.local_servers import free_port

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        proc = run_healthcheck("grpc", f"127.0.0.1:{port}")
        assert proc.returncode == 1 and "NOT_SERVING" in proc.stdout, proc.stdout + proc.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        proc = run_healthcheck("grpc", f"127.0.0.1:{port}")
        assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
    finally:
        server.stop(0)
    proc = run_healthcheck("grpc", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.integration  # starts Redis
def test_healthcheck_rq_sees_a_worker_of_this_host(redis_server: Any) -> None:
    import os

    import redis
    from rq import Queue, Worker

    url = f"redis://127.0.0.1:{redis_server.port}/15"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    env = {**os.environ, "SLMCL_REDIS_URL": url}
    proc = run_healthcheck("rq", env=env)
    assert proc.returncode == 1 and "no RQ worker" in proc.stdout, proc.stdout + proc.stderr
    worker = Worker([Queue("slmcl-train", connection=conn)], connection=conn, name="healthcheck-test")
    worker.register_birth()
    try:
        proc = run_healthcheck("rq", env=env)
        assert proc.returncode == 0 and "healthcheck-test" in proc.stdout, proc.stdout + proc.stderr
    finally:
        worker.register_death()
        conn.flushdb()
