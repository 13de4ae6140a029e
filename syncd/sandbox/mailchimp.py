"""Mailchimp Marketing API v3 emulator: one audience, its members, webhooks and batches.

A faithful local peer for end-to-end tests, the demo and benchmarks, driven through the real
``mailchimp-marketing`` SDK (``client.api_client.host = base_url + "/3.0"``). Tags refer to
``reference/mailchimp-and-google-analytics-api.md`` part A and its sources; file names refer to the
vendor corpus (``vendor-corpus/mailchimp/``), which is the evidence for shapes, titles and details.

Reference facts reproduced
--------------------------
- Errors are RFC 7807: ``application/problem+json; charset=utf-8`` with ``type``, ``title``,
  ``status``, ``detail``, ``instance``; ``instance`` equals the ``X-Request-Id`` header, and a
  ``Link: <…/ProblemDetailDocument.json>; rel="describedBy"`` header is sent (A4.4, MC-ERR;
  corpus README item 1, gr-member-get-404, gr-member-delete-404). So the SDK leaves ``e.text`` a
  raw JSON *string* (A1.9). Success bodies are ``application/json; charset=utf-8`` with a
  ``Link`` to the resource schema and an ``X-Request-Id`` (gr-member-get-200).
- 401 "API Key Invalid" with the 2016 detail (ds-api-key-invalid-401); HTTP Basic with any user
  name and the key as password (A1.3). ``Authorization: apikey <key>`` and ``Bearer <key>`` are
  accepted too (Mailchimp documents both schemes).
- 404 "Resource Not Found" / "The requested resource could not be found." for an unknown list
  (ds-list-get-404) and an unknown member (gr-member-get-404, ds-member-get-404).
- Member object fields and order, ``""`` for empty optional fields, ``+00:00`` timestamps,
  ``merge_fields`` listing every audience merge tag, ``stats``, ``location``, ``source``,
  ``tags``, ten ``_links`` (gr-member-get-200, gr-members-post-200, gr-member-put-200).
  ``id`` is the subscriber hash: md5 of the lower-cased address (A2.1; every corpus member).
- Collection envelope ``{members, list_id, total_items, _links}``; a page past the end is 200
  with ``members: []`` and an unchanged ``total_items``; a filter with no match gives
  ``total_items: 0`` (gr-members-list-*, ds-members-list-page2-offset10). ``count`` defaults to
  10, max 1000 (A2.7). ``fields``/``exclude_fields`` are dotted paths relative to the response
  root: ``members._links,_links`` strips both (ds-members-list-page2-offset10) while
  ``exclude_fields=email_address`` strips nothing from members (gr-members-list-page1-of-3).
- PUT = upsert (``status_if_new`` for new, ``status`` for existing); a PUT on an existing member
  needs no ``email_address`` (gr-member-put-200-unsubscribed). PATCH updates an existing member.
  PUT ``status: unsubscribed`` sets ``unsubscribe_reason: "N/A (Unsubscribed by admin)"``
  (gr-member-put-200-unsubscribed). Unknown merge tags in a write are dropped (gr-member-put-200:
  the ``email_address`` "merge field" is not echoed).
- POST on an existing member: 400 "Member Exists" "<email> is already a list member. Use PUT to
  insert or update list members." (ds-members-post-400); an email change colliding with another
  member gives the same (gr-member-put-400-member-exists). Bad address: 400 "Invalid Resource"
  "Please provide a valid email address." (gr-member-put-400-valid-email).
- DELETE = archive, 204 with an empty body; the member then reads 200 ``status: archived``
  (gr-member-delete-204, gr-member-get-200-archived; A2.4). DELETE of a member that is absent
  is 404 (gr-member-delete-404); of one that is archived, cleaned or pending it is **405**
  "Method Not Allowed" "This list member cannot be removed. Can not archive a contact that is
  bounced, pending or archived" with ``Allow: GET, PUT`` (gr-member-delete-405; corpus README
  item 4 "a repeat DELETE on an archived member returns 405, not 404").
- ``POST …/actions/delete-permanent`` is 204; the member then 404s and every API re-add is
  400 "Forgotten Email Not Subscribed" "<email> was permanently deleted and cannot be
  re-imported. The contact must re-subscribe to get back on the list." (A2.5, A4.6). Only a
  hosted signup form (:meth:`MailchimpEmulator.signup`) brings the address back.
- 400 "Member In Compliance State" "<email> is in a compliance state due to unsubscribe,
  bounce, or compliance review and cannot be subscribed." when ``subscribed`` is requested for
  an unsubscribed or cleaned member (A4.5, logged-member-in-compliance-state-400). ``pending``
  is allowed and "sends a confirmation email": counted in ``confirmation_emails_sent``.
- Batch subscribe ``POST /lists/{id}``: ≤ 500 members, always 200, with ``new_members``,
  ``updated_members``, ``errors[{email_address, error, error_code, field, field_message}]``,
  ``total_created``, ``total_updated``, ``error_count`` (A2.8; OpenAPI
  ``BatchUpdateListMembers``; ``error_code`` ∈ ERROR_CONTACT_EXISTS, ERROR_GENERIC).
- ``POST /batches`` (A2.9, MC-BATCH; OpenAPI ``Batch``): answers ``pending`` at once, runs the
  operations in a background thread through the same routes, then reports ``finished`` with
  ``total_operations``, ``finished_operations``, ``errored_operations``, ``submitted_at``,
  ``completed_at`` and ``response_body_url``: a gzipped tar archive of JSON files, each a JSON
  array of ``{status_code, operation_id, response}`` with ``response`` a JSON *string*.
- Webhooks (A3.1–A3.7): events ``subscribe, unsubscribe, profile, cleaned, upemail, campaign``
  and sources ``user, admin, api``; creation first sends the validator's HTTP GET (UA
  ``MailChimp.com WebHook Validator``); deliveries are form-encoded POSTs (UA ``MailChimp.com``)
  with ``type``, ``fired_at`` (``YYYY-MM-DD HH:MM:SS``, UTC, no zone) and bracketed ``data[...]``
  keys as in webhook-unsubscribe-captured (``data[id]`` is the 10-hex ``unique_email_id``,
  ``data[web_id]``, ``data[merges][EMAIL]`` first); an archive arrives as ``unsubscribe`` with
  ``data[action]=delete`` (corpus README item 9). A delivery taking over 10 s is cancelled and
  retried at growing intervals (A3.6). API-caused events carry source ``api`` (A3.7).
- Connection cap: more than ``max_connections`` simultaneous requests get 429 "TooManyRequests"
  "You have exceeded the limit of 10 simultaneous connections." (A4.1, A4.2, MC-GLOSS); no
  ``Retry-After`` (reference "could not be confirmed" 2).

Assumptions (points the reference or corpus could not confirm)
---------------------------------------------------------------
1. Archived members are left out of ``GET …/members`` unless ``status=archived`` is asked for
   (reference "could not be confirmed" 8 says ``archived`` is an accepted filter value).
2. ``since_last_changed`` / ``before_last_changed`` are strict (``>`` / ``<``) and compare at
   whole seconds, the precision Mailchimp shows. A strict peer is the conservative choice: a
   client that needs an overlap window must build one. The default order is creation order;
   ``sort_field``/``sort_dir`` are honoured.
3. A forgotten address is refused on *every* API add or upsert whatever the status, including
   ``unsubscribed`` (reference assumption 5); PATCH with a ``status`` on a forgotten hash is the
   same 400, PATCH without one is 404. delete-permanent of an absent member is 404 (assumption 4).
   The detail names the address; a request that only carries the hash (the address was erased)
   is named by the hash.
4. An archived member that was unsubscribed or cleaned stays in the compliance state (assumption
   6). PUT on an archived member without ``status`` uses ``status_if_new``. POST on an archived
   member re-adds it.
5. Changing ``email_address`` moves the member to md5(new address): ``id`` changes (it *is* the
   hash), ``unique_email_id``, ``contact_id`` and ``web_id`` stay. The ``upemail`` webhook's
   ``data[new_id]`` is therefore the unchanged ``unique_email_id``.
6. ``last_changed`` moves only when a write changes something; a no-op PUT leaves it alone.
7. Events: an API write that makes a member ``subscribed`` fires ``subscribe``;
   ``unsubscribed`` fires ``unsubscribe`` (action ``unsub``, reason ``manual``); ``cleaned``
   fires ``cleaned`` (reason ``hard``); archive and delete-permanent fire ``unsubscribe``
   (action ``delete``); a merge-field change alone fires ``profile``; an email change fires
   ``upemail``. New members added as anything but ``subscribed`` fire nothing.
8. People actions: ``click_unsubscribe`` and ``spam_complaint`` both end ``unsubscribed`` with
   webhook reasons ``manual`` and ``abuse`` (A3.3 lists ``abuse`` for unsubscribe); their
   ``unsubscribe_reason`` texts are invented. ``hard_bounce`` ends ``cleaned`` (reason
   ``hard``) with source ``admin`` by default, since a bounce is neither subscriber nor API.
   Every action takes a ``source=`` override.
9. New webhooks default to every event on and sources ``user``/``admin`` on, ``api`` off (the
   old v2 defaults); given ``events``/``sources`` are merged over those defaults.
10. Webhook retries use a compressed timescale, :data:`WEBHOOK_RETRY_DELAYS_SECONDS` (about
    15 s in all, against Mailchimp's ~75 minutes); any 2xx is success. Webhooks are never
    disabled for failing.
11. The real ``response_body_url`` is a pre-signed URL of a gzipped tar of JSON files; here it is
    ``/3.0/_batch_results/{id}.tar.gz`` on the sandbox (``application/gzip``), served without
    authentication like a pre-signed URL and outside the connection cap (it is not the API).
    The archive holds ``{id}/{n}.json`` files of at most :data:`BATCH_RESULTS_PER_FILE` results
    each, in operation order; how the real archive splits and names its files is not documented,
    so a client must read every file. At most :data:`BATCHES_KEPT` batches are kept.
    Operations run inside the emulator, as they run inside Mailchimp: they pass neither the
    injected faults of the control API (``latency_ms`` and the error rates model the client's
    network link, so the batch's own calls pay them, its operations do not) nor the connection
    cap, and they are not counted as requests.
12. 204s carry no Content-Type (the recordings show ``application/json``; the SDK returns the
    ``requests.Response`` either way, A1.11). An injected 503 is "Service Unavailable" (the
    glossary's 503 "ComplianceRelated" is a permanent refusal, not an outage). A missing key is
    401 "API Key Missing" (glossary APIKeyMissing); a wrong key "API Key Invalid".
13. ``ip_opt`` for API writes is the caller, recorded as ``127.0.0.1``. The "looks fake"
    refusal (gr-members-post-400-looks-fake) is not emulated: seeds use example.com addresses.
    ``contact_id`` in the path is not accepted (hash or address only).
14. The connection cap compares the number of Mailchimp requests in flight when a request
    arrives (the server's count, itself included) with ``max_connections``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import heapq
import io
import itertools
import json
import logging
import queue
import re
import secrets
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from syncd.sandbox.http import (
    Handler,
    Request,
    Response,
    Router,
    empty_response,
    json_response,
)

log = logging.getLogger(__name__)

VENDOR = "mailchimp"
API_PREFIX = "/3.0"
BATCH_RESULTS_PREFIX = f"{API_PREFIX}/_batch_results/"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
PROBLEM_CONTENT_TYPE = "application/problem+json; charset=utf-8"
ERROR_TYPE_URL = "https://mailchimp.com/developer/marketing/docs/errors/"
SCHEMA_BASE_URL = "https://us6.api.mailchimp.com/schema/3.0"
HEALTH_STATUS = "Everything's Chimpy!"

DEFAULT_PAGE_COUNT = 10
MAX_PAGE_COUNT = 1000
MAX_BATCH_MEMBERS = 500
DEFAULT_MAX_CONNECTIONS = 10
VIEW_CACHE_MAX_ENTRIES = 8
BATCHES_KEPT = 50
BATCH_RESULTS_PER_FILE = 100  # results per JSON file of the archive (assumption 11)
BATCH_RESULTS_CONTENT_TYPE = "application/gzip"
WEB_ID_BASE = 400_000_000
DEFAULT_MERGE_TAGS = ("FNAME", "LNAME", "ADDRESS", "PHONE")
API_CALLER_IP = "127.0.0.1"

WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_VALIDATOR_TIMEOUT_SECONDS = 10.0
WEBHOOK_RETRY_DELAYS_SECONDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
WEBHOOK_LOG_MAX_ENTRIES = 10_000
WEBHOOK_USER_AGENT = "MailChimp.com"
WEBHOOK_VALIDATOR_USER_AGENT = "MailChimp.com WebHook Validator"
WEBHOOK_EVENTS = ("subscribe", "unsubscribe", "profile", "cleaned", "upemail", "campaign")
WEBHOOK_SOURCES = ("user", "admin", "api")
DEFAULT_WEBHOOK_SOURCES = {"user": True, "admin": True, "api": False}

WRITE_STATUSES = frozenset({"subscribed", "unsubscribed", "cleaned", "pending", "transactional"})
FILTER_STATUSES = WRITE_STATUSES | {"archived"}
COMPLIANCE_STATUSES = frozenset({"unsubscribed", "cleaned"})
NOT_ARCHIVABLE_STATUSES = frozenset({"cleaned", "pending", "archived"})
SORT_FIELDS = {"timestamp_opt": "timestamp_opt", "timestamp_signup": "timestamp_signup",
               "last_changed": "last_changed"}

UNSUBSCRIBE_REASON_ADMIN = "N/A (Unsubscribed by admin)"
UNSUBSCRIBE_REASON_USER = "N/A (Unsubscribed by subscriber)"
UNSUBSCRIBE_REASON_ABUSE = "N/A (Abuse report)"

DETAIL_NOT_FOUND = "The requested resource could not be found."
DETAIL_KEY_INVALID = (
    "Your API key may be invalid, or you've attempted to access the wrong datacenter."
)
DETAIL_KEY_MISSING = "Your request did not include an API key."
DETAIL_VALIDATION = (
    "The resource submitted could not be validated. "
    "For field-specific details, see the 'errors' array."
)
DETAIL_BAD_EMAIL = "Please provide a valid email address."
DETAIL_CANNOT_ARCHIVE = (
    "This list member cannot be removed. "
    "Can not archive a contact that is bounced, pending or archived"
)
DETAIL_JSON = "We encountered an unspecified JSON parsing error."

_FAULTS: dict[int, tuple[str, str]] = {
    400: ("Bad Request", "The request could not be processed."),
    401: ("API Key Invalid", DETAIL_KEY_INVALID),
    403: ("Forbidden", "You don't have permission to access this resource."),
    404: ("Resource Not Found", DETAIL_NOT_FOUND),
    405: ("Method Not Allowed", "The requested method and resource are not compatible. "
          "See the Allow header for this resource's available methods."),
    429: ("TooManyRequests", "You have exceeded the limit of {max} simultaneous connections."),
    500: ("Internal Server Error", "An unexpected internal error has occurred. "
          "Please contact Support for more information."),
    502: ("Bad Gateway", "The server received an invalid response. Please try again later."),
    503: ("Service Unavailable", "The service is temporarily unavailable. Please try again later."),
    504: ("Gateway Timeout", "The server did not answer in time. Please try again later."),
}

_EMAIL_RE = re.compile(
    r"^[^@\s\"(),:;<>\[\\\]]+"  # local part
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"  # dotted domain
)

Clock = Callable[[], datetime | float]


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: md5 hex of the lower-cased address (A2.1)."""
    return hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()  # noqa: S324


