"""The one retry policy: short in-call retries and the long, persisted tier.

A :class:`RetryPolicy` is a small immutable value, in the spirit of urllib3's
``util/retry.py``. It builds the tenacity ``Retrying`` objects that connectors
use for in-call retries (a few tries, seconds apart), and computes the delay
before the next *persisted* attempt, which the ledger stores as
``next_attempt_at`` so that a restart loses nothing.

Rules, in one place:

- Only a :class:`~syncd.errors.RetriableError` is retried; a
  :class:`~syncd.errors.PermanentError` never is, and neither is a
  :class:`~syncd.errors.QuotaExhaustedError` in-call (its quota resets hours
  later: the persisted tier waits for it).
- A non-idempotent call is replayed only when the request cannot have reached
  the server (``reached_server is False``: connection refused, connect timeout).
  A read timeout or a dropped connection may have been processed, and a
  replayed POST could act twice (urllib3's ``_is_connection_error`` versus
  ``_is_read_error``).
- Backoff is exponential with full jitter and a cap; a server's Retry-After is
  honoured, up to ``max_retry_after_seconds``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog
import tenacity
from tenacity import RetryCallState, wait_random_exponential
from tenacity.wait import wait_base

from syncd.errors import QuotaExhaustedError, RetriableError

log = structlog.get_logger(__name__)

# 2**32 * 30 s is far past any cap; bounding the exponent keeps the float finite.
MAX_BACKOFF_EXPONENT = 32


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failed call.

    Attributes:
        attempts: tries per call in the short, in-call tier (1 = no retry).
        initial_wait_seconds: backoff multiplier of the in-call tier.
        max_wait_seconds: cap on one in-call backoff wait.
        max_retry_after_seconds: cap on how long a server's Retry-After is obeyed.
        budget: persisted attempts a task gets before it fails for good.
        persisted_initial_delay_seconds: delay after the first persisted failure.
        persisted_max_delay_seconds: cap on the delay between persisted attempts.
    """

    attempts: int = 3
    initial_wait_seconds: float = 0.5
    max_wait_seconds: float = 20
    max_retry_after_seconds: float = 60
    budget: int = 8
    persisted_initial_delay_seconds: float = 30
    persisted_max_delay_seconds: float = 3600

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.budget < 0:
            raise ValueError("budget must not be negative")
        waits = (
            self.initial_wait_seconds,
            self.max_wait_seconds,
            self.max_retry_after_seconds,
            self.persisted_initial_delay_seconds,
            self.persisted_max_delay_seconds,
        )
        if any(wait < 0 for wait in waits):
            raise ValueError("waits and delays must not be negative")

    def retrying(
        self, *, idempotent: bool = True, sleep: Callable[[float], None] = time.sleep
    ) -> tenacity.Retrying:
        """Build the in-call retry for one kind of call.

        Use it as ``policy.retrying()(function, *args)``; the last error is
        re-raised as itself once the attempts are spent.

        Args:
            idempotent: whether repeating the call is harmless (GET, PUT). When
                False, only failures that cannot have reached the server are retried.
            sleep: how to wait; tests pass a recorder so they never sleep.

        Returns:
            A tenacity ``Retrying`` that retries only ``RetriableError``, never a
            ``QuotaExhaustedError``.
        """

        def should_retry(error: BaseException) -> bool:
            if not isinstance(error, RetriableError) or isinstance(error, QuotaExhaustedError):
                return False
            return idempotent or error.reached_server is False

        backoff = wait_random_exponential(
            multiplier=self.initial_wait_seconds, max=self.max_wait_seconds
        )
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=_WaitRetryAfter(backoff, self.max_retry_after_seconds),
            retry=tenacity.retry_if_exception(should_retry),
            before_sleep=_log_retry,
            sleep=sleep,
            reraise=True,
        )

    def next_attempt_delay(
        self, attempts_so_far: int, *, rand: Callable[[], float] = random.random
    ) -> timedelta:
        """The delay before the next persisted attempt.

        ``initial * 2**attempts_so_far``, capped, then jittered down by up to
        half ("equal jitter") so a burst of failures does not come back at once
        but a delay never falls below half its step.

        Args:
            attempts_so_far: persisted attempts already made and failed; 0
                gives the first (shortest) delay.
            rand: a source of floats in [0, 1); injectable so tests are exact.

        Returns:
            The delay, between half the capped step and the capped step.

        Raises:
            ValueError: ``attempts_so_far`` is negative.
        """
        if attempts_so_far < 0:
            raise ValueError("attempts_so_far must not be negative")
        exponent = min(attempts_so_far, MAX_BACKOFF_EXPONENT)
        step = min(
            self.persisted_initial_delay_seconds * 2**exponent, self.persisted_max_delay_seconds
        )
        return timedelta(seconds=step * (0.5 + 0.5 * rand()))

    def exhausted(self, attempts_so_far: int) -> bool:
        """Whether a task has used its whole persisted budget.

        Args:
            attempts_so_far: persisted attempts already made.

        Returns:
            True when no further persisted attempt should be made.
        """
        return attempts_so_far >= self.budget


class _WaitRetryAfter(wait_base):
    """Exponential backoff, but at least the server's Retry-After (capped)."""

    def __init__(self, backoff: wait_base, cap_seconds: float) -> None:
        self._backoff = backoff
        self._cap_seconds = cap_seconds

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._backoff(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        hint = getattr(error, "retry_after_seconds", None)
        if hint is None:
            return wait
        return max(wait, min(max(float(hint), 0.0), self._cap_seconds))


def _log_retry(retry_state: RetryCallState) -> None:
    """Log a retry by status and title only: messages stay out of the logs."""
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    log.info(
        "call_retrying",
        attempt=retry_state.attempt_number,
        wait_seconds=round(retry_state.upcoming_sleep, 3),
        status=getattr(error, "status", None),
        title=getattr(error, "title", None),
    )
