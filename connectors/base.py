"""The connector contract: what syncd needs from every outside system.

A connector knows *how to talk to one system* and nothing else: it applies a
batch of actions, returning one outcome per action, and, when the system holds
a list syncd can read (a :class:`ReadableConnector`), reads it (a paged full
scan, and the changes since a cursor). Google Analytics is write-only: it
holds no list of users to read, so its connector offers no ``scan`` rather
than an empty one. Values in and out are frozen dataclasses, so the
reconciliation that decides *what should happen* stays pure and the ledger
never sees a vendor's wire format.

It also holds the call observers: connectors report every HTTP request they
make as ``(vendor, status)`` through :func:`report_call`, and whoever counts
them (the daemon's ``/metrics``) registers with :func:`add_call_observer`, so
connectors never import the daemon.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import requests
import structlog

log = structlog.get_logger(__name__)

K = TypeVar("K")
T = TypeVar("T")

ClientState = Literal["active", "archived", "deleted", "merged", "forgotten"]
MemberStatus = Literal[
    "subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived", "absent"
]
OutcomeStatus = Literal["done", "retriable", "permanent", "needs_person"]

ActionKind = Literal[
    # Mailchimp
    "subscribe",  # add or update as subscribed with FNAME/LNAME only
    "unsubscribe",  # set unsubscribed (never archive: that loses the compliance state)
    "update_names",  # FNAME/LNAME changed in Phorest
    "clear_extra_fields",  # blank merge fields that hold personal data beyond the name
    "move_email",  # the client's email changed: move the same member
    "erase",  # permanent deletion (Mailchimp delete-permanent, GA user deletion)
    # Phorest
    "withdraw_consent",  # emailMarketingConsent = false
]


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One client as the controller (Phorest) holds them.

    Attributes:
        client_id: Phorest's id.
        email: as stored, or None.
        mobile: as stored, or None.
        first_name / last_name: as stored ("" when blank).
        email_consent: ``emailMarketingConsent``.
        state: active, archived, deleted, merged (away) or forgotten (blanked).
        merged_into: the surviving client's id for a merged record.
        version: Phorest's optimistic-lock version.
        updated_at: Phorest's ``updatedAt``, the time of the last change.
        created_at: Phorest's ``createdAt``.
        last_visit: the last paid visit, if any.
        raw: the client's whole JSON object exactly as read (compact), kept only
            for a client with email-marketing consent: what a withdrawal PUTs
            back with only the flag changed. Personal data: never logged.
        read_at: when syncd read this record from Phorest (UTC).
    """

    client_id: str
    email: str | None
    mobile: str | None
    first_name: str
    last_name: str
    email_consent: bool
    state: ClientState
    version: int
    updated_at: datetime
    created_at: datetime | None = None
    last_visit: date | None = None
    merged_into: str | None = None
    raw: str | None = field(default=None, compare=False, repr=False)
    read_at: datetime | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One audience member as the processor (Mailchimp) holds them.

    Attributes:
        email: the member's address.
        status: Mailchimp's status.
        first_name / last_name: FNAME / LNAME.
        extra_fields: names of other non-empty merge fields (personal data
            beyond name and email, reported as drift under R1).
        last_changed: Mailchimp's ``last_changed``.
    """

    email: str
    status: MemberStatus
    first_name: str = ""
    last_name: str = ""
    extra_fields: tuple[str, ...] = ()
    last_changed: datetime | None = None


Record = ClientRecord | MemberRecord


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since a cursor, and the cursor to ask from next time.

    ``full`` is True when the system answered with everything (e.g. Phorest
    ignored a filter), so the caller should treat it as a full scan.
    """

    records: tuple[Record, ...]
    cursor: str
    full: bool = False


