"""A local SMTP server that keeps every message it receives, for syncd's alert emails.

syncd tells the practice manager about manual steps and failures by email.
:class:`SmtpSink` is a real SMTP server (``aiosmtpd``) on loopback, so the
daemon's own ``smtplib`` code runs unchanged against it; tests, the demo and
the control API read the messages back with :meth:`SmtpSink.messages`.

It speaks plain SMTP (syncd's ``smtp_security = "none"``); STARTTLS and SMTPS
are not offered. With a username and password it advertises AUTH PLAIN and
LOGIN without TLS, refuses mail until the client has logged in (530) and
refuses wrong credentials with 535, as a submission server does.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

LOOPBACK_HOST = "127.0.0.1"
SERVER_HOSTNAME = "syncd-sandbox"  # also spares aiosmtpd a slow getfqdn() lookup
READY_TIMEOUT_SECONDS = 5.0
ACCEPTED_REPLY = "250 2.0.0 Message accepted for delivery"
AUTH_REQUIRED_REPLY = "530 5.7.0 Authentication required"


class _QuietDeprecation(logging.Filter):
    """Drops aiosmtpd's own "Session.login_data is deprecated" line, logged on every AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


_MAIL_LOG = logging.getLogger("mail.log")
_MAIL_LOG.addFilter(_QuietDeprecation())
# aiosmtpd logs every connection at INFO, with the peer's address; only its
# warnings and errors are worth a line in the sandbox's output.
_MAIL_LOG.setLevel(logging.WARNING)


class SmtpSink:
    """An SMTP server on 127.0.0.1 that stores what it receives.

    Thread-safe: the server thread appends, any thread reads.

    Args:
        host: the address to listen on.
        port: the port; 0 picks a free one, readable from :attr:`port` after
            :meth:`start`.
        username: when set together with ``password``, clients must log in.
        password: the password for ``username``.
    """

    def __init__(
        self,
        host: str = LOOPBACK_HOST,
        port: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.host = host
        self._requested_port = port
        self._username = username
        self._password = password
        self._lock = threading.Condition()
        self._messages: list[dict[str, Any]] = []
        self._received = 0
        self._controller: _Controller | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (the requested one before :meth:`start`)."""
        controller = self._controller
        return controller.port if controller is not None else self._requested_port

    @property
    def requires_auth(self) -> bool:
        """Whether clients must log in before sending."""
        return self._username is not None

    def start(self) -> None:
        """Start serving in a background thread; returns once the server answers."""
        if self._controller is not None:
            return
        kwargs: dict[str, Any] = {}
        if self.requires_auth:
            # auth_required=True would make aiosmtpd warn on every connection
            # that AUTH without TLS is unsafe; the handler's MAIL hook refuses
            # unauthenticated senders instead, with the same 530 reply.
            kwargs = {"authenticator": self._authenticate, "auth_require_tls": False}
        controller = _Controller(
            _Handler(self),
            hostname=self.host,
            port=self._requested_port,
            server_hostname=SERVER_HOSTNAME,
            ready_timeout=READY_TIMEOUT_SECONDS,
            **kwargs,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop serving (messages already received are kept)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def messages(self) -> list[dict[str, Any]]:
        """Every message received so far, oldest first, as JSON-able copies.

        Returns:
            One dict per message: ``id``, ``mail_from`` and ``recipients`` (the
            envelope), ``from``, ``to``, ``subject``, ``date``, ``message_id``
            (headers), ``text`` (the plain-text body, or None), ``html`` (the
            HTML body, or None), ``auth_user`` (who logged in, or None) and
            ``received_at`` (RFC 3339 UTC).
        """
        with self._lock:
            return [dict(m, recipients=list(m["recipients"])) for m in self._messages]

    def clear(self) -> None:
        """Forget every message received."""
        with self._lock:
            self._messages.clear()

    def wait_for(self, count: int, timeout_seconds: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages have arrived.

        Args:
            count: how many messages to wait for.
            timeout_seconds: how long to wait at most.

        Returns:
            The messages (possibly fewer than ``count`` if the time ran out).
        """
        deadline = time.monotonic() + timeout_seconds
        with self._lock:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
        return self.messages()

    def _store(self, envelope: Envelope, session: Session) -> None:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        # SMTP carries CRLF line ends; store bodies with plain newlines.
        message = message_from_bytes(content.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(message, EmailMessage)
        auth_user = session.auth_data if isinstance(session.auth_data, str) else None
        record = {
            "mail_from": envelope.mail_from,
            "recipients": list(envelope.rcpt_tos),
            "from": _header(message, "From"),
            "to": _header(message, "To"),
            "subject": _header(message, "Subject"),
            "date": _header(message, "Date"),
            "message_id": _header(message, "Message-ID"),
            "text": _body(message, "plain"),
            "html": _body(message, "html"),
            "auth_user": auth_user,
            "received_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        with self._lock:
            self._received += 1
            record["id"] = self._received
            self._messages.append(record)
            self._lock.notify_all()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword) or self._password is None:
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        # Constant-time comparisons, as a real server would use.
        ok = secrets.compare_digest(login.encode(), (self._username or "").encode())
        ok &= secrets.compare_digest(password.encode(), self._password.encode())
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


class _Handler:
    """aiosmtpd handler: accepts every message and hands it to the sink."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self._sink.requires_auth and not session.authenticated:
            return AUTH_REQUIRED_REPLY
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self._sink._store(envelope, session)
        return ACCEPTED_REPLY


class _Controller(Controller):
    """aiosmtpd's threaded controller, able to listen on port 0.

    The stock controller connects to ``self.port`` to check that the server is
    up, which fails for port 0; so learn the bound port from the listening
    socket first.
    """

    def _trigger_server(self) -> None:
        if self.server is not None and self.server.sockets:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def _header(message: EmailMessage, name: str) -> str | None:
    value = message.get(name)
    return str(value) if value is not None else None


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    content = part.get_content()
    return content if isinstance(content, str) else None
