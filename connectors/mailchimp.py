"""Mailchimp, the marketing audience: read members; subscribe, opt out, rectify, erase.

Facts from ``reference/mailchimp-and-google-analytics-api.md`` part A, through the official
``mailchimp-marketing`` SDK, whose quirks (A1) are absorbed in :meth:`MailchimpConnector._call`
and ``_classify``: an error is an ``ApiClientError`` whose ``text`` is a problem+json *string*
(a dict under ``application/json``, the network exception when nothing came back), and an
empty body comes back as a ``requests.Response`` with no exception, even for a 429.

Archived members are not asked for: the default listing leaves them out (sandbox assumption 1)
and nothing needs them, since an erasure goes straight to the subscriber hash; should the real
API list them, they arrive as ``status="archived"``.

Writes on many members go as batch calls (``POST /lists/{id}``, 500 members each, A2.8):
subscribes, and since the full-resync benchmark showed single PATCHes dominating the call count,
unsubscribes too (``status: "unsubscribed"``, ``update_existing``). The trade-off: a batch is an
upsert, so an unsubscribe of an address that is not on the list *adds* it as an unsubscribed
member instead of answering 404, and the "absent" outcome is lost (it comes back "done"). That
is accepted because the reconciler plans unsubscribes only for members its scan saw; a lone
unsubscribe still goes as a PATCH and keeps the 404 -> "absent" answer. ``update_names`` and
``clear_extra_fields`` stay PATCHes: every batch member needs a ``status`` (the emulator answers
"Status is required." without one), an action does not carry the member's current status, and
sending a guessed one would change the subscription (or resubscribe someone: never).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import mailchimp_marketing
import requests
import structlog
from mailchimp_marketing.api_client import ApiClientError
from urllib3.exceptions import ProtocolError

from connectors.base import Action, Changes, CheckResult, MemberRecord, MemberStatus, Outcome
from syncd.config import MailchimpSettings
from syncd.errors import ConfigError, ConnectorError, PermanentError, RetriableError
from syncd.retry import RetryPolicy

log = structlog.get_logger(__name__)

PAGE_COUNT = 1000  # the largest member page (A2.7)
BATCH_MEMBERS = 500  # the most members one POST /lists/{id} takes (A2.8)
MEMBER_FIELDS = ["members.email_address", "members.status", "members.merge_fields",
                 "members.last_changed", "total_items"]  # a list: the SDK comma-joins it (A1.13)
NAME_FIELDS = frozenset({"FNAME", "LNAME"})
# since_last_changed is strict and whole-second (sandbox assumption 2), and a member saved
# while we page can carry an older last_changed than one already seen: re-read a margin.
CHANGES_OVERLAP = timedelta(minutes=2)
MEMBER = "/lists/{list_id}/members/{subscriber_hash}"
ROUTES: Mapping[str, tuple[str, str]] = {  # SDK method -> HTTP method, path template (for logs)
    "get": ("GET", "/ping"),
    "get_list": ("GET", "/lists/{list_id}"),
    "get_list_members_info": ("GET", "/lists/{list_id}/members"),
    "batch_list_members": ("POST", "/lists/{list_id}"),
    "set_list_member": ("PUT", MEMBER),
    "update_list_member": ("PATCH", MEMBER),
    "delete_list_member_permanent": ("POST", MEMBER + "/actions/delete-permanent"),
}
KINDS = frozenset({"subscribe", "unsubscribe", "update_names", "clear_extra_fields",
                   "move_email", "erase"})
# Sent through the batch endpoint when a wave holds two or more of them (module docstring).
BATCH_KINDS = frozenset({"subscribe", "unsubscribe"})
# An erased address already satisfies these (reference assumption 5).
FORGOTTEN_SATISFIES = frozenset({"unsubscribe", "update_names", "clear_extra_fields", "erase"})


class MailchimpConnector:
    """One Mailchimp audience (list), through the official SDK.

    Args:
        settings: the ``[mailchimp]`` section.
        retry: the in-call retry policy (default :class:`RetryPolicy`).
        sleep: how retries wait; tests pass a no-op.

    Raises:
        ConfigError: the API key is not set.
    """

    name = "mailchimp"

    def __init__(
        self,
        settings: MailchimpSettings,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if settings.api_key is None:
            raise ConfigError("mailchimp.api_key is not set")
        self._list_id, self._workers = settings.list_id, settings.max_connections
        self._retry, self._sleep = retry or RetryPolicy(), sleep
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._list_found: bool | None = None
        client = mailchimp_marketing.Client()
        # The SDK replaces every "server" in host + path by config["server"] (A1.4): "server"
        # makes that a no-op, so api_root is used verbatim, whatever its host is called.
        client.set_config({"api_key": settings.api_key.get_secret_value(), "server": "server",
                           "timeout": settings.timeout_seconds})
        client.api_client.host = settings.api_root  # survives set_config (A1.5)
        self._lists, self._ping = client.lists, client.ping

    def check(self) -> CheckResult:
        """Ping, then read the audience; not retried, never raises."""
        try:
            self._call(self._ping.get, retried=False)
            found = self._call(self._lists.get_list, self._list_id,
                               fields=["id", "stats.member_count"], retried=False)
        except ConnectorError as error:
            if error.status in (401, 403):
                return CheckResult(False, f"credentials refused ({error.status})")
            if error.status == 404:
                return CheckResult(False, "list not found (404)")
            if not error.permanent:
                return CheckResult(False, "unreachable")
            return CheckResult(False, f"refused ({error.status} {error.title})")
        stats = found.get("stats") if isinstance(found, dict) else None
        members = stats.get("member_count") if isinstance(stats, dict) else None
        return CheckResult(True, "credentials accepted", {"members": str(members)})

    def scan(self) -> Iterator[MemberRecord]:
        """Every member (archived ones aside), 1000 per page.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: credentials or list refused, or a page that is not a collection.
        """
        yield from self._pages({})

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

        Actions on one address run in the order given; the rest run concurrently (up to
        ``max_connections``), two or more subscribes or unsubscribes as one batch call per 500.
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
        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            for wave in _waves([actions[i] for i in todo]):
                indexes = [todo[w] for w in wave]
                many = [i for i in indexes if actions[i].kind in BATCH_KINDS]
                jobs = [[i] for i in indexes
                        if actions[i].kind not in BATCH_KINDS or len(many) == 1]
                if len(many) > 1:
                    jobs += [many[n:n + BATCH_MEMBERS] for n in range(0, len(many), BATCH_MEMBERS)]
                for job, done in zip(jobs, pool.map(lambda job: self._run(actions, job), jobs)):
                    outcomes.update(zip(job, done))
        result = [outcomes[i] for i in range(len(actions))]
        log.info("mailchimp_applied", processor=self.name, **Counter(o.status for o in result))
        return result

    def _run(self, actions: Sequence[Action], job: list[int]) -> list[Outcome]:
        """One job of a wave: a batch chunk, or a single action (a chunk of one is a PUT)."""
        if len(job) > 1:
            return self._batch([actions[i] for i in job])
        return [self._one(actions[job[0]])]

    def _one(self, action: Action) -> Outcome:
        """One member call; a refusal becomes the outcome."""
        email, kind = cast(str, action.email).strip(), action.kind
        names = {"FNAME": action.first_name, "LNAME": action.last_name}
        patch = self._lists.update_list_member
        bodies: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
            # Never "pending": that sends a confirmation email (R2).
            "subscribe": (self._lists.set_list_member, {
                "email_address": email, "status_if_new": "subscribed", "status": "subscribed",
                "merge_fields": names}),
            # A PATCH, not an upsert: an absent address is not added. Never archive (DELETE):
            # that may lose the compliance state (reference assumption 6).
            "unsubscribe": (patch, {"status": "unsubscribed"}),
            "update_names": (patch, {"merge_fields": names}),
            "clear_extra_fields": (patch, {"merge_fields": dict.fromkeys(action.fields, "")}),
            "move_email": (patch, {"email_address": (action.new_email or "").strip()}),
        }
        target = (self._list_id, _hash(email))
        try:
            if kind == "erase":
                result = self._call(self._lists.delete_list_member_permanent, *target)
            else:
                # A replayed move would 404 at the old hash: replay only what never left.
                fn, body = bodies[kind]
                result = self._call(fn, *target, body, skip_merge_validation="true",
                                    idempotent=kind != "move_email")
        except ConnectorError as error:
            return self._refused(action, error)
        response = result if isinstance(result, requests.Response) else None
        return Outcome(action, "done", request_id=response and response.headers.get("X-Request-Id"))

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
        return [_batch_outcome(a, errors.get(e.lower())) for a, e in zip(actions, emails)]

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

    def _pages(self, query: Mapping[str, str]) -> Iterator[MemberRecord]:
        """Members at offsets of 1000 until a short or empty page.

        Raises:
            RetriableError: a page could not be read after the in-call retries.
            PermanentError: refused, or a page that is not a member collection.
        """
        offset = 0
        while True:
            page = self._call(self._lists.get_list_members_info, self._list_id,
                              fields=MEMBER_FIELDS, count=PAGE_COUNT, offset=offset, **query)
            rows = page.get("members") if isinstance(page, dict) else None
            if not isinstance(rows, list):
                raise PermanentError("GET /lists/{list_id}/members: not a member collection",
                                     title="bad_response", reached_server=True)
            total = page.get("total_items") if isinstance(page.get("total_items"), int) else 0
            log.info("mailchimp_page", path=ROUTES["get_list_members_info"][1],
                     offset=offset, rows=len(rows), total=total)
            yield from (_record(row) for row in rows if isinstance(row, dict))
            offset += len(rows)
            if len(rows) < PAGE_COUNT or offset >= total:
                return

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
            with self._slots:
                try:
                    result: Any = fn(*args, **kwargs)
                except ApiClientError as error:
                    result = error  # classified outside the except: no chained body or detail
            return self._classify(f"{method} {template}", result)

        if not retried:
            return once()
        return self._retry.retrying(idempotent=idempotent, sleep=self._sleep)(once)

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
            status, problem = result.status_code, _problem(result.text)
            rid, retry_after = None, None
        elif isinstance(result, requests.Response) and not result.ok:
            status, problem = result.status_code, _problem(result.text)
            rid = result.headers.get("X-Request-Id")
            retry_after = _seconds(result.headers.get("Retry-After"))
        else:
            return result
        title = problem.get("title") if isinstance(problem.get("title"), str) else None
        rid = problem.get("instance") or rid or None
        log.info("mailchimp_refused", call=where, status=status, title=title, request_id=rid)
        message = f"{where}: HTTP {status}" + (f" {title}" if title else "")
        fields = {"status": status, "title": title, "request_id": rid, "reached_server": True}
        # 503 "ComplianceRelated" is "this method has been disabled", not an outage (A4.7).
        if (status == 429 or status >= 500) and title != "ComplianceRelated":
            raise RetriableError(message, retry_after_seconds=retry_after, **fields)
        raise PermanentError(message, **fields)


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


def _batch_outcome(action: Action, error: Mapping[str, Any] | None) -> Outcome:
    """One member's result in a batch; the ``error`` text names the address: never logged.

    Mapped as :meth:`MailchimpConnector._refused` maps the same titles for single calls.
    """
    if error is None:
        return Outcome(action, "done")
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
