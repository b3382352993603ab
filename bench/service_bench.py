"""Service-mode rows of the benchmark: a run with evaluation overlapped with training, and
evaluator scaling (1 vs 2 replicas). Real processes on loopback: Redis, the S3 gateway, the
monitor, a trainer worker and evaluator replicas, each limited to one torch thread so that
on a 2-core machine the trainer and an evaluator (or two evaluators) can run side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from service_common.local_servers import free_port, start_redis, start_s3, stop_pid

REPO = Path(__file__).resolve().parents[1]
ACCESS, SECRET = "bench-access", "bench-secret-key-123"


class LocalTrio:
    """Redis + S3 + monitor + trainer + N evaluators as processes; stopped by pid."""

    def __init__(self, workdir: Path, evaluators: int, threads: int = 1) -> None:
        self.dir = workdir
        self.redis = start_redis(workdir / "redis")
        self.s3 = start_s3(workdir / "s3", ACCESS, SECRET)
        self.env = {**os.environ, "SLMCL_REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0",
                    "SLMCL_S3_ENDPOINT": f"127.0.0.1:{self.s3.port}", "SLMCL_S3_ACCESS_KEY": ACCESS,
                    "SLMCL_S3_SECRET_KEY": SECRET, "SLMCL_S3_BUCKET": "bench", "SLMCL_WORK_DIR": str(workdir / "work"),
                    "SLMCL_DEVICE": os.environ.get("SLMCL_DEVICE", "auto"), "SLMCL_TORCH_THREADS": str(threads),
                    "SLMCL_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self.eval_addresses = [f"127.0.0.1:{free_port()}" for _ in range(evaluators)]
        for i, addr in enumerate(self.eval_addresses, 1):
            host, port = addr.split(":")
            self._start(["-m", "evaluator_service", "--host", host, "--port", port], f"evaluator-{i}",
                        SLMCL_REPLICA_ID=f"evaluator-{i}")
        self.monitor_address = f"127.0.0.1:{free_port()}"
        host, port = self.monitor_address.split(":")
        self._start(["-m", "monitor_service", "--host", host, "--port", port], "monitor",
                    SLMCL_EVALUATORS=",".join(self.eval_addresses))
        self._start(["-m", "trainer_service", "--name", f"bench-{os.getpid()}"], "trainer")
        from tests.services.conftest import wait_healthy

        for addr, proc in zip(self.eval_addresses + [self.monitor_address], self.procs):
            wait_healthy(addr, proc, timeout=300)

    def _start(self, args: list[str], name: str, **extra: str) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.dir / "logs" / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen([sys.executable, *args], env={**self.env, **extra}, stdout=log,
                                               stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))

    def store(self) -> Any:
        """The trio's object store, as the services see it."""
        from urllib.parse import quote

        from slmcl.storage.factory import open_store

        return open_store(f"s3://{quote(ACCESS, safe='')}:{quote(SECRET, safe='')}@bench"
                          f"?endpoint=127.0.0.1:{self.s3.port}&secure=0")

    def stop(self) -> None:
        for p in self.procs:
            stop_pid(p.pid)
        self.redis.stop()
        self.s3.stop()


def _submit_and_wait(client: Any, spec: Any, timeout: float = 3600) -> tuple[float, str]:
    t0 = time.perf_counter()
    exp = client.submit(spec)
    last = None
    for ev in client.watch(exp.id):
        last = ev
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("service run did not finish")
    wall = time.perf_counter() - t0
    if last is None or last.kind != "experiment_done":
        raise RuntimeError(f"service run ended with {last.kind if last else 'nothing'}")
    return wall, str(exp.id)


