"""Alerts: tell the practice manager when something needs a person (DESIGN R10).

Problems live in the ledger's ``alerts`` table, one open alert per
``problem_key``. Two kinds of code write them:

- the work itself: :mod:`syncd.tasks` (``needs_person:…``, ``retries_exhausted:…``,
  ``task_failed:…``) and :mod:`syncd.daemon` (``job_failed:<job>``);
- :func:`check_conditions`, from what the ledger knows about the world:

  - ``processor_down:<name>``: the processor's current run of failed contacts
    began more than ``[alerts] processor_down_minutes`` ago (30 without an
    ``[alerts]`` section); resolved once a contact succeeds. A processor that
    refuses the credentials gets the credentials alert instead, not both.
  - ``credentials:<name>``: at once when the processor refused syncd's
    credentials; resolved when they next work.
  - ``request_due:<id>``: an open data-subject request due within
    ``[policy] request_warning_days`` (kind ``request_due``) or past its due
    date (kind ``request_overdue``; the near-deadline alert is replaced, with
    no "resolved" notice, since nothing cleared); resolved once the request is
    closed.
  - ``manual_step:<request id>:<step id>``: a step of a request waits for a
    person (Phorest's Forget, a manual processor), with what to do; resolved
    when the step closes.
  - ``quota_deadline:<request id>``: a GA deletion of an open request waits
    for a quota day within a day of (or past) the request's deadline.

  Processors that are no longer configured have their alerts resolved.
  The engine raises ``suppressed_consent:<client id>`` itself: Phorest shows a
  person who asked to be erased with consent again; the retention purge raises
  ``purge_guard:<run id>`` when its guard holds a run back (client counts only).

:func:`dispatch` then tells the manager, by email and, when configured, a JSON
webhook. The policy is "one message per problem, throttled, never a flood":

- an open alert nobody was told about is sent now;
- one already sent is sent again (a reminder) only once ``last_notified_at`` is
  ``remind_every_hours`` old;
- a resolved alert the manager was told about gets one "Resolved" notice; one
  that cleared before anybody was told gets none;
- more than :data:`DIGEST_THRESHOLD` notices due at once go out as ONE digest.

A notice counts as delivered, and is marked in the ledger, once any channel
(email or webhook) took it: the manager has been told, and marking it stops the
other channel from repeating it every minute. When every channel failed,
nothing is marked and the next dispatch tries again. A delivery failure is
logged with its error type only (never an address, a URL or a message body) and
never raised.

Summaries, and so subjects and bodies, carry processor names, request ids, due
dates and reasons: never a subject key or personal data. The daemon calls
:func:`run_checks` every minute; without an ``[alerts]`` section the alerts are
still raised and resolved, so ``syncd status`` shows them, but nothing is sent.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Literal

import requests
import structlog

from syncd.config import AlertsSettings, Settings
from syncd.ledger import Alert, Ledger, ProcessorHealth, Request

log = structlog.get_logger(__name__)

SMTP_TIMEOUT_SECONDS = 10.0  # [alerts] has no timeout key; syncd check uses it too
WEBHOOK_TIMEOUT_SECONDS = 10.0
# More notices than this in one dispatch are sent as one digest.
DIGEST_THRESHOLD = 10
# A request due within this many days is brought to the manager's attention.
REQUEST_WARNING_DAYS = 7
# Without an [alerts] section, the schema's own default.
DEFAULT_PROCESSOR_DOWN_MINUTES: float = (
    AlertsSettings.model_fields["processor_down_minutes"].default
)
SUBJECT_PREFIX = "[syncd]"

PROCESSOR_DOWN = "processor_down"
CREDENTIALS = "credentials"
REQUEST_DUE = "request_due"
REQUEST_OVERDUE = "request_overdue"
MANUAL_STEP = "manual_step"
QUOTA_DEADLINE = "quota_deadline"
SUPPRESSED_CONSENT = "suppressed_consent"  # raised by the engine (syncd.engine)
PURGE_GUARD = "purge_guard"  # raised by the retention purge (syncd.retention)

REQUEST_LABELS = {"erase": "Erasure", "restrict": "Restriction",
                  "unrestrict": "Lift-restriction", "export": "Export"}  # fmt: skip
# What to do first, by alert kind; `syncd status` and `syncd check` follow in every message.
HINTS = {
    PROCESSOR_DOWN: "syncd keeps retrying by itself. Check the processor's status page and the"
    " server's internet connection.",
    CREDENTIALS: "Renew the API key or password with the processor and install it where the"
    " configuration expects it (see the README), then restart syncd.",
    REQUEST_DUE: "Finish the request before its deadline; it may need a manual step.",
    REQUEST_OVERDUE: "The statutory deadline has passed: finish the request now and record why"
    " it was late.",
    MANUAL_STEP: "Do what the message says; syncd closes a Phorest step itself once Phorest"
    " shows the client forgotten. `syncd request show ID` lists every step.",
    QUOTA_DEADLINE: "Google Analytics accepts 500 deletions a day per property; syncd sends the"
    " rest on the next quota day. Extend the request (`syncd request extend`) or delete the"
    " user by hand in GA's User Explorer, then confirm the step.",
    SUPPRESSED_CONSENT: "The person asked to be erased. Check with them before anything else;"
    " syncd keeps them off every processor meanwhile.",
    PURGE_GUARD: "An unusually large share of clients looks stale (a wrong lastVisit import?"
    " a changed setting?). Check the list with `syncd retention --dry-run`; only if it is"
    " right, confirm with the command in this message.",
    "needs_person": "A manual step is waiting for you; `syncd status` lists it.",
    "retries_exhausted": "syncd gave up on some changes after many tries; fix the cause, then"
    " run `syncd resync`.",
    "task_failed": "The processor refused some changes; `syncd status` shows why.",
    "job_failed": "syncd keeps retrying the job; if it does not clear, look at the service log"
    " (journalctl -u syncd).",
}
DEFAULT_HINT = "Look at `syncd status` for the details."

Event = Literal["problem", "reminder", "resolved"]


@dataclass(frozen=True, slots=True)
class DispatchReport:
    """What one :func:`dispatch` did.

    Attributes:
        sent: notices delivered (new problems, reminders and recoveries).
        failed: notices no channel took; they are tried again next time.
        reminders: how many of ``sent`` were reminders.
        recoveries: how many of ``sent`` were "resolved" notices.
        digest: whether the notices went out as one digest.
    """

    sent: int = 0
    failed: int = 0
    reminders: int = 0
    recoveries: int = 0
    digest: bool = False


@dataclass(frozen=True, slots=True)
class Notice:
    """One alert the manager is owed a word about, and which word."""

    alert: Alert
    event: Event


@dataclass(frozen=True, slots=True)
class Message:
    """One rendered message, covering one notice or a digest of several."""

    notices: tuple[Notice, ...]
    subject: str
    body: str
    payload: dict[str, Any]


# -- conditions -----------------------------------------------------------


def check_conditions(ledger: Ledger, settings: Settings, *, now: datetime) -> None:
    """Raise and resolve the alerts syncd derives from the ledger's state.

    Args:
        ledger: the open ledger.
        settings: the whole configuration (``[alerts]`` may be absent).
        now: the current aware time.

    Raises:
        LedgerError: SQLite failed.
    """
    alerts = settings.alerts
    down_after = timedelta(minutes=alerts.processor_down_minutes if alerts
                           else DEFAULT_PROCESSOR_DOWN_MINUTES)  # fmt: skip
    configured = {name for name, section in settings.sections() if section.is_active()}
    with ledger.transaction():
        open_by_key = {alert.problem_key: alert for alert in ledger.open_alerts()}
        for name, health in ledger.processor_health().items():
            _check_processor(ledger, health, name in configured, down_after, now)
        _check_requests(ledger, open_by_key, now, settings.policy.request_warning_days)
        _check_steps(ledger, open_by_key)
        _check_quota_deadlines(ledger, open_by_key, now)


def _check_processor(ledger: Ledger, health: ProcessorHealth, configured: bool,
                     down_after: timedelta, now: datetime) -> None:  # fmt: skip
    name = health.processor
    down_key, credentials_key = f"{PROCESSOR_DOWN}:{name}", f"{CREDENTIALS}:{name}"
    refused = configured and health.credentials_ok is False
    if refused:
        summary = f"{_display(name)} refused syncd's credentials"
        _raise(ledger, credentials_key, CREDENTIALS, summary)
    elif not configured or health.credentials_ok:
        _resolve(ledger, credentials_key)
    since = health.down_since
    if not configured or since is None:
        _resolve(ledger, down_key)
    elif not refused and now - since >= down_after:
        minutes = int((now - since).total_seconds() // 60)
        _raise(ledger, down_key, PROCESSOR_DOWN,
               f"{_display(name)} unreachable for {minutes} min, since {_when(since)}")


def _check_requests(ledger: Ledger, open_by_key: dict[str, Alert], now: datetime,
                    warning_days: int = REQUEST_WARNING_DAYS) -> None:  # fmt: skip
    open_requests = {request.id: request for request in ledger.open_requests()}
    horizon = now + timedelta(days=warning_days)
    for request in open_requests.values():
        if request.due_at > horizon:
            continue
        key = f"{REQUEST_DUE}:{request.id}"
        kind = REQUEST_OVERDUE if request.due_at <= now else REQUEST_DUE
        existing = open_by_key.get(key)
        if existing is not None and existing.kind == REQUEST_DUE and kind == REQUEST_OVERDUE:
            # The problem got worse, it did not clear: replace the alert so the
            # manager hears "overdue" now, and owe no "resolved" notice for it.
            ledger.resolve_alert(key)
            ledger.mark_recovery_notified(existing.id)
        _raise(ledger, key, kind, _request_summary(request, overdue=kind == REQUEST_OVERDUE))
    for key in open_by_key:
        prefix, _, request_id = key.partition(":")
        still_open = request_id.isdigit() and int(request_id) in open_requests
        if prefix == REQUEST_DUE and not still_open:
            _resolve(ledger, key)


def _check_steps(ledger: Ledger, open_by_key: dict[str, Alert]) -> None:
    """One alert per manual step waiting for a person; resolved when the step closes."""
    waiting = {}
    for step in ledger.open_steps(kind="manual"):
        if step.state != "waiting":
            continue
        key = f"{MANUAL_STEP}:{step.request_id}:{step.id}"
        waiting[key] = step
        if step.processor == "phorest":
            summary = (f"Request #{step.request_id}: {step.instructions}; syncd closes this "
                       "step itself once Phorest shows the client forgotten")
        else:
            summary = (f"Request #{step.request_id}: {step.processor}: {step.instructions}; "
                       f"then run: syncd request confirm {step.request_id} "
                       f"--processor {step.processor}")
        _raise(ledger, key, MANUAL_STEP, summary)
    for key in open_by_key:
        if key.startswith(f"{MANUAL_STEP}:") and key not in waiting:
            _resolve(ledger, key)


def _check_quota_deadlines(ledger: Ledger, open_by_key: dict[str, Alert], now: datetime) -> None:
    """An open request whose GA deletion waits for a quota day past (or on) its deadline."""
    threatened = set()
    for request in ledger.open_requests():
        late = [task for task in ledger.tasks_for_request(request.id)
                if task.state == "pending" and (task.last_error or "").startswith("quota_wait")
                and task.next_attempt_at >= request.due_at - timedelta(days=1)]
        if not late:
            continue
        key = f"{QUOTA_DEADLINE}:{request.id}"
        threatened.add(key)
        _raise(ledger, key, QUOTA_DEADLINE,
               f"Request #{request.id}: {len(late)} Google Analytics deletion(s) wait for the "
               f"next quota day ({_when(min(t.next_attempt_at for t in late))}), too close to "
               f"the deadline ({request.due_at.astimezone(UTC):%Y-%m-%d})")
    for key in open_by_key:
        if key.startswith(f"{QUOTA_DEADLINE}:") and key not in threatened:
            _resolve(ledger, key)


def _request_summary(request: Request, *, overdue: bool) -> str:
    # The kind, the id and the date only: the subject key and the note stay out.
    label = REQUEST_LABELS.get(request.kind, request.kind)
    due = f"{request.due_at.astimezone(UTC):%Y-%m-%d}"
    if overdue:
        return f"{label} request #{request.id} is overdue: it was due on {due}"
    return f"{label} request #{request.id} is due on {due}"


def _raise(ledger: Ledger, problem_key: str, kind: str, summary: str) -> None:
    # A no-op while the problem's alert is open: its first summary is kept.
    ledger.raise_alert(problem_key, kind, summary)


def _resolve(ledger: Ledger, problem_key: str) -> None:
    if ledger.resolve_alert(problem_key):
        log.info("alert_resolved", problem_key=problem_key)


# -- dispatch -------------------------------------------------------------


def dispatch(ledger: Ledger, alerts_settings: AlertsSettings, *, now: datetime) -> DispatchReport:
    """Send every notice that is due, and mark what was delivered.

    Args:
        ledger: the open ledger.
        alerts_settings: the ``[alerts]`` section.
        now: the current aware time.

    Returns:
        What was sent and what failed (failures are retried next time).

    Raises:
        LedgerError: SQLite failed (delivery failures are logged, never raised).
    """
    notices = due_notices(ledger, alerts_settings, now=now)
    if not notices:
        return DispatchReport()
    digest = len(notices) > DIGEST_THRESHOLD
    batches = [tuple(notices)] if digest else [(notice,) for notice in notices]
    messages = [_render(batch, alerts_settings, now) for batch in batches]
    delivered = _deliver(messages, alerts_settings, now)
    told: list[Notice] = []
    failed = 0
    for message, ok in zip(messages, delivered):
        if not ok:
            failed += len(message.notices)
            continue
        for notice in message.notices:
            _mark(ledger, notice)
            told.append(notice)
    if told:
        log.info("alerts_sent", count=len(told), digest=digest)
    return DispatchReport(
        sent=len(told),
        failed=failed,
        reminders=sum(n.event == "reminder" for n in told),
        recoveries=sum(n.event == "resolved" for n in told),
        digest=digest,
    )


def due_notices(ledger: Ledger, alerts_settings: AlertsSettings, *, now: datetime) -> list[Notice]:
    """The notices owed now: new problems, reminders, then recoveries, oldest first.

    Raises:
        LedgerError: SQLite failed.
    """
    remind_after = timedelta(hours=alerts_settings.remind_every_hours)
    notices = []
    for alert in ledger.open_alerts():
        if alert.last_notified_at is None:
            notices.append(Notice(alert, "problem"))
        elif now - alert.last_notified_at >= remind_after:
            notices.append(Notice(alert, "reminder"))
    notices.extend(Notice(alert, "resolved") for alert in ledger.alerts_recovered())
    return notices


def _mark(ledger: Ledger, notice: Notice) -> None:
    if notice.event == "resolved":
        ledger.mark_recovery_notified(notice.alert.id)
    else:
        ledger.mark_notified(notice.alert.id)


def _deliver(messages: Sequence[Message], alerts_settings: AlertsSettings,
             now: datetime) -> list[bool]:
    """Per message: whether any channel took it."""
    delivered = EmailSink(alerts_settings, now=now).deliver(messages)
    webhook = WebhookSink(alerts_settings)
    if not webhook.is_noop():
        delivered = [a or b for a, b in zip(delivered, webhook.deliver(messages))]
    return delivered


# -- rendering --------------------------------------------------------------


def _render(notices: Sequence[Notice], alerts_settings: AlertsSettings, now: datetime) -> Message:
    if len(notices) == 1:
        return _render_one(notices[0], alerts_settings, now)
    return _render_digest(notices, alerts_settings, now)


def _render_one(notice: Notice, alerts_settings: AlertsSettings, now: datetime) -> Message:
    alert, summary = notice.alert, _one_line(notice.alert.summary)
    lead = {"problem": "", "reminder": "Reminder: ", "resolved": "Resolved: "}[notice.event]
    lines = [summary, "", f"Problem:  {alert.problem_key}", f"Started:  {_when(alert.created_at)}"]
    if notice.event == "reminder":
        lines.append(f"Still open at {_when(now)}; you were told {_times(alert.notify_count)}.")
    if notice.event == "resolved":
        lines.append(f"Resolved: {_when(alert.resolved_at or now)}")
        lines += ["", "Nothing to do: syncd no longer sees this problem."]
    else:
        lines += ["", "What to do:", f"- {HINTS.get(alert.kind, DEFAULT_HINT)}", *_ROUTINE,
                  "", _footer(alerts_settings)]  # fmt: skip
    return Message(
        notices=(notice,),
        subject=f"{SUBJECT_PREFIX} {lead}{summary}",
        body="\n".join(lines) + "\n",
        payload={"source": "syncd", "text": f"{SUBJECT_PREFIX} {lead}{summary}",
                 **_entry(notice)},  # fmt: skip
    )


def _render_digest(notices: Sequence[Notice], alerts_settings: AlertsSettings,
                   now: datetime) -> Message:  # fmt: skip
    groups: list[tuple[str, Event]] = [
        ("New problems", "problem"), ("Still open", "reminder"), ("Resolved", "resolved")
    ]
    counts = {event: sum(n.event == event for n in notices) for _, event in groups}
    subject = (f"{SUBJECT_PREFIX} {len(notices)} alerts: {counts['problem']} new, "
               f"{counts['reminder']} still open, {counts['resolved']} resolved")  # fmt: skip
    lines = [f"syncd has {len(notices)} alerts for you at {_when(now)}; they are sent together"
             " as one message instead of one each."]  # fmt: skip
    for title, event in groups:
        chosen = [n.alert for n in notices if n.event == event]
        if chosen:
            lines += ["", f"{title} ({len(chosen)}):"]
            lines += [f"- {_one_line(a.summary)} (since {_when(a.created_at)})" for a in chosen]
    lines += ["", "What to do:", *_ROUTINE, "", _footer(alerts_settings)]
    return Message(
        notices=tuple(notices),
        subject=subject,
        body="\n".join(lines) + "\n",
        payload={"source": "syncd", "event": "digest", "text": subject,
                 "alerts": [_entry(n) for n in notices]},  # fmt: skip
    )


_ROUTINE = (
    "- Run `syncd status` on the server: open problems, manual steps and each processor's"
    " last error.",
    "- Run `syncd check` to test the connection and credentials of every processor.",
)


def _footer(alerts_settings: AlertsSettings) -> str:
    return (f"syncd repeats this every {alerts_settings.remind_every_hours:g} h while the problem"
            " stays open, and tells you when it clears.")  # fmt: skip


def _entry(notice: Notice) -> dict[str, Any]:
    alert = notice.alert
    return {
        "event": notice.event,
        "problem_key": alert.problem_key,
        "kind": alert.kind,
        "summary": _one_line(alert.summary),
        "started_at": alert.created_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }


def _display(processor: str) -> str:
    return processor.replace("_", " ").title()


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _times(count: int) -> str:
    return "once before" if count == 1 else f"{count} times before"


def _one_line(text: str) -> str:
    # Summaries end up in a header: a newline there is refused (and would be injection).
    return " ".join(text.split())


# -- sinks ------------------------------------------------------------------


def smtp_session(settings: AlertsSettings, *, timeout: float,
                 step: Callable[[str], None] | None = None) -> smtplib.SMTP:
    """An SMTP connection secured and logged in as ``[alerts]`` says (use it with ``with``).

    The steps are ``connect`` (the TLS handshake too, for ``ssl``), ``EHLO``,
    ``STARTTLS`` and ``login``; ``step`` is told each one before it starts, so a
    caller can say which failed. Nothing is sent in clear text when STARTTLS
    was asked for, and the connection is closed when a step fails.

    Raises:
        smtplib.SMTPNotSupportedError: the server offers no STARTTLS, or no AUTH
            while ``smtp_username`` is set (the message says which).
        OSError: any other failure (smtplib's and ssl's errors are OSErrors).
    """
    tell = step or (lambda _name: None)
    tell("connect")
    context = ssl.create_default_context()
    if settings.smtp_security == "ssl":
        client: smtplib.SMTP = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port,
                                                timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
    try:
        tell("EHLO")
        client.ehlo()
        if settings.smtp_security == "starttls":
            if not client.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("server does not offer STARTTLS")
            tell("STARTTLS")
            client.starttls(context=context)
            client.ehlo()
        if settings.smtp_username:
            if not client.has_extn("auth"):
                raise smtplib.SMTPNotSupportedError(
                    "smtp_username is set but the server offers no AUTH")
            tell("login")
            password = settings.smtp_password
            client.login(settings.smtp_username, password.get_secret_value() if password else "")
    except BaseException:
        client.close()
        raise
    return client


class EmailSink:
    """The manager's email, over one SMTP connection per dispatch.

    Args:
        alerts_settings: the ``[alerts]`` section.
        now: the messages' Date.
    """

    def __init__(self, alerts_settings: AlertsSettings, *, now: datetime) -> None:
        self._settings = alerts_settings
        self._now = now

    def deliver(self, messages: Sequence[Message]) -> list[bool]:
        """Send each message; per message, whether the server accepted it.

        A message the server refuses does not stop the others; a lost
        connection stops the rest until the next dispatch.
        """
        delivered = [False] * len(messages)
        settings = self._settings
        if settings.smtp_username and settings.smtp_password is None:
            log.error("alert_delivery_failed", channel="email", error="smtp_password_missing")
            return delivered
        try:
            with smtp_session(settings, timeout=SMTP_TIMEOUT_SECONDS) as client:
                for index, message in enumerate(messages):
                    try:
                        client.send_message(self._email(message))
                    except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused,
                            smtplib.SMTPDataError) as exc:  # fmt: skip
                        # The type only: the server's reply can echo the addresses.
                        log.warning("alert_delivery_failed", channel="email",
                                    error=type(exc).__name__,
                                    notices=len(message.notices))  # fmt: skip
                    else:
                        delivered[index] = True
        except OSError as exc:  # smtplib's and ssl's errors included
            log.warning("alert_delivery_failed", channel="email", error=type(exc).__name__,
                        undelivered=delivered.count(False))  # fmt: skip
        return delivered

    def _email(self, message: Message) -> EmailMessage:
        settings = self._settings
        email = EmailMessage()
        email["From"] = settings.from_
        email["To"] = ", ".join(settings.to)
        email["Subject"] = message.subject
        email["Date"] = format_datetime(self._now.astimezone(UTC))
        # A domain of our own spares make_msgid a slow getfqdn() lookup.
        email["Message-ID"] = make_msgid(domain=settings.from_.rpartition("@")[2])
        email["Auto-Submitted"] = "auto-generated"  # RFC 3834: no out-of-office replies
        email.set_content(message.body)
        return email


class WebhookSink:
    """An optional JSON webhook (Slack, Teams, ntfy …): one POST per message.

    Args:
        alerts_settings: the ``[alerts]`` section.
    """

    def __init__(self, alerts_settings: AlertsSettings) -> None:
        self._url = alerts_settings.webhook_url

    def is_noop(self) -> bool:
        """Whether no webhook is configured."""
        return self._url is None

    def deliver(self, messages: Sequence[Message]) -> list[bool]:
        """POST each message; per message, whether the webhook answered 2xx.

        An unreachable webhook stops the rest until the next dispatch, so a dead
        endpoint costs one timeout per dispatch, not one per message.
        """
        delivered = [False] * len(messages)
        if self._url is None:
            return delivered
        url = self._url.get_secret_value()
        for index, message in enumerate(messages):
            try:
                response = requests.post(url, json=message.payload, timeout=WEBHOOK_TIMEOUT_SECONDS)
                response.raise_for_status()
            except requests.HTTPError as exc:
                log.warning("alert_delivery_failed", channel="webhook", error=type(exc).__name__,
                            status=exc.response.status_code if exc.response is not None else None)
            except requests.RequestException as exc:
                # The type only: the URL is a secret, and the message may echo it.
                log.warning("alert_delivery_failed", channel="webhook", error=type(exc).__name__,
                            undelivered=len(messages) - index)  # fmt: skip
                break
            else:
                delivered[index] = True
        return delivered


# -- the daemon's entry point -------------------------------------------------


def run_checks(ledger: Ledger, settings: Settings, *, now: datetime) -> DispatchReport | None:
    """Update the alerts from the ledger's state, then tell the manager what is due.

    Called by the daemon every minute.

    Args:
        ledger: the open ledger.
        settings: the whole configuration.
        now: the current aware time.

    Returns:
        What :func:`dispatch` did, or None without an ``[alerts]`` section (the
        alerts are still raised and resolved, for ``syncd status``).

    Raises:
        LedgerError: SQLite failed.
    """
    check_conditions(ledger, settings, now=now)
    if settings.alerts is None:
        return None
    return dispatch(ledger, settings.alerts, now=now)
