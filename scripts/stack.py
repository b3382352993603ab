#!/usr/bin/env python3
"""The slmcl services as local processes on loopback: the development stack (make stack).

    python scripts/stack.py up     [--dir .stack] [--monitor-port 50051] [--evaluators 2] [--trainers 1]
    python scripts/stack.py status [--dir .stack]
    python scripts/stack.py stop   [--dir .stack]

`up` starts a private Redis and SeaweedFS's S3 gateway (service_common.local_servers), creates
the bucket, then the trainer worker(s), the evaluator replicas (free ports) and the monitor on
127.0.0.1:<monitor-port> with SLMCL_EVALUATORS naming the replicas. Every process runs in its own
session, so it outlives this script; `up` returns once all are healthy (gRPC health SERVING for
the monitor and the evaluators, the trainer registered as an RQ worker) and prints the address
for the client. If anything fails to start, it prints the tail of that log, stops what it
started and exits 1.

Everything lives under --dir:
    pids.json          names -> pids (with their start times), ports, log paths, the environment used
    credentials.env    the S3 key pair and the Redis password, generated once (random, 0600), reused by later `up`s
    token              the bearer token every gRPC call must carry (0600, generated once): a client reads it
                       through SLMCL_TOKEN_FILE=<dir>/token (printed by `up` and `status`); see docs/security.md
    logs/<name>.log    each process's output
    redis/ s3/         the servers' data, kept across restarts
    work/<name>/       each service's SLMCL_WORK_DIR

`stop` signals exactly the processes recorded in pids.json (SIGTERM, then SIGKILL after a grace
period; a recorded pid whose start time no longer matches belongs to someone else and is left
alone), together with the children they have at that moment (an RQ worker's work-horse runs in
its own process group), then removes pids.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service_common.local_servers import free_port, port_is_free, redis_url, start_redis, start_s3  # noqa: E402

STATE = "pids.json"
CREDENTIALS = "credentials.env"
TOKEN = "token"
SECRET_NAMES = ("SLMCL_S3_ACCESS_KEY", "SLMCL_S3_SECRET_KEY", "SLMCL_REDIS_PASSWORD")
BACKING = ("redis", "s3")  # stopped last: the services may still talk to them while stopping
DEFAULT_BUCKET = "slmcl"
DEFAULT_QUEUE = "slmcl-train"


class StackError(Exception):
    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


# --- processes ----------------------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def alive(pid: int, started: int | None = None) -> bool:
    """Running (not a zombie) and, when `started` is given, still the process we started."""
    if not Path("/proc").is_dir():  # no procfs: signal 0 is all we have
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return started is None or stat[1] == started


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (no zombie left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_processes(procs: dict[str, tuple[int, int | None]], grace: float, say: Callable[[str], None]) -> None:
    """SIGTERM every live one, wait up to `grace` seconds, then SIGKILL them and their children."""
    live = {name: (pid, st) for name, (pid, st) in procs.items() if alive(pid, st)}
    if not live:
        return
    family = {name: descendants(pid) for name, (pid, _) in live.items()}
    for name, (pid, _) in live.items():
        say(f"stopping {name} (pid {pid})")
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid, _ in live.values():
            _reap(pid)
        if not any(alive(pid, st) for pid, st in live.values()):
            break
        time.sleep(0.1)
    for name, (pid, st) in live.items():
        if alive(pid, st):
            say(f"{name} (pid {pid}) still running after {grace:.0f} s: SIGKILL")
            _signal(pid, signal.SIGKILL)
        for child in family[name] + (descendants(pid) if alive(pid, st) else []):
            if alive(child):
                _signal(child, signal.SIGKILL)
    time.sleep(0.1)
    for pid, _ in live.values():
        _reap(pid)


def stop_stack(procs: dict[str, tuple[int, int | None]], grace: float, say: Callable[[str], None]) -> None:
    """The services first, then S3 and Redis, which the services may use while they stop."""
    stop_processes({n: p for n, p in procs.items() if n not in BACKING}, grace, say)
    stop_processes({n: p for n, p in procs.items() if n in BACKING}, grace, say)


# --- state ----------------------------------------------------------------------------------------------

def read_state(d: Path) -> dict[str, Any] | None:
    path = d / STATE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_state(d: Path, state: dict[str, Any]) -> None:
    tmp = d / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=False) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(d / STATE)


def recorded(state: dict[str, Any]) -> dict[str, tuple[int, int | None]]:
    return {name: (pid, state.get("start_times", {}).get(name)) for name, pid in state.get("pids", {}).items()}


def _new_secret(name: str) -> str:
    return "slmcl-" + secrets.token_hex(6) if name == "SLMCL_S3_ACCESS_KEY" else secrets.token_urlsafe(32)


def _write_private(path: Path, text: str) -> None:
    """Create or replace a file only its owner can read (created 0600: never readable, even for a moment)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def load_credentials(d: Path) -> dict[str, str]:
    """The stack's secrets, generated once; a file from an older stack gets the ones it lacks added."""
    path = d / CREDENTIALS
    creds: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                creds[key.strip()] = value.strip()
    missing = [k for k in SECRET_NAMES if not creds.get(k)]
    if missing:
        creds.update({k: _new_secret(k) for k in missing})
        _write_private(path, "# secrets of the local stack, generated by scripts/stack.py: keep private\n"
                       + "".join(f"{k}={v}\n" for k, v in creds.items()))
    os.chmod(path, 0o600)
    return creds


