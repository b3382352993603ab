"""Each image of docker/Dockerfile contains every first-party module its code imports.

The deployment failed on its first real `slmcl submit` because the monitor image lacked
trainer_service (imported inside a function of monitor_service/control.py). Here, without Docker:
for each service target, the files COPY puts under /app (along the stage's FROM chain, the gRPC stubs
generated from proto/ included) are parsed, and every import in them (module level or inside a
function; relative ones resolved) that names a first-party package must resolve to a copied file.
Imports guarded by `try: ... except ImportError` are optional by design and not required.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
TARGETS = ("trainer", "evaluator", "monitor")
APP_DIR = "/app"


# --- the Dockerfile ----------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """(stage -> parent image or stage, stage -> instructions, global ARG defaults)."""
    parents: dict[str, str] = {}
    body: dict[str, list[tuple[str, str]]] = {}
    args: dict[str, str] = {}
    current = None
    for word, rest in instructions(text):
        if word == "FROM":
            words = rest.split()
            current = words[words.index("AS") + 1] if "AS" in words else rest
            parents[current], body[current] = words[0], []
        elif current is None and word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif current is not None:
            body[current].append((word, rest))
    return parents, body, args


def chain(stage: str, parents: dict[str, str], args: dict[str, str]) -> list[str]:
    """The stage and the stages it is built FROM (build arguments at their defaults)."""
    out = []
    while stage in parents:
        out.append(stage)
        stage = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), parents[stage])
    return out


def proto_modules(repo: Path) -> set[str]:
    """The modules `grpc_tools.protoc --python_out --grpc_python_out` generates from proto/."""
    out = set()
    for proto in (repo / "proto").rglob("*.proto"):
        stem = proto.relative_to(repo / "proto").with_suffix("").as_posix().replace("/", ".")
        out |= {stem + "_pb2", stem + "_pb2_grpc"}
    return out


def image_files(text: str, target: str, repo: Path) -> tuple[dict[str, Path], set[str]]:
    """What a target has under /app: {path in /app: repo file} and the generated stub modules."""
    parents, body, args = stages(text)
    assert target in body, f"docker/Dockerfile has no stage {target!r}"
    files: dict[str, Path] = {}
    generated: set[str] = set()
    workdir = "/"  # a stage inherits its parent's WORKDIR
    for stage in reversed(chain(target, parents, args)):
        for word, rest in body[stage]:
            if word == "WORKDIR":
                workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
            if word not in ("COPY", "ADD"):
                continue
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                if "/out" in " ".join(words):  # the stubs stage's protoc output
                    generated |= proto_modules(repo)
                continue
            *sources, dest = [w for w in words if not w.startswith("--")]
            dest_abs = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
            for src in sources:
                path = repo / src
                if path.is_dir():
                    for f in path.rglob("*.py"):
                        files[f"{dest_abs.rstrip('/')}/{f.relative_to(path).as_posix()}"] = f
                elif path.is_file():
                    target_path = f"{dest_abs.rstrip('/')}/{path.name}" if dest.endswith("/") else dest_abs
                    files[target_path] = path
    app = {p.removeprefix(APP_DIR + "/"): f for p, f in files.items() if p.startswith(APP_DIR + "/")}
    return app, generated


# --- imports -----------------------------------------------------------------------------------------

def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a `try` whose handlers catch ImportError (or ModuleNotFoundError)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def imports_of(source: str, module: str, is_package: bool) -> set[tuple[str, bool]]:
    """Every module a file imports (in functions and classes too), relative ones resolved, as
    (name, certain): `import X` and the X of `from X import Y` are certain; X.Y is a module only
    when Y is a submodule rather than a name defined in X."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out: set[tuple[str, bool]] = set()
    for node in ast.walk(tree):
        if _optional(node, parents):
            continue
        if isinstance(node, ast.Import):
            out |= {(alias.name, True) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            if base:
                out.add((base, True))
            out |= {(f"{base}.{a.name}" if base else a.name, False) for a in node.names if a.name != "*"}
    return out


def first_party(repo: Path) -> set[str]:
    names = {p.name for p in repo.iterdir() if (p / "__init__.py").is_file() or (p / "__main__.py").is_file()}
    return names | {"slmcl_api"}


def missing_imports(text: str, target: str, repo: Path = REPO) -> dict[str, set[str]]:
    """{first-party module not in the image: the copied files that import it}."""
    files, generated = image_files(text, target, repo)
    available: set[str] = set()
    for mod in [*generated, *(rel.removesuffix(".py").replace("/", ".") for rel in files)]:
        available.add(mod.removesuffix(".__init__"))
        parts = mod.split(".")
        available |= {".".join(parts[:i]) for i in range(1, len(parts))}  # namespace parents
    ours = first_party(repo)
    missing: dict[str, set[str]] = {}
    for rel, path in files.items():
        mod = rel.removesuffix(".py").replace("/", ".")
        is_package = mod.endswith(".__init__")
        for name, certain in imports_of(path.read_text(), mod.removesuffix(".__init__"), is_package):
            if name.split(".")[0] not in ours or name in available:
                continue
            in_repo = repo.joinpath(*name.split("."))
            if certain or in_repo.with_suffix(".py").is_file() or (in_repo / "__init__.py").is_file():
                missing.setdefault(name, set()).add(rel)
    return missing


# --- tests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_every_first_party_import_is_copied_into_the_image(target: str) -> None:
    missing = missing_imports(DOCKERFILE.read_text(), target)
    found = {k: sorted(v) for k, v in sorted(missing.items())}
    assert not missing, f"docker/Dockerfile target {target!r} lacks modules its code imports (module: files): {found}"


def test_each_target_copies_its_service_and_the_health_check() -> None:
    for target in TARGETS:
        files, generated = image_files(DOCKERFILE.read_text(), target, REPO)
        assert f"{target}_service/__main__.py" in files, target
        assert "docker/healthcheck.py" in files and "slmcl_api.v1.monitor_pb2_grpc" in generated, target


def test_the_check_catches_a_module_imported_inside_a_function(tmp_path: Path) -> None:
    """The shape of the original bug: a service imports another package only inside a function."""
    for pkg, code in {"alpha_service": "def go():\n    from beta_service.enqueue import run\n    return run\n",
                      "beta_service": "", "gamma": "from . import helpers\n"}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(code)
    (tmp_path / "beta_service" / "enqueue.py").write_text("def run(): pass\n")
    (tmp_path / "gamma" / "helpers.py").write_text("try:\n    import beta_service\nexcept ImportError:\n    pass\n")
    (tmp_path / "proto").mkdir()
    dockerfile = ("FROM base AS app\nWORKDIR /app\nCOPY gamma/ gamma/\n"
                  "FROM app AS alpha\nCOPY alpha_service/ alpha_service/\n")
    assert missing_imports(dockerfile, "alpha", tmp_path) == {"beta_service.enqueue": {"alpha_service/__init__.py"}}
    fixed = dockerfile + "COPY beta_service/__init__.py beta_service/enqueue.py beta_service/\n"
    assert missing_imports(fixed, "alpha", tmp_path) == {}


def test_control_plane_requirements_pin_what_requirements_txt_pins() -> None:
    """TORCH_FLAVOR=none installs docker/requirements-control.txt: the same versions, and no model stack."""
    def pins(path: Path) -> dict[str, str]:
        found = re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M)
        return {m.group(1).lower(): m.group(2) for m in found}

    full, control = pins(REPO / "requirements.txt"), pins(REPO / "docker" / "requirements-control.txt")
    differ = {k: (v, full.get(k)) for k, v in control.items() if full.get(k) != v}
    assert control and not differ, f"docker/requirements-control.txt vs requirements.txt: {differ}"
    assert not {"torch", "transformers", "peft", "accelerate"} & set(control)
    torch = pins(REPO / "docker" / "requirements-torch.txt")
    assert torch == {"torch": full["torch"]}, "docker/requirements-torch.txt must pin requirements.txt's torch"
