"""``syncd status``: is syncd doing its job, and what needs a person?

:func:`gather` reads the ledger (never writes it, never takes the writer lock)
and the lock file, and returns a :class:`Report`:

- the daemon: running (the pid holding the writer lock) and alive (its
  heartbeat, written while the loop turns, is recent);
- per processor: the last successful contact, the last error, whether the
  credentials were accepted, and a state (see
  :func:`syncd.health.processor_states`);
- tasks by state, the oldest failing task, the manual steps waiting
  (``needs_person``), open data-subject requests with their due dates, open
  alerts, queued or running resyncs, the last poll and the last resync.

The verdict, also the exit code, is usable from monitoring:

- ``healthy`` (0): the daemon runs and every processor was reached recently;
- ``degraded`` (1): it runs, but a processor is not reached, a problem is open
  (an alert), a request is overdue or the last poll is late;
- ``down`` (2): no ledger, no daemon, a daemon whose loop stopped beating, or
  no processor reachable.

Nothing here shows personal data: processors, task ids, rules, states and
times; error lines are the connectors' own classifications, redacted again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from syncd import engine
from syncd.analytics import RETENTION_CURSOR
from syncd.config import Settings
from syncd.ledger import Ledger, Task
from syncd.errors import SyncdError
from syncd.health import (
    HEARTBEAT_CURSOR,
    LAST_POLL_CURSOR,
    LAST_RESYNC_CURSOR,
    health_window,
    iso_seconds,
    processor_states,
)
from syncd.lock import lock_holder, lock_path
from syncd.log import redact_text

REQUEST_DUE_SOON_DAYS = 7
LISTED = 10  # manual steps, requests and alerts shown by name; the rest are counted

EXIT_CODES = {"healthy": 0, "degraded": 1, "down": 2}


@dataclass
class Report:
    """Everything ``syncd status`` shows; :attr:`verdict` is the summary."""

    verdict: str
    reasons: list[str]
    ledger: str
    daemon: dict[str, Any]
    processors: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    oldest_failing_task: dict[str, Any] | None = None
    manual_steps: list[dict[str, Any]] = field(default_factory=list)
    request_steps: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    last_poll: str | None = None
    last_resync: str | None = None
    ga_event_retention: str | None = None

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 degraded, 2 down."""
        return EXIT_CODES[self.verdict]

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (every field already is)."""
        return asdict(self)


def gather(settings: Settings, *, now: datetime | None = None) -> Report:
    """Read the ledger and the lock, and judge.

    Raises:
        LedgerError: the ledger exists but cannot be read.
        SyncdError: the lock file exists but cannot be read.
    """
    now = now or datetime.now(UTC)
    path = Path(settings.ledger.path)
    try:
        pid = lock_holder(path)
    except OSError as error:  # the service's files are private to its user
        raise SyncdError(f"cannot read {lock_path(path)}: {error.strerror}; run as root or as "
                         "the service's user") from None
    if not path.exists():
        return Report("down", [f"no ledger at {path}: syncd has not run here yet"], str(path),
                      {"running": pid is not None, "pid": pid, "heartbeat": None})
    window = health_window(settings)
    names = list(engine.configured(settings))
    with Ledger.open(path) as ledger:
        heartbeat = _moment(ledger.get_cursor(HEARTBEAT_CURSOR))
        report = Report(
            "healthy", [], str(path),
            {"running": pid is not None, "pid": pid, "heartbeat": iso_seconds(heartbeat)},
            processors=processor_states(ledger.processor_health(), names, now=now, window=window),
            tasks=ledger.count_tasks_by_state(),
            oldest_failing_task=_task(ledger.oldest_failing_task()),
            manual_steps=[_task(t) for t in ledger.tasks_in_state("needs_person", LISTED)],
            request_steps=[_step(s) for s in ledger.open_steps()
                           if s.kind == "manual" or s.state == "failed"],
            requests=[_request(r, now, settings.policy.request_warning_days)
                      for r in ledger.open_requests()],
            alerts=[{"problem": a.problem_key, "summary": a.summary,
                     "since": iso_seconds(a.created_at), "notified": a.notify_count}
                    for a in ledger.open_alerts()],
            commands=[_command(c) for c in ledger.active_commands()],
            last_poll=ledger.get_cursor(LAST_POLL_CURSOR),
            last_resync=ledger.get_cursor(LAST_RESYNC_CURSOR),
            ga_event_retention=ledger.get_cursor(RETENTION_CURSOR),
        )  # fmt: skip
    report.verdict, report.reasons = _judge(report, heartbeat, now, window)
    return report


def _judge(report: Report, heartbeat: datetime | None, now: datetime,
           window: timedelta) -> tuple[str, list[str]]:
    down: list[str] = []
    degraded: list[str] = []
    if report.daemon["pid"] is None:
        down.append("syncd run is not running")
    elif heartbeat is None or now - heartbeat > window:
        down.append("the daemon holds the lock but its loop has not beaten recently")
    states = {name: p["state"] for name, p in report.processors.items()}
    if states and all(state != "ok" for state in states.values()):
        down.append("no processor was reached recently")
    for name, state in states.items():
        if state != "ok":
            degraded.append(f"{name} is {state}")
        if report.processors[name]["credentials_ok"] is False:
            degraded.append(f"{name} refused the credentials")
    last_poll = _moment(report.last_poll)
    if report.daemon["pid"] is not None and (last_poll is None or now - last_poll > window):
        degraded.append("the last successful poll is late")
    overdue = sum(1 for r in report.requests if r["overdue"])
    if overdue:
        degraded.append(f"{overdue} request(s) overdue")
    if report.alerts:
        degraded.append(f"{len(report.alerts)} open alert(s)")
    if down:
        return "down", down + degraded
    return ("degraded", degraded) if degraded else ("healthy", [])


def render(report: Report) -> None:
    """Print the report as tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    colour = {"healthy": "green", "degraded": "yellow", "down": "red"}[report.verdict]
    console.print(f"[bold {colour}]{report.verdict.upper()}[/]"
                  + (": " + "; ".join(report.reasons) if report.reasons else ""))
    daemon = report.daemon
    console.print(
        f"daemon: {'running (pid ' + str(daemon['pid']) + ')' if daemon['running'] else 'not running'}"
        f", last heartbeat {daemon['heartbeat'] or 'never'}; last poll {report.last_poll or 'never'}"
        f"; last resync {report.last_resync or 'never'}"
    )
    table = Table(title="Processors")
    for column in ("processor", "state", "last success", "credentials", "last error", "at"):
        table.add_column(column, overflow="fold")
    for name, p in report.processors.items():
        creds = {True: "accepted", False: "REFUSED", None: "-"}[p["credentials_ok"]]
        table.add_row(name, p["state"], p["last_ok"] or "never", creds, p["last_error"] or "-",
                      p["last_error_at"] or "-")
    console.print(table)
    if report.ga_event_retention:
        console.print(f"GA event-data retention: {report.ga_event_retention} "
                      "(as read at the last nightly check)")
    queue = ", ".join(f"{n} {state}" for state, n in report.tasks.items() if n) or "none"
    console.print(f"tasks: {queue}")
    failing = report.oldest_failing_task
    if failing:
        console.print(f"oldest failing task: #{failing['id']} {failing['processor']} "
                      f"{failing['action']} ({failing['state']}, {failing['attempts']} attempt(s), "
                      f"since {failing['created_at']}): {failing['last_error'] or '-'}")
    _listing(console, "Manual steps waiting", report.manual_steps,
             ("id", "processor", "action", "reason", "created_at", "last_error"),
             report.tasks.get("needs_person", 0))
    _listing(console, "Request steps waiting for a person", report.request_steps,
             ("request", "processor", "state", "client_id", "what"), len(report.request_steps))
    _listing(console, "Open requests", report.requests,
             ("id", "kind", "client_id", "received_at", "due_at", "overdue"),
             len(report.requests))
    _listing(console, "Open alerts", report.alerts, ("problem", "summary", "since", "notified"),
             len(report.alerts))
    _listing(console, "Resyncs asked of the daemon", report.commands,
             ("id", "state", "requested_at", "stage"), len(report.commands))


