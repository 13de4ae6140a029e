"""The small error vocabulary every syncd module raises.

One root, :class:`SyncdError`. Configuration problems are :class:`ConfigError`;
a failed call to an outside system is a :class:`ConnectorError`, either
:class:`RetriableError` (429, 5xx, timeouts, dropped connections) or
:class:`PermanentError` (any other refusal); a spent daily quota is a
:class:`QuotaExhaustedError`, retriable but only after the reset. The ledger
and identifier parsing have one type each so the CLI can turn every one of
them into a one-line message and an exit code.
"""

from __future__ import annotations

from collections.abc import Iterable


class SyncdError(Exception):
    """Root of every error syncd raises on purpose.

    The CLI prints ``str(error)`` as a single line and exits non-zero; anything
    that is not a ``SyncdError`` is a bug.
    """


class ConfigError(SyncdError):
    """The configuration cannot be used.

    Attributes:
        errors: every problem found, one human-readable line each, so that
            ``syncd config validate`` can report them all at once.
    """

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: tuple[str, ...] = (errors,) if isinstance(errors, str) else tuple(errors)
        super().__init__("; ".join(self.errors))


class LedgerError(SyncdError):
    """The ledger file cannot be opened or used (e.g. written by a newer syncd)."""


class IdentifierError(SyncdError, ValueError):
    """An email, phone number or client id is not valid enough to key a subject."""


class ConnectorError(SyncdError):
    """A call to an outside system failed.

    Attributes:
        permanent: True when repeating the same call cannot succeed.
        status: the HTTP status, or None when no response arrived.
        title: the vendor's short error name (e.g. Mailchimp's problem title).
        retry_after_seconds: the server's Retry-After hint, if any.
        request_id: the vendor's request id, for the audit trail.
        reached_server: whether the request can have reached the server: False
            when it certainly did not (connection refused, connect timeout), so
            replaying even a non-idempotent call is safe; True when a response
            arrived; None when unknown (read timeout, dropped connection).
    """

    permanent: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        title: str | None = None,
        retry_after_seconds: float | None = None,
        request_id: str | None = None,
        reached_server: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.retry_after_seconds = retry_after_seconds
        self.request_id = request_id
        self.reached_server = reached_server


class RetriableError(ConnectorError):
    """The call may succeed later: rate limited, server error, timeout, network."""

    permanent = False


class QuotaExhaustedError(RetriableError):
    """The vendor's quota for a period (e.g. GA's user deletions per day) is spent.

    The call can succeed only once the quota resets, hours away, so it is
    never retried in-call; ``retry_after_seconds`` is the time until the reset.
    An action refused this way waits in the ledger and is not a failed attempt.
    """


class PermanentError(ConnectorError):
    """The call was refused for a reason that repeating it will not change."""

    permanent = True
