"""HTTP served by syncd: the Mailchimp audience webhook (and, with the daemon, health and metrics).

``/webhooks/mailchimp/<secret>``:

- ``GET`` answers 200: Mailchimp's validator probes the URL with a GET before
  it saves a webhook.
- ``POST`` takes Mailchimp's form-encoded events (``unsubscribe``, ``cleaned``,
  ``upemail``, ``profile``; ``subscribe`` and ``campaign`` are accepted and
  ignored), records each in the ledger's inbox *before* answering 200, and
  leaves the processing to a worker, so the answer comes in milliseconds, far
  inside Mailchimp's 10 s limit. A replayed delivery has the same dedupe key
  and changes nothing.
- A wrong secret gets 404 and records nothing (compared in constant time, so
  the secret cannot be guessed by timing). A malformed body gets 400 and
  records nothing: a media type other than ``application/x-www-form-urlencoded``
  (parsed, not prefix-matched; a charset other than UTF-8 is refused), bytes
  that are not UTF-8 once percent-decoded, an address that is not one, a
  ``fired_at`` outside :data:`FIRED_AT_EARLIEST` .. now +
  :data:`FIRED_AT_FUTURE_SLACK_SECONDS`, or a name longer than Mailchimp
  allows. A body over :data:`WEBHOOK_BODY_LIMIT_BYTES` gets 413; the app never
  reads more than that, whatever ``Content-Length`` says.

The app is plain WSGI so the daemon can host it and tests can mount it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from email.headerregistry import HeaderRegistry
from typing import Any
from urllib.parse import parse_qsl

import structlog

from syncd.errors import IdentifierError
from syncd.events import WebhookEvent
from syncd.identity import normalise_email

log = structlog.get_logger(__name__)

WEBHOOK_PREFIX = "/webhooks/mailchimp/"
WEBHOOK_BODY_LIMIT_BYTES = 64 * 1024
FIRED_AT_FORMAT = "%Y-%m-%d %H:%M:%S"  # Mailchimp's, no zone: UTC
# A fired_at outside these bounds is not a real delivery: Mailchimp's webhooks
# post-date 2000, and a clock a day ahead of ours is a forgery or a broken sender.
FIRED_AT_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
FIRED_AT_FUTURE_SLACK_SECONDS = 24 * 60 * 60
# Mailchimp's text merge fields hold at most 255 characters.
MERGE_FIELD_MAX_CHARS = 255
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
HANDLED_EVENTS = frozenset({"unsubscribe", "cleaned", "upemail", "profile"})
IGNORED_EVENTS = frozenset({"subscribe", "campaign"})


class WebhookError(ValueError):
    """A webhook body that cannot be trusted (answered 400)."""


def parse_mailchimp_event(form: Mapping[str, str], *,
                          now: datetime | None = None) -> WebhookEvent | None:
    """Validate one form-encoded Mailchimp event.

    Args:
        form: the decoded form fields.
        now: the current aware time, the upper bound of a plausible
            ``fired_at`` (default: the system clock).

    Returns:
        The event, or None for a well-formed event type syncd does not act on.

    Raises:
        WebhookError: the body is not a Mailchimp event syncd can trust.
    """
    kind = form.get("type", "")
    if kind in IGNORED_EVENTS:
        return None
    if kind not in HANDLED_EVENTS:
        raise WebhookError("unknown or missing event type")
    try:
        occurred_at = datetime.strptime(form.get("fired_at", ""), FIRED_AT_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise WebhookError("fired_at missing or not 'YYYY-MM-DD HH:MM:SS'") from None
    latest = (now or datetime.now(UTC)) + timedelta(seconds=FIRED_AT_FUTURE_SLACK_SECONDS)
    if not FIRED_AT_EARLIEST <= occurred_at <= latest:
        raise WebhookError("fired_at is not a plausible time")
    payload: dict[str, str] = {"list_id": form.get("data[list_id]", "")}
    if kind == "upemail":
        payload["old_email"] = _email(form, "data[old_email]")
        payload["new_email"] = _email(form, "data[new_email]")
    else:
        payload["email"] = _email(form, "data[email]")
        for key in ("reason", "action"):
            if form.get(f"data[{key}]"):
                payload[key] = form[f"data[{key}]"][:40]
        if kind == "profile":
            payload["first_name"] = _merge_field(form, "data[merges][FNAME]")
            payload["last_name"] = _merge_field(form, "data[merges][LNAME]")
    identity = json.dumps([kind, form.get("fired_at"), payload], sort_keys=True)
    return WebhookEvent(kind, occurred_at, payload, hashlib.sha256(identity.encode()).hexdigest())


def _email(form: Mapping[str, str], key: str) -> str:
    value = form.get(key, "")
    # U+FFFD is what a decoder leaves for bytes it could not read: never part of
    # a real address, and two different broken addresses would collide on it.
    if "\ufffd" in value:
        raise WebhookError(f"{key} is not an email address")
    try:
        return normalise_email(value)
    except IdentifierError:
        raise WebhookError(f"{key} missing or not an email address") from None


def _merge_field(form: Mapping[str, str], key: str) -> str:
    value = form.get(key, "")
    if len(value) > MERGE_FIELD_MAX_CHARS:
        raise WebhookError(f"{key} is longer than {MERGE_FIELD_MAX_CHARS} characters")
    return value


_HEADERS = HeaderRegistry()


def _is_utf8_form(content_type: str) -> bool:
    """Whether a Content-Type header is exactly form encoding, in UTF-8 if a charset is named.

    The header is parsed as RFC 2045 defines it (type, subtype, parameters), so
    ``application/x-www-form-urlencodedX`` or a list of types is not mistaken
    for the form type, and a header with any parse defect is refused.
    """
    header = _HEADERS("content-type", content_type)
    if header.defects or header.content_type != FORM_MEDIA_TYPE:
        return False
    charset = header.params.get("charset")
    return charset is None or charset.lower() in ("utf-8", "utf8")


def _body_length(environ: Mapping[str, Any]) -> int | None:
    """How many body bytes the app may read, or None when ``Content-Length`` is malformed.

    Only ASCII digits are a length: ``int()`` would also take ``-1``, ``+5`` and
    `` 5``, and a negative length reads to the end of the stream. Without a
    length, a server that marks its input as terminated (it buffered the whole
    body, as waitress does) lets the app read up to one byte past the cap, so an
    oversized body is seen as such; any other input has no body.
    """
    given = environ.get("CONTENT_LENGTH") or ""
    if not given:
        return WEBHOOK_BODY_LIMIT_BYTES + 1 if environ.get("wsgi.input_terminated") else 0
    if not (given.isascii() and given.isdigit()):
        return None
    return int(given)


# record(event) stores the event durably; returns False for a replay.
Recorder = Callable[[WebhookEvent], bool]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def mailchimp_webhook_app(secret: str, record: Recorder, *,
                          clock: Callable[[], datetime] | None = None
                          ) -> Callable[..., Iterable[bytes]]:
    """A WSGI app serving ``/webhooks/mailchimp/<secret>``.

    Args:
        secret: the last path segment Mailchimp was given.
        record: stores an event durably before the 200 goes out (e.g.
            ``Ledger.add_inbox_event``); an exception there answers 503 so
            Mailchimp retries.
        clock: returns the current aware UTC time, against which ``fired_at``
            is judged (default: the system clock).
    """
    expected = secret.encode()
    now = clock or (lambda: datetime.now(UTC))

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        method: str = environ.get("REQUEST_METHOD", "GET")
        given = path[len(WEBHOOK_PREFIX):].encode() if path.startswith(WEBHOOK_PREFIX) else b""
        if not given or not hmac.compare_digest(given, expected):
            return _answer(start_response, 404, "not found")
        if method in ("GET", "HEAD"):
            return _answer(start_response, 200, "ok")
        if method != "POST":
            return _answer(start_response, 405, "method not allowed")
        length = _body_length(environ)
        if length is None:
            return _answer(start_response, 400, "bad content length")
        if length > WEBHOOK_BODY_LIMIT_BYTES:
            return _answer(start_response, 413, "body too large")
        if not _is_utf8_form(environ.get("CONTENT_TYPE", "")):
            return _answer(start_response, 400, f"expected {FORM_MEDIA_TYPE} in UTF-8")
        raw = environ["wsgi.input"].read(length)
        if len(raw) > WEBHOOK_BODY_LIMIT_BYTES:  # no length given, and the input ran past the cap
            return _answer(start_response, 413, "body too large")
        if environ.get("CONTENT_LENGTH") and len(raw) != length:
            return _answer(start_response, 400, "body shorter than its content length")
        try:
            body = raw.decode("utf-8")
            # errors="strict": a percent-encoded byte that is not UTF-8 is refused,
            # not turned into U+FFFD and stored as if it were part of an address.
            form = dict(parse_qsl(body, keep_blank_values=True, strict_parsing=bool(body),
                                  encoding="utf-8", errors="strict"))
            event = parse_mailchimp_event(form, now=now())
        except (UnicodeDecodeError, ValueError) as exc:
            # Our own messages name the field; parse_qsl's quote the body, so not those.
            reason = (str(exc) if isinstance(exc, WebhookError) else
                      "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not form-encoded")
            log.warning("webhook_rejected", source="mailchimp", reason=reason)
            return _answer(start_response, 400, "malformed event")
        if event is None:
            return _answer(start_response, 200, "ignored")
        try:
            fresh = record(event)
        except Exception as exc:  # the ledger is unavailable: make Mailchimp try again later
            # One line, the type only: the journal gets no traceback from a request.
            log.error("webhook_not_recorded", source="mailchimp", kind=event.kind,
                      error=type(exc).__name__)
            return _answer(start_response, 503, "try again")
        log.info("webhook_recorded", source="mailchimp", kind=event.kind, replay=not fresh)
        return _answer(start_response, 200, "ok")

    return app


def _answer(start_response: StartResponse, status: int, text: str) -> list[bytes]:
    body = text.encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              413: "Payload Too Large", 503: "Service Unavailable"}[status]
    start_response(
        f"{status} {reason}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
