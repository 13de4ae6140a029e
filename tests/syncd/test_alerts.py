"""Tests for syncd.alerts: a real ledger and SMTP server; the webhook faked at the wire.

Mail goes through smtplib to the sandbox's aiosmtpd sink and is read back from
it; alert state is read back from the ledger. A client's email, name and subject
key are seeded next to the alerts (a request's note, a task payload, a
processor's last error) and must never reach a message or a log line.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import responses
import structlog

from syncd import config
from syncd.alerts import DIGEST_THRESHOLD, check_conditions, dispatch, run_checks
from syncd.config import AlertsSettings, Settings
from syncd.ledger import Ledger
from syncd.sandbox.smtp import SmtpSink
from tests.support import FakeClock

START = datetime(2026, 11, 24, 19, 40, tzinfo=UTC)
MANAGER = "practice.manager@salon.example"
SENDER = "syncd@salon.example"
SMTP_USER, SMTP_PASSWORD = "syncd-mailer", "smtp-pass-never-logged"
WEBHOOK_URL = "https://hooks.example.net/services/T000/B000/hook-secret-token"
CLIENT_EMAIL = "zelda.quintanilla@client.example"
CLIENT_NAME = "Zelda Quintanilla"
SUBJECT_KEY = "sk_5f0c1e9a7b3d42e8a6c4f2b0d8e6a4c2"
NEVER_SHOWN = [CLIENT_EMAIL, "zelda", "Quintanilla", SUBJECT_KEY]
NEVER_LOGGED = [*NEVER_SHOWN, MANAGER, SENDER, SMTP_USER, SMTP_PASSWORD, "hook-secret-token"]


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture(scope="module")
def running_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def sink(running_sink: SmtpSink) -> SmtpSink:
    running_sink.clear()
    return running_sink


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture
def ledger(db_path: Path, clock: FakeClock) -> Iterator[Ledger]:
    with Ledger.open(db_path, clock=clock) as opened:
        yield opened


@pytest.fixture
def alerts(sink: SmtpSink) -> AlertsSettings:
    return alerts_for(sink.port)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Log events as the code emitted them, before any redaction could hide a leak."""
    with structlog.testing.capture_logs() as captured:
        yield captured


def alerts_for(port: int, **changes: Any) -> AlertsSettings:
    values: dict[str, Any] = {"to": [MANAGER], "from": SENDER, "smtp_host": "127.0.0.1",
                              "smtp_port": port, "smtp_security": "none"}  # fmt: skip
    return AlertsSettings(**(values | changes))


def settings_with(alerts: AlertsSettings | None, **sections: Any) -> Settings:
    return config.Settings(
        identity={"hmac_key": "k" * 32},
        phorest={"business_id": "salon", "username": "global/api@salon.example", "password": "p"},
        mailchimp={"api_key": "0123456789abcdef-us6", "list_id": "a1b2c3d4e5"},
        alerts=None if alerts is None else alerts.model_dump(by_alias=True, exclude_none=True),
        **sections,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def row(db_path: Path, problem_key: str) -> dict[str, Any]:
    """The newest alert for ``problem_key``, read from the file as an operator would."""
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM alerts WHERE problem_key = ? ORDER BY id DESC LIMIT 1",
                             (problem_key,)).fetchone()  # fmt: skip
    finally:
        conn.close()
    assert found is not None, f"no alert {problem_key}"
    return dict(found)


def open_keys(ledger: Ledger) -> dict[str, str]:
    return {alert.problem_key: alert.kind for alert in ledger.open_alerts()}


def subjects(sink: SmtpSink) -> list[str]:
    return [message["subject"] for message in sink.messages()]


def seed_personal_data(ledger: Ledger) -> None:
    """Personal data where careless alert code could pick it up."""
    ledger.add_task(SUBJECT_KEY, "mailchimp", "unsubscribe", "opt_out",
                    payload={"email": CLIENT_EMAIL, "first_name": "Zelda"})  # fmt: skip


# -- one message per problem --------------------------------------------------------


