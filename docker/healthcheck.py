"""Container health checks for the slmcl services (exit 0 = healthy, 1 = not).

    python docker/healthcheck.py grpc [HOST:PORT]   gRPC health (grpc.health.v1) answers SERVING
    python docker/healthcheck.py rq                 an RQ worker of this host is registered in Redis

The gRPC check asks for the overall server status (service ""), which every slmcl server sets
to SERVING once it is bound and ready, and NOT_SERVING while it shuts down. The RQ check looks
for a worker whose hostname is this container's (``SLMCL_REDIS_URL`` names the Redis); a worker
that stops heart-beating drops out of that registry by itself.

Only grpcio, grpcio-health-checking, redis and rq are imported: no model, no torch.
"""

from __future__ import annotations

import os
import socket
import sys


def check_grpc(address: str, timeout: float = 5.0) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{address}: {exc.code().name}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def check_rq(redis_url: str, hostname: str | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    import redis
    from rq import Worker
    from rq.serializers import JSONSerializer

    hostname = hostname or socket.gethostname()
    try:
        conn = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        workers = Worker.all(connection=conn, serializer=JSONSerializer)  # RQ's default pickles
    except redis.RedisError as exc:
        return False, f"redis: {exc}"
    mine = [w.name for w in workers if w.hostname == hostname]
    if mine:
        return True, f"worker(s) on {hostname}: {', '.join(mine)}"
    return False, f"no RQ worker registered for host {hostname} ({len(workers)} in all)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("grpc", "rq"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "grpc":
        ok, why = check_grpc(argv[1] if len(argv) > 1 else "127.0.0.1:50051")
    else:
        ok, why = check_rq(os.environ.get("SLMCL_REDIS_URL", "redis://127.0.0.1:6379/0"))
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