def _listing(console: Any, title: str, rows: list[dict[str, Any]], columns: Iterable[str],
             total: int) -> None:
    if not rows:
        return
    from rich.table import Table

    table = Table(title=f"{title} ({total})")
    columns = tuple(columns)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows[:LISTED]:
        table.add_row(*(str(row.get(column)) if row.get(column) is not None else "-"
                        for column in columns))
    console.print(table)
    if total > LISTED:
        console.print(f"... and {total - LISTED} more")


def _task(task: Task | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {"id": task.id, "processor": task.processor, "action": task.action,
            "reason": task.reason, "state": task.state, "attempts": task.attempts,
            "created_at": iso_seconds(task.created_at),
            "next_attempt_at": iso_seconds(task.next_attempt_at),
            "last_error": redact_text(task.last_error) if task.last_error else None}


def _request(request: Any, now: datetime, warning_days: int = REQUEST_DUE_SOON_DAYS
             ) -> dict[str, Any]:  # fmt: skip
    return {"id": request.id, "kind": request.kind, "client_id": request.client_id,
            "received_at": iso_seconds(request.received_at),
            "due_at": iso_seconds(request.due_at), "overdue": request.due_at < now,
            "due_soon": request.due_at < now + timedelta(days=warning_days)}


def _step(step: Any) -> dict[str, Any]:
    """A request step waiting for a person, or one syncd could not finish."""
    return {"request": step.request_id, "processor": step.processor, "state": step.state,
            "client_id": step.client_id,
            "what": step.instructions if step.state == "waiting" else step.evidence}


def _command(command: Any) -> dict[str, Any]:
    progress = command.progress or {}
    return {"id": command.id, "kind": command.kind, "state": command.state,
            "requested_at": iso_seconds(command.requested_at), "stage": progress.get("stage")}


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
