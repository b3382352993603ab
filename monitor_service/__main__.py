"""python -m monitor_service --host 127.0.0.1 --port 50051

The control plane: gRPC Monitor API, Redis for queues/state/events, the object store for
results, the evaluator pool from $SLMCL_EVALUATORS. It runs no model: every forward pass
(evaluation and drift) runs on the evaluators, so it needs neither torch nor an accelerator.
"""

from __future__ import annotations

import argparse
import logging
import os

import redis


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m monitor_service")
    parser.add_argument("--host", default=os.environ.get("SLMCL_MONITOR_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SLMCL_MONITOR_PORT", "50051")))
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("SLMCL_LOG_LEVEL", "INFO").upper(), format="%(asctime)s monitor %(levelname)s %(name)s: %(message)s")

    from monitor_service.control import Control
    from monitor_service.evaluators import EvaluatorPool
    from monitor_service.server import MonitorServicer
    from service_common.grpc_server import make_server, serve
    from service_common.settings import Settings
    from slmcl.errors import SlmclError
    from slmcl.storage.factory import open_store
    from slmcl_api.v1 import monitor_pb2, monitor_pb2_grpc

    settings = Settings()
    try:
        store = open_store(settings.store_url)
    except SlmclError as exc:  # no credentials, a bad SLMCL_STORE_URL: one line, not a traceback
        raise SystemExit(f"monitor: object store: {exc}") from None
    control = Control(settings, store, redis.Redis.from_url(settings.redis_url), EvaluatorPool(settings.evaluators))
    control.start()
    server = make_server()
    monitor_pb2_grpc.add_MonitorServicer_to_server(MonitorServicer(control), server)
    serve(server, f"{args.host}:{args.port}", [monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name],
          on_stop=control.stop)


if __name__ == "__main__":
    main()