def load_token(d: Path) -> Path:
    """The stack's bearer token file (one random token, 0600), generated once."""
    path = d / TOKEN
    if not path.exists() or not path.read_text().strip():
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    os.chmod(path, 0o600)
    return path


# --- health ---------------------------------------------------------------------------------------------

def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service_common.auth import client_channel

    try:
        with client_channel(address) as ch:  # TLS when SLMCL_TLS_CA is set (health itself needs no token)
            check = health_pb2_grpc.HealthStub(ch).Check  # type: ignore[attr-defined]  # the stub's HealthStub has no methods
            resp = check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def rq_worker_registered(redis_url: str, pid: int, name: str, log: Path) -> bool:
    import redis
    from rq import Worker
    from rq.serializers import JSONSerializer

    try:
        conn = redis.Redis.from_url(redis_url, socket_timeout=2)
        host = socket.gethostname()
        for w in Worker.all(connection=conn, serializer=JSONSerializer):
            if w.name == name or (w.pid == pid and w.hostname == host):
                return True
    except redis.RedisError:
        pass
    try:  # RQ logs "*** Listening on <queue>..." once it waits for jobs
        return "Listening on" in log.read_text(errors="replace")
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --- up -------------------------------------------------------------------------------------------------

def ensure_stubs(say: Callable[[str], None]) -> None:
    """The gRPC stubs (slmcl_api/, generated and git-ignored): made here when missing or stale."""
    protos = sorted((REPO / "proto" / "slmcl_api" / "v1").glob("*.proto"))
    stale = [p for p in protos
             if not (out := REPO / "slmcl_api" / "v1" / (p.stem + "_pb2.py")).exists()
             or out.stat().st_mtime < p.stat().st_mtime]
    if not stale:
        return
    say("generating the gRPC stubs (slmcl_api/)")
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=.", "--pyi_out=.",
                           "--grpc_python_out=.", *[str(p.relative_to(REPO)) for p in protos]],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"protoc failed (pip install -r requirements-dev.txt?):\n{proc.stdout}{proc.stderr}")