def _iso(ts: int | None) -> str:
    """Epoch seconds as Mailchimp writes them (``2021-11-23T22:51:56+00:00``), or ``""``."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))


def _results_archive(batch_id: str, results: Sequence[Mapping[str, Any]], mtime: int) -> bytes:
    """A batch's results as Mailchimp ships them: a gzipped tar of JSON-array files.

    Args:
        batch_id: names the archive's directory.
        results: ``{status_code, operation_id, response}`` entries, in operation order.
        mtime: the files' modification time (the batch's completion), so the bytes are stable.

    Returns:
        The ``.tar.gz`` bytes: ``{batch_id}/{n}.json``, :data:`BATCH_RESULTS_PER_FILE` each.
    """
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=mtime) as packed, \
            tarfile.open(fileobj=packed, mode="w") as tar:
        for n, start in enumerate(range(0, len(results), BATCH_RESULTS_PER_FILE)):
            data = json.dumps(list(results[start:start + BATCH_RESULTS_PER_FILE]),
                              separators=(",", ":")).encode()
            info = tarfile.TarInfo(f"{batch_id}/{n}.json")
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parse_time(value: str | datetime | float) -> float:
    """An ISO 8601 string (``Z`` or an offset; naive means UTC), a datetime or epoch → epoch.

    Raises:
        ValueError: an unparseable string.
    """
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        # An unencoded "+00:00" in a query string arrives as " 00:00".
        if "T" in text and text.count(" ") == 1:
            text = text.replace(" ", "+")
        value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


class _Problem(Exception):
    """A Mailchimp error answer, raised inside handlers and rendered by the route wrapper."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        error_code: str = "ERROR_GENERIC",
    ) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.error_code = error_code


def _not_found() -> _Problem:
    return _Problem(404, "Resource Not Found", DETAIL_NOT_FOUND)


def _invalid(field_name: str, message: str) -> _Problem:
    return _Problem(400, "Invalid Resource", DETAIL_VALIDATION,
                    errors=[{"field": field_name, "message": message}])


def _forgotten(email: str) -> _Problem:
    return _Problem(400, "Forgotten Email Not Subscribed",
                    f"{email} was permanently deleted and cannot be re-imported. "
                    "The contact must re-subscribe to get back on the list.")


def _compliance(email: str) -> _Problem:
    return _Problem(400, "Member In Compliance State",
                    f"{email} is in a compliance state due to unsubscribe, bounce, or compliance "
                    "review and cannot be subscribed.")


def _member_exists(email: str) -> _Problem:
    return _Problem(400, "Member Exists",
                    f"{email} is already a list member. Use PUT to insert or update list members.",
                    error_code="ERROR_CONTACT_EXISTS")


class _Member:
    """One audience member, kept lean: ids derive from ``seq``, times are epoch seconds."""

    __slots__ = (
        "hash", "email", "seq", "email_type", "status", "archived_from", "unsubscribe_reason",
        "merges", "ip_signup", "timestamp_signup", "ip_opt", "timestamp_opt", "last_changed",
        "language", "vip", "source", "tags", "member_rating",
    )

    def __init__(self, email: str, seq: int, status: str, now: int, source: str) -> None:
        self.hash = subscriber_hash(email)
        self.email = email.strip()
        self.seq = seq
        self.email_type = "html"
        self.status = status
        self.archived_from = ""
        self.unsubscribe_reason = ""
        self.merges: dict[str, Any] | None = None
        self.ip_signup = ""
        self.timestamp_signup: int | None = None
        self.ip_opt = ""
        self.timestamp_opt: int | None = None
        self.last_changed = now
        self.language = ""
        self.vip = False
        self.source = source
        self.tags: list[dict[str, Any]] | None = None
        self.member_rating = 2


@dataclass
class _Batch:
    """One ``POST /batches`` job and its results."""

    id: str
    operations: list[dict[str, Any]]
    authorization: str
    host: str
    submitted_at: int
    status: str = "pending"
    finished: int = 0
    errored: int = 0
    completed_at: int | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


@dataclass(order=True)
class _Delivery:
    """One webhook POST waiting for its next attempt."""

    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    type: str = field(compare=False)
    source: str = field(compare=False)
    attempt: int = field(compare=False, default=1)


