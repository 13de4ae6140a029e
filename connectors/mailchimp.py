"""Mailchimp, the marketing audience: read members; subscribe, opt out, rectify, erase.

Facts from ``reference/mailchimp-and-google-analytics-api.md`` part A, through the official
``mailchimp-marketing`` SDK, whose quirks (A1) are absorbed in :meth:`MailchimpConnector._call`
and ``_classify``: an error is an ``ApiClientError`` whose ``text`` is a problem+json *string*
(a dict under ``application/json``, the network exception when nothing came back), and an
empty body comes back as a ``requests.Response`` with no exception, even for a 429.

Archived members are not asked for: the default listing leaves them out (sandbox assumption 1)
and nothing needs them, since an erasure goes straight to the subscriber hash; should the real
API list them, they arrive as ``status="archived"``.

A full scan reads up to ``SCAN_PREFETCH_PAGES`` member pages ahead on threads (each call holds
one of ``max_connections`` slots), yielding members in offset order; ``changes`` reads page by
page.

Writes on many members go as batch calls, two kinds of them, when a wave holds two or more:

- Subscribes and unsubscribes go through ``POST /lists/{id}`` (500 members each, A2.8); the
  full-resync benchmark showed single PATCHes dominating the call count. The trade-off: a batch
  is an upsert, so an unsubscribe of an address that is not on the list *adds* it as an
  unsubscribed member instead of answering 404, and the "absent" outcome is lost (it comes
  back "done"). That is accepted because the reconciler plans unsubscribes only for members its
  scan saw; a lone unsubscribe still goes as a PATCH and keeps the 404 -> "absent" answer.
- ``update_names``, ``clear_extra_fields`` and ``erase`` go through the asynchronous
  ``POST /batches`` (500 operations each, A2.9), each operation exactly the single call (the
  PATCH, or the ``delete-permanent`` POST) with ``operation_id`` = the action's position. Not
  through ``POST /lists/{id}``: every member there needs a ``status``, an action does not carry
  the member's current one, and a guessed one would change the subscription (or resubscribe
  someone: never). The batches are polled at backed-off intervals until ``finished`` (at most
  :data:`OPERATIONS_DEADLINE_SECONDS`), then ``response_body_url`` (pre-signed: no credentials)
  is read: a gzipped tar of JSON arrays of ``{status_code, operation_id, response}``, each
  ``response`` the problem+json a single call would get, so each result is classified exactly
  as that single call. What cannot be told (a submit refused, a batch unfinished at the
  deadline, an archive unreadable, a result missing) is ``retriable``: replaying is safe, a
  PATCH being idempotent and a repeated delete-permanent answering 404 ("absent", done).

When a wave's last ``POST /lists/{id}`` chunk and last ``POST /batches`` are both partial and
fit in one batch together, the subscribes and unsubscribes ride in that batch as their single
calls (``_fill``): the write calls are as few as 500 to a call allows.

``move_email`` always stays a single PATCH (rare, and a replayed move is not idempotent), and a
lone action of any kind is a single call (a lone subscribe or unsubscribe may fill a batch).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import mailchimp_marketing
import requests
import structlog
from mailchimp_marketing.api_client import ApiClientError
from urllib3.exceptions import ProtocolError

from connectors.base import (
    Action,
    Changes,
    CheckResult,
    MemberRecord,
    MemberStatus,
    Outcome,
    read_ahead,
    report_attempt,
)
from syncd.config import MailchimpSettings
from syncd.errors import ConfigError, ConnectorError, PermanentError, RetriableError
from syncd.retry import RetryPolicy

log = structlog.get_logger(__name__)

PAGE_COUNT = 1000  # the largest member page (A2.7)
# Member pages a full scan reads ahead, on as many threads (capped by max_connections, since
# each call holds one of its slots): page by page a 10,000-member scan waits out ten round
# trips in a row; three at once leave slots for anything else using the connector.
SCAN_PREFETCH_PAGES = 3
BATCH_MEMBERS = 500  # the most members one POST /lists/{id} takes (A2.8)
BATCH_OPERATIONS = 500  # the most operations we put in one POST /batches (A2.9)
# How long the /batches of one wave may take before their actions are given back as
# retriable; read at each apply, so tests can shorten it.
OPERATIONS_DEADLINE_SECONDS = 15 * 60.0
# Status polls (see _next_poll): a batch costs its submit, at most one poll while it runs
# and the one that finds it finished, in the common case. Neither the reference nor the
# vendor corpus records how long a real batch takes (the guide only says batches run in
# the background; third-party reports speak of minutes under load), so later polls back
# off to one a minute.
OPERATIONS_FIRST_POLL_SECONDS = 2.0  # the wait before the first status poll
OPERATIONS_POLL_MARGIN = 1.5  # the wait from progress, stretched by this much
OPERATIONS_MAX_POLL_SECONDS = 60.0
MEMBER_FIELDS = ["members.email_address", "members.status", "members.merge_fields",
                 "members.last_changed", "total_items"]  # a list: the SDK comma-joins it (A1.13)
NAME_FIELDS = frozenset({"FNAME", "LNAME"})
# What a subject access export (R8) shows of a member: everything about the person.
EXPORT_FIELDS = ("email_address", "status", "email_type", "merge_fields", "unsubscribe_reason",
                 "ip_signup", "timestamp_signup", "ip_opt", "timestamp_opt", "last_changed",
                 "language", "vip", "source", "tags", "member_rating", "location")
# since_last_changed is strict and whole-second (sandbox assumption 2), and a member saved
# while we page can carry an older last_changed than one already seen: re-read a margin.
CHANGES_OVERLAP = timedelta(minutes=2)
MEMBER = "/lists/{list_id}/members/{subscriber_hash}"
ROUTES: Mapping[str, tuple[str, str]] = {  # SDK method -> HTTP method, path template (for logs)
    "get": ("GET", "/ping"),
    "get_list": ("GET", "/lists/{list_id}"),
    "get_list_members_info": ("GET", "/lists/{list_id}/members"),
    "get_list_member": ("GET", MEMBER),
    "batch_list_members": ("POST", "/lists/{list_id}"),
    "set_list_member": ("PUT", MEMBER),
    "update_list_member": ("PATCH", MEMBER),
    "delete_list_member_permanent": ("POST", MEMBER + "/actions/delete-permanent"),
    "start": ("POST", "/batches"),
    "status": ("GET", "/batches/{batch_id}"),
}
RESULTS = "GET response_body_url"  # the batch results download, for logs and errors
KINDS = frozenset({"subscribe", "unsubscribe", "update_names", "clear_extra_fields",
                   "move_email", "erase"})
# Sent through POST /lists/{id} when a wave holds two or more of them (module docstring).
BATCH_KINDS = frozenset({"subscribe", "unsubscribe"})
# Sent through POST /batches when a wave holds two or more of them (module docstring).
OPERATION_KINDS = frozenset({"update_names", "clear_extra_fields", "erase"})
# An erased address already satisfies these (reference assumption 5).
FORGOTTEN_SATISFIES = frozenset({"unsubscribe", "update_names", "clear_extra_fields", "erase"})
Send = Callable[..., requests.Response]  # one HTTP request: requests.get, ApiClient.request


class MailchimpConnector:
    """One Mailchimp audience (list), through the official SDK.

    Args:
        settings: the ``[mailchimp]`` section.
        retry: the in-call retry policy (default :class:`RetryPolicy`).
        sleep: how retries and batch polls wait; tests pass a no-op.
        clock: monotonic seconds, for the batch deadline; tests pass a fake one.

    Raises:
        ConfigError: the API key is not set.
    """

    name = "mailchimp"
    # A multiple of 500: with _fill, every apply but a run's last fills its write calls.
    # Not larger: an apply holds its actions and their batch results (about 3.5 KB
    # each) in memory, so 10,000 at a time cost a large resync some 35 MB of its peak.
    apply_batch_size = 2_500

    def __init__(
        self,
        settings: MailchimpSettings,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.api_key is None:
            raise ConfigError("mailchimp.api_key is not set")
        self._list_id, self._workers = settings.list_id, settings.max_connections
        self._retry, self._sleep, self._clock = retry or RetryPolicy(), sleep, clock
        self._timeout = settings.timeout_seconds
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._list_found: bool | None = None
        client = mailchimp_marketing.Client()
        # The SDK replaces every "server" in host + path by config["server"] (A1.4): "server"
        # makes that a no-op, so api_root is used verbatim, whatever its host is called.
        client.set_config({"api_key": settings.api_key.get_secret_value(), "server": "server",
                           "timeout": settings.timeout_seconds})
        client.api_client.host = settings.api_root  # survives set_config (A1.5)
        # Every SDK call sends through ApiClient.request, the one place that still holds the
        # status of a success (call_api keeps only the body); the download goes around the SDK.
        # It also keeps each thread's last X-Request-Id: the audit's evidence of a success.
        self._seen = threading.local()
        client.api_client.request = _observed(self.name, client.api_client.request, self._seen)
        self._get = _observed(self.name, requests.get)
        self._lists, self._ping, self._batches = client.lists, client.ping, client.batches

    def check(self) -> CheckResult:
        """Ping, then read the audience; not retried, never raises."""
        try:
            self._call(self._ping.get, retried=False)
            found = self._call(self._lists.get_list, self._list_id,
                               fields=["id", "stats.member_count"], retried=False)
        except ConnectorError as error:
            if error.status in (401, 403):
                return CheckResult(False, f"credentials refused ({error.status})",
                                   credentials_refused=True)
            if error.status == 404:
                return CheckResult(False, "list not found (404)")
            if not error.permanent:
                return CheckResult(False, "unreachable")
            return CheckResult(False, f"refused ({error.status} {error.title})")
        stats = found.get("stats") if isinstance(found, dict) else None
        members = stats.get("member_count") if isinstance(stats, dict) else None
        return CheckResult(True, "credentials accepted", {"members": str(members)})

    def scan(self) -> Iterator[MemberRecord]:
        """Every member (archived ones aside), 1000 per page, in offset order.

        After the first page, up to ``SCAN_PREFETCH_PAGES`` pages are read ahead on
        threads (see :meth:`_pages_ahead`). Close the iterator when stopping early.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials or list refused, or a page that is not a collection.
        """
        # Closed explicitly, so a caller that stops early stops the read-ahead at once.
        with closing(self._pages_ahead()) as members:
            yield from members

    def member(self, email: str) -> MemberRecord | None:
        """The member at ``email`` (one GET by subscriber hash), or None when there is none.

        Raises:
            RetriableError: the member could not be read after the in-call retries, or a 404
                whose cause (missing member or missing list) could not be told.
            PermanentError: credentials refused, the list does not exist, or an answer that
                is not a member.
        """
        raw = self._get_member(email, [f.removeprefix("members.") for f in MEMBER_FIELDS[:-1]])
        return None if raw is None else _record(raw)

    def _get_member(self, email: str, fields: Sequence[str]) -> dict[str, Any] | None:
        """``fields`` of the member at ``email`` (one GET by subscriber hash), or None.

        Raises:
            RetriableError: see :meth:`member`.
            PermanentError: see :meth:`member`.
        """
        try:
            raw = self._call(self._lists.get_list_member, self._list_id, _hash(email),
                             fields=list(fields))
        except ConnectorError as error:
            if error.status != 404:
                raise
            self._list_found = None
            found = self._list_exists()
            if found is None:
                raise RetriableError("GET /lists/{list_id}: list unverified", status=404,
                                     title="list_unverified", reached_server=True) from None
            if not found:
                raise PermanentError("GET /lists/{list_id}: HTTP 404", status=404,
                                     title="list_not_found", reached_server=True) from None
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("email_address"), str):
            raise PermanentError("GET " + MEMBER + ": not a member", title="bad_response",
                                 reached_server=True)
        return raw

    def member_fields(self, email: str) -> dict[str, Any] | None:
        """What the audience holds about the member at ``email``, or None when there is none.

        :data:`EXPORT_FIELDS` of the member as Mailchimp returns them (the
        address, status, merge fields, sign-up and opt-in times and addresses,
        ...): for a subject access request (R8). Nothing of it is logged.

        Raises:
            RetriableError: the member could not be read after the in-call retries, or a 404
                whose cause (missing member or missing list) could not be told.
            PermanentError: credentials refused, the list does not exist, or an answer that
                is not a member.
        """
        raw = self._get_member(email, EXPORT_FIELDS)
        if raw is None:
            return None
        return {key: raw[key] for key in EXPORT_FIELDS if key in raw}

    def changes(self, cursor: str | None) -> Changes:
        """Members changed since ``cursor`` minus an overlap; None or "" scans everything.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials or list refused, or a page that is not a collection.
        """
        since = _parse_time(cursor)
        if cursor and since is None:
            log.warning("mailchimp_cursor_invalid")
        if since is None:
            records = tuple(self.scan())
            return Changes(records, _cursor(records, None), full=True)
        records = tuple(self._pages({"since_last_changed": _format_time(since - CHANGES_OVERLAP)}))
        return Changes(records, _cursor(records, since))

    def apply(self, actions: Sequence[Action], *, dry_run: bool = False) -> list[Outcome]:
        """Carry out ``actions``; exactly one outcome per action, in order, never raising.

        Actions on one address run in the order given (in successive waves); the rest run
        concurrently (up to ``max_connections``). In a wave, two or more subscribes or
        unsubscribes go as one ``POST /lists/{id}`` per 500, and two or more update_names,
        clear_extra_fields or erases as one ``POST /batches`` per 500, awaited before the next
        wave starts; the last partial members chunk fills the last partial batch when it
        fits (module docstring).
        """
        refusals = [_refusal(action) for action in actions]
        outcomes = {i: Outcome(actions[i], "permanent", r) for i, r in enumerate(refusals) if r}
        todo = [i for i, refused in enumerate(refusals) if not refused]
        if dry_run:
            for kind, count in sorted(Counter(actions[i].kind for i in todo).items()):
                log.info(f"would_{kind}", processor=self.name, count=count, label="(dry run)")
            outcomes.update({i: Outcome(actions[i], "done", "dry_run") for i in todo})
            return [outcomes[i] for i in range(len(actions))]
        self._list_found = None  # verified lazily, once per apply, on a member 404
        # One thread more than slots: the one awaiting a wave's /batches holds no slot while
        # it sleeps between polls, and must not keep a single call from running.
        with ThreadPoolExecutor(max_workers=self._workers + 1) as pool:
            for wave in _waves([actions[i] for i in todo]):
                indexes = [todo[w] for w in wave]
                many = [i for i in indexes if actions[i].kind in BATCH_KINDS]
                ops = [i for i in indexes if actions[i].kind in OPERATION_KINDS]
                many, ops = _fill(many, ops if len(ops) > 1 else [])
                many = many if len(many) > 1 else []
                grouped = set(many) | set(ops)
                # The /batches first, chunked and awaited in one job: Mailchimp works on them
                # while the other calls of the wave are made.
                jobs = [("operations", ops)] if ops else []
                jobs += [("one", [i]) for i in indexes if i not in grouped]
                jobs += [("members", many[n:n + BATCH_MEMBERS])
                         for n in range(0, len(many), BATCH_MEMBERS)]
                runs = pool.map(lambda job: self._run(actions, *job), jobs)
                for (_, job), done in zip(jobs, runs):
                    outcomes.update(zip(job, done))
        result = [outcomes[i] for i in range(len(actions))]
        log.info("mailchimp_applied", processor=self.name, **Counter(o.status for o in result))
        return result

    def _run(self, actions: Sequence[Action], way: str, job: list[int]) -> list[Outcome]:
        """One job of a wave; one outcome per position of ``job``, in order.

        Args:
            actions: every action of the apply.
            way: ``one`` (a single call), ``members`` (a ``POST /lists/{id}`` chunk; a chunk
                of one would be a PUT) or ``operations`` (every ``POST /batches`` of the wave).
            job: positions in ``actions``.
        """
        if way == "members":
            return self._batch([actions[i] for i in job])
        if way == "operations":
            return self._operations(actions, job)
        return [self._one(actions[job[0]])]

    def _one(self, action: Action) -> Outcome:
        """One member call; a refusal becomes the outcome."""
        email, kind = cast(str, action.email).strip(), action.kind
        patch = self._lists.update_list_member
        # A subscribe is the PUT upsert; an unsubscribe a PATCH, not an upsert: an absent
        # address is not added. Never archive (DELETE): that may lose the compliance state
        # (reference assumption 6). The bodies: _update_body.
        calls: dict[str, Callable[..., Any]] = {
            "subscribe": self._lists.set_list_member, "unsubscribe": patch,
            "update_names": patch, "clear_extra_fields": patch, "move_email": patch}
        target = (self._list_id, _hash(email))
        try:
            if kind == "erase":
                result = self._call(self._lists.delete_list_member_permanent, *target)
            else:
                # A replayed move would 404 at the old hash: replay only what never left.
                body = (_update_body(action) if kind != "move_email"
                        else {"email_address": (action.new_email or "").strip()})
                result = self._call(calls[kind], *target, body, skip_merge_validation="true",
                                    idempotent=kind != "move_email")
        except ConnectorError as error:
            return self._refused(action, error)
        del result
        return Outcome(action, "done", request_id=self._request_id())

    def _batch(self, actions: Sequence[Action]) -> list[Outcome]:
        """Up to 500 subscribes and unsubscribes (distinct addresses: one wave) in one call.

        Each ``errors`` entry is mapped back to its action by address. Never "pending" (R2).
        """
        emails = [cast(str, a.email).strip() for a in actions]
        members = [_batch_member(email, a) for email, a in zip(emails, actions)]
        body = {"members": members, "update_existing": True}
        try:
            answer = self._call(self._lists.batch_list_members, self._list_id, body,
                                skip_merge_validation="true")
        except ConnectorError as error:
            return [self._refused(a, error) for a in actions]
        try:
            errors = {str(e.get("email_address", "")).strip().lower(): e
                      for e in answer.get("errors") or ()}
        except (AttributeError, TypeError):  # not a dict, or errors not a list of objects
            error = PermanentError("POST /lists/{list_id}: not a batch answer", status=200,
                                   title="bad_response", reached_server=True)
            return [self._refused(a, error) for a in actions]
        log.info("mailchimp_batch", path=ROUTES["batch_list_members"][1],
                 members=len(members), errors=len(errors))
        request_id = self._request_id()
        return [_batch_outcome(a, errors.get(e.lower()), request_id)
                for a, e in zip(actions, emails)]

    def _operations(self, actions: Sequence[Action], indexes: list[int]) -> list[Outcome]:
        """Two or more update_names, clear_extra_fields or erases (one wave) via ``/batches``.

        Submits one batch per :data:`BATCH_OPERATIONS`, polls them all until ``finished`` or
        :data:`OPERATIONS_DEADLINE_SECONDS`, then classifies every operation's result as its
        single call would be (:meth:`_operation_outcome`). Never raises.

        Args:
            actions: every action of the apply.
            indexes: the positions in ``actions`` to carry out; each is its ``operation_id``.

        Returns:
            One outcome per position of ``indexes``, in that order.
        """
        outcomes: dict[int, Outcome] = {}
        operations: dict[int, dict[str, Any]] = {}
        for i in indexes:
            try:
                operations[i] = _operation(self._list_id, i, actions[i])
            except (TypeError, ValueError):  # a body json cannot encode: as the SDK would fail
                outcomes[i] = Outcome(actions[i], "permanent", "request_failed")
        todo = list(operations)
        waiting: dict[str, list[int]] = {}
        for chunk in (todo[n:n + BATCH_OPERATIONS] for n in range(0, len(todo), BATCH_OPERATIONS)):
            started = self._start([operations[i] for i in chunk])
            if isinstance(started, ConnectorError):
                outcomes.update((i, Outcome(actions[i], "retriable", "batch_submit_failed",
                                            started.request_id, started.retry_after_seconds))
                                for i in chunk)
            else:
                waiting[started] = chunk
        started_at = self._clock()
        deadline = started_at + OPERATIONS_DEADLINE_SECONDS
        due = dict.fromkeys(waiting, started_at + OPERATIONS_FIRST_POLL_SECONDS)
        polls: Counter[str] = Counter()
        while waiting and (now := self._clock()) < deadline:
            batch_id = min(waiting, key=due.__getitem__)
            if due[batch_id] > now:
                self._sleep(min(due[batch_id], deadline) - now)
            polled, polls[batch_id] = self._poll(batch_id), polls[batch_id] + 1
            if isinstance(polled, ConnectorError):
                outcomes.update((i, Outcome(actions[i], "retriable", "batch_status_refused",
                                            polled.request_id)) for i in waiting.pop(batch_id))
            elif polled is not None and polled.get("status") == "finished":
                outcomes.update(self._results(actions, batch_id, waiting.pop(batch_id), polled))
            else:
                due[batch_id] = _next_poll(started_at, self._clock(), polled, polls[batch_id])
        for batch_id, chunk in waiting.items():
            log.warning("mailchimp_operations_unfinished", batch_id=batch_id,
                        operations=len(chunk), deadline_seconds=OPERATIONS_DEADLINE_SECONDS)
            outcomes.update((i, Outcome(actions[i], "retriable", "batch_unfinished"))
                            for i in chunk)
        return [outcomes[i] for i in indexes]

    def _start(self, operations: list[dict[str, Any]]) -> str | ConnectorError:
        """Submit one ``POST /batches``.

        Retried in-call even after a read timeout: every operation is safe to replay, so a
        second batch of the same operations does no harm.

        Returns:
            The batch id, or the error that refused the submit (or an answer with no id).
        """
        try:
            answer = self._call(self._batches.start, {"operations": operations})
        except ConnectorError as error:
            log.warning("mailchimp_operations_not_submitted", operations=len(operations),
                        status=error.status, title=error.title)
            return error
        batch_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(batch_id, str) or not batch_id:
            log.warning("mailchimp_operations_not_submitted", operations=len(operations),
                        status=200, title="bad_response")
            return PermanentError("POST /batches: no batch id", status=200, title="bad_response",
                                  reached_server=True)
        log.info("mailchimp_operations_submitted", batch_id=batch_id,
                 operations=len(operations), status=answer.get("status"))
        return batch_id

    def _poll(self, batch_id: str) -> dict[str, Any] | ConnectorError | None:
        """One ``GET /batches/{id}``.

        Returns:
            The status answer (``finished`` or not); None when it could not be read for now
            (asked again at the next poll, until the deadline); the error when it was refused
            (e.g. 404: the batch is gone), which no later poll will change.
        """
        try:
            answer = self._call(self._batches.status, batch_id)
        except ConnectorError as error:
            log.warning("mailchimp_operations_status_failed", batch_id=batch_id,
                        status=error.status, title=error.title)
            return error if error.permanent else None
        if not isinstance(answer, dict):
            return None
        counts = {k: answer.get(k) for k in ("total_operations", "finished_operations",
                                             "errored_operations")}
        if answer.get("status") == "finished":
            log.info("mailchimp_operations_finished", batch_id=batch_id, **counts)
        else:
            log.info("mailchimp_operations_running", batch_id=batch_id,
                     status=str(answer.get("status")), **counts)
        return answer

    def _results(self, actions: Sequence[Action], batch_id: str, chunk: list[int],
                 status: Mapping[str, Any]) -> Iterator[tuple[int, Outcome]]:
        """Each operation of a finished batch and its outcome, read from ``response_body_url``.

        Args:
            actions: every action of the apply.
            batch_id: the batch, for logs.
            chunk: the positions (``operation_id``) submitted in it.
            status: its finished ``GET /batches/{id}`` answer.

        Yields:
            ``(position, outcome)`` for every position of ``chunk``; a result that cannot be
            read is retriable (``batch_results_unreadable``, ``batch_result_missing``).
        """
        url = status.get("response_body_url")
        results: dict[str, Mapping[str, Any]] | None = None
        if isinstance(url, str) and url:
            try:
                results = _archived_results(self._download(url))
            except ConnectorError as error:
                log.warning("mailchimp_operations_results_failed", batch_id=batch_id,
                            status=error.status, title=error.title)
        if results is None:
            log.warning("mailchimp_operations_results_unreadable", batch_id=batch_id,
                        operations=len(chunk))
            yield from ((i, Outcome(actions[i], "retriable", "batch_results_unreadable"))
                        for i in chunk)
            return
        answered: Counter[str] = Counter()
        for i in chunk:
            result = results.get(str(i))
            code = result.get("status_code") if result is not None else None
            if result is None or not isinstance(code, int) or isinstance(code, bool):
                answered["missing"] += 1
                yield i, Outcome(actions[i], "retriable", "batch_result_missing")
                continue
            answered[str(code)] += 1
            yield i, self._operation_outcome(actions[i], code, result, batch_id)
        log.info("mailchimp_operations_results", batch_id=batch_id, operations=len(chunk),
                 statuses=dict(sorted(answered.items())))

    def _operation_outcome(self, action: Action, code: int,
                           result: Mapping[str, Any], batch_id: str) -> Outcome:
        """One operation's result, classified exactly as the same single call's answer.

        The batch id stands in for the request id (the audit trail's reference), unless the
        operation's problem document names its own ``instance``.
        """
        if 200 <= code < 300:
            return Outcome(action, "done", request_id=batch_id)
        method, template = ROUTES[_OPERATION_CALLS[action.kind]]
        error = _error(f"{method} {template}", code, result.get("response"), request_id=batch_id)
        return self._refused(action, error)

    def _download(self, url: str) -> bytes:
        """GET a pre-signed ``response_body_url``: no credentials, a timeout, a slot held.

        Raises:
            RetriableError: a network failure, 429 or 5xx, once the in-call retries are spent.
            PermanentError: another error status (an expired link: 403).
        """

        def once() -> bytes:
            with self._slots:
                try:
                    answer = self._get(url, timeout=self._timeout)
                except requests.RequestException as error:
                    failure: ConnectorError = _unsent(RESULTS, error)
                else:
                    if answer.ok:
                        return answer.content
                    failure = _error(RESULTS, answer.status_code, None,
                                     retry_after=_seconds(answer.headers.get("Retry-After")))
            raise failure

        return self._retry.retrying(sleep=self._sleep)(once)

    def _refused(self, action: Action, error: ConnectorError) -> Outcome:
        """The outcome of a failed call, by Mailchimp's problem title and the action kind."""
        rid, title, kind = error.request_id, error.title, action.kind
        if isinstance(error, RetriableError):
            return Outcome(action, "retriable", _slug(title or "unavailable"), rid,
                           error.retry_after_seconds)
        if title == "Member In Compliance State":
            return Outcome(action, "needs_person", "needs_client_resubscribe", rid)
        if title == "Forgotten Email Not Subscribed":
            if kind in FORGOTTEN_SATISFIES:
                return Outcome(action, "done", "forgotten", rid)
            return Outcome(action, "permanent", "forgotten_email", rid)  # the caller suppresses
        if error.status == 405 and kind == "erase":
            return Outcome(action, "permanent", "cannot_delete", rid)  # "contact support"
        if title == "Member Exists" and kind == "move_email":
            return Outcome(action, "permanent", "email_taken", rid)
        if error.status == 404 and kind != "subscribe":
            # A missing list and a missing member read alike: call the member absent (done;
            # idempotent erasure, assumption 4) only once the list is known to exist.
            found = self._list_exists()
            if found is None:
                return Outcome(action, "retriable", "list_unverified", rid)
            return Outcome(action, "done" if found else "permanent",
                           "absent" if found else "list_not_found", rid)
        return Outcome(action, "permanent", _slug(title or f"http_{error.status}"), rid)

    def _list_exists(self) -> bool | None:
        """Whether the audience exists (cached per apply); None when that cannot be told."""
        if self._list_found is None:
            try:
                self._call(self._lists.get_list, self._list_id, fields=["id"])
                self._list_found = True
            except ConnectorError as error:
                if error.status != 404:
                    return None
                self._list_found = False
        return self._list_found

    def _pages(self, query: Mapping[str, str], start: int = 0) -> Iterator[MemberRecord]:
        """Members at offsets of 1000 from ``start`` until a short or empty page.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: refused, or a page that is not a member collection.
        """
        offset = start
        while True:
            rows, total = self._page(offset, query)
            yield from (_record(row) for row in rows if isinstance(row, dict))
            offset += len(rows)
            if len(rows) < PAGE_COUNT or offset >= total:
                return

    def _pages_ahead(self) -> Iterator[MemberRecord]:
        """Every member as :meth:`_pages` reads them, the following pages read ahead.

        The first page's ``total_items`` says which offsets exist; they are read up to
        ``SCAN_PREFETCH_PAGES`` at once (never more than ``max_connections``: each
        call holds a slot) and yielded in order. A short or empty page ends the scan,
        as does an error at its turn. If the last of them is full and reports more
        members than the first did (members added during the scan), the rest is read
        one page at a time as :meth:`_pages` does, so they are not missed.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: refused, or a page that is not a member collection.
        """
        rows, total = self._page(0, {})
        yield from (_record(row) for row in rows if isinstance(row, dict))
        if len(rows) < PAGE_COUNT or PAGE_COUNT >= total:
            return
        offsets = range(PAGE_COUNT, total, PAGE_COUNT)
        in_flight = min(SCAN_PREFETCH_PAGES, self._workers)
        read = partial(self._page, query={})
        with closing(read_ahead(read, offsets, in_flight=in_flight,
                                thread_name="mailchimp-scan")) as pages:
            for rows, total in pages:
                yield from (_record(row) for row in rows if isinstance(row, dict))
                if len(rows) < PAGE_COUNT:
                    return
        following = offsets[-1] + PAGE_COUNT
        if total > following:
            log.info("mailchimp_members_grew", path=ROUTES["get_list_members_info"][1],
                     total=total, offset=following)
            yield from self._pages({}, start=following)

    def _page(self, offset: int, query: Mapping[str, str]) -> tuple[list[Any], int]:
        """The members at ``offset`` (up to 1000) and the ``total_items`` the page reports.

        Thread-safe: the call holds one of ``max_connections`` slots.

        Raises:
            RetriableError: the page could not be read after the in-call retries.
            PermanentError: refused, or a page that is not a member collection.
        """
        page = self._call(self._lists.get_list_members_info, self._list_id,
                          fields=MEMBER_FIELDS, count=PAGE_COUNT, offset=offset, **query)
        rows = page.get("members") if isinstance(page, dict) else None
        if not isinstance(rows, list):
            raise PermanentError("GET /lists/{list_id}/members: not a member collection",
                                 title="bad_response", reached_server=True)
        total = page.get("total_items") if isinstance(page.get("total_items"), int) else 0
        log.info("mailchimp_page", path=ROUTES["get_list_members_info"][1],
                 offset=offset, rows=len(rows), total=total)
        return rows, total

    def _call(self, fn: Callable[..., Any], *args: Any, idempotent: bool = True,
              retried: bool = True, **kwargs: Any) -> Any:
        """One SDK call, holding one of ``max_connections`` slots, with the in-call retries.

        Returns:
            The decoded JSON, or the ``requests.Response`` of an empty 2xx (a 204).

        Raises:
            RetriableError: see :meth:`_classify`, once the retries are spent.
            PermanentError: see :meth:`_classify`.
        """
        method, template = ROUTES[fn.__name__]

        def once() -> Any:
            self._seen.request_id = None
            with self._slots:
                try:
                    result: Any = fn(*args, **kwargs)
                except ApiClientError as error:
                    result = error  # classified outside the except: no chained body or detail
            return self._classify(f"{method} {template}", result)

        if not retried:
            return once()
        return self._retry.retrying(idempotent=idempotent, sleep=self._sleep)(once)

    def _request_id(self) -> str | None:
        """The X-Request-Id of this thread's last SDK call (its last attempt), if it had one."""
        return getattr(self._seen, "request_id", None)

    @staticmethod
    def _classify(where: str, result: Any) -> Any:
        """The one classification of what the SDK gave back (A1.8-A1.11, A4.4-A4.7).

        Messages hold the method, the path template, the status and the problem title:
        never an address, a body, or the problem ``detail`` (which names the address).

        Returns:
            ``result`` itself when it is a success.

        Raises:
            RetriableError: 429, 5xx, a timeout or a network failure.
            PermanentError: other 4xx, 503 "ComplianceRelated", a request that could not be built.
        """
        if isinstance(result, ApiClientError) and result.status_code is None:
            raise _unsent(where, result.text)
        if isinstance(result, ApiClientError):
            error = _error(where, result.status_code, result.text)
        elif isinstance(result, requests.Response) and not result.ok:
            error = _error(where, result.status_code, result.text,
                           request_id=result.headers.get("X-Request-Id"),
                           retry_after=_seconds(result.headers.get("Retry-After")))
        else:
            return result
        log.info("mailchimp_refused", call=where, status=error.status, title=error.title,
                 request_id=error.request_id)
        raise error


def _observed(vendor: str, send: Send, seen: threading.local | None = None) -> Send:
    """``send`` (one HTTP request per call), reporting each request it makes to the observers.

    What ``send`` returns or raises is passed on untouched: only :func:`report_attempt` sees it.
    With ``seen``, the response's X-Request-Id is kept there (per thread) as ``request_id``.
    """

    def observed(*args: Any, **kwargs: Any) -> requests.Response:
        try:
            response = send(*args, **kwargs)
        except Exception as error:
            report_attempt(vendor, error)
            raise
        report_attempt(vendor, response)
        if seen is not None:
            seen.request_id = response.headers.get("X-Request-Id")
        return response

    return observed


def _error(where: str, status: int, text: Any, *, request_id: str | None = None,
           retry_after: float | None = None) -> ConnectorError:
    """The error for an answer of ``status`` with problem+json ``text`` (a string or a dict).

    Shared by single calls (:meth:`MailchimpConnector._classify`) and the results of batch
    operations, so that both are classified alike. The message holds ``where``, the status and
    the problem title only.

    Returns:
        RetriableError for 429 and 5xx (503 "ComplianceRelated" aside); PermanentError else.
    """
    problem = _problem(text)
    title = problem.get("title") if isinstance(problem.get("title"), str) else None
    instance = problem.get("instance")
    rid = (instance if isinstance(instance, str) else None) or request_id or None
    message = f"{where}: HTTP {status}" + (f" {title}" if title else "")
    fields: dict[str, Any] = {"status": status, "title": title, "request_id": rid,
                              "reached_server": True}
    # 503 "ComplianceRelated" is "this method has been disabled", not an outage (A4.7).
    if (status == 429 or status >= 500) and title != "ComplianceRelated":
        return RetriableError(message, retry_after_seconds=retry_after, **fields)
    return PermanentError(message, **fields)


def _unsent(where: str, cause: Any) -> ConnectorError:
    """The error for what the SDK caught while sending (``status_code`` None, A1.10).

    Returns:
        RetriableError for a timeout or a connection failure (``reached_server`` False only
        when the request cannot have left: refused, connect timeout); PermanentError for
        anything else, e.g. a body that is not JSON-serialisable.
    """
    kind = type(cause).__name__
    if isinstance(cause, requests.ConnectTimeout):
        reached: bool | None = False
    elif isinstance(cause, requests.ConnectionError):
        # Dropped after sending: ProtocolError/OSError; refused: inside MaxRetryError.
        inner = cause.args[0] if cause.args else None
        reached = None if isinstance(inner, ProtocolError | OSError) else False
    elif isinstance(cause, requests.Timeout | requests.exceptions.ChunkedEncodingError):
        reached = None
    else:
        return PermanentError(f"{where}: {kind}", title="request_failed")
    title = "timeout" if isinstance(cause, requests.Timeout) else "connection_failed"
    return RetriableError(f"{where}: {kind}", title=title, reached_server=reached)


def _problem(text: Any) -> dict[str, Any]:
    """The problem document: already a dict (``application/json``), or a JSON string."""
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except ValueError:
            return {}
    return text if isinstance(text, dict) else {}


def _batch_member(email: str, action: Action) -> dict[str, Any]:
    """One ``members`` entry of a batch call, for a kind in :data:`BATCH_KINDS`."""
    if action.kind == "unsubscribe":
        return {"email_address": email, "status": "unsubscribed"}
    return {"email_address": email, "status": "subscribed",
            "merge_fields": {"FNAME": action.first_name, "LNAME": action.last_name}}


# The SDK method of the single call each batch operation stands for (ROUTES gives its route).
# Subscribes and unsubscribes ride in a /batches job only to fill it (_fill).
_OPERATION_CALLS: Mapping[str, str] = {"update_names": "update_list_member",
                                       "clear_extra_fields": "update_list_member",
                                       "erase": "delete_list_member_permanent",
                                       "subscribe": "set_list_member",
                                       "unsubscribe": "update_list_member"}


def _fill(many: list[int], ops: list[int]) -> tuple[list[int], list[int]]:
    """Move the ``POST /lists/{id}`` remainder into the last ``POST /batches`` when it fits.

    When a wave holds both a partial members chunk (or a lone subscribe or unsubscribe)
    and a partial operations batch whose sum fits in one batch, the members ride in that
    batch as their single calls (a PUT upsert that never asks for confirmation, an
    unsubscribe PATCH, whose 404 is "absent" again): one write call fewer, and no poll
    more, the batch being awaited anyway. Full chunks stay as they are. So an apply of a
    multiple of 500 such actions in one wave costs exactly that many / 500 write calls.

    Returns:
        ``(many, ops)``: the positions for ``POST /lists/{id}`` and for ``POST /batches``.
    """
    spill, room = len(many) % BATCH_MEMBERS, len(ops) % BATCH_OPERATIONS
    if not spill or not room or spill + room > BATCH_OPERATIONS:
        return many, ops
    return many[:len(many) - spill], ops + many[len(many) - spill:]


def _update_body(action: Action) -> dict[str, Any]:
    """The body of an action's single call (not a move, not an erase).

    A subscribe is the PUT upsert, never "pending" (R2); an unsubscribe a PATCH of the
    status; ``update_names`` and ``clear_extra_fields`` PATCH merge fields only.
    """
    if action.kind == "subscribe":
        return {"email_address": cast(str, action.email).strip(),
                "status_if_new": "subscribed", "status": "subscribed",
                "merge_fields": {"FNAME": action.first_name, "LNAME": action.last_name}}
    if action.kind == "unsubscribe":
        return {"status": "unsubscribed"}
    if action.kind == "update_names":
        return {"merge_fields": {"FNAME": action.first_name, "LNAME": action.last_name}}
    return {"merge_fields": dict.fromkeys(action.fields, "")}


def _operation(list_id: str, position: int, action: Action) -> dict[str, Any]:
    """One ``POST /batches`` operation: exactly the single call, its body a JSON *string*.

    Args:
        list_id: the audience.
        position: the action's position in the apply: the ``operation_id`` results come back by.
        action: an action of a kind in :data:`OPERATION_KINDS`.

    Returns:
        ``{method, path, operation_id}``, with ``params`` and ``body`` for a PATCH (A2.9).

    Raises:
        TypeError, ValueError: the body cannot be encoded as JSON.
    """
    method, template = ROUTES[_OPERATION_CALLS[action.kind]]
    path = template.format(list_id=list_id, subscriber_hash=_hash(cast(str, action.email)))
    operation: dict[str, Any] = {"method": method, "path": path,
                                 "operation_id": str(position)}
    if action.kind != "erase":
        operation["params"] = {"skip_merge_validation": "true"}
        operation["body"] = json.dumps(_update_body(action))
    return operation


def _archived_results(archive: bytes) -> dict[str, Mapping[str, Any]] | None:
    """Results by ``operation_id`` from a ``response_body_url`` download, or None.

    The download is a gzipped tar of JSON files, each a JSON array of
    ``{status_code, operation_id, response}``; every file is read (how many there are and how
    they are named is not documented). A file that is not such an array is skipped (its
    operations read as missing); an archive that cannot be unpacked at all gives None.
    """
    results: dict[str, Mapping[str, Any]] = {}
    skipped = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for entry in tar:
                member = tar.extractfile(entry) if entry.isfile() else None
                if member is None:
                    continue
                try:
                    rows = json.loads(member.read())
                except ValueError:
                    rows = None
                if not isinstance(rows, list):
                    skipped += 1
                    continue
                results.update((str(row.get("operation_id")), row) for row in rows
                               if isinstance(row, dict))
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return None
    if skipped:
        log.warning("mailchimp_operations_results_skipped", files=skipped)
    return results


def _batch_outcome(action: Action, error: Mapping[str, Any] | None,
                   request_id: str | None = None) -> Outcome:
    """One member's result in a batch; the ``error`` text names the address: never logged.

    Mapped as :meth:`MailchimpConnector._refused` maps the same titles for single calls.
    ``request_id`` is the batch call's X-Request-Id, the evidence of a success.
    """
    if error is None:
        return Outcome(action, "done", request_id=request_id)
    text = f"{error.get('error', '')} {error.get('error_code', '')}".lower()
    if "compliance state" in text:
        return Outcome(action, "needs_person", "needs_client_resubscribe")
    if "forgotten" in text or "permanently deleted" in text:
        if action.kind in FORGOTTEN_SATISFIES:
            return Outcome(action, "done", "forgotten")
        return Outcome(action, "permanent", "forgotten_email")
    return Outcome(action, "permanent", _slug(str(error.get("error_code") or "rejected")))


def _refusal(action: Action) -> str | None:
    """Why an action cannot be sent at all, or None."""
    if action.kind not in KINDS:
        return "unsupported_action"
    if not (action.email or "").strip():
        return "missing_email"
    if action.kind == "move_email" and not (action.new_email or "").strip():
        return "missing_new_email"
    return None


def _waves(actions: Sequence[Action]) -> list[list[int]]:
    """Positions grouped so that the actions on one address fall in successive waves."""
    next_wave: dict[str, int] = {}
    waves: list[list[int]] = []
    for index, action in enumerate(actions):
        keys = {(e or "").strip().lower() for e in (action.email, action.new_email)} - {""}
        wave = max(next_wave.get(key, 0) for key in keys)
        next_wave.update(dict.fromkeys(keys, wave + 1))
        waves += [[] for _ in range(wave + 1 - len(waves))]
        waves[wave].append(index)
    return waves


def _next_poll(started_at: float, now: float, status: Mapping[str, Any] | None,
               polls: int) -> float:
    """When to ask again about a batch that was not finished at ``now`` (monotonic seconds).

    The first poll comes :data:`OPERATIONS_FIRST_POLL_SECONDS` after the submit, when a
    batch of moderate size has usually finished: two calls. When it has not, the next poll
    is timed so that one more is usually the last (a batch then costs three calls): from
    its progress, the time it took for the operations done so far, scaled to all of them,
    with a margin; with no progress to go by, three times as long as it has already run.
    Later polls double the elapsed time. No wait is longer than
    :data:`OPERATIONS_MAX_POLL_SECONDS`; the caller stops at the deadline.

    Args:
        started_at: when the batches of the wave were submitted.
        now: when the poll was answered.
        status: its answer (None when it could not be read).
        polls: how many polls of this batch were made, this one included.
    """
    elapsed = max(now - started_at, OPERATIONS_FIRST_POLL_SECONDS)
    total = status.get("total_operations") if status is not None else None
    done = status.get("finished_operations") if status is not None else None
    if (isinstance(total, int) and isinstance(done, int) and 0 < done < total
            and not isinstance(done, bool)):
        wait = elapsed * (total - done) / done * OPERATIONS_POLL_MARGIN
    else:
        wait = elapsed * (3 if polls == 1 else 1)
    return now + min(max(wait, OPERATIONS_FIRST_POLL_SECONDS), OPERATIONS_MAX_POLL_SECONDS)


def _record(raw: Mapping[str, Any]) -> MemberRecord:
    """One member; ``extra_fields`` names the non-blank merge fields other than FNAME/LNAME."""
    merges = raw.get("merge_fields") if isinstance(raw.get("merge_fields"), dict) else {}
    return MemberRecord(
        email=str(raw.get("email_address") or ""),
        status=cast(MemberStatus, str(raw.get("status") or "")),
        first_name=str(merges.get("FNAME") or ""),
        last_name=str(merges.get("LNAME") or ""),
        extra_fields=tuple(sorted(k for k, v in merges.items()
                                  if k not in NAME_FIELDS and _filled(v))),
        last_changed=_parse_time(raw.get("last_changed")),
    )


def _filled(value: Any) -> bool:
    """Whether a merge value holds anything (an ADDRESS is a dict of strings)."""
    if isinstance(value, dict):
        return any(_filled(v) for v in value.values())
    return bool(value.strip()) if isinstance(value, str) else value is not None


def _hash(email: str) -> str:
    """The subscriber hash: md5 hex of the lower-cased address (A2.1)."""
    return hashlib.md5(email.strip().lower().encode()).hexdigest()  # noqa: S324


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "rejected"


def _parse_time(value: Any) -> datetime | None:
    """ISO 8601 (naive means UTC) as an aware UTC datetime, else None."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _format_time(value: datetime) -> str:
    """Mailchimp's form: ``2026-01-02T03:04:05+00:00`` (whole seconds, UTC)."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def _cursor(records: Sequence[MemberRecord], since: datetime | None) -> str:
    """The newest ``last_changed`` seen, never older than ``since``; "" when there is none."""
    times = [r.last_changed for r in records if r.last_changed] + ([since] if since else [])
    return _format_time(max(times)) if times else ""


def _seconds(value: str | None) -> float | None:
    """A delta-seconds Retry-After (Mailchimp documents none); anything else is ignored."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