def ensure_bucket(endpoint: str, creds: dict[str, str], bucket: str) -> None:
    from urllib.parse import quote

    from minio.error import S3Error

    from slmcl.errors import SlmclError
    from slmcl.storage.factory import open_store

    user = ":".join(quote(creds[k], safe="") for k in ("SLMCL_S3_ACCESS_KEY", "SLMCL_S3_SECRET_KEY"))
    deadline = time.monotonic() + 30
    while True:
        try:
            open_store(f"s3://{user}@{bucket}?endpoint={endpoint}&secure=0&region=us-east-1")  # creates the bucket
            return
        except (S3Error, SlmclError) as exc:  # an answer or a bad URL, not a gateway still starting: no retry
            raise StackError(f"cannot create bucket {bucket}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the gateway's filer may need a moment after the first answer
            if time.monotonic() > deadline:
                raise StackError(f"cannot create bucket {bucket}: {exc}") from None
            time.sleep(0.5)


def cmd_up(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    (d / "logs").mkdir(exist_ok=True)
    say = print

    old = read_state(d)
    if old is not None:
        live = [name for name, (pid, st) in recorded(old).items() if alive(pid, st)]
        if live:
            print(f"a stack is already running from {d} ({', '.join(live)}): "
                  f"`python scripts/stack.py stop --dir {args.dir}` first", file=sys.stderr)
            return 1
        say(f"removing the stale {d / STATE} (none of its processes is running)")
        (d / STATE).unlink()

    if not port_is_free(args.monitor_port):
        print(f"port {args.monitor_port} on 127.0.0.1 is taken: choose another with --monitor-port", file=sys.stderr)
        return 1

    state: dict[str, Any] = {"dir": str(d), "pids": {}, "start_times": {}, "ports": {}, "logs": {}, "env": {},
                             "commands": {}}
    procs: dict[str, subprocess.Popen] = {}

    def record(name: str, pid: int, port: int | None, log: Path, command: list[str] | None = None) -> None:
        state["pids"][name] = pid
        state["start_times"][name] = start_time(pid)
        if port is not None:
            state["ports"][name] = port
        state["logs"][name] = str(log)
        if command:
            state["commands"][name] = command
        write_state(d, state)

    try:
        ensure_stubs(say)
        creds = load_credentials(d)
        token_file = load_token(d)

        redis_srv = start_redis(d / "redis", password=creds["SLMCL_REDIS_PASSWORD"])
        record("redis", redis_srv.pid, redis_srv.port, redis_srv.log)
        say(f"redis        127.0.0.1:{redis_srv.port}  (pid {redis_srv.pid}, password in {d / CREDENTIALS})")
        s3_srv = start_s3(d / "s3", creds["SLMCL_S3_ACCESS_KEY"], creds["SLMCL_S3_SECRET_KEY"])
        record("s3", s3_srv.pid, s3_srv.port, s3_srv.log)
        say(f"s3           127.0.0.1:{s3_srv.port}  (pid {s3_srv.pid}, SeaweedFS)")
        for name, log in (("redis", redis_srv.log), ("s3", s3_srv.log)):
            link = d / "logs" / f"{name}.log"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(log, link.parent))

        bucket = os.environ.get("SLMCL_S3_BUCKET") or DEFAULT_BUCKET
        endpoint = f"127.0.0.1:{s3_srv.port}"
        ensure_bucket(endpoint, creds, bucket)

        used = {args.monitor_port, redis_srv.port, s3_srv.port}
        ev_ports = []
        for _ in range(args.evaluators):
            port = free_port(used)
            used |= {port}
            ev_ports.append(port)
        rq_url = redis_url(redis_srv.port, 0, creds["SLMCL_REDIS_PASSWORD"])
        monitor_address = f"127.0.0.1:{args.monitor_port}"
        stack_env = {
            "SLMCL_REDIS_URL": rq_url,
            "SLMCL_S3_ENDPOINT": endpoint,
            "SLMCL_S3_ACCESS_KEY": creds["SLMCL_S3_ACCESS_KEY"],
            "SLMCL_S3_SECRET_KEY": creds["SLMCL_S3_SECRET_KEY"],
            "SLMCL_S3_BUCKET": bucket,
            "SLMCL_S3_SECURE": "0",
            "SLMCL_S3_REGION": "us-east-1",
            "SLMCL_QUEUE": os.environ.get("SLMCL_QUEUE") or DEFAULT_QUEUE,
            "SLMCL_EVALUATORS": ",".join(f"127.0.0.1:{p}" for p in ev_ports),
            "SLMCL_MONITOR_ADDRESS": monitor_address,
            "SLMCL_DEVICE": args.device,
            # The servers accept exactly this token and the monitor sends it to the evaluators, whatever token
            # settings the caller's environment holds.
            "SLMCL_TOKENS_FILE": str(token_file),
            "SLMCL_TOKEN_FILE": str(token_file),
            "SLMCL_TOKENS": "",
            "SLMCL_TOKEN": "",
            "SLMCL_AUTH": "",
        }
        state["env"] = {**stack_env, "SLMCL_S3_SECRET_KEY": "<see credentials.env>",
                        "SLMCL_REDIS_URL": redis_url(redis_srv.port, 0, "<see credentials.env>")}
        state["credentials"] = str(d / CREDENTIALS)
        state["token_file"] = str(token_file)
        state["monitor"] = monitor_address
        write_state(d, state)

        def spawn(name: str, argv: list[str], port: int | None, extra: dict[str, str]) -> None:
            log = d / "logs" / f"{name}.log"
            work = d / "work" / name
            work.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **stack_env, "SLMCL_WORK_DIR": str(work),
                   "PYTHONUNBUFFERED": "1", **extra}
            with open(log, "ab") as out:
                out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
                out.flush()
                proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            procs[name] = proc
            record(name, proc.pid, port, log, [sys.executable, *argv])

        checks: dict[str, Callable[[], bool]] = {}
        for i, port in enumerate(ev_ports, 1):
            name = f"evaluator-{i}"
            spawn(name, ["-m", "evaluator_service", "--host", "127.0.0.1", "--port", str(port)], port,
                  {"SLMCL_REPLICA_ID": name})
            checks[name] = functools.partial(grpc_serving, f"127.0.0.1:{port}")
        for i in range(1, args.trainers + 1):
            name = f"trainer-{i}"
            worker_name = f"stack-{name}-{secrets.token_hex(3)}"
            spawn(name, ["-m", "trainer_service", "--name", worker_name], None, {})
            pid, log = procs[name].pid, d / "logs" / f"{name}.log"
            checks[name] = functools.partial(rq_worker_registered, rq_url, pid, worker_name, log)
        spawn("monitor", ["-m", "monitor_service", "--host", "127.0.0.1", "--port", str(args.monitor_port)],
              args.monitor_port, {})
        checks["monitor"] = lambda: grpc_serving(monitor_address)

        pending = dict(checks)
        deadline = time.monotonic() + args.timeout
        while pending:
            for name in list(pending):
                code = procs[name].poll()
                if code is not None:
                    raise StackError(f"{name} exited with status {code} while starting", d / "logs" / f"{name}.log")
                if pending[name]():
                    where = f" on 127.0.0.1:{state['ports'][name]}" if name in state["ports"] else ""
                    say(f"{name:<12} ready{where}")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                for name in pending:
                    log_path = d / "logs" / f"{name}.log"
                    print(f"\n--- {name}: last lines of {log_path}\n{tail(log_path)}", file=sys.stderr)
                raise StackError(f"not healthy after {args.timeout:.0f} s: {', '.join(pending)}")
            if pending:
                time.sleep(0.5)
    except (Exception, KeyboardInterrupt, SystemExit) as exc:  # noqa: BLE001 - whatever it was (a bad setting
        # stops Settings() with SystemExit naming the variable), undo the half-started stack
        failed_log = getattr(exc, "log", None)
        if failed_log is not None:
            print(f"\n--- last lines of {failed_log}\n{tail(failed_log)}\n---", file=sys.stderr)
        print(f"stack failed to start: {exc or type(exc).__name__}", file=sys.stderr)
        print("stopping what was started", file=sys.stderr)
        stop_stack(recorded(state), args.grace, lambda m: print(m, file=sys.stderr))
        (d / STATE).unlink(missing_ok=True)
        return 1

    say("")
    say(f"slmcl stack is up: monitor on {monitor_address}, logs in {d / 'logs'}")
    say(f"  export SLMCL_SERVER={monitor_address}")
    say(f"  export SLMCL_TOKEN_FILE={token_file}   # every call needs this token (docs/security.md)")
    say(f"  stop it with: python scripts/stack.py stop --dir {args.dir}   (or: make stack-stop)")
    return 0


