"""Phorest, the controller: read its clients, withdraw email-marketing consent.

Facts from ``reference/phorest-api.md``: HTTP Basic on every call (UTF-8), paged
``GET …/client`` (``_embedded.clients`` + ``page``), ``updatedAfter`` as
``2026-01-02T03:04:05.000Z``, unknown parameters silently ignored, ``PUT`` with
the current ``version``, no erase endpoint. Every call is treated as idempotent,
the PUT too: a replay after a lost answer meets a stale version (409), re-reads
and finds the flag already false.

A withdrawal is one call in the common case: the action carries the client's
whole record as the scan or a lookup read it, with its ``version``; it is PUT
back with only ``emailMarketingConsent`` changed and checked against the PUT's
answer (200 with the updated client, §4). Any doubt falls back to GET → PUT →
GET: no record, a record read longer ago than ``FRESH_RECORD``, an answer that
does not show the change or whose version moved by more than our own write, or
an error that may mean a stale version (409, 412, a 400 naming the version).

A 429, or any answer with a Retry-After, pauses the shared rate limiter: every
thread sending through this connector waits, not only the one that was told.

A full scan reads up to ``SCAN_PREFETCH_PAGES`` pages ahead on threads, yielding them in
page order; the rest (lookups, the changes feed, appointments) reads page by page.

Phorest has no batch write, so :meth:`PhorestConnector.apply` runs withdrawals on
up to ``MAX_CONCURRENT_WRITES`` threads; all of them share one rate limiter and
one connection pool, and actions on the same client run one after another.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, cast
from urllib.parse import quote

import requests
import structlog
from requests.adapters import HTTPAdapter
from requests.auth import HTTPBasicAuth
from urllib3.exceptions import ProtocolError

from connectors.base import (
    Action,
    Changes,
    CheckResult,
    ClientRecord,
    ClientState,
    Outcome,
    read_ahead,
    report_attempt,
)
from syncd.config import PhorestSettings
from syncd.errors import ConfigError, ConnectorError, PermanentError, RetriableError
from syncd.retry import RetryPolicy

log = structlog.get_logger(__name__)

CLIENTS_PATH = "/api/business/{business_id}/client"
CLIENT_PATH = "/api/business/{business_id}/client/{client_id}"
BRANCHES_PATH = "/api/business/{business_id}/branch"
APPOINTMENTS_PATH = "/api/business/{business_id}/branch/{branch_id}/appointment"
# §5: a from_date..to_date range over 31 days is refused (400), pages hold at most 100.
# Both bounds are inclusive, so a 31-day window ends 30 days after it starts.
APPOINTMENT_WINDOW_DAYS = 31
APPOINTMENT_PAGE_SIZE = 100
BRANCH_PAGE_SIZE = 100
# activationState values that hold a slot for the client (CANCELED does not).
BOOKED_STATES = frozenset({"ACTIVE", "RESERVED"})
# Archived and deleted clients are hidden unless asked for, and R5 needs them.
LIST_FLAGS: Mapping[str, str] = {"includeArchived": "true", "includeDeleted": "true"}
# Re-read the last two minutes at every poll: a save committed while we paged
# can carry an updatedAt older than the newest one we saw (DATAHUB does this).
CHANGES_OVERLAP = timedelta(minutes=2)
STALE_VERSION_TRIES = 2  # the first PUT, then one more after re-reading
# A record read longer ago than the poll's overlap is not trusted for a blind PUT:
# re-read it first (the version check catches most staleness; this bounds the rest).
FRESH_RECORD = CHANGES_OVERLAP
# How long every lane pauses after a 429 that names no Retry-After (§6: from 1 s).
RATE_LIMITED_PAUSE_SECONDS = 1.0
# Withdrawals in flight at once, each sending one request at a time. At ~20 ms a
# call two or three already fill 90 requests/s; the rest absorb slow answers.
MAX_CONCURRENT_WRITES = 8
# Pages a full scan reads ahead, on as many threads. Page by page, a scan waits ~20 ms per
# call and never reaches the rate limit; four in flight fill 100 req/s at up to ~40 ms a
# call, and at most four pages (of page_size clients) wait in memory for the caller.
SCAN_PREFETCH_PAGES = 4
APPLY_SECONDS = 5.0  # how long one apply should take at the configured rate limit
CALLS_PER_WITHDRAWAL = 1  # one PUT from the record read (GET, PUT, GET only in doubt)
FORGOTTEN_FIRST_NAMES = frozenset({"anonymous", ""})
# Fields of a client's JSON that describe the record, not the person (left out of exports).
TECHNICAL_FIELDS = frozenset({"version", "_links"})
_BODY_READ_ERRORS = requests.exceptions.ChunkedEncodingError
_TITLES = {401: "unauthorized", 403: "unauthorized", 404: "not_found", 409: "stale_version",
           412: "stale_version"}

PAGE_KEYS = ("number", "totalPages", "totalElements")
Page = tuple[list[Any], dict[str, int]]  # the rows, and PAGE_KEYS from the envelope's page


@dataclass(frozen=True, slots=True)
class AppointmentWindow:
    """One branch's appointments read for one date window (both dates inclusive).

    Attributes:
        branch_id: the branch.
        first / last: the window's ``from_date`` and ``to_date``.
        pages: list calls it took (one per page of up to 100).
        rows: appointments Phorest returned.
    """

    branch_id: str
    first: date
    last: date
    pages: int
    rows: int


@dataclass(frozen=True, slots=True)
class Bookings:
    """Clients with a booked (not cancelled, not deleted) appointment in a date range.

    Attributes:
        client_ids: every such client.
        windows: what was read, per branch and window, in order.
    """

    client_ids: frozenset[str]
    windows: tuple[AppointmentWindow, ...]

    @property
    def calls(self) -> int:
        """Appointment list calls made (branch listing not included)."""
        return sum(w.pages for w in self.windows)


class PhorestConnector:
    """The Phorest third-party API for one business.

    Args:
        settings: the ``[phorest]`` section.
        retry: the in-call retry policy (default :class:`RetryPolicy`).
        session: a ``requests.Session`` to use (tests); shared by the threads of
            :meth:`apply`, so its pool should hold ``MAX_CONCURRENT_WRITES``
            connections. By default a new one whose pool does.
        clock: monotonic seconds, for the client-side rate limit.
        sleep: how to wait (rate limit and retries); tests pass a recorder.
        now: the wall clock (UTC), stamped on every record read (its ``read_at``).

    Raises:
        ConfigError: the password is not set.
    """

    name = "phorest"
    # Writes are one record at a time (no bulk endpoint), 1 call each: an apply is sized
    # to last about APPLY_SECONDS at the rate limit, so progress stays fine and a stopping
    # daemon (which stops between applies) exits promptly. Set per instance in __init__.
    apply_batch_size = MAX_CONCURRENT_WRITES

    def __init__(
        self,
        settings: PhorestSettings,
        *,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if settings.password is None:
            raise ConfigError("phorest.password is not set")
        self._settings = settings
        self._retry = retry or RetryPolicy()
        self._session = session or _pooled_session(MAX_CONCURRENT_WRITES)
        # requests would encode str credentials as Latin-1; Phorest decodes UTF-8.
        password = settings.password.get_secret_value().encode()
        self._auth = HTTPBasicAuth(settings.username.encode(), password)
        self._sleep = sleep
        self._now = now
        # One limiter per connector, shared by every thread that sends through it.
        self._limiter = RateLimiter(settings.max_requests_per_second, clock=clock, sleep=sleep)
        self.apply_batch_size = max(MAX_CONCURRENT_WRITES, int(
            settings.max_requests_per_second * APPLY_SECONDS / CALLS_PER_WITHDRAWAL))

    def check(self) -> CheckResult:
        """One cheap list call, not retried: reachable and credentials accepted."""
        try:
            _rows, page = self._list({"size": 1}, retried=False)
        except ConnectorError as error:
            if error.status in (401, 403):
                return CheckResult(False, f"credentials refused ({error.status})",
                                   credentials_refused=True)
            return CheckResult(False, f"{'refused' if error.permanent else 'unreachable'}: {error}")
        return CheckResult(True, "credentials accepted", {"clients": str(page["totalElements"])})

    def scan(self) -> Iterator[ClientRecord]:
        """Every client, archived and deleted included, streamed page by page in order.

        After the first page, up to ``SCAN_PREFETCH_PAGES`` pages are read ahead on
        threads (see :meth:`_pages_ahead`); every request still passes the shared
        rate limiter. Close the iterator when stopping early: that stops the reads.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        # Closed explicitly, so a caller that stops early stops the read-ahead at once.
        with closing(self._pages_ahead({})) as pages:
            for rows, _page in pages:
                yield from self._records(rows)

    def find_by_email(self, email: str) -> list[ClientRecord]:
        """Clients holding ``email`` (archived and deleted included), via the ``email`` filter.

        Phorest silently ignores a filter it does not know, so rows whose
        address differs are dropped rather than trusted.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        wanted = email.strip().casefold()
        return [
            record
            for rows, _page in self._pages({"email": email})
            for record in self._records(rows)
            if record.email and record.email.strip().casefold() == wanted
        ]

    def find_by_phone(self, phone: str, spellings: Sequence[str] = ()) -> list[ClientRecord]:
        """Clients whose mobile is ``phone`` (E.164), via the ``phone`` filter.

        Phorest compares the stored mobile as written, so the filter is asked
        once per spelling (the E.164 form first, then ``spellings``, e.g. the
        national form). An answer is kept only if its mobile ends in the same
        nine digits (Phorest ignores a filter it does not know, so rows are
        never trusted blindly); the caller compares the normalised numbers
        exactly. Each client appears once.

        Args:
            phone: the number in E.164.
            spellings: other ways the number may be stored.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        found: dict[str, ClientRecord] = {}
        for spelling in dict.fromkeys((phone, *spellings)):
            for rows, _page in self._pages({"phone": spelling}):
                for record in self._records(rows):
                    if record.mobile and _same_number(record.mobile, phone):
                        found.setdefault(record.client_id, record)
        return list(found.values())

    def client(self, client_id: str) -> ClientRecord | None:
        """One client by id (archived, deleted and merged ones included), or None if unknown.

        Raises:
            RetriableError: Phorest could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        try:
            return _record(self._client(client_id), self._now())
        except PermanentError as error:
            if error.title == "not_found":
                return None
            raise

    def client_fields(self, client_id: str) -> dict[str, Any] | None:
        """What Phorest holds about one client, field by field, or None if unknown.

        The client's JSON as Phorest returns it, less the fields that are not
        about the person (:data:`TECHNICAL_FIELDS`): for a subject access
        request (R8). Nothing of it is logged.

        Raises:
            RetriableError: Phorest could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        try:
            raw = self._client(client_id)
        except PermanentError as error:
            if error.title == "not_found":
                return None
            raise
        return {key: value for key, value in raw.items() if key not in TECHNICAL_FIELDS}

    def changes(self, cursor: str | None) -> Changes:
        """Clients updated since ``cursor`` minus an overlap; None or "" scans everything.

        Phorest ignores a misspelt filter and answers with everything, so when the
        filtered total reaches the unfiltered one and holds records older than asked
        for, the answer is flagged ``full`` (``phorest_filter_ignored``).

        Raises:
            RetriableError: the feed could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        since = _parse_instant(cursor)
        if cursor and since is None:
            log.warning("phorest_cursor_invalid")
        if since is None:
            records = tuple(self.scan())
            return Changes(records, _cursor(records, None), full=True)
        after = since - CHANGES_OVERLAP
        found: list[ClientRecord] = []
        everything = False
        for rows, page in self._pages({"updatedAfter": _format_instant(after)}):
            if page["number"] == 0 and page["totalElements"] > 0:
                everything = page["totalElements"] >= self._list({"size": 1})[1]["totalElements"]
            found.extend(self._records(rows))
        # Everything came back *and* some of it is older than asked: the filter was
        # ignored. (If every record is newer, every client really changed: a normal answer.)
        full = everything and any(record.updated_at <= after for record in found)
        if full:
            log.warning("phorest_filter_ignored", path=CLIENTS_PATH, records=len(found))
        return Changes(tuple(found), _cursor(found, since), full=full)

    def _records(self, rows: Sequence[Any]) -> list[ClientRecord]:
        """One page's clients, stamped with the time they were read."""
        read_at = self._now()
        return [_record(row, read_at) for row in rows]

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        """Carry out ``withdraw_consent`` actions concurrently; never raises.

        Actions are grouped by client: each client's actions run in the order
        given, on one thread, and up to ``MAX_CONCURRENT_WRITES`` clients are
        worked on at once. Every request still passes the shared rate limiter.
        A dry run reads each client but writes nothing.

        Args:
            actions: what to do; anything but ``withdraw_consent`` is refused.
            dry_run: read, decide and log, but send no PUT.

        Returns:
            Exactly one outcome per action, in the order of ``actions``; a failure
            of one action is its outcome, never an exception.
        """
        outcomes: dict[int, Outcome] = {}
        by_client: dict[str, list[int]] = {}
        for index, action in enumerate(actions):
            refused = _refusal(action)
            if refused:
                outcomes[index] = Outcome(action, "permanent", refused)
            else:
                by_client.setdefault(cast(str, action.client_id), []).append(index)
        lanes = list(by_client.values())
        workers = min(MAX_CONCURRENT_WRITES, len(lanes))
        if workers <= 1:
            for lane in lanes:
                outcomes.update(self._apply_lane(actions, lane, dry_run))
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phorest-apply")
            try:
                # Each lane runs in a copy of the caller's context: bound log fields follow.
                run = self._apply_lane
                futures = [
                    pool.submit(contextvars.copy_context().run, run, actions, lane, dry_run)
                    for lane in lanes
                ]
                for future in futures:
                    outcomes.update(future.result())
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        result = [outcomes[index] for index in range(len(actions))]
        if result:
            log.info("phorest_applied", dry_run=dry_run, **Counter(o.status for o in result))
        return result

    def _apply_lane(
        self, actions: Sequence[Action], lane: Sequence[int], dry_run: bool
    ) -> dict[int, Outcome]:
        """One client's actions (by index into ``actions``), one after another.

        Returns:
            The outcome of each index in ``lane``.
        """
        return {index: self._apply_one(actions[index], dry_run) for index in lane}

    def _apply_one(self, action: Action, dry_run: bool) -> Outcome:
        """One withdrawal whose failure, even an unexpected one, becomes its outcome."""
        client_id = cast(str, action.client_id)
        try:
            if not dry_run:
                done = self._withdraw_from_record(action)
                if done is not None:
                    return Outcome(action, "done", done)
            return Outcome(action, "done", self._withdraw_consent(client_id, dry_run))
        except RetriableError as error:
            wait = error.retry_after_seconds
            return Outcome(action, "retriable", error.title, retry_after_seconds=wait)
        except PermanentError as error:
            return Outcome(action, "permanent", error.title)
        except Exception as error:  # noqa: BLE001 — on a worker thread: nobody else would see it
            # The type only: a message could quote a request or an answer.
            log.error("phorest_apply_failed", path=CLIENT_PATH, error=type(error).__name__)
            return Outcome(action, "retriable", "unexpected_error")

    def _withdraw_from_record(self, action: Action) -> str | None:
        """One PUT of the record the action carries, with only the consent flag changed.

        Returns:
            ``"withdrawn"`` when the PUT's answer shows the change at the next
            version; None when there is doubt (see the module docstring) and
            the caller must fall back to GET → PUT → GET. A doubt after a PUT
            that was accepted is settled by that fallback too: its re-read
            then finds the flag false (reported ``"withdrawn"``, not already).

        Raises:
            RetriableError: Phorest stayed unavailable through the in-call retries.
            PermanentError: not_found, or any refusal that cannot mean a stale version.
        """
        client_id = cast(str, action.client_id)
        client, doubt = self._usable_record(action)
        if client is None:
            log.debug("phorest_put_from_record_skipped", path=CLIENT_PATH, doubt=doubt)
            return None
        sent_version = client["version"]
        try:
            answer = self._request("PUT", CLIENT_PATH, client_id=client_id,
                                   body={**client, "emailMarketingConsent": False})
        except PermanentError as error:
            if error.title not in ("stale_version", "bad_response"):
                raise
            # A stale version, or a 2xx we could not read: re-read and decide from that.
            log.info("phorest_put_doubt", path=CLIENT_PATH, doubt=error.title)
            return None if error.title == "stale_version" else self._after_doubt(client_id)
        doubt = _answer_doubt(answer, client_id, sent_version)
        if doubt is None:
            log.info("phorest_put", path=CLIENT_PATH, field="emailMarketingConsent", calls=1)
            return "withdrawn"
        log.info("phorest_put_doubt", path=CLIENT_PATH, doubt=doubt)
        return self._after_doubt(client_id)

    def _after_doubt(self, client_id: str) -> str:
        """GET → PUT → GET after a PUT that was accepted but not shown to have worked."""
        done = self._withdraw_consent(client_id, False)
        return "withdrawn" if done == "already" else done

    def _usable_record(self, action: Action) -> tuple[dict[str, Any] | None, str]:
        """The action's record if a blind PUT of it is safe, else (None, why not)."""
        if not action.record:
            return None, "no_record"
        read_at = _parse_instant(action.read_at)
        if read_at is None or self._now() - read_at > FRESH_RECORD:
            return None, "record_too_old"
        try:
            client = json.loads(action.record)
        except ValueError:
            return None, "record_unreadable"
        if not isinstance(client, dict) or client.get("clientId") != action.client_id:
            return None, "record_not_this_client"
        if type(client.get("version")) is not int:
            return None, "record_without_version"
        if client.get("emailMarketingConsent") is not True:
            return None, "record_without_consent"
        return client, ""

    def _withdraw_consent(self, client_id: str, dry_run: bool) -> str:
        """GET, flip only ``emailMarketingConsent``, PUT it back with its version, re-GET.

        Raises:
            RetriableError: Phorest stayed unavailable through the in-call retries.
            PermanentError: not_found, stale_version (twice), verify_failed, ….
        """
        for attempt in range(1, STALE_VERSION_TRIES + 1):
            client = self._client(client_id)
            if client.get("emailMarketingConsent") is False:
                return "already"
            if dry_run:
                log.info("would_withdraw_consent", label="(dry run)", path=CLIENT_PATH)
                return "dry_run"
            changed = {**client, "emailMarketingConsent": False}
            try:
                self._request("PUT", CLIENT_PATH, client_id=client_id, body=changed)
            except PermanentError as error:
                if error.title != "stale_version" or attempt == STALE_VERSION_TRIES:
                    raise
                log.info("phorest_stale_version", path=CLIENT_PATH, attempt=attempt)
                continue
            log.info("phorest_put", path=CLIENT_PATH, field="emailMarketingConsent")
            stored = self._client(client_id)
            if stored.get("emailMarketingConsent") is not False:
                raise PermanentError(f"PUT {CLIENT_PATH}: consent still set", title="verify_failed")
            return "withdrawn"
        raise AssertionError("unreachable")  # pragma: no cover

    def _client(self, client_id: str) -> dict[str, Any]:
        """One client's JSON object.

        Raises:
            PermanentError: not_found, or bad_response when the answer is not an object.
        """
        client = self._request("GET", CLIENT_PATH, client_id=client_id)
        if not isinstance(client, dict):
            raise PermanentError(f"GET {CLIENT_PATH}: not a client object", title="bad_response")
        return client

    def branches(self) -> list[str]:
        """Every branch id of the business (paged ``GET …/branch``).

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        found: list[str] = []
        for rows, _page in self._pages({}, path=BRANCHES_PATH, key="branches",
                                       size=BRANCH_PAGE_SIZE, flags={}):
            for row in rows:
                branch_id = row.get("branchId") if isinstance(row, dict) else None
                if not isinstance(branch_id, str) or not branch_id:
                    raise PermanentError(f"GET {BRANCHES_PATH}: a branch without branchId",
                                         title="bad_response")
                if branch_id not in found:
                    found.append(branch_id)
        return found

    def booked_clients(
        self,
        first: date,
        days: int,
        *,
        on_window: Callable[[AppointmentWindow], None] | None = None,
    ) -> Bookings:
        """Clients with a booked appointment from ``first`` for ``days`` days, at any branch.

        One branch and one window of ``APPOINTMENT_WINDOW_DAYS`` at a time, pages
        of ``APPOINTMENT_PAGE_SIZE``: the cost is branches x windows x pages,
        never a call per client. Cancelled and deleted appointments are not
        asked for, and dropped if Phorest sends them anyway (it ignores a
        parameter it does not know). ``RESERVED`` counts as booked.

        Args:
            first: the first day (inclusive), e.g. today.
            days: how many days from ``first`` (at least 1).
            on_window: called after each window is read (progress, a stop point).

        Raises:
            ValueError: ``days`` is below 1.
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials refused, or an answer we cannot trust.
        """
        if days < 1:
            raise ValueError("days must be at least 1")
        end = first + timedelta(days=days - 1)
        booked: set[str] = set()
        windows: list[AppointmentWindow] = []
        for branch_id in self.branches():
            for start, stop in appointment_windows(first, end):
                params = {"from_date": start.isoformat(), "to_date": stop.isoformat(),
                          "fetch_canceled": "false", "fetch_deleted": "false"}
                pages = rows_read = 0
                for rows, _page in self._pages(params, path=APPOINTMENTS_PATH,
                                               key="appointments", size=APPOINTMENT_PAGE_SIZE,
                                               flags={}, branch_id=branch_id):
                    pages += 1
                    rows_read += len(rows)
                    booked.update(filter(None, map(_booked_client, rows)))
                window = AppointmentWindow(branch_id, start, stop, pages, rows_read)
                windows.append(window)
                if on_window is not None:
                    on_window(window)
        log.info("phorest_bookings_read", branches=len({w.branch_id for w in windows}),
                 windows=len(windows), calls=sum(w.pages for w in windows), clients=len(booked))
        return Bookings(frozenset(booked), tuple(windows))

    def _pages(
        self,
        params: Mapping[str, str],
        *,
        path: str = CLIENTS_PATH,
        key: str = "clients",
        size: int | None = None,
        flags: Mapping[str, str] = LIST_FLAGS,
        branch_id: str = "",
        start: int = 0,
    ) -> Iterator[Page]:
        """Pages from ``start`` on, one at a time, until an empty page or the last one.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: a page not the one asked for, or not the documented shape.
        """
        number = start
        while True:
            rows, page = self._page(number, params, path=path, key=key, size=size, flags=flags,
                                    branch_id=branch_id)
            yield rows, page
            if not rows or number >= page["totalPages"] - 1:
                return
            number += 1

    def _pages_ahead(self, params: Mapping[str, str]) -> Iterator[Page]:
        """Client pages as :meth:`_pages` gives them, reading ahead for a full scan.

        Page 0 is read (and yielded) first: its ``totalPages`` says which pages exist.
        Pages 1..totalPages-1 are then read up to ``SCAN_PREFETCH_PAGES`` at once and
        yielded in order; an empty page ends the scan, as does an error at its turn.
        If the last of them reports more pages than page 0 did (clients added during
        the scan), the rest is read one page at a time as :meth:`_pages` does, so they
        are not missed. A page that reports *fewer* pages does not end the scan early:
        the pages already asked for are still read until an empty one (offset paging
        shifts rows towards the front when clients go, so stopping could skip some).

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: a page not the one asked for, or not the documented shape.
        """
        rows, page = self._page(0, params)
        yield rows, page
        last = page["totalPages"] - 1
        if not rows or last < 1:
            return
        read = partial(self._page, params=params)
        with closing(read_ahead(read, range(1, last + 1), in_flight=SCAN_PREFETCH_PAGES,
                                thread_name="phorest-scan")) as pages:
            for rows, page in pages:
                if not rows:
                    return
                yield rows, page
        if page["totalPages"] - 1 > last:
            log.info("phorest_pages_grew", path=CLIENTS_PATH, pages=page["totalPages"],
                     first_seen=last + 1)
            yield from self._pages(params, start=last + 1)

    def _page(
        self,
        number: int,
        params: Mapping[str, str],
        *,
        path: str = CLIENTS_PATH,
        key: str = "clients",
        size: int | None = None,
        flags: Mapping[str, str] = LIST_FLAGS,
        branch_id: str = "",
    ) -> Page:
        """Page ``number`` of a listing (thread-safe: it only sends through ``_request``).

        Raises:
            RetriableError: the page could not be read after the in-call retries.
            PermanentError: bad_response, Phorest answered with another page (a page
                parameter it did not honour would repeat page 0 forever).
        """
        query = {**params, "page": number, "size": size or self._settings.page_size}
        rows, page = self._list(query, path=path, key=key, flags=flags, branch_id=branch_id)
        if page["number"] != number:
            message = f"GET {path}: asked for page {number}, got {page['number']}"
            raise PermanentError(message, title="bad_response")
        log.info("phorest_page", path=path, page=number, rows=len(rows))
        return rows, page

    def _list(
        self,
        params: Mapping[str, Any],
        *,
        retried: bool = True,
        path: str = CLIENTS_PATH,
        key: str = "clients",
        flags: Mapping[str, str] = LIST_FLAGS,
        branch_id: str = "",
    ) -> Page:
        """One list page; ``_embedded`` may be absent on an empty page.

        Raises:
            PermanentError: bad_response, the envelope is not the documented shape.
        """
        query = {**flags, **params}
        body = self._request("GET", path, params=query, retried=retried, branch_id=branch_id)
        try:
            page = {name: int(body["page"][name]) for name in PAGE_KEYS}
            rows = body.get("_embedded", {}).get(key, [])
            if not isinstance(rows, list):
                raise TypeError(type(rows).__name__)
        except (KeyError, TypeError, ValueError, AttributeError):
            message = f"GET {path}: malformed page envelope"
            raise PermanentError(message, title="bad_response") from None
        return rows, page

    def _request(
        self,
        method: str,
        template: str,
        *,
        client_id: str = "",
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        retried: bool = True,
        branch_id: str = "",
    ) -> Any:
        """Send one request (with the in-call retries); the decoded JSON of a 2xx.

        Raises:
            RetriableError: see :meth:`_raise_for`, once the retries are spent.
            PermanentError: see :meth:`_raise_for`.
        """
        path = template.format(
            business_id=quote(self._settings.business_id, safe=""),
            client_id=quote(client_id, safe=""),
            branch_id=quote(branch_id, safe=""),
        )

        def once() -> Any:
            self._throttle()
            result: requests.Response | requests.RequestException
            try:
                result = self._session.request(
                    method,
                    self._settings.base_url + path,
                    params=params,
                    json=body,
                    auth=self._auth,
                    headers={"Accept": "application/json"},
                    timeout=self._settings.timeout_seconds,
                )
            except requests.RequestException as error:
                result = error  # classified outside the except: no chained URL in tracebacks
            # Every Phorest request, retries and check() included, is sent from here.
            report_attempt(self.name, result)
            status = getattr(result, "status_code", None)
            if isinstance(result, requests.Response):
                self._pause_if_told(result)
            log.debug("phorest_request", method=method, path=template, status=status)
            return self._raise_for(method, template, result)

        return self._retry.retrying(sleep=self._sleep)(once) if retried else once()

    def _raise_for(
        self, method: str, template: str, result: requests.Response | requests.RequestException
    ) -> Any:
        """The one classification of a Phorest answer; returns the decoded JSON of a 2xx.

        Messages carry the method, the path *template* and the status: never the
        URL (a query string can hold an email) nor a body.

        Raises:
            RetriableError: 429, 5xx, timeouts, connection failures.
            PermanentError: any other status (titled), a 2xx that is not JSON.
        """
        where = f"{method} {template}"
        if isinstance(result, requests.RequestException):
            kind = type(result).__name__
            reached: bool | None = None  # read timeout, dropped connection: it may have landed
            if isinstance(result, requests.ConnectTimeout):
                reached = False
            elif isinstance(result, requests.ConnectionError):
                # urllib3 read errors (dropped after sending) arrive unwrapped;
                # refused connections and failed handshakes inside MaxRetryError.
                cause = result.args[0] if result.args else None
                reached = None if isinstance(cause, ProtocolError | OSError) else False
            elif not isinstance(result, requests.Timeout | _BODY_READ_ERRORS):
                raise PermanentError(f"{where}: {kind}", title="request_failed")
            title = "timeout" if isinstance(result, requests.Timeout) else "connection_failed"
            raise RetriableError(f"{where}: {kind}", title=title, reached_server=reached)
        status = result.status_code
        if status == 429 or status >= 500:
            raise RetriableError(
                f"{where}: HTTP {status}",
                status=status,
                title="rate_limited" if status == 429 else "server_error",
                retry_after_seconds=_retry_after(result.headers.get("Retry-After")),
                reached_server=True,
            )
        if not 200 <= status < 300:
            title = _TITLES.get(status, "rejected")
            if status == 400 and method == "PUT" and _mentions_version(result):
                title = "stale_version"  # how a stale version might be refused: re-read
            raise PermanentError(f"{where}: HTTP {status}", status=status, title=title)
        try:
            return result.json()
        except ValueError:
            message = f"{where}: HTTP {status} with a body that is not JSON"
            raise PermanentError(message, status=status, title="bad_response") from None

    def _pause_if_told(self, response: requests.Response) -> None:
        """A 429 or a Retry-After pauses every thread sharing the rate limiter."""
        told = _retry_after(response.headers.get("Retry-After"))
        if response.status_code != 429 and told is None:
            return
        seconds = RATE_LIMITED_PAUSE_SECONDS if told is None else told
        seconds = min(seconds, self._retry.max_retry_after_seconds)
        self._limiter.pause(seconds)
        log.info("phorest_paused", status=response.status_code, seconds=round(seconds, 3))

    def _throttle(self) -> None:
        """Space requests at least 1/max_requests_per_second apart, across threads."""
        self._limiter.acquire()


class RateLimiter:
    """Start times at least ``1/per_second`` apart, handed out to any number of threads.

    A next-slot scheduler: under a lock, each caller takes the next free slot
    (now, or the last slot handed out plus the interval, whichever is later),
    then waits for it *outside* the lock. Slots are never closer than the
    interval, so however many threads share the limiter, no window of one
    second holds more than ``per_second`` starts, and no thread holds the lock
    while it sleeps. An idle limiter grants no burst: after a pause the next
    request goes at once and the one after it an interval later.

    Args:
        per_second: the most requests to start in any one second (> 0).
        clock: monotonic seconds.
        sleep: how to wait; tests pass a recorder.

    Raises:
        ValueError: ``per_second`` is not positive.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not per_second > 0:
            raise ValueError("per_second must be positive")
        self._interval_seconds = 1.0 / per_second
        self._clock, self._sleep = clock, sleep
        self._next_slot: float | None = None
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take the next free slot and wait until it comes.

        Returns:
            The slot, in ``clock`` seconds: when the caller may start its request.
        """
        with self._lock:
            now = self._clock()
            slot = now if self._next_slot is None else max(now, self._next_slot)
            self._next_slot = slot + self._interval_seconds
        if slot > now:
            self._sleep(slot - now)
        return slot

    def pause(self, seconds: float) -> None:
        """Hand out no slot for ``seconds`` from now, to any thread (a 429 was seen).

        A slot already handed out is kept (its holder may be asleep waiting for
        it); every later ``acquire`` starts after the pause. A pause never
        shortens one already in force.
        """
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            if self._next_slot is None or until > self._next_slot:
                self._next_slot = until


def appointment_windows(first: date, last: date) -> list[tuple[date, date]]:
    """``first``..``last`` (inclusive) cut into windows Phorest accepts, in order.

    Each window spans at most ``APPOINTMENT_WINDOW_DAYS`` days, both ends included.
    """
    windows: list[tuple[date, date]] = []
    start = first
    while start <= last:
        stop = min(last, start + timedelta(days=APPOINTMENT_WINDOW_DAYS - 1))
        windows.append((start, stop))
        start = stop + timedelta(days=1)
    return windows


def _booked_client(row: Any) -> str | None:
    """The client an appointment row holds a slot for; None if cancelled, deleted or odd."""
    if not isinstance(row, dict) or row.get("deleted") is True:
        return None
    if row.get("activationState") not in BOOKED_STATES:
        return None
    client_id = row.get("clientId")
    return client_id if isinstance(client_id, str) and client_id else None


def _refusal(action: Action) -> str | None:
    """Why Phorest cannot carry ``action`` out at all (the permanent reason), or None."""
    if action.kind != "withdraw_consent":
        return "unsupported_action"
    if not action.client_id:
        return "missing_client_id"
    return None


def _same_number(stored: str, phone: str) -> bool:
    """Whether a stored mobile is the E.164 ``phone``: the same trailing nine digits.

    Enough to tell numbers apart within one business whatever the spelling
    (``07700 900123``, ``+44 7700 900123``, ``447700900123``).
    """
    digits = "".join(ch for ch in stored if ch.isdigit())
    wanted = "".join(ch for ch in phone if ch.isdigit())
    return len(digits) >= 9 and digits[-9:] == wanted[-9:]


def _pooled_session(connections: int) -> requests.Session:
    """A session that keeps up to ``connections`` connections to a host for reuse.

    requests' default pool keeps 10; sized here so a worker never finds it full
    (urllib3 would then open a connection per request and throw it away).
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_maxsize=connections)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _answer_doubt(answer: Any, client_id: str, sent_version: int) -> str | None:
    """Why a PUT's answer does not show our withdrawal as the one new write, or None."""
    if not isinstance(answer, dict) or answer.get("clientId") != client_id:
        return "answer_not_the_client"
    if answer.get("emailMarketingConsent") is not False:
        return "answer_shows_consent"
    version = answer.get("version")
    if type(version) is not int or version != sent_version + 1:
        return "version_moved"
    return None


