"""``python -m evaluator_service [--port 50052] [--host 127.0.0.1] [--preload-spec SPEC_FILE]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service_common.grpc_server import make_server, serve
from service_common.settings import Settings
from slmcl.storage.factory import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluator_service", description=__doc__)
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--preload-spec", metavar="SPEC_JSON_FILE",
                        help="load this spec's base model before reporting SERVING (JSON or YAML spec)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=os.environ.get("SLMCL_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("evaluator_service")

    from slmcl.models.runtime import configure_process

    configure_process(threads=os.environ.get("SLMCL_TORCH_THREADS"))

    import slmcl.models.engine  # noqa: F401 - torch, transformers, peft: imported before SERVING, not on the first request
    from evaluator_service.server import EvaluatorServicer, replica_id
    from slmcl.errors import SlmclError
    from slmcl_api.v1 import evaluator_pb2, evaluator_pb2_grpc

    settings = Settings()
    try:
        store = open_store(settings.store_url)
    except Exception as exc:  # noqa: BLE001 - one line, not a urllib3 traceback
        log.error("object store %s: %s", settings.store_url, exc)
        return 2
    servicer = EvaluatorServicer.create(settings, store, replica_id(args.port))
    if args.preload_spec:
        from slmcl.config.spec import load_spec

        try:
            servicer.core.preload(load_spec(args.preload_spec, check_files=False))
        except SlmclError as exc:
            log.error("--preload-spec %s: %s", args.preload_spec, exc)
            return 2
    # Every slot's request, as many again waiting for a slot (cancellable), and room for Info and health.
    server = make_server(max_workers=max(16, 2 * servicer.core.capacity + 4))
    evaluator_pb2_grpc.add_EvaluatorServicer_to_server(servicer, server)
    log.info("replica %s", servicer.core.replica_id)
    serve(server, f"{args.host}:{args.port}", [evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"].full_name])
    log.info("stopped")
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch and transformers (seconds, for nothing)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