class _WebhookSender:
    """Delivers webhook POSTs from one background thread, retrying failures on a schedule."""

    def __init__(self, retry_delays_seconds: Sequence[float]) -> None:
        self._delays = tuple(retry_delays_seconds)
        self._cond = threading.Condition()
        self._heap: list[_Delivery] = []
        self._busy = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.log: deque[dict[str, Any]] = deque(maxlen=WEBHOOK_LOG_MAX_ENTRIES)

    def submit(self, url: str, form: Sequence[tuple[str, str]], event_type: str,
               source: str) -> None:
        """Queue one delivery for now."""
        body = urlencode(list(form)).encode("ascii")
        with self._cond:
            heapq.heappush(self._heap, _Delivery(time.monotonic(), next(self._seq), url, body,
                                                 event_type, source))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mailchimp-webhooks",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        """Deliveries queued or in progress (retries included)."""
        with self._cond:
            return len(self._heap) + self._busy

    def drain(self, timeout_seconds: float) -> bool:
        """Wait until nothing is queued or in progress; False on timeout."""
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def clear(self) -> None:
        """Drop every queued delivery and the log."""
        with self._cond:
            self._heap.clear()
            self.log.clear()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the delivery thread (queued deliveries are dropped)."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap and self._heap[0].due <= time.monotonic():
                        break
                    wait = self._heap[0].due - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._closed:
                    return
                job = heapq.heappop(self._heap)
                self._busy += 1
            status = self._post(job)
            ok = status is not None and 200 <= status < 300
            with self._cond:
                self._busy -= 1
                self.log.append({"url": job.url, "type": job.type, "source": job.source,
                                 "attempt": job.attempt, "status": status, "ok": ok})
                if not ok and job.attempt <= len(self._delays) and not self._closed:
                    job.due = time.monotonic() + self._delays[job.attempt - 1]
                    job.attempt += 1
                    heapq.heappush(self._heap, job)
                self._cond.notify_all()

    @staticmethod
    def _post(job: _Delivery) -> int | None:
        request = urllib.request.Request(
            job.url, data=job.body, method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "User-Agent": WEBHOOK_USER_AGENT})
        try:
            # The URL is a configured webhook (http/https checked at creation).
            with urllib.request.urlopen(  # noqa: S310
                    request, timeout=WEBHOOK_TIMEOUT_SECONDS) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except (OSError, ValueError):
            return None


def _path_tree(raw: Iterable[str]) -> dict[str, Any] | None:
    """Dotted paths as a tree.

    ``["members.email_address", "total_items"]`` → ``{"members": {"email_address": True},
    "total_items": True}``.
    """
    tree: dict[str, Any] = {}
    seen = False
    for chunk in raw:
        for path in chunk.split(","):
            parts = [p for p in path.strip().split(".") if p]
            if not parts:
                continue
            seen = True
            node = tree
            for i, part in enumerate(parts):
                if i == len(parts) - 1:
                    node[part] = True
                    break
                child = node.get(part)
                if child is True:
                    break
                node = node.setdefault(part, {})
    return tree if seen else None


def _include(value: Any, tree: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_include(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: (v if tree[k] is True else _include(v, tree[k]))
            for k, v in value.items() if k in tree}


def _exclude(value: Any, tree: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_exclude(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        sub = tree.get(k)
        if sub is True:
            continue
        out[k] = v if sub is None else _exclude(v, sub)
    return out


def _project(payload: dict[str, Any], include: dict[str, Any] | None,
             exclude: dict[str, Any] | None) -> dict[str, Any]:
    """Mailchimp's ``fields`` then ``exclude_fields``; unknown paths are ignored."""
    if include is not None:
        payload = _include(payload, include)
    if exclude is not None:
        payload = _exclude(payload, exclude)
    return payload


def _wanted(include: dict[str, Any] | None, exclude: dict[str, Any] | None,
            key: str) -> tuple[bool, bool]:
    """Whether a root key (e.g. ``members``) is wanted at all, and whether its ``_links`` are."""
    inc = include.get(key) if include is not None else True
    if inc is None:
        return False, False
    exc = exclude.get(key) if exclude is not None else None
    if exc is True:
        return False, False
    links_excluded = isinstance(exc, dict) and exc.get("_links") is True
    links = (inc is True or "_links" in inc) and not links_excluded
    return True, links