def test_a_new_problem_is_mailed_to_the_manager_and_marked_notified(
    ledger: Ledger, alerts: AlertsSettings, sink: SmtpSink, db_path: Path
) -> None:
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing (OSError)")

    report = dispatch(ledger, alerts, now=START)

    [mail] = sink.messages()
    assert mail["subject"] == "[syncd] the poll job keeps failing (OSError)"
    assert mail["mail_from"] == SENDER and mail["recipients"] == [MANAGER]
    assert "the poll job keeps failing (OSError)" in mail["text"]
    assert "Started:  2026-11-24 19:40 UTC" in mail["text"]
    assert "`syncd status`" in mail["text"] and "`syncd check`" in mail["text"]
    assert mail["html"] is None
    stored = row(db_path, "job_failed:poll")
    assert stored["notify_count"] == 1
    assert stored["last_notified_at"] == "2026-11-24T19:40:00.000000Z"
    assert (report.sent, report.failed, report.reminders, report.recoveries) == (1, 0, 0, 0)


def test_nothing_due_sends_nothing(ledger: Ledger, alerts: AlertsSettings, sink: SmtpSink) -> None:
    report = dispatch(ledger, alerts, now=START)

    assert sink.messages() == []
    assert report.sent == report.failed == 0


def test_an_open_problem_is_repeated_only_after_remind_every_hours(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock, db_path: Path
) -> None:
    alerts = alerts_for(sink.port, remind_every_hours=6)
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    dispatch(ledger, alerts, now=clock.now)

    clock.advance(hours=5, minutes=59)
    quiet = dispatch(ledger, alerts, now=clock.now)
    assert quiet.sent == 0 and len(sink.messages()) == 1

    clock.advance(minutes=1)
    reminder = dispatch(ledger, alerts, now=clock.now)
    again = dispatch(ledger, alerts, now=clock.now)

    assert subjects(sink) == ["[syncd] the poll job keeps failing",
                              "[syncd] Reminder: the poll job keeps failing"]  # fmt: skip
    assert "you were told once before" in sink.messages()[1]["text"]
    assert (reminder.sent, reminder.reminders, again.sent) == (1, 1, 0)
    assert row(db_path, "job_failed:poll")["notify_count"] == 2


def test_a_cleared_problem_gets_exactly_one_recovery_notice(
    ledger: Ledger, alerts: AlertsSettings, sink: SmtpSink, clock: FakeClock, db_path: Path
) -> None:
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    dispatch(ledger, alerts, now=clock.now)
    clock.advance(minutes=5)
    ledger.resolve_alert("job_failed:poll")

    first = dispatch(ledger, alerts, now=clock.now)
    clock.advance(days=2)
    second = dispatch(ledger, alerts, now=clock.now)

    assert subjects(sink) == ["[syncd] the poll job keeps failing",
                              "[syncd] Resolved: the poll job keeps failing"]  # fmt: skip
    assert "Resolved: 2026-11-24 19:45 UTC" in sink.messages()[1]["text"]
    assert (first.sent, first.recoveries, second.sent) == (1, 1, 0)
    assert row(db_path, "job_failed:poll")["recovery_notified_at"] == "2026-11-24T19:45:00.000000Z"


def test_a_problem_that_cleared_before_anyone_was_told_sends_nothing(
    ledger: Ledger, alerts: AlertsSettings, sink: SmtpSink
) -> None:
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    ledger.resolve_alert("job_failed:poll")

    report = dispatch(ledger, alerts, now=START)

    assert sink.messages() == [] and report.sent == 0


@pytest.mark.parametrize(("due", "emails"), [(DIGEST_THRESHOLD, DIGEST_THRESHOLD),
                                             (DIGEST_THRESHOLD + 1, 1)],
                         ids=["ten-separate", "eleven-digest"])  # fmt: skip
def test_more_than_ten_notices_at_once_go_out_as_one_digest(
    ledger: Ledger, alerts: AlertsSettings, sink: SmtpSink, db_path: Path, due: int, emails: int
) -> None:
    for n in range(due):
        ledger.raise_alert(f"task_failed:mailchimp:reason{n}", "task_failed",
                           f"mailchimp: task(s) failed (reason{n})")  # fmt: skip

    report = dispatch(ledger, alerts, now=START)

    assert len(sink.messages()) == emails
    assert report.sent == due and report.digest == (emails == 1)
    assert all(row(db_path, f"task_failed:mailchimp:reason{n}")["notify_count"] == 1
               for n in range(due))  # fmt: skip
    if emails == 1:
        [digest] = sink.messages()
        assert digest["subject"] == f"[syncd] {due} alerts: {due} new, 0 still open, 0 resolved"
        assert all(f"- mailchimp: task(s) failed (reason{n}) (since" in digest["text"]
                   for n in range(due))  # fmt: skip


