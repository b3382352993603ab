"""Every service's Redis connection, built here: commands wait out a Redis restart instead of failing.

redis-py retries a command on ``ConnectionError`` / ``TimeoutError`` (which includes "LOADING": a
restarted Redis reading its append-only file) through the connection's ``Retry``. Ours is the
same rule as ``service_common.retry`` (exponential backoff with jitter, bounded by
``SLMCL_RETRY_BUDGET_SECONDS``) and logs each wait, so the monitor's loops, the RQ worker and
its jobs reconnect and carry on where they were after Redis comes back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT, XReadGroupResponse, XReadResponse

from service_common.retry import RetryPolicy

T = TypeVar("T")

log = logging.getLogger("slmcl.redis")

CONNECT_TIMEOUT = 5.0  # s: one connection attempt; the budget decides how many


class BudgetRetry(Retry):
    """redis-py's ``Retry`` with a time budget instead of a count, one log line per wait."""

    def __init__(self, policy: RetryPolicy) -> None:
        super().__init__(ExponentialWithJitterBackoff(cap=policy.max_wait_seconds, base=policy.initial_seconds),
                         policy.attempts_within_budget(),
                         (redis.ConnectionError, redis.TimeoutError, socket.timeout))
        self.policy = policy

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, BudgetRetry) and self.policy == other.policy and super().__eq__(other)

    __hash__ = Retry.__hash__

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        deadline = time.monotonic() + self.policy.budget_seconds
        waits = self.policy.waits()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("redis: %s: %s (attempt %d); the retry budget of %.0f s is spent, giving up",
                              type(error).__name__, error, failures, self.policy.budget_seconds)
                    raise error
                wait = min(next(waits), left)
                log.warning("redis: %s: %s (attempt %d); retrying in %.1f s (%.0f s of the retry budget left)",
                            type(error).__name__, error, failures, wait, left)
                time.sleep(wait)


class AsyncBudgetRetry(AsyncRetry):
    """The asyncio twin of ``BudgetRetry`` (for ``redis.asyncio`` clients: the monitor's gRPC streams)."""

    def __init__(self, policy: RetryPolicy) -> None:
        super().__init__(ExponentialWithJitterBackoff(cap=policy.max_wait_seconds, base=policy.initial_seconds),
                         policy.attempts_within_budget(), (redis.ConnectionError, redis.TimeoutError))
        self.policy = policy

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, AsyncBudgetRetry) and self.policy == other.policy and super().__eq__(other)

    __hash__ = AsyncRetry.__hash__

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                              is_retryable: Callable[[Exception], bool] | None = None,
                              with_failure_count: bool = False) -> T:
        deadline = time.monotonic() + self.policy.budget_seconds
        waits = self.policy.waits()
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    await fail(error, failures)
                else:
                    await fail(error)
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("redis: %s: %s (attempt %d); the retry budget of %.0f s is spent, giving up",
                              type(error).__name__, error, failures, self.policy.budget_seconds)
                    raise error
                wait = min(next(waits), left)
                log.warning("redis: %s: %s (attempt %d); retrying in %.1f s (%.0f s of the retry budget left)",
                            type(error).__name__, error, failures, wait, left)
                await asyncio.sleep(wait)


def redis_from_url(url: str, policy: RetryPolicy | None = None, **kwargs: Any) -> redis.Redis:
    """A client of ``url`` whose every command (pipelines and blocking reads too) retries through an outage."""
    policy = policy or RetryPolicy.from_env()
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    kwargs.setdefault("socket_keepalive", True)
    return redis.Redis.from_url(url, retry=BudgetRetry(policy),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError], **kwargs)


def async_redis_from_url(url: str, policy: RetryPolicy | None = None, **kwargs: Any) -> redis.asyncio.Redis:
    """``redis_from_url`` for asyncio code: the same retry rule, waits that do not block the event loop."""
    policy = policy or RetryPolicy.from_env()
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    kwargs.setdefault("socket_keepalive", True)
    return redis.asyncio.Redis.from_url(url, retry=AsyncBudgetRetry(policy),
                                        retry_on_error=[redis.ConnectionError, redis.TimeoutError], **kwargs)


def is_redis_outage(exc: BaseException) -> bool:
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


# -- replies -------------------------------------------------------------------------------------
# redis-py types its replies for every client configuration: ``bytes | str`` (``decode_responses``
# decides) and, for stream reads, the RESP3 dict shapes too. Our clients (built above) keep the
# defaults: bytes, and the legacy RESP2 shapes. These helpers turn such a reply into the ``str`` values
# the services use, in one place, so that no caller needs a cast or an ignore of its own.

HashFields: TypeAlias = "dict[FieldT, EncodableT]"
"""What ``hset(mapping=...)`` accepts: its stub's ``Mapping`` is invariant in the key, so a ``dict[str, ...]``
is refused although every key is a ``str``; annotate the dict you build with this instead."""


def text(value: bytes | str) -> str:
    """A reply value as ``str``: our clients get ``bytes`` (UTF-8), a ``decode_responses`` client ``str``."""
    return value.decode() if isinstance(value, bytes) else value


def text_fields(fields: Mapping[bytes | str, bytes | str] | None) -> dict[str, str]:
    """A hash (``hgetall``) or a stream entry's fields, keys and values as ``str``.

    ``None`` (the fields of a pending entry trimmed from its stream) is ``{}``.
    """
    return {text(k): text(v) for k, v in fields.items()} if fields else {}


def stream_entries(got: XReadResponse | XReadGroupResponse | None) -> list[tuple[str, dict[str, str]]]:
    """The entries of an XREAD / XREADGROUP reply for ONE stream: ``[(entry id, {field: value}), ...]``.

    An empty read (``None`` or ``[]``) has none. A pending entry that was trimmed from the stream comes
    back from XREADGROUP with no fields: it is ``(id, {})`` here (a real entry always has a field, so an
    empty dict says "nothing left to handle" as ``None`` did).
    """
    if not got:
        return []
    if isinstance(got, dict):
        raise TypeError("stream_entries reads the legacy (RESP2) reply of a client built by redis_from_url / "
                        "async_redis_from_url; this one is a RESP3 dict (protocol=3)")
    # The legacy shape, what our clients get: [[stream, [(id, {field: value} or None), ...]]].
    return [(text(eid), text_fields(fields)) for eid, fields in got[0][1]]


__all__ = ["AsyncBudgetRetry", "BudgetRetry", "HashFields", "async_redis_from_url", "is_redis_outage",
           "redis_from_url", "stream_entries", "text", "text_fields"]
