"""Tests for the SMTP sink, sending real mail to it with smtplib."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import pytest

from syncd.sandbox.smtp import SmtpSink

TIMEOUT_SECONDS = 10
USERNAME = "syncd"
PASSWORD = "s3cret-sandbox"
BODY = "Open Phorest › Client actions › Forget.\nThen syncd checks again.\n"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def auth_sink() -> Iterator[SmtpSink]:
    with SmtpSink(username=USERNAME, password=PASSWORD) as running:
        yield running


def alert(subject: str = "Erasure needs a manual step – Café Nails") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "syncd@example.com"
    message["To"] = "manager@example.com, owner@example.com"
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime(2026, 11, 24, 19, 40, tzinfo=UTC))
    message["Message-ID"] = make_msgid(domain="example.com")
    message.set_content(BODY)
    return message


def send(sink: SmtpSink, message: EmailMessage, login: tuple[str, str] | None = None) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT_SECONDS) as client:
        if login:
            client.login(*login)
        client.send_message(message)


def test_sink_listens_on_a_free_loopback_port(sink: SmtpSink) -> None:
    assert sink.host == "127.0.0.1"
    assert sink.port > 0


def test_a_plain_message_is_stored_with_envelope_headers_and_body(sink: SmtpSink) -> None:
    message = alert()

    send(sink, message)

    [stored] = sink.messages()
    assert stored["mail_from"] == "syncd@example.com"
    assert stored["recipients"] == ["manager@example.com", "owner@example.com"]
    assert stored["subject"] == "Erasure needs a manual step – Café Nails"
    assert stored["text"] == BODY
    assert stored["html"] is None
    assert stored["message_id"] == message["Message-ID"]
    assert stored["date"] == "Tue, 24 Nov 2026 19:40:00 +0000"
    assert stored["auth_user"] is None
    assert stored["received_at"].endswith("Z")


def test_envelope_recipients_include_blind_copies(sink: SmtpSink) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=TIMEOUT_SECONDS) as client:
        client.send_message(alert(), to_addrs=["manager@example.com", "dpo@example.com"])

    [stored] = sink.messages()
    assert stored["recipients"] == ["manager@example.com", "dpo@example.com"]
    assert stored["to"] == "manager@example.com, owner@example.com"


def test_an_html_alternative_is_kept_next_to_the_text(sink: SmtpSink) -> None:
    message = alert()
    message.add_alternative("<p>Open Phorest</p>", subtype="html")

    send(sink, message)

    [stored] = sink.messages()
    assert stored["text"].startswith("Open Phorest")
    assert stored["html"].strip() == "<p>Open Phorest</p>"


def test_messages_are_kept_in_order_until_cleared(sink: SmtpSink) -> None:
    for n in range(3):
        send(sink, alert(f"alert {n}"))

    subjects = [m["subject"] for m in sink.wait_for(3)]
    sink.clear()

    assert subjects == ["alert 0", "alert 1", "alert 2"]
    assert sink.messages() == []


def test_an_authenticated_sender_is_accepted_and_recorded(auth_sink: SmtpSink) -> None:
    send(auth_sink, alert(), login=(USERNAME, PASSWORD))

    [stored] = auth_sink.messages()
    assert stored["auth_user"] == USERNAME
    assert stored["subject"] == "Erasure needs a manual step – Café Nails"


@pytest.mark.parametrize(
    "login",
    [(USERNAME, "wrong"), ("someone-else", PASSWORD)],
    ids=["wrong-password", "wrong-username"],
)
def test_wrong_credentials_are_refused_with_535(
    auth_sink: SmtpSink, login: tuple[str, str]
) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        send(auth_sink, alert(), login=login)

    assert refused.value.smtp_code == 535
    assert auth_sink.messages() == []


def test_a_sink_with_credentials_refuses_mail_without_login(auth_sink: SmtpSink) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(auth_sink, alert())

    assert refused.value.smtp_code == 530
    assert auth_sink.messages() == []


def test_a_stopped_sink_keeps_its_messages_and_refuses_connections() -> None:
    sink = SmtpSink()
    sink.start()
    send(sink, alert())
    port = sink.port

    sink.stop()

    assert len(sink.messages()) == 1
    with pytest.raises(OSError):
        smtplib.SMTP(sink.host, port, timeout=TIMEOUT_SECONDS)