def test_a_digest_lists_new_open_and_resolved_problems_apart(
    ledger: Ledger, alerts: AlertsSettings, sink: SmtpSink, clock: FakeClock
) -> None:
    for n in range(4):
        ledger.raise_alert(f"job_failed:old{n}", "job_failed", f"old problem {n}")
    dispatch(ledger, alerts, now=clock.now)
    sink.clear()
    clock.advance(hours=24)
    ledger.resolve_alert("job_failed:old0")
    for n in range(8):
        ledger.raise_alert(f"job_failed:new{n}", "job_failed", f"new problem {n}")

    report = dispatch(ledger, alerts, now=clock.now)

    [digest] = sink.messages()
    assert digest["subject"] == "[syncd] 12 alerts: 8 new, 3 still open, 1 resolved"
    text = digest["text"]
    headings = ["New problems (8):", "Still open (3):", "Resolved (1):"]
    assert [text.index(h) for h in headings] == sorted(text.index(h) for h in headings)
    assert (report.sent, report.reminders, report.recoveries, report.digest) == (12, 3, 1, True)


# -- delivery failures ----------------------------------------------------------


def test_an_unreachable_smtp_server_marks_nothing_and_the_next_dispatch_delivers(
    ledger: Ledger, sink: SmtpSink, db_path: Path, events: list[dict[str, Any]]
) -> None:
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")

    down = dispatch(ledger, alerts_for(closed_port()), now=START)

    assert (down.sent, down.failed) == (0, 1)
    assert row(db_path, "job_failed:poll")["notify_count"] == 0
    [failure] = [e for e in events if e["event"] == "alert_delivery_failed"]
    assert (failure["channel"], failure["error"]) == ("email", "ConnectionRefusedError")

    up = dispatch(ledger, alerts_for(sink.port), now=START)

    assert (up.sent, up.failed) == (1, 0)
    assert subjects(sink) == ["[syncd] the poll job keeps failing"]
    assert row(db_path, "job_failed:poll")["notify_count"] == 1


def test_starttls_is_required_when_configured_never_skipped(
    ledger: Ledger, sink: SmtpSink, db_path: Path, events: list[dict[str, Any]]
) -> None:
    # The sink offers no STARTTLS: sending in clear text instead would leak the login.
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")

    report = dispatch(ledger, alerts_for(sink.port, smtp_security="starttls"), now=START)

    assert sink.messages() == [] and report.failed == 1
    assert row(db_path, "job_failed:poll")["notify_count"] == 0
    assert [e["error"] for e in events if e["event"] == "alert_delivery_failed"] == [
        "SMTPNotSupportedError"
    ]


def test_the_configured_login_is_used(ledger: Ledger, db_path: Path) -> None:
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    with SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD) as auth_sink:
        alerts = alerts_for(auth_sink.port, smtp_username=SMTP_USER, smtp_password=SMTP_PASSWORD)

        report = dispatch(ledger, alerts, now=START)

        [mail] = auth_sink.messages()
    assert mail["auth_user"] == SMTP_USER
    assert report.sent == 1 and row(db_path, "job_failed:poll")["notify_count"] == 1


@pytest.mark.parametrize(
    ("changes", "error"),
    [({"smtp_username": SMTP_USER, "smtp_password": "wrong"}, "SMTPAuthenticationError"),
     ({}, "SMTPSenderRefused"),
     ({"smtp_username": SMTP_USER}, "smtp_password_missing")],
    ids=["wrong-password", "no-login", "no-password"],
)  # fmt: skip
def test_a_refused_login_marks_nothing_and_logs_no_credentials(
    ledger: Ledger, db_path: Path, events: list[dict[str, Any]], changes: dict[str, Any], error: str
) -> None:
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    with SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD) as auth_sink:
        report = dispatch(ledger, alerts_for(auth_sink.port, **changes), now=START)
        assert auth_sink.messages() == []

    assert report.failed == 1 and row(db_path, "job_failed:poll")["notify_count"] == 0
    assert [e["error"] for e in events if e["event"] == "alert_delivery_failed"] == [error]
    assert not [secret for secret in NEVER_LOGGED if secret in repr(events)]


