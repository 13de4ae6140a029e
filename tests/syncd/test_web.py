"""The Mailchimp webhook intake, over real HTTP, recording into a real ledger."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from syncd import log
from syncd.ledger import Ledger
from syncd.sandbox.mailchimp import MailchimpEmulator
from syncd.web import (
    WEBHOOK_BODY_LIMIT_BYTES,
    WebhookError,
    WebhookEvent,
    mailchimp_webhook_app,
    parse_mailchimp_event,
)
from tests.support import serve_wsgi

SECRET = "s3cret-path-segment-0123456789"
EMAIL = "webhook.person@example.com"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    Ledger.open(path).close()
    return path


@pytest.fixture
def url(ledger_path: Path) -> Iterator[str]:
    def record(event: WebhookEvent) -> bool:
        with Ledger.open(ledger_path) as ledger:
            return ledger.add_inbox_event(
                "mailchimp", event.kind, event.occurred_at, event.payload, event.dedupe_key
            )

    with serve_wsgi(mailchimp_webhook_app(SECRET, record)) as base:
        yield f"{base}/webhooks/mailchimp/{SECRET}"


def pending(ledger_path: Path) -> list:
    with Ledger.open(ledger_path) as ledger:
        return ledger.pending_inbox()


def unsubscribe_form(**overrides: str) -> dict[str, str]:
    form = {
        "type": "unsubscribe",
        "fired_at": "2026-11-24 10:11:12",
        "data[action]": "unsub",
        "data[reason]": "manual",
        "data[id]": "8a25ff1d98",
        "data[list_id]": "a6b5da1054",
        "data[email]": EMAIL,
        "data[email_type]": "html",
        "data[merges][EMAIL]": EMAIL,
        "data[merges][FNAME]": "Webhook",
        "data[merges][LNAME]": "Person",
    }
    form.update(overrides)
    return form


def test_validator_get_is_answered_200(url: str, ledger_path: Path) -> None:
    assert requests.get(url, timeout=5).status_code == 200
    assert pending(ledger_path) == []


def test_unsubscribe_is_recorded_before_the_200(url: str, ledger_path: Path) -> None:
    assert requests.post(url, data=unsubscribe_form(), timeout=5).status_code == 200
    (event,) = pending(ledger_path)
    assert event.kind == "unsubscribe"
    assert event.payload["email"] == EMAIL and event.payload["reason"] == "manual"
    assert event.occurred_at.isoformat() == "2026-11-24T10:11:12+00:00"


def test_replayed_delivery_changes_nothing(url: str, ledger_path: Path) -> None:
    for _ in range(3):
        assert requests.post(url, data=unsubscribe_form(), timeout=5).status_code == 200
    assert len(pending(ledger_path)) == 1


@pytest.mark.parametrize(
    ("kind", "extra", "expected"),
    [
        ("cleaned", {"data[reason]": "hard"}, {"email": EMAIL, "reason": "hard"}),
        ("upemail", {"data[old_email]": EMAIL, "data[new_email]": "New@Example.com"},
         {"old_email": EMAIL, "new_email": "new@example.com"}),
        ("profile", {"data[merges][FNAME]": "Renamed"}, {"email": EMAIL, "first_name": "Renamed"}),
    ],
    ids=["cleaned", "upemail", "profile"],
)
def test_each_handled_event_keeps_what_processing_needs(
    url: str, ledger_path: Path, kind: str, extra: dict[str, str], expected: dict[str, str]
) -> None:
    form = {"type": kind, "fired_at": "2026-11-24 10:11:12", "data[email]": EMAIL, **extra}
    assert requests.post(url, data=form, timeout=5).status_code == 200
    (event,) = pending(ledger_path)
    assert expected.items() <= event.payload.items()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ({"fired_at": "2026-11-24 10:11:12", "data[email]": EMAIL}, FORM),
        (unsubscribe_form(type="explode"), FORM),
        (unsubscribe_form(fired_at="yesterday"), FORM),
        (unsubscribe_form(**{"data[email]": "not-an-address"}), FORM),
        ({"type": "upemail", "fired_at": "2026-11-24 10:11:12", "data[old_email]": EMAIL}, FORM),
        ('{"type": "unsubscribe"}', "application/json"),
        (b"type=unsubscribe&\xff\xfe", FORM),
    ],
    ids=["no-type", "unknown-type", "bad-fired-at", "bad-email", "upemail-without-new",
         "json-body", "not-utf8"],
)
def test_malformed_bodies_get_400_and_nothing_is_recorded(
    url: str, ledger_path: Path, body: object, content_type: str
) -> None:
    response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=5)
    assert response.status_code == 400
    assert pending(ledger_path) == []


@pytest.mark.parametrize(
    "encoded_email",
    ["%FF%FEzz@x.com", "zz%C3@x.com", "%ED%A0%80zz@x.com", "%EF%BF%BDzz@x.com"],
    ids=["not-utf8", "truncated-utf8", "surrogate", "replacement-character"],
)
def test_an_email_that_is_not_valid_utf8_gets_400_and_nothing_is_recorded(
    url: str, ledger_path: Path, encoded_email: str
) -> None:
    body = ("type=unsubscribe&fired_at=2026-11-24+10%3A11%3A12&data%5Blist_id%5D=a6"
            f"&data%5Bemail%5D={encoded_email}")
    response = requests.post(url, data=body, headers={"Content-Type": FORM}, timeout=5)
    assert response.status_code == 400
    assert pending(ledger_path) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencodedX",
        "application/x-www-form-urlencoded-but-not",
        "application/x-www-form-urlencoded, text/plain",
        "application/x-www-form-urlencoded; charset=latin-1",
        "application/x-www-form-urlencoded;;",
        "text/plain",
        "",
    ],
    ids=["suffix", "longer-name", "two-types", "other-charset", "broken-params", "text", "none"],
)
def test_a_body_that_is_not_exactly_form_encoded_utf8_gets_400_and_nothing_is_recorded(
    url: str, ledger_path: Path, content_type: str
) -> None:
    response = requests.post(url, data=unsubscribe_form(), timeout=5,
                             headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert pending(ledger_path) == []


@pytest.mark.parametrize(
    "content_type",
    [FORM, "Application/X-WWW-Form-Urlencoded; charset=UTF-8", f'{FORM}; charset="utf-8"'],
    ids=["plain", "mixed-case-with-charset", "quoted-charset"],
)
def test_the_form_media_type_is_recognised_in_any_of_its_spellings(
    url: str, ledger_path: Path, content_type: str
) -> None:
    response = requests.post(url, data=unsubscribe_form(), timeout=5,
                             headers={"Content-Type": content_type})
    assert response.status_code == 200
    assert len(pending(ledger_path)) == 1


@pytest.mark.parametrize(
    "fired_at",
    ["0001-01-01 00:00:00", "9999-12-31 23:59:59", "1999-12-31 23:59:59",
     (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S")],
    ids=["year-1", "year-9999", "before-2000", "two-days-ahead"],
)
def test_an_implausible_fired_at_gets_400_and_nothing_is_recorded(
    url: str, ledger_path: Path, fired_at: str
) -> None:
    response = requests.post(url, data=unsubscribe_form(fired_at=fired_at), timeout=5)
    assert response.status_code == 400
    assert pending(ledger_path) == []


@pytest.mark.parametrize(
    ("fired_at", "accepted"),
    [("2000-01-01 00:00:00", True), ("1999-12-31 23:59:59", False),
     ("2026-12-04 10:11:12", True), ("2026-12-04 10:11:13", False)],
    ids=["first-second-of-2000", "last-second-of-1999", "a-day-ahead", "past-a-day-ahead"],
)
def test_fired_at_is_plausible_from_2000_to_a_day_ahead_of_the_clock(
    fired_at: str, accepted: bool
) -> None:
    now = datetime(2026, 12, 3, 10, 11, 12, tzinfo=UTC)
    form = unsubscribe_form(fired_at=fired_at)
    if accepted:
        event = parse_mailchimp_event(form, now=now)
        assert event is not None and event.occurred_at.strftime("%Y-%m-%d %H:%M:%S") == fired_at
    else:
        with pytest.raises(WebhookError, match="plausible"):
            parse_mailchimp_event(form, now=now)


def test_a_name_longer_than_mailchimp_allows_gets_400_and_nothing_is_recorded(
    url: str, ledger_path: Path
) -> None:
    form = unsubscribe_form(type="profile", **{"data[merges][FNAME]": "N" * 256})
    assert requests.post(url, data=form, timeout=5).status_code == 400
    assert pending(ledger_path) == []


def call_app(ledger_path: Path, environ: dict[str, object]) -> str:
    """One request straight into the app (no server in between to fix the framing)."""

    def record(event: WebhookEvent) -> bool:
        with Ledger.open(ledger_path) as ledger:
            return ledger.add_inbox_event(
                "mailchimp", event.kind, event.occurred_at, event.payload, event.dedupe_key
            )

    statuses: list[str] = []
    environ = {"PATH_INFO": f"/webhooks/mailchimp/{SECRET}", "REQUEST_METHOD": "POST",
               "CONTENT_TYPE": FORM, **environ}
    b"".join(mailchimp_webhook_app(SECRET, record)(
        environ, lambda status, headers: statuses.append(status)))
    return statuses[0]


@pytest.mark.parametrize(
    ("length", "status"),
    [("-1", "400"), ("+70000", "400"), (" 70000", "400"), ("1e9", "400"), (None, "413"),
     (str(WEBHOOK_BODY_LIMIT_BYTES + 1), "413")],
    ids=["negative", "signed", "spaced", "not-a-number", "missing-on-a-terminated-input",
         "over-the-cap"],
)
def test_the_app_never_reads_past_its_cap_whatever_content_length_says(
    ledger_path: Path, length: str | None, status: str
) -> None:
    body = "&".join(f"{k}={v}" for k, v in unsubscribe_form(
        **{"data[merges][NOTES]": "x" * (WEBHOOK_BODY_LIMIT_BYTES * 4)}).items()).encode()
    stream = io.BytesIO(body)
    environ: dict[str, object] = {"wsgi.input": stream, "wsgi.input_terminated": True}
    if length is not None:
        environ["CONTENT_LENGTH"] = length
    assert call_app(ledger_path, environ).startswith(status)
    assert stream.tell() <= WEBHOOK_BODY_LIMIT_BYTES + 1
    assert pending(ledger_path) == []


def test_a_body_shorter_than_its_content_length_gets_400(ledger_path: Path) -> None:
    body = b"type=unsubscribe&fired_at=2026-11-24+10%3A11%3A12&data%5Bemail%5D=a%40example.com"
    environ = {"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body) + 10)}
    assert call_app(ledger_path, environ).startswith("400")
    assert pending(ledger_path) == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_wrong_secret_gets_404_and_records_nothing(url: str, ledger_path: Path, method: str) -> None:
    wrong = url.rsplit("/", 1)[0] + "/guess"
    response = requests.request(method, wrong, data=unsubscribe_form(), timeout=5)
    assert response.status_code == 404
    assert requests.post(url.rsplit("/", 1)[0] + "/", data=unsubscribe_form(), timeout=5).status_code == 404
    assert pending(ledger_path) == []


def test_events_syncd_does_not_act_on_are_acknowledged_and_not_recorded(
    url: str, ledger_path: Path
) -> None:
    assert requests.post(url, data=unsubscribe_form(type="subscribe"), timeout=5).status_code == 200
    assert pending(ledger_path) == []


def test_oversized_body_is_refused(url: str, ledger_path: Path) -> None:
    body = unsubscribe_form(**{"data[merges][NOTES]": "x" * 70_000})
    assert requests.post(url, data=body, timeout=5).status_code == 413
    assert pending(ledger_path) == []


def test_a_failing_ledger_answers_503_so_mailchimp_retries() -> None:
    def broken(_: WebhookEvent) -> bool:
        raise OSError("disk full")

    app = mailchimp_webhook_app(SECRET, broken)
    body = b"type=unsubscribe&fired_at=2026-11-24+10%3A11%3A12&data%5Bemail%5D=a%40example.com"
    statuses: list[str] = []
    app(
        {"PATH_INFO": f"/webhooks/mailchimp/{SECRET}", "REQUEST_METHOD": "POST",
         "CONTENT_TYPE": FORM, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)},
        lambda status, headers: statuses.append(status),
    )
    assert statuses == ["503 Service Unavailable"]


def test_real_mailchimp_deliveries_are_recorded(url: str, ledger_path: Path) -> None:
    emulator = MailchimpEmulator("key-us1", "list1")
    try:
        other = "second.person@example.com"
        for address in (EMAIL, other):
            emulator.add_member(address, "subscribed", merge_fields={"FNAME": "A", "LNAME": "B"})
        emulator.add_webhook(url, validate=True)
        emulator.click_unsubscribe(EMAIL)
        emulator.spam_complaint(other)
        assert emulator.drain_webhooks(10)
    finally:
        emulator.close()
    events = pending(ledger_path)
    assert [e.kind for e in events] == ["unsubscribe", "unsubscribe"]
    assert sorted(e.payload["reason"] for e in events) == ["abuse", "manual"]


def test_processed_events_lose_their_payload(url: str, ledger_path: Path) -> None:
    requests.post(url, data=unsubscribe_form(), timeout=5)
    with Ledger.open(ledger_path) as ledger:
        (event,) = ledger.pending_inbox()
        assert ledger.finish_inbox_event(event.id, "consent_withdrawn")
        assert not ledger.finish_inbox_event(event.id, "again")
        assert ledger.pending_inbox() == []
        ledger.checkpoint()
    assert EMAIL.encode() not in ledger_path.read_bytes()


def test_rejections_never_log_the_address(url: str) -> None:
    stream = io.StringIO()
    log.configure("debug", "json", stream=stream)
    try:
        requests.post(url, data=unsubscribe_form(fired_at="bad"), timeout=5)
        requests.post(url, data=unsubscribe_form(), timeout=5)
    finally:
        log.configure("warning")
    assert "webhook_rejected" in stream.getvalue() and "webhook_recorded" in stream.getvalue()
    assert EMAIL not in stream.getvalue()