def phase_run_service(b: Any) -> None:
    """Submit -> done wall time of one run (base + 3 stages) in service mode, and its overlap."""
    from service_common.client import MonitorClient

    s = b.sizes
    with tempfile.TemporaryDirectory(prefix="slmcl-bench-svc-") as tmp:
        trio = LocalTrio(Path(tmp), evaluators=1)
        try:
            client = MonitorClient(trio.monitor_address)
            store = trio.store()

            def run_spec(name: str) -> Any:
                return b.make_spec(eval_rows=s.run_eval_rows, eval_tokens=s.run_eval_tokens,
                                   train_rows=s.run_train_rows, ref_rows=s.run_ref_rows,
                                   output_dir=str(Path(tmp) / name))

            _submit_and_wait(client, run_spec("warm"))  # model loads in every process, excluded
            walls, overlaps, sums, maxes = [], [], [], []
            for rep in range(b.args.reps):
                # Every rep the same work, a first experiment's: the base is evaluated again (its
                # cached results deleted); p_0 stays in the monitor's memory (1 s of one thread).
                for key in store.list_keys("cache/base-eval/"):
                    store.delete(key)
                wall, exp_id = _submit_and_wait(client, run_spec(f"r{rep}"))
                out = client.results(exp_id, Path(tmp) / f"res-{rep}", include_checkpoints=False)
                train = evals = 0.0
                for rec_file in out.glob("runs/*/stage-*.json"):
                    rec = json.loads(rec_file.read_text())
                    train += rec.get("timing", {}).get("train_seconds", 0.0)
                    evals += rec.get("timing", {}).get("eval_seconds", 0.0)
                longest = max(train, evals)
                walls.append(wall)
                overlaps.append(wall / longest if longest else float("nan"))
                sums.append((train + evals) / longest if longest else float("nan"))
                maxes.append(longest)
                b.log(f"run_service: rep {rep + 1}/{b.args.reps} wall {wall:.1f}s  train {train:.1f}s  "
                      f"eval {evals:.1f}s  wall/max {overlaps[-1]:.2f}")
        finally:
            trio.stop()
    naive_run = next((r for r in b.rows if r.name == "run_seconds"), None)
    b.add("run_service_seconds", "s/run", naive_run.naive_samples if naive_run else None, walls, "lower",
          "service mode, submit -> done, base evaluated each time: 1 trainer + 1 evaluator + monitor, 1 torch "
          "thread each; naive = the run row's naive path (in-process), when run in the same invocation")
    b.add("run_service_overlap", "x max(train, eval)", sums, overlaps, "lower",
          "wall / max(total training, total evaluation); naive = sequential (train + eval) / max; target <= 1.15")


def phase_scaling(b: Any) -> None:
    """Evaluation throughput of one vs two evaluator replicas on the same requests."""
    from monitor_service.evaluators import EvaluatorPool
    from service_common.datasets import map_paths, sha256_hex, spec_paths
    from slmcl_api.v1 import evaluator_pb2

    s = b.sizes
    spec = b.make_spec(eval_rows=s.eval_rows, eval_tokens=s.eval_tokens, output_dir="/tmp/unused")
    shards = 2
    with tempfile.TemporaryDirectory(prefix="slmcl-bench-scale-") as tmp:
        trio = LocalTrio(Path(tmp), evaluators=2)
        try:
            store = trio.store()
            keys = {}
            for _field, path in spec_paths(spec):
                data = Path(path).read_bytes()
                key = f"datasets/{sha256_hex(data)}.json"
                store.put_bytes(key, data)
                keys[path] = "store:" + key
            spec_json = map_paths(spec, lambda p: keys.get(p, p)).to_json()
            requests = [evaluator_pb2.EvaluateRequest(experiment_id="bench", spec_json=spec_json, task=t.name,
                                                      shard_index=i, shard_count=shards)
                        for t in spec.tasks for i in range(shards)]
            n_rows = s.eval_rows * len(spec.tasks)

            def throughput(addresses: list[str]) -> float:
                pool = EvaluatorPool(",".join(addresses))
                t0 = time.perf_counter()
                with ThreadPoolExecutor(max_workers=len(requests)) as ex:
                    list(ex.map(pool.evaluate, requests))
                return n_rows / (time.perf_counter() - t0)

            throughput(trio.eval_addresses)  # warm-up: both replicas load the model
            one, two = [], []
            for rep in range(b.args.reps):
                one.append(throughput(trio.eval_addresses[:1]))
                two.append(throughput(trio.eval_addresses))
                b.log(f"scaling: rep {rep + 1}/{b.args.reps} 1 replica {one[-1]:.2f} ex/s, 2 replicas {two[-1]:.2f}")
        finally:
            trio.stop()
    b.add("scaling_eval_examples_per_s", "examples/s", one, two, "higher",
          f"{n_rows} test rows as {len(requests)} shards; naive = 1 evaluator replica, ours = 2 replicas "
          "(1 torch thread each); target >= 1.7x")