# -- the webhook --------------------------------------------------------------


@pytest.fixture
def wire() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def posted(wire: responses.RequestsMock) -> list[dict[str, Any]]:
    return [json.loads(call.request.body) for call in wire.calls]


def test_the_webhook_gets_one_json_post_per_problem(
    ledger: Ledger, sink: SmtpSink, wire: responses.RequestsMock
) -> None:
    wire.post(WEBHOOK_URL, status=200)
    ledger.raise_alert("processor_down:mailchimp", "processor_down", "Mailchimp unreachable")

    report = dispatch(ledger, alerts_for(sink.port, webhook_url=WEBHOOK_URL), now=START)

    [payload] = posted(wire)
    assert payload["text"] == "[syncd] Mailchimp unreachable"
    assert (payload["event"], payload["problem_key"], payload["kind"]) == (
        "problem", "processor_down:mailchimp", "processor_down"
    )  # fmt: skip
    assert payload["started_at"].startswith("2026-11-24T19:40:00")
    assert len(sink.messages()) == 1 and report.sent == 1


def test_a_digest_is_one_webhook_post(
    ledger: Ledger, sink: SmtpSink, wire: responses.RequestsMock
) -> None:
    wire.post(WEBHOOK_URL, status=200)
    for n in range(DIGEST_THRESHOLD + 2):
        ledger.raise_alert(f"job_failed:job{n}", "job_failed", f"job {n} keeps failing")

    dispatch(ledger, alerts_for(sink.port, webhook_url=WEBHOOK_URL), now=START)

    [payload] = posted(wire)
    assert payload["event"] == "digest"
    assert [a["summary"] for a in payload["alerts"]] == [
        f"job {n} keeps failing" for n in range(DIGEST_THRESHOLD + 2)
    ]


@pytest.mark.parametrize(
    ("smtp_up", "webhook_status", "marked"),
    [(True, 500, 1), (False, 200, 1), (False, 503, 0), (False, None, 0)],
    ids=["email-only", "webhook-only", "both-fail", "webhook-unreachable"],
)
def test_a_notice_counts_as_delivered_when_any_channel_took_it(
    ledger: Ledger, sink: SmtpSink, wire: responses.RequestsMock, db_path: Path,
    smtp_up: bool, webhook_status: int | None, marked: int,
) -> None:  # fmt: skip
    if webhook_status is not None:
        wire.post(WEBHOOK_URL, status=webhook_status)  # else: responses refuses the connection
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    alerts = alerts_for(sink.port if smtp_up else closed_port(), webhook_url=WEBHOOK_URL)

    report = dispatch(ledger, alerts, now=START)

    assert row(db_path, "job_failed:poll")["notify_count"] == marked
    assert (report.sent, report.failed) == (marked, 1 - marked)


# -- conditions ---------------------------------------------------------------


def test_a_processor_is_reported_down_only_after_the_threshold(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock
) -> None:
    settings = settings_with(alerts_for(sink.port, processor_down_minutes=30))
    ledger.record_contact("mailchimp", ok=True)
    ledger.record_contact("mailchimp", ok=False, error="ConnectionError")

    clock.advance(minutes=29, seconds=59)
    early = run_checks(ledger, settings, now=clock.now)
    assert open_keys(ledger) == {} and early is not None and early.sent == 0

    clock.advance(seconds=1)
    run_checks(ledger, settings, now=clock.now)

    assert open_keys(ledger) == {"processor_down:mailchimp": "processor_down"}
    assert subjects(sink) == [
        "[syncd] Mailchimp unreachable for 30 min, since 2026-11-24 19:40 UTC"
    ]


def test_a_processor_that_answers_again_clears_its_alert_with_a_notice(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock
) -> None:
    settings = settings_with(alerts_for(sink.port))
    ledger.record_contact("mailchimp", ok=False, error="Timeout")
    run_checks(ledger, settings, now=clock.advance(minutes=45))

    ledger.record_contact("mailchimp", ok=True)
    report = run_checks(ledger, settings, now=clock.advance(minutes=1))

    assert open_keys(ledger) == {}
    assert subjects(sink)[-1] == (
        "[syncd] Resolved: Mailchimp unreachable for 45 min, since 2026-11-24 19:40 UTC"
    )
    assert report is not None and report.recoveries == 1


