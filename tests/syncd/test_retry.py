"""Tests for syncd.retry: pure, no network, no real sleeping (urllib3 test_retry.py style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from syncd.errors import PermanentError, QuotaExhaustedError, RetriableError
from syncd.retry import RetryPolicy

OK = "ok"


def server_error(status: int = 503, *, retry_after: float | None = None) -> RetriableError:
    return RetriableError(
        f"GET /thing: HTTP {status}",
        status=status,
        retry_after_seconds=retry_after,
        reached_server=True,
    )


def connect_failed() -> RetriableError:
    return RetriableError("GET /thing: ConnectionError", reached_server=False)


def read_timeout() -> RetriableError:
    return RetriableError("GET /thing: ReadTimeout", reached_server=None)


def quota_spent() -> QuotaExhaustedError:
    return QuotaExhaustedError("POST /thing: HTTP 403", status=403, retry_after_seconds=3600,
                               reached_server=True)  # fmt: skip


@dataclass
class Script:
    """A callable that raises or returns the scripted outcomes in order, counting calls."""

    outcomes: Sequence[BaseException | str]
    calls: int = 0

    def __call__(self) -> str:
        outcome = self.outcomes[self.calls]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@dataclass
class Sleeps:
    """Records requested waits instead of sleeping."""

    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def run(policy: RetryPolicy, script: Script, *, idempotent: bool = True) -> tuple[Any, Sleeps]:
    sleeps = Sleeps()
    return policy.retrying(idempotent=idempotent, sleep=sleeps)(script), sleeps


@pytest.mark.parametrize(
    ("outcomes", "idempotent", "expected", "calls"),
    [
        pytest.param([server_error(), server_error(), OK], True, OK, 3, id="503-503-200"),
        pytest.param([PermanentError("400", status=400)], True, PermanentError, 1, id="permanent"),
        pytest.param(
            [server_error(), server_error(), server_error(), OK],
            True,
            RetriableError,
            3,
            id="gives-up-after-attempts",
        ),
        pytest.param([ValueError("bug")], True, ValueError, 1, id="not-a-syncd-error"),
        pytest.param([server_error(), OK], False, RetriableError, 1, id="post-reached-server"),
        pytest.param([read_timeout(), OK], False, RetriableError, 1, id="post-read-timeout"),
        pytest.param([connect_failed(), OK], False, OK, 2, id="post-connect-failed"),
        pytest.param([quota_spent(), OK], True, QuotaExhaustedError, 1, id="daily-quota-spent"),
        pytest.param([read_timeout(), OK], True, OK, 2, id="get-read-timeout"),
    ],
)
def test_retrying_retries_only_what_is_safe_to_repeat(
    outcomes: list[BaseException | str],
    idempotent: bool,
    expected: str | type[BaseException],
    calls: int,
) -> None:
    script = Script(outcomes)
    if isinstance(expected, str):
        result, _ = run(RetryPolicy(), script, idempotent=idempotent)
        assert result == expected
    else:
        with pytest.raises(expected):
            run(RetryPolicy(), script, idempotent=idempotent)
    assert script.calls == calls


def test_the_last_error_is_reraised_as_itself() -> None:
    last = server_error(502)
    with pytest.raises(RetriableError) as raised:
        run(RetryPolicy(attempts=2), Script([server_error(), last]))
    assert raised.value is last


@pytest.mark.parametrize(
    ("retry_after", "expected_wait"),
    [
        pytest.param(7.0, 7.0, id="honoured"),
        pytest.param(600.0, 60.0, id="capped-at-max-retry-after"),
        pytest.param(-5.0, None, id="negative-means-backoff"),
    ],
)
def test_retry_after_is_honoured_up_to_its_cap(
    retry_after: float, expected_wait: float | None
) -> None:
    result, sleeps = run(RetryPolicy(), Script([server_error(429, retry_after=retry_after), OK]))
    assert result == OK
    assert len(sleeps.waits) == 1
    if expected_wait is None:
        assert 0 <= sleeps.waits[0] <= RetryPolicy().initial_wait_seconds
    else:
        assert sleeps.waits[0] == expected_wait


def test_backoff_waits_are_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(attempts=8, initial_wait_seconds=1, max_wait_seconds=10)
    _, sleeps = run(policy, Script([server_error()] * 7 + [OK]))
    caps = [min(1 * 2**n, 10) for n in range(7)]
    assert len(sleeps.waits) == 7
    assert all(0 <= wait <= cap for wait, cap in zip(sleeps.waits, caps, strict=True))


def test_a_single_attempt_never_sleeps() -> None:
    script = Script([server_error(), OK])
    with pytest.raises(RetriableError):
        run(RetryPolicy(attempts=1), script)
    assert script.calls == 1


@pytest.mark.parametrize(
    ("attempts_so_far", "rand", "seconds"),
    [
        pytest.param(0, lambda: 1.0, 30, id="first-step"),
        pytest.param(1, lambda: 1.0, 60, id="doubles"),
        pytest.param(3, lambda: 1.0, 240, id="doubles-again"),
        pytest.param(7, lambda: 1.0, 3600, id="capped"),
        pytest.param(10_000, lambda: 1.0, 3600, id="huge-count-stays-capped"),
        pytest.param(0, lambda: 0.0, 15, id="jitter-halves-at-most"),
        pytest.param(7, lambda: 0.0, 1800, id="jitter-under-the-cap"),
    ],
)
def test_next_attempt_delay_grows_exponentially_with_a_cap(
    attempts_so_far: int, rand: Callable[[], float], seconds: float
) -> None:
    delay = RetryPolicy().next_attempt_delay(attempts_so_far, rand=rand)
    assert delay == timedelta(seconds=seconds)


def test_next_attempt_delays_never_shrink_and_stay_within_the_cap() -> None:
    policy = RetryPolicy()
    delays = [policy.next_attempt_delay(n, rand=lambda: 1.0) for n in range(20)]
    assert delays == sorted(delays)
    assert max(delays) == timedelta(seconds=policy.persisted_max_delay_seconds)
    jittered = [policy.next_attempt_delay(n) for n in range(20)]
    assert all(d / 2 <= j <= d for d, j in zip(delays, jittered, strict=True))


def test_next_attempt_delay_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy().next_attempt_delay(-1)


@pytest.mark.parametrize(
    ("attempts_so_far", "exhausted"),
    [
        pytest.param(0, False, id="fresh"),
        pytest.param(7, False, id="last-allowed"),
        pytest.param(8, True, id="spent"),
        pytest.param(9, True, id="over"),
    ],
)
def test_the_persisted_budget_is_spent_after_budget_attempts(
    attempts_so_far: int, exhausted: bool
) -> None:
    assert RetryPolicy(budget=8).exhausted(attempts_so_far) is exhausted


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"attempts": 0}, id="no-attempts"),
        pytest.param({"budget": -1}, id="negative-budget"),
        pytest.param({"max_wait_seconds": -1}, id="negative-wait"),
    ],
)
def test_a_policy_with_impossible_values_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_a_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        RetryPolicy().attempts = 5  # type: ignore[misc]
