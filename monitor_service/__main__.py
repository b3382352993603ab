"""python -m monitor_service --host 127.0.0.1 --port 50051

The control plane: gRPC Monitor API (grpc.aio), Redis for queues/state/events, the object store for
results, the evaluator pool from $SLMCL_EVALUATORS. It runs no model: every forward pass
(evaluation and drift) runs on the evaluators, so it needs neither torch nor an accelerator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

# Blocking Control calls (store and Redis round trips) run here; watchers are coroutines and take none.
EXECUTOR_THREADS = 32
STOP_GRACE_SECONDS = 5.0


async def serve(host: str, port: int, dashboard_host: str = "127.0.0.1", dashboard_port: int | None = None) -> None:
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio
    from grpc_reflection.v1alpha import reflection

    from monitor_service.control import Control
    from monitor_service.evaluators import EvaluatorPool
    from monitor_service.server import MonitorServicer
    from service_common.auth import add_port, aio_server_interceptors
    from service_common.grpc_server import MAX_MESSAGE_BYTES
    from service_common.redis_conn import async_redis_from_url, redis_from_url
    from service_common.settings import Settings
    from slmcl.errors import SlmclError
    from slmcl.storage.factory import open_store
    from slmcl_api.v1 import monitor_pb2, monitor_pb2_grpc

    log = logging.getLogger("monitor_service")
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="rpc"))
    settings = Settings()
    try:
        store = open_store(settings.store_url)
    except SlmclError as exc:  # no credentials, a bad SLMCL_STORE_URL: one line, not a traceback
        raise SystemExit(f"monitor: object store: {exc}") from None
    control = Control(settings, store, redis_from_url(settings.redis_url), EvaluatorPool(settings.evaluators))
    dashboard = None
    if dashboard_port is not None:  # the read-only live page (monitor_service/dashboard.py): off unless asked for
        from monitor_service.dashboard import ControlSource, start_dashboard

        dashboard = start_dashboard(ControlSource(control), dashboard_host, dashboard_port)  # refuses an open bind
    await asyncio.to_thread(control.start)
    aredis = async_redis_from_url(settings.redis_url)  # watch streams wait out a Redis restart too

    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_receive_message_length", settings.max_request_bytes)],
        interceptors=aio_server_interceptors())
    monitor_name = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name
    monitor_pb2_grpc.add_MonitorServicer_to_server(MonitorServicer(control, aredis), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [monitor_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    add_port(server, address)  # TLS when configured; never unauthenticated off loopback (service_common.auth)
    await server.start()
    for name in ("", monitor_name):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s", monitor_name, address)

    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: health NOT_SERVING, in-flight calls get %.0f s", STOP_GRACE_SECONDS)
    await health.enter_graceful_shutdown()
    if dashboard is not None:
        await asyncio.to_thread(dashboard.shutdown)
        dashboard.server_close()
    await asyncio.to_thread(control.stop)
    await server.stop(grace=STOP_GRACE_SECONDS)  # watchers are cancelled at the end of the grace
    await aredis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m monitor_service")
    parser.add_argument("--host", default=os.environ.get("SLMCL_MONITOR_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SLMCL_MONITOR_PORT", "50051")))
    # A string default goes through type=int too: a bad SLMCL_DASHBOARD_PORT is a usage error, not a traceback.
    parser.add_argument("--dashboard-port", type=int,
                        default=os.environ.get("SLMCL_DASHBOARD_PORT", "").strip() or None,
                        help="serve the live dashboard on this port (default: off; SLMCL_DASHBOARD_PORT)")
    parser.add_argument("--dashboard-host", default=os.environ.get("SLMCL_DASHBOARD_HOST", "127.0.0.1"),
                        help="its address (default 127.0.0.1; off loopback it needs SLMCL_TOKENS: docs/deploy.md)")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("SLMCL_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s monitor %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.host, args.port, args.dashboard_host, args.dashboard_port))


if __name__ == "__main__":
    main()