# --- stop / status --------------------------------------------------------------------------------------

def cmd_stop(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    state = read_state(d)
    if state is None:
        print(f"no stack recorded in {d} (no {STATE})")
        return 0
    procs = recorded(state)
    stop_stack(procs, args.grace, print)
    still = [n for n, (pid, st) in procs.items() if alive(pid, st)]
    if still:
        print(f"could not stop: {', '.join(still)}", file=sys.stderr)
        return 1
    (d / STATE).unlink(missing_ok=True)
    print(f"stack in {d} stopped (data, logs and credentials kept)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    d = Path(args.dir).resolve()
    state = read_state(d)
    if state is None:
        print(f"no stack recorded in {d} (no {STATE})")
        return 1
    all_alive = True
    for name, (pid, st) in recorded(state).items():
        ok = alive(pid, st)
        all_alive &= ok
        port = state.get("ports", {}).get(name)
        where = f"127.0.0.1:{port}" if port else "-"
        log_name = state.get("logs", {}).get(name, "")
        print(f"{name:<12} pid {pid:<8} {'alive' if ok else 'DEAD ':<6} {where:<17} {log_name}")
    if state.get("monitor"):
        print(f"\nexport SLMCL_SERVER={state['monitor']}")
    if state.get("token_file"):
        print(f"export SLMCL_TOKEN_FILE={state['token_file']}")
    return 0 if all_alive else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("must be at least 1")
        return value

    up = sub.add_parser("up", help="start the stack and wait until it is healthy")
    up.add_argument("--dir", default=".stack", help="state, logs and data (default .stack)")
    up.add_argument("--monitor-port", type=int, default=50051, help="the monitor's port on 127.0.0.1 (default 50051)")
    up.add_argument("--evaluators", type=positive, default=2, help="evaluator replicas (default 2)")
    up.add_argument("--trainers", type=positive, default=1, help="trainer workers (default 1)")
    up.add_argument("--device", default=os.environ.get("SLMCL_DEVICE") or "auto",
                    help="SLMCL_DEVICE for the services: auto, cpu, cuda (default $SLMCL_DEVICE or auto)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all to be healthy (default 300)")
    up.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on failure")
    up.set_defaults(func=cmd_up)

    stop = sub.add_parser("stop", help="stop the processes recorded in pids.json")
    stop.add_argument("--dir", default=".stack")
    stop.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL (default 30)")
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser("status", help="each recorded process and whether it is alive")
    status.add_argument("--dir", default=".stack")
    status.set_defaults(func=cmd_status)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
