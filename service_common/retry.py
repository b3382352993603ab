"""Waiting out outages: one retry rule (exponential backoff with jitter, bounded by a time budget) for every service.

Why a time budget rather than a number of attempts: what an operator knows is how long a store or
Redis restart may take ("ten minutes"), not how many attempts fit into it. Every wait is logged
once, so a stalled service says what it is waiting for. The settings come from the environment:

    SLMCL_RETRY_BUDGET_SECONDS    total time one operation keeps retrying (default 600)
    SLMCL_RETRY_INITIAL_SECONDS   first wait (default 0.5); each further wait doubles ...
    SLMCL_RETRY_MAX_WAIT_SECONDS  ... up to this cap (default 15); the jitter draws each wait in [d/2, d]
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

BUDGET_ENV = "SLMCL_RETRY_BUDGET_SECONDS"
INITIAL_ENV = "SLMCL_RETRY_INITIAL_SECONDS"
MAX_WAIT_ENV = "SLMCL_RETRY_MAX_WAIT_SECONDS"
DEFAULT_BUDGET = 600.0
DEFAULT_INITIAL = 0.5
DEFAULT_MAX_WAIT = 15.0

_log = logging.getLogger("slmcl.retry")


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"{name}={text!r}: must be >= 0")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    budget_seconds: float = DEFAULT_BUDGET
    initial_seconds: float = DEFAULT_INITIAL
    max_wait_seconds: float = DEFAULT_MAX_WAIT

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Read at call time, not import time, so a test or an operator can change it per process."""
        return cls(_env_seconds(BUDGET_ENV, DEFAULT_BUDGET), _env_seconds(INITIAL_ENV, DEFAULT_INITIAL),
                   max(_env_seconds(MAX_WAIT_ENV, DEFAULT_MAX_WAIT), 0.001))

    def waits(self) -> Iterator[float]:
        """Equal jitter: each wait is drawn in [d/2, d] of the doubling delay d, so restarted clients spread out."""
        delay = max(self.initial_seconds, 0.001)
        while True:
            d = min(delay, self.max_wait_seconds)
            yield d / 2 + random.uniform(0, d / 2)
            delay *= 2

    def attempts_within_budget(self) -> int:
        """How many retries the budget holds at the slowest (no-jitter) waits: sizes redis-py's counted Retry."""
        total, n, delay = 0.0, 0, max(self.initial_seconds, 0.001)
        while total < self.budget_seconds:
            total += min(delay, self.max_wait_seconds) / 2  # the shortest wait each draw can give
            delay *= 2
            n += 1
        return max(n, 1)


def call_with_retry(fn: Callable[[], T], *, what: str, is_transient: Callable[[BaseException], bool],
                    policy: RetryPolicy | None = None, logger: logging.Logger | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``; a transient failure is retried until the budget is spent, then re-raised as it was.

    Anything ``is_transient`` rejects (a missing key, a bad request) is raised at once: waiting would not help.
    """
    policy = policy or RetryPolicy.from_env()
    logger = logger or _log
    deadline = time.monotonic() + policy.budget_seconds
    waits = policy.waits()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error("%s failed (attempt %d: %s: %s); the retry budget of %.0f s is spent, giving up",
                             what, attempt, type(exc).__name__, _short(exc), policy.budget_seconds)
                raise
            wait = min(next(waits), left)
            logger.warning("%s failed (attempt %d: %s: %s); retrying in %.1f s (%.0f s of the retry budget left)",
                           what, attempt, type(exc).__name__, _short(exc), wait, left)
            sleep(wait)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or "-"


__all__ = ["BUDGET_ENV", "INITIAL_ENV", "MAX_WAIT_ENV", "RetryPolicy", "call_with_retry"]