def test_the_down_threshold_defaults_to_30_minutes_without_an_alerts_section(
    ledger: Ledger, clock: FakeClock
) -> None:
    settings = settings_with(None)
    ledger.record_contact("phorest", ok=False, error="ConnectionError")

    check_conditions(ledger, settings, now=clock.advance(minutes=29))
    assert open_keys(ledger) == {}
    check_conditions(ledger, settings, now=clock.advance(minutes=1))
    assert open_keys(ledger) == {"processor_down:phorest": "processor_down"}


def test_refused_credentials_alert_at_once_and_clear_when_accepted(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock
) -> None:
    settings = settings_with(alerts_for(sink.port))
    ledger.record_contact("mailchimp", ok=False, error="401 API Key Invalid", credentials_ok=False)

    run_checks(ledger, settings, now=clock.now)
    assert open_keys(ledger) == {"credentials:mailchimp": "credentials"}
    # Still refused two hours later: still one problem, not a second "unreachable" one.
    run_checks(ledger, settings, now=clock.advance(hours=2))
    assert open_keys(ledger) == {"credentials:mailchimp": "credentials"}

    ledger.record_contact("mailchimp", ok=True)
    run_checks(ledger, settings, now=clock.advance(minutes=1))

    assert open_keys(ledger) == {}
    assert subjects(sink) == [
        "[syncd] Mailchimp refused syncd's credentials",
        "[syncd] Resolved: Mailchimp refused syncd's credentials",
    ]
    assert "Renew the API key" in sink.messages()[0]["text"]


def test_alerts_of_a_processor_no_longer_configured_are_resolved(
    ledger: Ledger, clock: FakeClock
) -> None:
    ledger.record_contact("mailchimp", ok=False, error="401", credentials_ok=False)
    check_conditions(ledger, settings_with(None), now=clock.now)
    assert open_keys(ledger) == {"credentials:mailchimp": "credentials"}

    without_mailchimp = settings_with(None).model_copy(update={"mailchimp": None})
    check_conditions(ledger, without_mailchimp, now=clock.advance(hours=1))

    assert open_keys(ledger) == {}


def test_a_request_near_its_deadline_is_raised_and_resolved_when_closed(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock
) -> None:
    settings = settings_with(alerts_for(sink.port))
    request_id = ledger.add_request("erase", SUBJECT_KEY, "email",
                                    due_at=START + timedelta(days=30),
                                    note=f"asked by {CLIENT_NAME} <{CLIENT_EMAIL}>")  # fmt: skip
    run_checks(ledger, settings, now=clock.advance(days=22, hours=23))
    assert open_keys(ledger) == {}

    run_checks(ledger, settings, now=clock.advance(hours=1))
    assert open_keys(ledger) == {f"request_due:{request_id}": "request_due"}

    ledger.close_request(request_id, "done")
    run_checks(ledger, settings, now=clock.advance(minutes=1))

    assert open_keys(ledger) == {}
    assert subjects(sink) == [
        f"[syncd] Erasure request #{request_id} is due on 2026-12-24",
        f"[syncd] Resolved: Erasure request #{request_id} is due on 2026-12-24",
    ]


def test_an_overdue_request_is_announced_as_overdue_without_a_resolved_notice(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock, db_path: Path
) -> None:
    settings = settings_with(alerts_for(sink.port))
    due_at = START + timedelta(days=3)
    request_id = ledger.add_request("export", SUBJECT_KEY, "email", due_at=due_at)
    run_checks(ledger, settings, now=clock.now)

    run_checks(ledger, settings, now=clock.advance(days=3, minutes=1))

    assert open_keys(ledger) == {f"request_due:{request_id}": "request_overdue"}
    assert subjects(sink) == [
        f"[syncd] Export request #{request_id} is due on 2026-11-27",
        f"[syncd] Export request #{request_id} is overdue: it was due on 2026-11-27",
    ]
    assert row(db_path, f"request_due:{request_id}")["notify_count"] == 1


