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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

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


__all__ = ["AsyncBudgetRetry", "BudgetRetry", "async_redis_from_url", "is_redis_outage", "redis_from_url"]