class MailchimpEmulator:
    """One Mailchimp audience behind the Marketing API v3, plus people actions and seeding.

    Thread-safe: one re-entrant lock guards the state. Outbound HTTP (the webhook validator's
    GET, deliveries) never runs under it.

    Attributes:
        vendor: ``"mailchimp"``, the server's tag for counting and faults.
        api_key: the only key accepted (as the Basic-auth password).
        list_id: the audience id; any other list id is 404.
        max_connections: simultaneous requests allowed before 429.
        confirmation_emails_sent: how many times a write set someone ``pending``.
    """

    vendor = VENDOR

    def __init__(
        self,
        api_key: str,
        list_id: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Clock | None = None,
        list_name: str = "Sandbox Salon",
        webhook_retry_delays_seconds: Sequence[float] = WEBHOOK_RETRY_DELAYS_SECONDS,
    ) -> None:
        """Create an empty audience.

        Args:
            api_key: the key clients must present.
            list_id: the audience id.
            max_connections: simultaneous requests admitted; more get 429.
            clock: returns "now" as an aware datetime or epoch seconds; default the wall clock.
            list_name: the audience name in ``GET /lists/{id}``.
            webhook_retry_delays_seconds: waits between delivery attempts.
        """
        self.api_key = api_key
        self.list_id = list_id
        self.list_name = list_name
        self.max_connections = max_connections
        self._clock: Clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.RLock()
        self._router: Router | None = None
        self._sender = _WebhookSender(webhook_retry_delays_seconds)
        self._batch_queue: queue.Queue[_Batch | None] = queue.Queue()
        self._batch_thread: threading.Thread | None = None
        self._created_at = self._now()
        self._init_state()

    def _init_state(self) -> None:
        self._members: dict[str, _Member] = {}
        self._forgotten: set[str] = set()
        self._status_counts: Counter[str] = Counter()
        self._merge_tags: list[str] = list(DEFAULT_MERGE_TAGS)
        self._seq = itertools.count(1)
        self._version = 0
        self._order_dirty = False
        self._views: OrderedDict[tuple[Any, ...], tuple[int, list[_Member]]] = OrderedDict()
        self._webhooks: dict[str, dict[str, Any]] = {}
        self._batches: OrderedDict[str, _Batch] = OrderedDict()
        self.confirmation_emails_sent = 0

    # ------------------------------------------------------------------ server protocol

    def register(self, router: Router) -> None:
        """Add the ``/3.0`` routes to the sandbox router."""
        self._router = router
        p = API_PREFIX
        routes: list[tuple[str, str, Handler, bool]] = [
            # The API root; its template prefix "/3.0/" also makes every unknown /3.0 path
            # Mailchimp's (a problem+json 404/405) in Router.vendor_of.
            ("GET", f"{p}/", self._root, True),
            ("GET", f"{p}/ping", self._ping, True),
            ("GET", f"{p}/lists", self._get_lists, True),
            ("GET", f"{p}/lists/{{list_id}}", self._get_list, True),
            ("POST", f"{p}/lists/{{list_id}}", self._batch_members, True),
            ("GET", f"{p}/lists/{{list_id}}/members", self._get_members, True),
            ("POST", f"{p}/lists/{{list_id}}/members", self._post_member, True),
            ("GET", f"{p}/lists/{{list_id}}/members/{{subscriber_hash}}", self._get_member, True),
            ("PUT", f"{p}/lists/{{list_id}}/members/{{subscriber_hash}}", self._put_member, True),
            ("PATCH", f"{p}/lists/{{list_id}}/members/{{subscriber_hash}}", self._patch_member,
             True),
            ("DELETE", f"{p}/lists/{{list_id}}/members/{{subscriber_hash}}", self._archive_member,
             True),
            ("POST", f"{p}/lists/{{list_id}}/members/{{subscriber_hash}}/actions/delete-permanent",
             self._delete_permanent, True),
            ("GET", f"{p}/lists/{{list_id}}/webhooks", self._get_webhooks, True),
            ("POST", f"{p}/lists/{{list_id}}/webhooks", self._post_webhook, True),
            ("GET", f"{p}/lists/{{list_id}}/webhooks/{{webhook_id}}", self._get_webhook, True),
            ("PATCH", f"{p}/lists/{{list_id}}/webhooks/{{webhook_id}}", self._patch_webhook, True),
            ("DELETE", f"{p}/lists/{{list_id}}/webhooks/{{webhook_id}}", self._delete_webhook,
             True),
            ("GET", f"{p}/batches", self._get_batches, True),
            ("POST", f"{p}/batches", self._post_batch, True),
            ("GET", f"{p}/batches/{{batch_id}}", self._get_batch, True),
            ("DELETE", f"{p}/batches/{{batch_id}}", self._delete_batch, True),
            # Stands in for the pre-signed S3 URL: no authentication.
            ("GET", f"{BATCH_RESULTS_PREFIX}{{batch_id}}.tar.gz", self._batch_results, False),
        ]
        for method, template, handler, auth in routes:
            router.add(VENDOR, method, template, self._wrap(handler, auth))

    def gate(self, request: Request) -> Response | None:
        """429 once more than ``max_connections`` requests are in flight (A4.1, A4.2)."""
        if request.path.startswith(BATCH_RESULTS_PREFIX):
            return None
        # The server counts this request (at arrival) before asking, hence ">".
        if request.in_flight > self.max_connections:
            return self.fault_body(429)
        return None

    def fault_body(self, status: int) -> Response:
        """Mailchimp's problem+json for ``status`` (used for injected faults and unknown paths)."""
        title, detail = _FAULTS.get(status, ("Error", "An unexpected error occurred."))
        problem = _Problem(status, title, detail.format(max=self.max_connections))
        return self._problem_response(problem, str(uuid.uuid4()))

    # ------------------------------------------------------------------ plumbing

    def _wrap(self, handler: Handler, auth: bool) -> Handler:
        def wrapped(request: Request) -> Response:
            rid = str(uuid.uuid4())
            try:
                if auth:
                    self._authenticate(request)
                response = handler(request)
            except _Problem as problem:
                response = self._problem_response(problem, rid)
            except Exception:  # a bug here must still answer like Mailchimp, not drop the socket
                log.exception("mailchimp_emulator_failed")
                response = self._problem_response(_Problem(500, *_FAULTS[500]), rid)
            response.headers.setdefault("X-Request-Id", rid)
            return response

        return wrapped

    @staticmethod
    def _problem_response(problem: _Problem, rid: str) -> Response:
        payload: dict[str, Any] = {"type": ERROR_TYPE_URL, "title": problem.title,
                                   "status": problem.status, "detail": problem.detail,
                                   "instance": rid}
        if problem.errors:
            payload["errors"] = problem.errors
        response = json_response(problem.status, payload, PROBLEM_CONTENT_TYPE)
        response.headers.update({
            "X-Request-Id": rid,
            "Link": (f"<{SCHEMA_BASE_URL}/Definitions/ProblemDetailDocument.json>; "
                     'rel="describedBy"'),
            **problem.headers,
        })
        return response

    @staticmethod
    def _ok(payload: Any, schema: str) -> Response:
        response = json_response(200, payload, JSON_CONTENT_TYPE)
        response.headers["Link"] = f'<{SCHEMA_BASE_URL}/{schema}>; rel="describedBy"'
        return response

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization", "").strip()
        if not header:
            raise _Problem(401, "API Key Missing", DETAIL_KEY_MISSING)
        scheme, _, credential = header.partition(" ")
        key: str | None = None
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential.strip(), validate=True).decode("utf-8")
                key = decoded.partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                key = None
        elif scheme.lower() in ("apikey", "bearer"):
            key = credential.strip()
        expected = self.api_key.encode("utf-8")
        if key is None or not secrets.compare_digest(key.encode("utf-8"), expected):
            raise _Problem(401, "API Key Invalid", DETAIL_KEY_INVALID)

    def _check_list(self, request: Request) -> None:
        if request.params.get("list_id") != self.list_id:
            raise _not_found()

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        try:
            body = request.json()
        except (ValueError, UnicodeDecodeError) as err:
            raise _Problem(400, "JSON Parse Exception", DETAIL_JSON) from err
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise _Problem(400, "JSON Parse Exception", DETAIL_JSON)
        return body

    @staticmethod
    def _base(request: Request) -> str:
        return f"http://{request.headers.get('host', '127.0.0.1')}{API_PREFIX}"

    def _now(self) -> int:
        now = self._clock()
        return int(now.timestamp() if isinstance(now, datetime) else now)

    def _changed(self) -> None:
        self._version += 1

    @staticmethod
    def _key(segment: str) -> str:
        return subscriber_hash(segment) if "@" in segment else segment.strip().lower()

    # ------------------------------------------------------------------ rendering

    def _ueid(self, m: _Member) -> str:
        return hashlib.md5(f"{self.list_id}:ueid:{m.seq}".encode()).hexdigest()[:10]  # noqa: S324

    def _contact_id(self, m: _Member) -> str:
        return hashlib.md5(f"{self.list_id}:contact:{m.seq}".encode()).hexdigest()  # noqa: S324

    def _merge_fields(self, m: _Member) -> dict[str, Any]:
        merges = dict.fromkeys(self._merge_tags, "")
        if m.merges:
            merges.update(m.merges)
        return merges

    def _member_links(self, base: str, h: str) -> list[dict[str, str]]:
        me = f"{base}/lists/{self.list_id}/members/{h}"
        resp = f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Response.json"
        return [
            {"rel": "self", "href": me, "method": "GET", "targetSchema": resp},
            {"rel": "parent", "href": f"{base}/lists/{self.list_id}/members", "method": "GET",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/CollectionResponse.json",
             "schema": f"{SCHEMA_BASE_URL}/Paths/Lists/Members/Collection.json"},
            {"rel": "update", "href": me, "method": "PATCH", "targetSchema": resp,
             "schema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/PATCH.json"},
            {"rel": "upsert", "href": me, "method": "PUT", "targetSchema": resp,
             "schema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/PUT.json"},
            {"rel": "delete", "href": me, "method": "DELETE"},
            {"rel": "activity", "href": f"{me}/activity", "method": "GET",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Activity/Response.json"},
            {"rel": "goals", "href": f"{me}/goals", "method": "GET",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Goals/Response.json"},
            {"rel": "notes", "href": f"{me}/notes", "method": "GET",
             "targetSchema":
                 f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Notes/CollectionResponse.json"},
            {"rel": "events", "href": f"{me}/events", "method": "POST",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Events/POST.json"},
            {"rel": "delete_permanent", "href": f"{me}/actions/delete-permanent", "method": "POST"},
        ]

    def _render(self, m: _Member, base: str | None, links: bool = True) -> dict[str, Any]:
        """The member object as gr-member-get-200 shows it (``_links`` only with a base URL)."""
        merges = self._merge_fields(m)
        full_name = f"{merges.get('FNAME', '')} {merges.get('LNAME', '')}".strip()
        out: dict[str, Any] = {
            "id": m.hash,
            "email_address": m.email,
            "unique_email_id": self._ueid(m),
            "contact_id": self._contact_id(m),
            "full_name": full_name,
            "web_id": WEB_ID_BASE + m.seq,
            "email_type": m.email_type,
            "status": m.status,
        }
        if m.status == "unsubscribed":
            out["unsubscribe_reason"] = m.unsubscribe_reason
        out.update({
            "consents_to_one_to_one_messaging": True,
            "merge_fields": merges,
            "stats": {"avg_open_rate": 0, "avg_click_rate": 0},
            "ip_signup": m.ip_signup,
            "timestamp_signup": _iso(m.timestamp_signup),
            "ip_opt": m.ip_opt,
            "timestamp_opt": _iso(m.timestamp_opt),
            "member_rating": m.member_rating,
            "last_changed": _iso(m.last_changed),
            "language": m.language,
            "vip": m.vip,
            "email_client": "",
            "location": {"latitude": 0, "longitude": 0, "gmtoff": 0, "dstoff": 0,
                         "country_code": "", "timezone": "", "region": ""},
            "source": m.source,
            "tags_count": len(m.tags or ()),
            "tags": list(m.tags or ()),
            "list_id": self.list_id,
        })
        if base is not None and links:
            out["_links"] = self._member_links(base, m.hash)
        return out

    def _collection_links(self, base: str) -> list[dict[str, str]]:
        members = f"{base}/lists/{self.list_id}/members"
        return [
            {"rel": "self", "href": members, "method": "GET",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/CollectionResponse.json",
             "schema": f"{SCHEMA_BASE_URL}/Paths/Lists/Members/Collection.json"},
            {"rel": "parent", "href": f"{base}/lists/{self.list_id}", "method": "GET",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Response.json"},
            {"rel": "create", "href": members, "method": "POST",
             "targetSchema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/Response.json",
             "schema": f"{SCHEMA_BASE_URL}/Definitions/Lists/Members/POST.json"},
        ]

    # ------------------------------------------------------------------ state changes

    def _set_status(self, m: _Member, status: str, *, now: int, reason: str = "",
                    confirm: bool = True) -> None:
        """Move a member to ``status``, keeping the per-status counts and the opt-in time."""
        old = m.status
        if old == status:
            return
        self._status_counts[old] -= 1
        self._status_counts[status] += 1
        if status == "archived":
            m.archived_from = old
        m.status = status
        if status == "unsubscribed":
            m.unsubscribe_reason = reason or UNSUBSCRIBE_REASON_ADMIN
        if status == "subscribed":
            m.timestamp_opt = now
        if status == "pending" and confirm:
            self.confirmation_emails_sent += 1

    def _create(self, email: str, status: str, *, now: int, source: str,
                confirm: bool = True) -> _Member:
        m = _Member(email, next(self._seq), status, now, source)
        self._members[m.hash] = m
        self._status_counts[status] += 1
        if status == "subscribed":
            m.timestamp_opt = now
        if status == "pending" and confirm:
            self.confirmation_emails_sent += 1
        self._changed()
        return m

    def _rekey(self, m: _Member, new_email: str) -> None:
        del self._members[m.hash]
        m.email = new_email.strip()
        m.hash = subscriber_hash(new_email)
        self._members[m.hash] = m
        self._order_dirty = True

    @staticmethod
    def _in_compliance(m: _Member) -> bool:
        return m.status in COMPLIANCE_STATUSES or (
            m.status == "archived" and m.archived_from in COMPLIANCE_STATUSES)

    def _apply_merges(self, m: _Member, merges: Any, *, register: bool) -> bool:
        """Write merge values; API writes drop unknown tags, seeding registers them."""
        if not isinstance(merges, Mapping):
            return False
        changed = False
        current = dict(m.merges or {})
        for tag, value in merges.items():
            if tag not in self._merge_tags:
                if not register or not re.fullmatch(r"[A-Z0-9_]{1,10}", str(tag)):
                    continue
                self._merge_tags.append(str(tag))
            value = "" if value is None else value
            if current.get(tag, "") != value:
                changed = True
                if value == "":
                    current.pop(tag, None)
                else:
                    current[tag] = value
        m.merges = current or None
        return changed

    def _write(self, key: str, body: Mapping[str, Any], mode: str, *, source: str = "api",
               label: str | None = None) -> tuple[_Member, bool, list[tuple[str, ...]]]:
        """The shared body of POST / PUT / PATCH / batch member writes (lock held).

        Args:
            key: the subscriber hash from the path (or of the body's address for POST/batch).
            body: the member fields.
            mode: ``post``, ``put``, ``patch`` or ``batch``.
            source: the webhook source for the events caused.
            label: how to name the address in error details when only a hash is known.

        Returns:
            The member, whether it was created, and the events to fire.

        Raises:
            _Problem: any Mailchimp refusal.
        """
        now = self._now()
        email_in = body.get("email_address")
        if email_in is not None and (not isinstance(email_in, str)
                                     or not _EMAIL_RE.match(email_in.strip())):
            raise _Problem(400, "Invalid Resource", DETAIL_BAD_EMAIL)
        status_in = body.get("status")
        status_if_new = body.get("status_if_new")
        for name, value in (("status", status_in), ("status_if_new", status_if_new)):
            if value is not None and value not in WRITE_STATUSES:
                raise _invalid(name, "Schema describes enum values subscribed, unsubscribed, "
                                     "cleaned, pending, transactional.")
        name = email_in or label or key
        m = self._members.get(key)
        events: list[tuple[str, ...]] = []
        if m is None:
            if mode == "patch":
                if key in self._forgotten and status_in is not None:
                    raise _forgotten(name)
                raise _not_found()
            if not email_in:
                raise _invalid("email_address", "This value should not be blank.")
            new_key = subscriber_hash(email_in)
            if new_key != key and new_key in self._members:
                raise _member_exists(email_in)
            if new_key in self._forgotten:
                raise _forgotten(email_in.strip())
            status = (status_if_new or status_in) if mode == "put" else status_in
            if status is None:
                raise _invalid("status_if_new" if mode == "put" else "status",
                               "This value should not be blank.")
            m = self._create(email_in, status, now=now, source="API - Generic")
            m.ip_opt = API_CALLER_IP
            self._apply_merges(m, body.get("merge_fields"), register=False)
            self._apply_profile(m, body)
            if status == "subscribed":
                events.append(("subscribe", m.hash))
            return m, True, events

        if mode == "post" and m.status != "archived":
            raise _member_exists(m.email)
        status = status_in
        if m.status == "archived" and status is None and mode in ("put", "batch"):
            status = status_if_new
        if status == "subscribed" and m.status != "subscribed" and self._in_compliance(m):
            raise _compliance(m.email)
        changed = False
        old_email = m.email
        if email_in and subscriber_hash(email_in) != m.hash:
            new_key = subscriber_hash(email_in)
            if new_key in self._members:
                raise _member_exists(email_in.strip())
            if new_key in self._forgotten:
                raise _forgotten(email_in.strip())
            self._rekey(m, email_in)
            events.append(("upemail", m.hash, old_email))
            changed = True
        elif email_in and email_in.strip() != m.email:
            m.email = email_in.strip()  # same address, different letter case
            changed = True
        merges_changed = self._apply_merges(m, body.get("merge_fields"), register=False)
        changed = self._apply_profile(m, body) or merges_changed or changed
        old_status = m.status
        if status is not None and status != old_status:
            self._set_status(m, status, now=now)
            if status == "subscribed":
                m.ip_opt = API_CALLER_IP
                events.append(("subscribe", m.hash))
            elif status == "unsubscribed":
                events.append(("unsubscribe", m.hash, "unsub", "manual"))
            elif status == "cleaned":
                events.append(("cleaned", m.hash, "hard"))
            changed = True
        elif merges_changed:
            events.append(("profile", m.hash))
        if changed:
            m.last_changed = now
            self._changed()
        return m, False, events

    @staticmethod
    def _apply_profile(m: _Member, body: Mapping[str, Any]) -> bool:
        changed = False
        for attr in ("email_type", "language", "vip"):
            if attr in body and body[attr] is not None and getattr(m, attr) != body[attr]:
                setattr(m, attr, body[attr])
                changed = True
        return changed

    # ------------------------------------------------------------------ webhooks out

    def _form(self, event: tuple[str, ...], fired_at: int) -> list[tuple[str, str]] | None:
        """The form fields of one event, in the order the captured delivery shows (A3.2, A3.3)."""
        kind, key = event[0], event[1]
        m = self._members.get(key)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(fired_at))
        head = [("type", kind), ("fired_at", stamp)]
        if kind == "cleaned":
            email = m.email if m else event[3] if len(event) > 3 else ""
            return head + [("data[list_id]", self.list_id), ("data[campaign_id]", ""),
                           ("data[reason]", event[2]), ("data[email]", email)]
        if m is None:
            return None
        if kind == "upemail":
            return head + [("data[list_id]", self.list_id), ("data[new_id]", self._ueid(m)),
                           ("data[new_email]", m.email), ("data[old_email]", event[2])]
        form = list(head)
        if kind == "unsubscribe":
            campaign = event[4] if len(event) > 4 else ""
            form += [("data[action]", event[2]), ("data[reason]", event[3]),
                     ("data[campaign_id]", campaign)]
        form += [("data[id]", self._ueid(m)), ("data[email]", m.email),
                 ("data[email_type]", m.email_type), ("data[ip_opt]", m.ip_opt)]
        if kind == "subscribe":
            form.append(("data[ip_signup]", m.ip_signup))
        form.append(("data[web_id]", str(WEB_ID_BASE + m.seq)))
        form.append(("data[merges][EMAIL]", m.email))
        for tag, value in self._merge_fields(m).items():
            form.append((f"data[merges][{tag}]", "" if isinstance(value, dict) else str(value)))
        form.append(("data[list_id]", self.list_id))
        return form

    def _fire(self, events: Sequence[tuple[str, ...]], source: str) -> None:
        """Queue deliveries to every webhook whose events and sources allow them."""
        if not events:
            return
        with self._lock:
            hooks = list(self._webhooks.values())
            if not hooks:
                return
            now = self._now()
            forms = [(e[0], self._form(e, now)) for e in events]
        for kind, form in forms:
            if form is None:
                continue
            for hook in hooks:
                if not hook["events"].get(kind):
                    continue
                if kind != "campaign" and not hook["sources"].get(source):
                    continue
                self._sender.submit(hook["url"], form, kind, source)

    # ------------------------------------------------------------------ routes: basics

    def _root(self, request: Request) -> Response:
        with self._lock:
            total = self._status_counts["subscribed"]
        base = self._base(request)
        return self._ok({
            "account_id": hashlib.md5(self.api_key.encode()).hexdigest()[:25],  # noqa: S324
            "login_id": "100000001",
            "account_name": self.list_name,
            "email": "",
            "first_name": "",
            "last_name": "",
            "username": "sandbox",
            "role": "owner",
            "member_since": _iso(self._created_at),
            "pricing_plan_type": "monthly",
            "account_timezone": "Etc/UTC",
            "account_industry": "Health and Beauty",
            "total_subscribers": total,
            "_links": [{"rel": "self", "href": f"{base}/", "method": "GET"},
                       {"rel": "lists", "href": f"{base}/lists", "method": "GET"},
                       {"rel": "ping", "href": f"{base}/ping", "method": "GET"}],
        }, "Root.json")

    def _ping(self, request: Request) -> Response:
        return self._ok({"health_status": HEALTH_STATUS}, "Ping.json")

    def _list_object(self, base: str) -> dict[str, Any]:
        counts = self._status_counts
        return {
            "id": self.list_id,
            "web_id": WEB_ID_BASE,
            "name": self.list_name,
            "permission_reminder": "You are receiving this email because you opted in with us.",
            "use_archive_bar": True,
            "campaign_defaults": {"from_name": self.list_name, "from_email": "",
                                  "subject": "", "language": "en"},
            "notify_on_subscribe": "",
            "notify_on_unsubscribe": "",
            "date_created": _iso(self._created_at),
            "list_rating": 0,
            "email_type_option": False,
            "subscribe_url_short": "",
            "subscribe_url_long": "",
            "beamer_address": "",
            "visibility": "prv",
            "double_optin": False,
            "has_welcome": False,
            "marketing_permissions": False,
            "modules": [],
            "stats": {
                "member_count": counts["subscribed"],
                "unsubscribe_count": counts["unsubscribed"],
                "cleaned_count": counts["cleaned"],
                "member_count_since_send": counts["subscribed"],
                "unsubscribe_count_since_send": counts["unsubscribed"],
                "cleaned_count_since_send": counts["cleaned"],
                "campaign_count": 0,
                "campaign_last_sent": "",
                "merge_field_count": len(self._merge_tags),
                "avg_sub_rate": 0,
                "avg_unsub_rate": 0,
                "target_sub_rate": 0,
                "open_rate": 0,
                "click_rate": 0,
                "last_sub_date": "",
                "last_unsub_date": "",
            },
            "_links": [{"rel": "self", "href": f"{base}/lists/{self.list_id}", "method": "GET"},
                       {"rel": "members", "href": f"{base}/lists/{self.list_id}/members",
                        "method": "GET"}],
        }

    def _get_lists(self, request: Request) -> Response:
        with self._lock:
            item = self._list_object(self._base(request))
        return self._ok({"lists": [item], "total_items": 1,
                         "constraints": {"may_create": False, "max_instances": 1,
                                         "current_total_instances": 1},
                         "_links": []}, "Lists/Collection.json")

    def _get_list(self, request: Request) -> Response:
        self._check_list(request)
        include, exclude = _path_tree(request.query.get("fields", [])), _path_tree(
            request.query.get("exclude_fields", []))
        with self._lock:
            payload = self._list_object(self._base(request))
        return self._ok(_project(payload, include, exclude), "Lists/Instance.json")

    # ------------------------------------------------------------------ routes: members

    def _int_arg(self, request: Request, name: str, default: int, maximum: int | None) -> int:
        raw = request.arg(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError as err:
            raise _invalid(name, "Schema describes integer, string found instead.") from err
        if value < 0 or (maximum is not None and value > maximum):
            raise _invalid(name, f"Must be between 0 and {maximum}." if maximum is not None
                           else "Must be 0 or more.")
        return value

    @staticmethod
    def _time_arg(request: Request, name: str) -> float | None:
        raw = request.arg(name)
        if not raw:
            return None
        try:
            return _parse_time(raw)
        except (ValueError, TypeError) as err:
            raise _invalid(name, "Please provide a valid ISO 8601 date and time, like "
                                 "2015-10-21T15:41:36+00:00.") from err

    def _view(self, key: tuple[Any, ...]) -> list[_Member]:
        """The filtered, ordered members for a query, cached until the data changes (lock held)."""
        cached = self._views.get(key)
        if cached is not None and cached[0] == self._version:
            self._views.move_to_end(key)
            return cached[1]
        if self._order_dirty:
            self._members = dict(sorted(self._members.items(), key=lambda kv: kv[1].seq))
            self._order_dirty = False
        status, since, before, since_opt, before_opt, email_type, vip_only, sort_field, desc = key
        found: Iterable[_Member] = self._members.values()
        if status:
            found = (m for m in found if m.status == status)
        else:
            found = (m for m in found if m.status != "archived")
        if since is not None:
            found = (m for m in found if m.last_changed > since)
        if before is not None:
            found = (m for m in found if m.last_changed < before)
        if since_opt is not None:
            found = (m for m in found
                     if m.timestamp_opt is not None and m.timestamp_opt > since_opt)
        if before_opt is not None:
            found = (m for m in found
                     if m.timestamp_opt is not None and m.timestamp_opt < before_opt)
        if email_type:
            found = (m for m in found if m.email_type == email_type)
        if vip_only:
            found = (m for m in found if m.vip)
        result = list(found)
        if sort_field:
            attr = SORT_FIELDS[sort_field]
            result.sort(key=lambda m: (getattr(m, attr) or 0, m.seq), reverse=desc)
        elif desc:
            result.reverse()
        self._views[key] = (self._version, result)
        while len(self._views) > VIEW_CACHE_MAX_ENTRIES:
            self._views.popitem(last=False)
        return result

    def _get_members(self, request: Request) -> Response:
        self._check_list(request)
        count = self._int_arg(request, "count", DEFAULT_PAGE_COUNT, MAX_PAGE_COUNT)
        offset = self._int_arg(request, "offset", 0, None)
        status = request.arg("status") or None
        if status is not None and status not in FILTER_STATUSES:
            raise _invalid("status", "Schema describes enum values subscribed, unsubscribed, "
                                     "cleaned, pending, transactional, archived.")
        sort_field = request.arg("sort_field") or None
        if sort_field is not None and sort_field not in SORT_FIELDS:
            raise _invalid("sort_field", "Schema describes enum values timestamp_opt, "
                                         "timestamp_signup, last_changed.")
        key = (
            status,
            self._time_arg(request, "since_last_changed"),
            self._time_arg(request, "before_last_changed"),
            self._time_arg(request, "since_timestamp_opt"),
            self._time_arg(request, "before_timestamp_opt"),
            request.arg("email_type") or None,
            (request.arg("vip_only") or "").lower() == "true",
            sort_field,
            (request.arg("sort_dir") or "").upper() == "DESC",
        )
        include = _path_tree(request.query.get("fields", []))
        exclude = _path_tree(request.query.get("exclude_fields", []))
        wanted, links = _wanted(include, exclude, "members")
        base = self._base(request)
        with self._lock:
            view = self._view(key)
            total = len(view)
            members = ([self._render(m, base, links) for m in view[offset:offset + count]]
                       if wanted else [])
        payload = {"members": members, "list_id": self.list_id, "total_items": total,
                   "_links": self._collection_links(base)}
        return self._ok(_project(payload, include, exclude), "Lists/Members/Collection.json")

    def _member_response(self, request: Request, m_dict: dict[str, Any]) -> Response:
        include = _path_tree(request.query.get("fields", []))
        exclude = _path_tree(request.query.get("exclude_fields", []))
        return self._ok(_project(m_dict, include, exclude), "Lists/Members/Instance.json")

    def _get_member(self, request: Request) -> Response:
        self._check_list(request)
        key = self._key(request.params["subscriber_hash"])
        with self._lock:
            m = self._members.get(key)
            if m is None:
                raise _not_found()
            out = self._render(m, self._base(request))
        return self._member_response(request, out)

    def _member_write(self, request: Request, mode: str) -> Response:
        self._check_list(request)
        body = self._body(request)
        if mode == "post":
            email = body.get("email_address")
            if not isinstance(email, str) or not _EMAIL_RE.match(email.strip()):
                raise _Problem(400, "Invalid Resource", DETAIL_BAD_EMAIL)
            if body.get("status") is None:
                raise _invalid("status", "This value should not be blank.")
            key, label = subscriber_hash(email), email
        else:
            segment = request.params["subscriber_hash"]
            key, label = self._key(segment), (segment if "@" in segment else None)
        with self._lock:
            m, _, events = self._write(key, body, mode, label=label)
            out = self._render(m, self._base(request))
        self._fire(events, "api")
        return self._member_response(request, out)

    def _post_member(self, request: Request) -> Response:
        return self._member_write(request, "post")

    def _put_member(self, request: Request) -> Response:
        return self._member_write(request, "put")

    def _patch_member(self, request: Request) -> Response:
        return self._member_write(request, "patch")

    def _archive_member(self, request: Request) -> Response:
        self._check_list(request)
        key = self._key(request.params["subscriber_hash"])
        with self._lock:
            m = self._members.get(key)
            if m is None:
                raise _not_found()
            if m.status in NOT_ARCHIVABLE_STATUSES:
                raise _Problem(405, "Method Not Allowed", DETAIL_CANNOT_ARCHIVE,
                               headers={"Allow": "GET, PUT"})
            self._set_status(m, "archived", now=self._now())
            m.last_changed = self._now()
            self._changed()
        self._fire([("unsubscribe", key, "delete", "manual")], "api")
        return empty_response(204)

    def _delete_permanent(self, request: Request) -> Response:
        self._check_list(request)
        key = self._key(request.params["subscriber_hash"])
        with self._lock:
            m = self._members.get(key)
            if m is None:
                raise _not_found()
            # Built before the member goes: the event must still name the address.
            form = self._form(("unsubscribe", key, "delete", "manual"), self._now()) \
                if m.status != "archived" and self._webhooks else None
            del self._members[key]
            self._status_counts[m.status] -= 1
            self._forgotten.add(key)
            self._changed()
            hooks = list(self._webhooks.values())
        if form is not None:
            for hook in hooks:
                if hook["events"].get("unsubscribe") and hook["sources"].get("api"):
                    self._sender.submit(hook["url"], form, "unsubscribe", "api")
        return empty_response(204)

    def _batch_members(self, request: Request) -> Response:
        self._check_list(request)
        body = self._body(request)
        entries = body.get("members")
        if not isinstance(entries, list):
            raise _invalid("members", "This value should not be blank.")
        if len(entries) > MAX_BATCH_MEMBERS:
            raise _invalid("members", f"You may only submit up to {MAX_BATCH_MEMBERS} members "
                                      "at a time.")
        update_existing = bool(body.get("update_existing", False))
        base = self._base(request)
        created: list[dict[str, Any]] = []
        updated: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        events: list[tuple[str, ...]] = []
        with self._lock:
            for entry in entries:
                email = entry.get("email_address") if isinstance(entry, dict) else None
                try:
                    if not isinstance(email, str) or not _EMAIL_RE.match(email.strip()):
                        raise _Problem(400, "Invalid Resource", DETAIL_BAD_EMAIL)
                    if entry.get("status") is None:
                        raise _Problem(400, "Invalid Resource", "Status is required.")
                    key = subscriber_hash(email)
                    existing = self._members.get(key)
                    if existing is not None and not update_existing:
                        raise _Problem(
                            400, "Member Exists",
                            f"{email} is already a list member, do you want to update? please "
                            "provide update_existing:true in the request body",
                            error_code="ERROR_CONTACT_EXISTS")
                    m, was_created, caused = self._write(key, entry, "batch")
                except _Problem as problem:
                    errors.append({"email_address": email if isinstance(email, str) else "",
                                   "error": problem.detail, "error_code": problem.error_code,
                                   "field": "", "field_message": ""})
                    continue
                events.extend(caused)
                (created if was_created else updated).append(self._render(m, base))
        self._fire(events, "api")
        return self._ok({
            "new_members": created,
            "updated_members": updated,
            "errors": errors,
            "total_created": len(created),
            "total_updated": len(updated),
            "error_count": len(errors),
            "_links": [{"rel": "self", "href": f"{base}/lists/{self.list_id}", "method": "POST"}],
        }, "Lists/BatchPOST.json")

    # ------------------------------------------------------------------ routes: webhooks

    def _webhook_object(self, hook: Mapping[str, Any], base: str | None) -> dict[str, Any]:
        out = {"id": hook["id"], "url": hook["url"], "events": dict(hook["events"]),
               "sources": dict(hook["sources"]), "list_id": self.list_id}
        if base is not None:
            out["_links"] = [{"rel": "self", "method": "GET",
                              "href": f"{base}/lists/{self.list_id}/webhooks/{hook['id']}"}]
        return out

    @staticmethod
    def _flags(given: Any, names: Sequence[str], defaults: Mapping[str, bool]) -> dict[str, bool]:
        flags = {n: defaults.get(n, True) for n in names}
        if isinstance(given, Mapping):
            flags.update({n: bool(given[n]) for n in names if n in given})
        return flags

    @staticmethod
    def _validate_webhook_url(url: str) -> bool:
        """The validator's GET (A3.4): the endpoint must answer 200."""
        request = urllib.request.Request(url, method="GET",
                                         headers={"User-Agent": WEBHOOK_VALIDATOR_USER_AGENT})
        try:
            with urllib.request.urlopen(  # noqa: S310 (http/https checked by the caller)
                    request, timeout=WEBHOOK_VALIDATOR_TIMEOUT_SECONDS) as answer:
                answer.read()
                return answer.status == 200
        except (OSError, ValueError):
            return False

    def add_webhook(
        self,
        url: str,
        events: Mapping[str, bool] | None = None,
        sources: Mapping[str, bool] | None = None,
        *,
        validate: bool = False,
    ) -> dict[str, Any]:
        """Configure a webhook directly (seeding / control API).

        Args:
            url: where deliveries go.
            events: event flags over the defaults (all on).
            sources: source flags over the defaults (user, admin on; api off).
            validate: send the validator's GET first, as the API route does.

        Returns:
            The webhook object (no ``_links``).

        Raises:
            ValueError: the URL is not http(s), or validation was asked for and failed.
        """
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("webhook url must be http or https")
        if validate and not self._validate_webhook_url(url):
            raise ValueError("webhook url did not answer the validator's GET with 200")
        hook = {"id": secrets.token_hex(5), "url": url,
                "events": self._flags(events, WEBHOOK_EVENTS, {}),
                "sources": self._flags(sources, WEBHOOK_SOURCES, DEFAULT_WEBHOOK_SOURCES)}
        with self._lock:
            self._webhooks[hook["id"]] = hook
            return self._webhook_object(hook, None)

    def _post_webhook(self, request: Request) -> Response:
        self._check_list(request)
        body = self._body(request)
        url = body.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise _invalid("url", "This value should be a valid URL.")
        # Outside any lock: the receiver may well call back into this sandbox.
        if not self._validate_webhook_url(url):
            raise _invalid("url", "The URL did not answer the webhook validator's GET with 200.")
        hook = self.add_webhook(url, body.get("events"), body.get("sources"))
        return self._ok(self._webhook_object(hook, self._base(request)),
                        "Lists/Webhooks/Instance.json")

    def _get_webhooks(self, request: Request) -> Response:
        self._check_list(request)
        base = self._base(request)
        with self._lock:
            hooks = [self._webhook_object(h, base) for h in self._webhooks.values()]
        return self._ok({"webhooks": hooks, "list_id": self.list_id, "total_items": len(hooks),
                         "_links": []}, "Lists/Webhooks/Collection.json")

    def _find_webhook(self, request: Request) -> dict[str, Any]:
        self._check_list(request)
        hook = self._webhooks.get(request.params["webhook_id"])
        if hook is None:
            raise _not_found()
        return hook

    def _get_webhook(self, request: Request) -> Response:
        with self._lock:
            hook = self._webhook_object(self._find_webhook(request), self._base(request))
        return self._ok(hook, "Lists/Webhooks/Instance.json")

    def _patch_webhook(self, request: Request) -> Response:
        body = self._body(request)
        with self._lock:
            hook = self._find_webhook(request)
            url = body.get("url", hook["url"])
        if url != hook["url"]:
            if not isinstance(url, str) or not self._validate_webhook_url(url):
                raise _invalid("url",
                               "The URL did not answer the webhook validator's GET with 200.")
        with self._lock:
            hook["url"] = url
            hook["events"] = self._flags(body.get("events"), WEBHOOK_EVENTS, hook["events"])
            hook["sources"] = self._flags(body.get("sources"), WEBHOOK_SOURCES, hook["sources"])
            out = self._webhook_object(hook, self._base(request))
        return self._ok(out, "Lists/Webhooks/Instance.json")

    def _delete_webhook(self, request: Request) -> Response:
        with self._lock:
            hook = self._find_webhook(request)
            del self._webhooks[hook["id"]]
        return empty_response(204)

    # ------------------------------------------------------------------ routes: batches

    def _batch_object(self, batch: _Batch) -> dict[str, Any]:
        finished = batch.status == "finished"
        return {
            "id": batch.id,
            "status": batch.status,
            "total_operations": len(batch.operations),
            "finished_operations": batch.finished,
            "errored_operations": batch.errored,
            "submitted_at": _iso(batch.submitted_at),
            "completed_at": _iso(batch.completed_at) if finished else "",
            "response_body_url": (f"http://{batch.host}{BATCH_RESULTS_PREFIX}{batch.id}.tar.gz"
                                  if finished else ""),
            "_links": [{"rel": "self", "method": "GET",
                        "href": f"http://{batch.host}{API_PREFIX}/batches/{batch.id}"}],
        }

    def _post_batch(self, request: Request) -> Response:
        body = self._body(request)
        operations = body.get("operations")
        if not isinstance(operations, list):
            raise _invalid("operations", "This value should not be blank.")
        for op in operations:
            if (not isinstance(op, dict)
                    or op.get("method") not in ("GET", "POST", "PUT", "PATCH", "DELETE")
                    or not isinstance(op.get("path"), str)):
                raise _invalid("operations", "Each operation needs a method "
                                             "(GET, POST, PUT, PATCH, DELETE) and a path.")
            if op.get("body") is not None and not isinstance(op["body"], str):
                raise _invalid("operations.body", "Schema describes string, object found instead.")
        batch = _Batch(id=secrets.token_hex(5), operations=operations,
                       authorization=request.headers.get("authorization", ""),
                       host=request.headers.get("host", "127.0.0.1"), submitted_at=self._now())
        with self._lock:
            self._batches[batch.id] = batch
            while len(self._batches) > BATCHES_KEPT:
                self._batches.popitem(last=False)
            out = self._batch_object(batch)
            if self._batch_thread is None:
                self._batch_thread = threading.Thread(target=self._run_batches,
                                                      name="mailchimp-batches", daemon=True)
                self._batch_thread.start()
        self._batch_queue.put(batch)
        return self._ok(out, "Batches/Instance.json")

    def _run_batches(self) -> None:
        while True:
            batch = self._batch_queue.get()
            if batch is None:
                return
            with self._lock:
                batch.status = "started"
            for op in batch.operations:
                try:
                    response = self._dispatch(op, batch)
                except Exception:  # one broken operation must not stop the batch
                    log.exception("mailchimp_batch_operation_failed")
                    response = self.fault_body(500)
                with self._lock:
                    batch.results.append({
                        "status_code": response.status,
                        "operation_id": op.get("operation_id"),
                        "response": response.body.decode("utf-8") if response.body else "",
                    })
                    batch.finished += 1
                    if response.status >= 400:
                        batch.errored += 1
            with self._lock:
                batch.status = "finished"
                batch.completed_at = self._now()

    def _dispatch(self, op: Mapping[str, Any], batch: _Batch) -> Response:
        """Run one batch operation through the registered routes, as its own request.

        The route's handler is called directly, not through the server: the operation runs
        inside Mailchimp, so it pays no injected fault (``latency_ms`` models the client's
        link), passes no connection cap and is not counted (assumption 11).
        """
        path = op["path"] if op["path"].startswith(API_PREFIX) else API_PREFIX + op["path"]
        split = urlsplit(path)
        query = parse_qs(split.query, keep_blank_values=True)
        for name, value in (op.get("params") or {}).items():
            values = value if isinstance(value, list) else [value]
            query[name] = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
        if self._router is None:
            return self.fault_body(404)
        route, params, known = self._router.match(op["method"], split.path)
        if route is None or route.vendor != VENDOR:
            return self.fault_body(405 if known else 404)
        body = op.get("body")
        request = Request(method=op["method"], path=split.path, query=query,
                          headers={"authorization": batch.authorization, "host": batch.host,
                                   "content-type": "application/json"},
                          body=body.encode("utf-8") if body else b"", params=params)
        return route.handler(request)

    def _get_batches(self, request: Request) -> Response:
        with self._lock:
            batches = [self._batch_object(b) for b in self._batches.values()]
        return self._ok({"batches": batches, "total_items": len(batches), "_links": []},
                        "Batches/Collection.json")

    def _get_batch(self, request: Request) -> Response:
        with self._lock:
            batch = self._batches.get(request.params["batch_id"])
            if batch is None:
                raise _not_found()
            out = self._batch_object(batch)
        return self._ok(out, "Batches/Instance.json")

    def _delete_batch(self, request: Request) -> Response:
        with self._lock:
            if self._batches.pop(request.params["batch_id"], None) is None:
                raise _not_found()
        return empty_response(204)

    def _batch_results(self, request: Request) -> Response:
        """The ``response_body_url`` download: the finished batch's results as a ``.tar.gz``."""
        with self._lock:
            batch = self._batches.get(request.params["batch_id"])
            if batch is None or batch.status != "finished":
                raise _not_found()
            results = list(batch.results)
        archive = _results_archive(batch.id, results, batch.completed_at or 0)
        return Response(200, archive, BATCH_RESULTS_CONTENT_TYPE)

    # ------------------------------------------------------------------ people actions

    def _person(self, email: str) -> _Member:
        m = self._members.get(self._key(email))
        if m is None:
            raise KeyError("no such member")
        return m

    def _act(self, events: list[tuple[str, ...]], source: str, m: _Member) -> dict[str, Any]:
        out = self._render(m, None)
        self._fire(events, source)
        return out

    def click_unsubscribe(self, email: str, *, campaign_id: str = "",
                          source: str = "user") -> dict[str, Any]:
        """The person clicks "unsubscribe" in a campaign (webhook action=unsub, reason=manual).

        Args:
            email: address or subscriber hash.
            campaign_id: the campaign the link came from (``data[campaign_id]``).
            source: webhook source; ``admin`` for an unsubscribe done in the web UI.

        Returns:
            The member. A member not currently mailable is left as is, with no webhook.

        Raises:
            KeyError: no such member.
        """
        return self._unsubscribe(email, "manual", UNSUBSCRIBE_REASON_USER if source == "user"
                                 else UNSUBSCRIBE_REASON_ADMIN, campaign_id, source)

    def spam_complaint(self, email: str, *, campaign_id: str = "",
                       source: str = "user") -> dict[str, Any]:
        """The person reports a campaign as spam: unsubscribed, webhook reason=abuse (A3.3).

        Raises:
            KeyError: no such member.
        """
        return self._unsubscribe(email, "abuse", UNSUBSCRIBE_REASON_ABUSE, campaign_id, source)

    def _unsubscribe(self, email: str, reason: str, text: str, campaign_id: str,
                     source: str) -> dict[str, Any]:
        with self._lock:
            m = self._person(email)
            events: list[tuple[str, ...]] = []
            if m.status in ("subscribed", "pending", "transactional"):
                now = self._now()
                self._set_status(m, "unsubscribed", now=now, reason=text)
                m.last_changed = now
                self._changed()
                events.append(("unsubscribe", m.hash, "unsub", reason, campaign_id))
            return self._act(events, source, m)

    def hard_bounce(self, email: str, *, source: str = "admin") -> dict[str, Any]:
        """A hard bounce: status ``cleaned``, webhook ``cleaned`` reason=hard.

        Raises:
            KeyError: no such member.
        """
        with self._lock:
            m = self._person(email)
            events: list[tuple[str, ...]] = []
            if m.status not in ("cleaned", "archived"):
                now = self._now()
                self._set_status(m, "cleaned", now=now)
                m.last_changed = now
                self._changed()
                events.append(("cleaned", m.hash, "hard"))
            return self._act(events, source, m)

    def change_email(self, old: str, new: str, *, source: str = "user") -> dict[str, Any]:
        """The person changes their address on the profile page (webhook ``upemail``).

        Raises:
            KeyError: no such member.
            ValueError: the new address is invalid, taken, or forgotten.
        """
        with self._lock:
            m = self._person(old)
            if not _EMAIL_RE.match(new.strip()):
                raise ValueError("invalid email address")
            new_key = subscriber_hash(new)
            if new_key == m.hash:
                m.email = new.strip()
                return self._render(m, None)
            if new_key in self._members or new_key in self._forgotten:
                raise ValueError("address already in use or forgotten")
            old_email = m.email
            self._rekey(m, new)
            m.last_changed = self._now()
            self._changed()
            return self._act([("upemail", m.hash, old_email)], source, m)

    def update_profile(self, email: str, merges: Mapping[str, Any], *,
                       source: str = "user") -> dict[str, Any]:
        """The person edits their profile (webhook ``profile``); unknown tags are registered.

        Raises:
            KeyError: no such member.
        """
        with self._lock:
            m = self._person(email)
            events: list[tuple[str, ...]] = []
            if self._apply_merges(m, merges, register=True):
                m.last_changed = self._now()
                self._changed()
                events.append(("profile", m.hash))
            return self._act(events, source, m)

    def signup(self, email: str, fname: str = "", lname: str = "", *,
               source: str = "user") -> dict[str, Any]:
        """The person subscribes through the hosted signup form (webhook ``subscribe``).

        The only way back for a forgotten address (A2.5), and for one in the compliance state:
        the person opts in again themselves.

        Raises:
            ValueError: the address is invalid.
        """
        if not _EMAIL_RE.match(email.strip()):
            raise ValueError("invalid email address")
        key = subscriber_hash(email)
        with self._lock:
            now = self._now()
            self._forgotten.discard(key)
            m = self._members.get(key)
            events: list[tuple[str, ...]] = []
            if m is None:
                m = self._create(email, "subscribed", now=now, source="Hosted Signup Form")
                m.timestamp_signup = now
                m.ip_signup = m.ip_opt = API_CALLER_IP
                self._apply_merges(m, {"FNAME": fname, "LNAME": lname}, register=False)
                events.append(("subscribe", m.hash))
            elif m.status != "subscribed":
                self._set_status(m, "subscribed", now=now)
                self._apply_merges(m, {"FNAME": fname, "LNAME": lname} if fname or lname else {},
                                   register=False)
                m.last_changed = now
                self._changed()
                events.append(("subscribe", m.hash))
            return self._act(events, source, m)

    # ------------------------------------------------------------------ seeding and inspection

    def add_member(
        self,
        email: str,
        status: str = "subscribed",
        merge_fields: Mapping[str, Any] | None = None,
        last_changed: str | datetime | float | None = None,
        *,
        timestamp_opt: str | datetime | float | None = None,
        timestamp_signup: str | datetime | float | None = None,
        email_type: str = "html",
        source: str = "Import",
        vip: bool = False,
        language: str = "",
        tags: Sequence[str] = (),
        archived_from: str = "subscribed",
        unsubscribe_reason: str = UNSUBSCRIBE_REASON_ADMIN,
    ) -> dict[str, Any]:
        """Seed one member, with no webhook and no confirmation email.

        Args:
            email: the address.
            status: any member status, ``archived`` included.
            merge_fields: merge values; new tags are added to the audience.
            last_changed: when it last changed (default now).
            timestamp_opt: opt-in time (default ``last_changed`` for subscribed members).
            timestamp_signup: signup time (default none).
            email_type: ``html`` or ``text``.
            source: the member's ``source`` text.
            vip: VIP flag.
            language: language code.
            tags: tag names.
            archived_from: the status before archiving, for ``status="archived"``.
            unsubscribe_reason: the reason shown for ``status="unsubscribed"``.

        Returns:
            The member object (no ``_links``).

        Raises:
            ValueError: bad address or status, or the address is already present or forgotten.
        """
        with self._lock:
            m = self._seed(email, status, merge_fields, last_changed, timestamp_opt=timestamp_opt,
                           timestamp_signup=timestamp_signup, email_type=email_type, source=source,
                           vip=vip, language=language, tags=tags, archived_from=archived_from,
                           unsubscribe_reason=unsubscribe_reason)
            return self._render(m, None)

    def add_members(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Seed many members fast: each row holds :meth:`add_member`'s arguments by name.

        Raises:
            ValueError: as :meth:`add_member`.
        """
        n = 0
        with self._lock:
            for row in rows:
                self._seed(**row)
                n += 1
        return n

    def _seed(self, email: str, status: str = "subscribed",
              merge_fields: Mapping[str, Any] | None = None,
              last_changed: str | datetime | float | None = None, *,
              timestamp_opt: str | datetime | float | None = None,
              timestamp_signup: str | datetime | float | None = None, email_type: str = "html",
              source: str = "Import", vip: bool = False, language: str = "",
              tags: Sequence[str] = (), archived_from: str = "subscribed",
              unsubscribe_reason: str = UNSUBSCRIBE_REASON_ADMIN) -> _Member:
        if not _EMAIL_RE.match(email.strip()):
            raise ValueError("invalid email address")
        if status not in FILTER_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        key = subscriber_hash(email)
        if key in self._members:
            raise ValueError("member already present")
        if key in self._forgotten:
            raise ValueError("address was permanently deleted")
        changed = int(_parse_time(last_changed)) if last_changed is not None else self._now()
        first = archived_from if status == "archived" else status
        m = self._create(email, first, now=changed, source=source, confirm=False)
        if status == "archived":
            self._set_status(m, "archived", now=changed)
        if first == "unsubscribed":
            m.unsubscribe_reason = unsubscribe_reason
        m.last_changed = changed
        m.timestamp_opt = (int(_parse_time(timestamp_opt)) if timestamp_opt is not None
                           else changed if first == "subscribed" else None)
        m.timestamp_signup = int(_parse_time(timestamp_signup)) if timestamp_signup else None
        m.email_type, m.vip, m.language = email_type, vip, language
        if tags:
            m.tags = [{"id": 1000 + i, "name": t} for i, t in enumerate(tags)]
        if merge_fields:
            self._apply_merges(m, merge_fields, register=True)
        return m

    def forget(self, email: str) -> None:
        """Seed an address as permanently deleted (removes it if present), with no webhook."""
        key = self._key(email)
        with self._lock:
            m = self._members.pop(key, None)
            if m is not None:
                self._status_counts[m.status] -= 1
            self._forgotten.add(key)
            self._changed()

    def is_forgotten(self, email_or_hash: str) -> bool:
        """Whether the address was permanently deleted and not signed up again."""
        with self._lock:
            return self._key(email_or_hash) in self._forgotten

    def member(self, email_or_hash: str) -> dict[str, Any] | None:
        """The member object (no ``_links``), archived ones included; None if absent."""
        with self._lock:
            m = self._members.get(self._key(email_or_hash))
            return self._render(m, None) if m else None

    def members_count(self, status: str | None = None) -> int:
        """How many members are stored (archived included), or how many have ``status``."""
        with self._lock:
            return len(self._members) if status is None else self._status_counts[status]

    def snapshot_members(self) -> list[dict[str, Any]]:
        """Every member, lean: id, email_address, status, merge_fields (set ones), last_changed."""
        with self._lock:
            return [{"id": m.hash, "email_address": m.email, "status": m.status,
                     "merge_fields": dict(m.merges or {}), "last_changed": _iso(m.last_changed)}
                    for m in sorted(self._members.values(), key=lambda m: m.seq)]

    def dump(self) -> dict[str, Any]:
        """A summary for the control API: counts by status, forgotten, emails sent, webhooks."""
        with self._lock:
            return {
                "list_id": self.list_id,
                "members": len(self._members),
                "by_status": {s: n for s, n in sorted(self._status_counts.items()) if n},
                "forgotten": len(self._forgotten),
                "confirmation_emails_sent": self.confirmation_emails_sent,
                "webhooks": [self._webhook_object(h, None) for h in self._webhooks.values()],
                "batches": {b.id: b.status for b in self._batches.values()},
                "webhook_deliveries_pending": self._sender.pending(),
            }

    def webhook_log(self) -> list[dict[str, Any]]:
        """Every delivery attempt: url, type, source, attempt, status (None: no answer), ok."""
        with self._sender._cond:
            return list(self._sender.log)

    def drain_webhooks(self, timeout_seconds: float = 5.0) -> bool:
        """Wait until every queued webhook delivery (retries included) is done; False on timeout."""
        return self._sender.drain(timeout_seconds)

    def reset(self) -> None:
        """Forget every member, webhook, batch and counter (queued deliveries are dropped)."""
        self._sender.clear()
        with self._lock:
            self._init_state()

    def close(self) -> None:
        """Stop the background threads."""
        self._sender.close()
        if self._batch_thread is not None:
            self._batch_queue.put(None)
