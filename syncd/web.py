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
  records nothing. A body over :data:`WEBHOOK_BODY_LIMIT_BYTES` gets 413.

The app is plain WSGI so the daemon can host it and tests can mount it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import structlog

from syncd.errors import IdentifierError
from syncd.identity import normalise_email

log = structlog.get_logger(__name__)

WEBHOOK_PREFIX = "/webhooks/mailchimp/"
WEBHOOK_BODY_LIMIT_BYTES = 64 * 1024
FIRED_AT_FORMAT = "%Y-%m-%d %H:%M:%S"  # Mailchimp's, no zone: UTC
HANDLED_EVENTS = frozenset({"unsubscribe", "cleaned", "upemail", "profile"})
IGNORED_EVENTS = frozenset({"subscribe", "campaign"})


class WebhookError(ValueError):
    """A webhook body that cannot be trusted (answered 400)."""


@dataclass(frozen=True)
class WebhookEvent:
    """One parsed Mailchimp audience event.

    ``payload`` holds what processing needs (addresses, reason, names) and is
    scrubbed from the ledger once processed.
    """

    kind: str
    occurred_at: datetime
    payload: dict[str, str]
    dedupe_key: str


def parse_mailchimp_event(form: Mapping[str, str]) -> WebhookEvent | None:
    """Validate one form-encoded Mailchimp event.

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
            payload["first_name"] = form.get("data[merges][FNAME]", "")
            payload["last_name"] = form.get("data[merges][LNAME]", "")
    identity = json.dumps([kind, form.get("fired_at"), payload], sort_keys=True)
    return WebhookEvent(kind, occurred_at, payload, hashlib.sha256(identity.encode()).hexdigest())


def _email(form: Mapping[str, str], key: str) -> str:
    try:
        return normalise_email(form.get(key, ""))
    except IdentifierError:
        raise WebhookError(f"{key} missing or not an email address") from None


# record(event) stores the event durably; returns False for a replay.
Recorder = Callable[[WebhookEvent], bool]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def mailchimp_webhook_app(secret: str, record: Recorder) -> Callable[..., Iterable[bytes]]:
    """A WSGI app serving ``/webhooks/mailchimp/<secret>``.

    Args:
        secret: the last path segment Mailchimp was given.
        record: stores an event durably before the 200 goes out (e.g.
            ``Ledger.add_inbox_event``); an exception there answers 503 so
            Mailchimp retries.
    """
    expected = secret.encode()

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
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _answer(start_response, 400, "bad content length")
        if length > WEBHOOK_BODY_LIMIT_BYTES:
            return _answer(start_response, 413, "body too large")
        content_type = environ.get("CONTENT_TYPE", "")
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return _answer(start_response, 400, "expected application/x-www-form-urlencoded")
        try:
            body = environ["wsgi.input"].read(length).decode("utf-8")
            form = dict(parse_qsl(body, keep_blank_values=True, strict_parsing=bool(body)))
            event = parse_mailchimp_event(form)
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning("webhook_rejected", source="mailchimp", reason=str(exc))
            return _answer(start_response, 400, "malformed event")
        if event is None:
            return _answer(start_response, 200, "ignored")
        try:
            fresh = record(event)
        except Exception:  # the ledger is unavailable: make Mailchimp try again later
            log.exception("webhook_not_recorded", source="mailchimp", kind=event.kind)
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
