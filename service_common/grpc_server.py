"""gRPC plumbing every server shares: health, reflection, error mapping, graceful stop."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service_common.auth import add_port, client_channel, server_interceptors
from slmcl.errors import (
    CancelledError,
    DataError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    SlmclError,
    SpecError,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # specs ship their datasets; results stream in chunks


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Domain errors -> status codes: the client learns what kind of failure it was."""
    if isinstance(exc, (SpecError, DataError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, LimitExceededError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, SlmclError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def _abort(fn_name: str, exc: Exception, context: grpc.ServicerContext) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", fn_name)  # a bug, not the caller's fault: keep the traceback
    context.abort(code, str(exc) or type(exc).__name__)


def rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a unary servicer method: a raised domain error aborts with the matching status."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(fn.__name__, exc, context)

    return wrapper


def rpc_stream(fn: Callable[..., Iterable[Any]]) -> Callable[..., Iterable[Any]]:
    """The same for a server-streaming method."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
        try:
            yield from fn(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(fn.__name__, exc, context)

    return wrapper


MESSAGE_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def make_server(max_workers: int = 16) -> grpc.Server:
    """A thread-pool server with the token check of ``service_common.auth`` (when tokens are configured)."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=MESSAGE_OPTIONS,
                       interceptors=server_interceptors())


def serve(server: grpc.Server, address: str, service_names: list[str],
          on_stop: Callable[[], None] | None = None) -> None:
    """Add health + reflection, bind (TLS and the loopback rule of ``auth.add_port``), start, and block until
    SIGTERM/SIGINT."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    add_port(server, address)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s", ", ".join(service_names), address)
    stopped = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        health_servicer.enter_graceful_shutdown()
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()
    if on_stop is not None:
        on_stop()
    server.stop(grace=5).wait()


def channel(address: str) -> grpc.Channel:
    """A client channel to a slmcl server: the token and TLS of ``auth.client_channel``, large messages."""
    return client_channel(address, options=MESSAGE_OPTIONS)