@dataclass(frozen=True, slots=True)
class Action:
    """One thing to do in one system, for one subject.

    Attributes:
        kind: what to do.
        subject_key: the HMAC key of the subject (for the ledger and audit).
        task_id: the ledger task this action belongs to, if any.
        email: the address to act on (Mailchimp) — personal data, scrubbed
            from the ledger once the task is final.
        new_email: for ``move_email``.
        client_id: for Phorest actions.
        first_name / last_name: for ``subscribe`` and ``update_names``.
        fields: merge-field names for ``clear_extra_fields``.
        record: for ``withdraw_consent``, the client's whole JSON as last read
            (with its ``version``), so the write can be one PUT — personal data,
            scrubbed with the rest of the payload; never logged.
        read_at: when ``record`` was read (ISO-8601 UTC).
    """

    kind: ActionKind
    subject_key: str
    task_id: int | None = None
    email: str | None = None
    new_email: str | None = None
    client_id: str | None = None
    first_name: str = ""
    last_name: str = ""
    fields: tuple[str, ...] = ()
    record: str | None = field(default=None, compare=False, repr=False)
    read_at: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one action.

    Attributes:
        action: the action this answers.
        status: done, retriable (try later), permanent (will never work as
            asked) or needs_person (a human must act, e.g. the client must
            re-subscribe themselves).
        reason: a short machine-readable reason (``needs_client_resubscribe``,
            ``forgotten_email``, ``stale_version`` …), never personal data.
        request_id: the vendor's request id, for the audit trail.
        retry_after_seconds: the vendor's hint for a retriable outcome.
        evidence: the vendor's receipt for a done action when it is not a
            request id (GA's ``deletionRequestTime``), for the audit trail;
            never personal data.
        quota_wait: for a retriable outcome, True when the vendor's quota for
            the period is spent and ``retry_after_seconds`` is when it
            resets: the action was not tried and failed, it waits its turn,
            so it must never count against the retry budget.
    """

    action: Action
    status: OutcomeStatus
    reason: str | None = None
    request_id: str | None = None
    retry_after_seconds: float | None = None
    evidence: str | None = None
    quota_wait: bool = False


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The answer to :meth:`Connector.check`: reachable and credentials accepted."""

    ok: bool
    detail: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # True when the system answered and refused syncd's credentials (401/403).
    credentials_refused: bool = False


@runtime_checkable
class Connector(Protocol):
    """What every connector offers. One module and one class per system.

    Reading is not part of it: see :class:`ReadableConnector`.
    """

    name: str
    # How many actions one ``apply`` call should be given: a connector that groups
    # actions into bulk calls wants many, one that writes record by record fewer
    # (so progress and a crash's redo stay small).
    apply_batch_size: int

    def check(self) -> CheckResult:
        """Verify reachability and credentials with one cheap call."""
        ...

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        """Carry out ``actions``; exactly one outcome per action, in order.

        Failures are outcomes, not exceptions: a vendor refusing one member
        must not lose the others' results.
        """
        ...


@runtime_checkable
class ReadableConnector(Connector, Protocol):
    """A connector whose system holds records syncd reads and reconciles (Phorest, Mailchimp).

    A write-only processor (Google Analytics: it erases on request but lists no
    one) is a plain :class:`Connector`; inventing an empty scan for it would
    claim it holds no one.
    """

    def scan(self) -> Iterator[Record]:
        """Every record, streamed page by page at the largest page size allowed.

        Raises:
            ConnectorError: a page could not be read after the in-call retries.
        """
        ...

    def changes(self, cursor: str | None) -> Changes:
        """Records changed since ``cursor`` (None: since the beginning).

        Raises:
            ConnectorError: the feed could not be read after the in-call retries.
        """
        ...


# -- Call observers: every HTTP request a connector makes, by vendor and status --------------

CallObserver = Callable[[str, str], None]
"""Told ``(vendor, status)`` after each HTTP request: see :func:`report_call`."""

# The status of a request that got no answer: a small fixed set, never an exception's message
# (which can quote a URL, and a URL can hold an email).
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"  # refused, reset, TLS failure, dropped mid-answer
INVALID_RESPONSE = "invalid_response"  # an answer requests could not use (undecodable, loops)
NO_ANSWER_STATUSES = frozenset({TIMEOUT, CONNECTION_ERROR, INVALID_RESPONSE})
# Failures after the request was handed to the network, in order (a ConnectTimeout is a
# ConnectionError too); any other exception means no request was made.
_NO_ANSWER: tuple[tuple[tuple[type[Exception], ...], str], ...] = (
    ((requests.Timeout,), TIMEOUT),
    ((requests.ConnectionError, requests.exceptions.ChunkedEncodingError), CONNECTION_ERROR),
    ((requests.exceptions.ContentDecodingError, requests.TooManyRedirects,
      requests.exceptions.RetryError), INVALID_RESPONSE),
)

# Copied on write, so reporting (from every connector thread) reads it without a lock.
_observers: tuple[CallObserver, ...] = ()
_observers_lock = threading.Lock()


def add_call_observer(observer: CallObserver) -> None:
    """Have ``observer`` told of every HTTP request any connector makes, from now on.

    Process-wide and thread-safe. Adding an observer already added changes nothing (each
    request is reported to it once).
    """
    global _observers
    with _observers_lock:
        if observer not in _observers:
            _observers = (*_observers, observer)


def remove_call_observer(observer: CallObserver) -> None:
    """Stop telling ``observer``; one that was never added is ignored. Thread-safe."""
    global _observers
    with _observers_lock:
        _observers = tuple(known for known in _observers if known != observer)


def report_call(vendor: str, status: str) -> None:
    """Tell every observer of one HTTP request that ``vendor``'s connector made.

    An observer that raises is logged (its exception's type only) and skipped: counting a
    call must never fail the call.

    Args:
        vendor: the connector's ``name`` (``"phorest"``, ``"mailchimp"``).
        status: the HTTP status code as a string (``"200"``, ``"429"`` …), or one of
            :data:`NO_ANSWER_STATUSES` when no answer came back.
    """
    for observer in _observers:
        try:
            observer(vendor, status)
        except Exception as error:  # noqa: BLE001 — an observer's bug is not the call's
            log.debug("call_observer_failed", vendor=vendor, error=type(error).__name__)


def report_attempt(vendor: str, result: requests.Response | BaseException) -> None:
    """Report what one attempt to send a request through ``requests`` came to.

    A response is reported by its status, after one report per redirect it followed (each
    was a request of its own). An exception is reported by the class of failure, if the
    request was handed to the network at all: one that could not even be built (a bad URL,
    a body that cannot be encoded) made no request and is not reported. A redirect loop that
    requests gives up on counts once, as ``invalid_response``.

    Args:
        vendor: the connector's ``name``.
        result: the response, or the exception the attempt raised.
    """
    if isinstance(result, BaseException):
        status = next((name for kinds, name in _NO_ANSWER if isinstance(result, kinds)), None)
        if status is not None:
            report_call(vendor, status)
        return
    for answer in (*result.history, result):
        report_call(vendor, str(answer.status_code))


def read_ahead(
    fetch: Callable[[K], T], keys: Iterable[K], *, in_flight: int, thread_name: str
) -> Iterator[T]:
    """``fetch(key)`` for each key, up to ``in_flight`` at once on threads, yielded in key order.

    For a paged full scan whose pages are known in advance: the next pages are read
    while the caller works on this one. Each fetch runs in a copy of the caller's
    context (bound log fields follow). At most ``in_flight`` results are held besides
    the one just yielded, so memory stays bounded however slow the caller is.

    A fetch's exception is raised here at its key's turn, after every earlier result
    was yielded, and no further fetch is started. Leaving early (``close()``, or the
    generator being collected) cancels the fetches not started and waits for the
    running ones: no thread of the pool is left behind. Close the generator (e.g. with
    ``contextlib.closing``) when stopping before its end, so that happens at once.

    Args:
        fetch: reads one key; called on a worker thread, so it must be thread-safe.
        keys: what to fetch, in the order to yield; consumed lazily.
        in_flight: the most fetches started and not yet yielded (at least 1).
        thread_name: the prefix of the pool's thread names.
    """
    pending = iter(keys)
    ahead: deque[Future[T]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix=thread_name)

    def fill() -> None:
        while len(ahead) < in_flight:
            key = next(pending, _END)
            if key is _END:
                return
            ahead.append(pool.submit(contextvars.copy_context().run, fetch, key))

    try:
        fill()
        while ahead:
            result = ahead.popleft().result()
            fill()  # keep in_flight reads going while the caller works on this result
            yield result
    finally:
        for future in ahead:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


_END: Any = object()  # the end of read_ahead's keys (a key may be None)