def test_a_due_alert_whose_request_is_gone_is_resolved(ledger: Ledger, clock: FakeClock) -> None:
    ledger.raise_alert("request_due:999", "request_due", "Erasure request #999 is due soon")
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")

    check_conditions(ledger, settings_with(None), now=clock.now)

    assert open_keys(ledger) == {"job_failed:poll": "job_failed"}


def test_without_an_alerts_section_alerts_are_kept_for_status_and_nothing_is_sent(
    ledger: Ledger, clock: FakeClock, db_path: Path
) -> None:
    ledger.record_contact("mailchimp", ok=False, error="401", credentials_ok=False)

    result = run_checks(ledger, settings_with(None), now=clock.now)

    assert result is None
    assert open_keys(ledger) == {"credentials:mailchimp": "credentials"}
    assert row(db_path, "credentials:mailchimp")["notify_count"] == 0


# -- personal data ---------------------------------------------------------------


def test_no_personal_data_reaches_mail_webhook_or_logs(
    ledger: Ledger, sink: SmtpSink, clock: FakeClock, wire: responses.RequestsMock,
    events: list[dict[str, Any]],
) -> None:  # fmt: skip
    wire.post(WEBHOOK_URL, status=200)
    settings = settings_with(alerts_for(sink.port, webhook_url=WEBHOOK_URL))
    seed_personal_data(ledger)
    ledger.add_request("erase", SUBJECT_KEY, f"email from {CLIENT_EMAIL}",
                       due_at=START + timedelta(days=2),
                       note=f"{CLIENT_NAME} <{CLIENT_EMAIL}>")  # fmt: skip
    ledger.record_contact("mailchimp", ok=False, error=f"404 member {CLIENT_EMAIL} not found")
    ledger.record_contact("phorest", ok=False, error=f"{CLIENT_NAME}", credentials_ok=False)

    run_checks(ledger, settings, now=clock.advance(hours=1))
    # A failing round too, so failure log lines are covered.
    failing = settings.model_copy(update={"alerts": alerts_for(closed_port())})
    ledger.raise_alert("job_failed:poll", "job_failed", "the poll job keeps failing")
    run_checks(ledger, failing, now=clock.advance(minutes=1))

    mails = sink.messages()
    assert len(mails) == 3  # mailchimp down, phorest credentials, the request
    shown = json.dumps([[m["subject"], m["text"]] for m in mails]) + json.dumps(posted(wire))
    assert not [value for value in NEVER_SHOWN if value.lower() in shown.lower()]
    assert any(e["event"] == "alert_delivery_failed" for e in events)
    assert not [value for value in NEVER_LOGGED if value.lower() in repr(events).lower()]


# -- data-subject request steps ---------------------------------------------------


def summaries(ledger: Ledger) -> dict[str, str]:
    return {alert.problem_key: alert.summary for alert in ledger.open_alerts()}


def test_each_waiting_manual_step_is_an_alert_resolved_when_the_step_closes(
    ledger: Ledger, clock: FakeClock
) -> None:
    settings = settings_with(None)
    request_id = ledger.add_request("erase", SUBJECT_KEY, "email", START + timedelta(days=30))
    forget = ledger.add_step(request_id, "phorest", "manual", client_id="c1",
                             instructions="In Phorest, open client c1 and use Client actions › Forget")
    paper = ledger.add_step(request_id, "paper_forms", "manual", client_id="c1",
                            instructions="Shred the forms (client id c1, request #1)")
    ledger.add_step(request_id, "mailchimp", "task")  # syncd's own work: no alert
    failed_manual = ledger.add_step(request_id, "salon_software", "manual")
    ledger.close_step(failed_manual, "failed")

    check_conditions(ledger, settings, now=clock.now)

    assert summaries(ledger) == {
        f"manual_step:{request_id}:{forget}": (
            f"Request #{request_id}: In Phorest, open client c1 and use Client actions › Forget; "
            "syncd closes this step itself once Phorest shows the client forgotten"),
        f"manual_step:{request_id}:{paper}": (
            f"Request #{request_id}: paper_forms: Shred the forms (client id c1, request #1); "
            f"then run: syncd request confirm {request_id} --processor paper_forms"),
    }
    assert {a.kind for a in ledger.open_alerts()} == {"manual_step"}

    ledger.close_step(paper, "done", confirmed_by="Ann")
    check_conditions(ledger, settings, now=clock.advance(minutes=1))
    assert open_keys(ledger) == {f"manual_step:{request_id}:{forget}": "manual_step"}

    ledger.close_request(request_id, "cancelled")  # its waiting step no longer waits for anyone
    check_conditions(ledger, settings, now=clock.advance(minutes=1))
    assert open_keys(ledger) == {}