def _mentions_version(response: requests.Response) -> bool:
    """Whether a refusal's body names the version (read, never logged)."""
    try:
        return "version" in response.text.casefold()
    except (ValueError, _BODY_READ_ERRORS):
        return False


def _record(raw: Any, read_at: datetime | None = None) -> ClientRecord:
    """Map one client's JSON (the forgotten shape is the sandbox emulator's).

    A client with email-marketing consent keeps its whole JSON (compact) as
    ``raw``, for a one-call withdrawal; the others do not need it.

    Raises:
        PermanentError: bad_response, no clientId, version or updatedAt.
    """
    raw = raw if isinstance(raw, dict) else {}
    client_id, version = raw.get("clientId"), raw.get("version")
    updated_at = _parse_instant(raw.get("updatedAt"))
    if not (isinstance(client_id, str) and client_id and type(version) is int and updated_at):
        message = f"GET {CLIENTS_PATH}: a client without clientId, version or updatedAt"
        raise PermanentError(message, title="bad_response")
    email, mobile = raw.get("email") or None, raw.get("mobile") or None
    first, last = str(raw.get("firstName") or ""), str(raw.get("lastName") or "")
    merged_into = raw.get("mergedToClientId") or None
    forgotten = email is None and mobile is None and not last.strip()
    state: ClientState = "active"
    if merged_into:
        state = "merged"
    elif raw.get("deleted") is True:
        state = "deleted"
    elif forgotten and first.strip().casefold() in FORGOTTEN_FIRST_NAMES:
        state = "forgotten"
    elif raw.get("archived") is True:
        state = "archived"
    last_visit = _parse_instant(raw.get("lastVisit"))
    return ClientRecord(
        client_id=client_id,
        email=email,
        mobile=mobile,
        first_name=first,
        last_name=last,
        email_consent=raw.get("emailMarketingConsent") is True,
        state=state,
        version=version,
        updated_at=updated_at,
        created_at=_parse_instant(raw.get("createdAt")),
        last_visit=last_visit.date() if last_visit else None,
        merged_into=merged_into,
        raw=_compact(raw) if raw.get("emailMarketingConsent") is True else None,
        read_at=read_at,
    )


def _compact(raw: dict[str, Any]) -> str | None:
    """The client's JSON as one compact string, or None if it cannot be written back."""
    try:
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return None


def _parse_instant(value: Any) -> datetime | None:
    """ISO-8601 (``Z``, ``+00:00``, ``+0000``; a date or a naive time means UTC), else None."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _format_instant(value: datetime) -> str:
    """Phorest's filter format, ``2026-01-02T03:04:05.000Z`` (UTC, milliseconds)."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _cursor(records: Sequence[ClientRecord], since: datetime | None) -> str:
    """The newest ``updatedAt`` seen, never older than ``since``; "" when there is none."""
    times = [record.updated_at for record in records] + ([since] if since else [])
    return _format_instant(max(times)) if times else ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a delta-seconds Retry-After (Phorest sends none; an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