def _waiting_analytics_task(ledger: Ledger, request_id: int, next_attempt_at: datetime,
                            error: str) -> int:  # fmt: skip
    task_id = ledger.add_task(SUBJECT_KEY, "google_analytics", "erase", "R3:erasure_request",
                              request_id=request_id)  # fmt: skip
    ledger.claim(task_id)
    ledger.retry_later(task_id, next_attempt_at, error, refund_attempt=True)
    return task_id


@pytest.mark.parametrize(
    ("before_due", "error", "raised"),
    [(timedelta(hours=12), "quota_wait:quota_exceeded", True),
     (timedelta(days=1), "quota_wait:quota_exceeded", True),
     (-timedelta(days=2), "quota_wait:quota_exceeded", True),
     (timedelta(days=1, seconds=1), "quota_wait:quota_exceeded", False),
     (timedelta(hours=12), "retriable:http_503", False)],
    ids=["half-a-day-before", "a-day-before", "past-the-deadline", "in-time", "not-a-quota-wait"],
)
def test_a_ga_deletion_waiting_for_quota_near_the_deadline_is_an_alert(
    ledger: Ledger, clock: FakeClock, before_due: timedelta, error: str, raised: bool
) -> None:
    due = START + timedelta(days=30)
    request_id = ledger.add_request("erase", SUBJECT_KEY, "email", due)
    _waiting_analytics_task(ledger, request_id, due - before_due, error)

    check_conditions(ledger, settings_with(None), now=clock.now)

    expected = {f"quota_deadline:{request_id}": "quota_deadline"} if raised else {}
    assert open_keys(ledger) == expected
    if raised:
        summary = summaries(ledger)[f"quota_deadline:{request_id}"]
        assert summary.startswith(f"Request #{request_id}: 1 Google Analytics deletion(s) wait")
        assert "(2026-12-24)" in summary and SUBJECT_KEY not in summary


def test_a_quota_deadline_alert_is_resolved_once_the_deletion_is_done(
    ledger: Ledger, clock: FakeClock
) -> None:
    due = START + timedelta(days=30)
    request_id = ledger.add_request("erase", SUBJECT_KEY, "email", due)
    ledger.add_request("erase", "someone-else", "email", due)  # no GA deletion: no alert
    closed = ledger.add_request("erase", "closed", "email", due)
    task_id = _waiting_analytics_task(ledger, request_id, due, "quota_wait:quota_exceeded")
    _waiting_analytics_task(ledger, closed, due, "quota_wait:quota_exceeded")
    ledger.close_request(closed, "cancelled")
    check_conditions(ledger, settings_with(None), now=clock.now)
    assert open_keys(ledger) == {f"quota_deadline:{request_id}": "quota_deadline"}

    ledger.claim(task_id)
    ledger.finish(task_id, "done", detail="deletionRequestTime=2026-12-24T00:00:00Z")
    check_conditions(ledger, settings_with(None), now=clock.advance(hours=1))

    assert open_keys(ledger) == {}


@pytest.mark.parametrize(("warning_days", "raised"), [(None, False), (14, True), (13, False)],
                         ids=["default-7", "14", "13"])  # fmt: skip
def test_request_warning_days_sets_how_early_a_deadline_is_announced(
    ledger: Ledger, clock: FakeClock, warning_days: int | None, raised: bool
) -> None:
    policy = {} if warning_days is None else {"request_warning_days": warning_days}
    settings = settings_with(None, policy=policy)
    request_id = ledger.add_request("erase", SUBJECT_KEY, "email",
                                    START + timedelta(days=13, hours=12))  # fmt: skip

    check_conditions(ledger, settings, now=clock.now)

    assert open_keys(ledger) == ({f"request_due:{request_id}": "request_due"} if raised else {})
