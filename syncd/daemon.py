"""``syncd run``: the long-running service.

One process, one writer. The daemon holds an exclusive lock on a file beside
the ledger (``<ledger>.lock``) for as long as it runs, so no second daemon or
one-shot command mutates the ledger at the same time.

The loop (``schedule``), on the main thread:

- every second, or at once when a webhook arrives: process the inbox and run
  the due tasks;
- every ``[phorest] poll_interval_seconds``: poll both change feeds
  (:func:`syncd.engine.poll`), and read the Phorest client of every open
  "Forget" step of a data-subject request (:func:`syncd.rights.advance`);
- after the due tasks (every second): close the request steps whose tasks
  finished and complete the requests whose steps all are;
- at ``[daemon] nightly_resync_at`` (local time): a full resync, and a read of
  GA's data-retention setting against the policy (:mod:`syncd.analytics`, R9;
  also once at start);
- at ``[daemon] retention_purge_at`` (local time): the retention purge
  (:func:`syncd.retention.purge`, its guard included), whose erasure requests
  the work job then carries out;
- every second: a resync an operator asked for while the daemon runs (a
  command row written by ``syncd resync``), with its progress written back;
- every ``[daemon] alert_check_seconds``: the alert checks
  (:func:`syncd.alerts.run_checks`): raise and resolve alerts from the
  ledger's state and email the manager what is due;
- every turn, once a job scrubbed personal data (a processed webhook, a
  finished task): a checkpoint that empties the WAL of it
  (:meth:`syncd.ledger.Ledger.flush_scrubbed`), retried at the next turn while
  a reader holds an old snapshot.

A job that raises is logged (type only), counted, recorded as an open alert
in the ledger and tried again after a growing pause (5 s doubling to 5 min),
so it neither kills the loop nor spins. Its alert is resolved when it next
succeeds.

HTTP (waitress, built by :func:`syncd.httpd.serve` with its limits, on
``[daemon] listen``): ``/healthz`` (200 when every processor was reached within
the health window, else 503, with a JSON body per processor, read from the
ledger as ``syncd status`` reads it),
``/metrics`` (Prometheus text: polls, job failures, vendor API calls and errors
by vendor and status, processors up, tasks by processor and state, queue depth,
oldest pending task age, last resync) and the Mailchimp webhook. Slow, silent
and oversized requests are cut off by the server (:mod:`syncd.httpd`); only GET
and HEAD are served except on the webhook, whose body is also capped by
:mod:`syncd.web`.

Signals only set flags. SIGTERM and SIGINT finish the job in flight and exit 0;
SIGHUP re-reads the configuration (an invalid new file is logged and the old
one kept). Under systemd (``$NOTIFY_SOCKET``) the daemon sends READY=1 once the
ledger is open and HTTP listens (before the first poll, which may be a long
first resync), STATUS= lines and STOPPING=1. WATCHDOG=1 goes out at half
``$WATCHDOG_USEC`` from a thread, but only while the loop turns or a long job
(the resync's progress) shows movement: a hung loop stops the pings and
systemd restarts the service.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import schedule
import structlog
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from connectors.base import add_call_observer, remove_call_observer
from syncd import alerts, analytics, config, engine, export, health, httpd, retention, rights
from syncd.errors import ConfigError, ConnectorError, LedgerError, SyncdError
from syncd.identity import SubjectKeys
from syncd.inbox import process_inbox, recorder
from syncd.log import redact_text
from syncd.ledger import Ledger
from syncd.lock import writer_ledger
from syncd.retry import RetryPolicy
from syncd.tasks import run_due
from syncd.web import WEBHOOK_PREFIX, mailchimp_webhook_app

log = structlog.get_logger(__name__)

WORK_EVERY_SECONDS = 1
# Phorest clients read per run of the requests job to verify Forget steps (2.5 s at the
# default 20 requests/s); with more steps waiting, each is read every few runs in turn.
FORGET_CHECKS_PER_RUN = 50
EXPORTS_CHECK_SECONDS = 60  # console exports past [console] export_keep_minutes are deleted
JOB_BACKOFF_SECONDS = (5.0, 300.0)  # first pause after a failure, longest pause
HEARTBEAT_EVERY_SECONDS = 10.0  # how often the loop's heartbeat is written for `syncd status`
COMMAND_PROGRESS_EVERY_SECONDS = 0.5  # how often a followed resync's progress is written
RESYNC_STATUS_EVERY_SECONDS = 2.0  # how often a resync's progress goes to systemd's STATUS=
RESYNC_STAGES = {"phorest": "reading Phorest", "mailchimp": "reading Mailchimp",
                 "planned": "planning", "applied": "applying"}


class Interrupted(SyncdError):
    """A long job stopped at a safe point because the daemon is stopping."""


class _Every:
    """A throttle: :meth:`due` is True the first time, then at most once per ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            return False
        self._last = now
        return True


@dataclass
class _Job:
    name: str
    run: Callable[[], None]
    failures: int = 0
    paused_until: float = 0.0


@dataclass
class _Runtime:
    """What a configuration builds: rebuilt whole on SIGHUP."""

    settings: config.Settings
    connectors: dict[str, Any]
    keys: SubjectKeys
    webhook_secret: str | None
    scheduler: schedule.Scheduler = field(default_factory=schedule.Scheduler)


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not under systemd (or it failed)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            # Never block the loop on a reader that stopped reading: drop the message.
            sock.send(message.encode(), socket.MSG_DONTWAIT)
        return True
    except BlockingIOError:
        log.debug("sd_notify_dropped", reason="the socket's queue is full")
        return False
    except OSError as error:
        log.warning("sd_notify_failed", error=type(error).__name__)
        return False


class Daemon:
    """The service: build it from a config path, then :meth:`run` until a signal.

    Args:
        config_path: the TOML file (re-read on SIGHUP).
        settings: that file, already loaded (default: load it at :meth:`run`).
        install_signals: install the SIGTERM/SIGINT/SIGHUP handlers (tests that
            run the daemon on a thread call :meth:`stop` instead).
    """

    def __init__(self, config_path: str | None, *, settings: config.Settings | None = None,
                 install_signals: bool = True) -> None:
        self.config_path = config_path
        self._settings = settings
        self._install_signals = install_signals
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        self.registry = CollectorRegistry()
        self._polls = Counter("syncd_polls", "Change-feed polls, by outcome.", ["outcome"],
                              registry=self.registry)
        self._job_failures = Counter("syncd_job_failures", "Jobs that raised, by job.", ["job"],
                                     registry=self.registry)
        self._api_calls = Counter("syncd_api_calls", "Vendor API requests, by vendor and status "
                                  "(HTTP status, or timeout, connection_error, invalid_response).",
                                  ["vendor", "status"], registry=self.registry)
        self._api_errors = Counter("syncd_api_errors", "Vendor API requests that failed "
                                   "(4xx, 5xx or no answer), by vendor and status.",
                                   ["vendor", "status"], registry=self.registry)
        self.registry.register(_LedgerCollector(self))
        self.runtime: _Runtime | None = None
        self.http_port: int | None = None
        self.console_port: int | None = None
        self.ledger_path: Path | None = None
        self._jobs: dict[str, Callable[[], None]] = {}
        self._forget_cursor = 0  # the last Forget step verified (see the requests job)
        self._last_beat = time.monotonic()
        self._heartbeat = _Every(HEARTBEAT_EVERY_SECONDS)
        self._ledger: Ledger | None = None  # the main thread's connection, while running

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the job in flight and return."""
        self._stop.set()
        self._wake.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`stop`). Returns the exit code (0).

        Raises:
            ConfigError: the configuration is unusable at start.
            AlreadyRunning: another syncd holds the ledger.
            LedgerError: the ledger cannot be opened.
            OSError: the listen address cannot be bound.
        """
        if self._install_signals:  # first, so a signal during start-up is not lost
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_reload)
        runtime = self.runtime = self._build(self._settings or config.load(self.config_path))
        add_call_observer(self._count_call)
        try:
            self._run_locked(runtime)
        finally:
            remove_call_observer(self._count_call)
        log.info("daemon_stopped")
        return 0

    def _count_call(self, vendor: str, status: str) -> None:
        """Count one vendor API request (called from connector threads)."""
        self._api_calls.labels(vendor, status).inc()
        if not status.isdigit() or int(status) >= 400:
            self._api_errors.labels(vendor, status).inc()

    def _run_locked(self, runtime: _Runtime) -> None:
        # Taking the lock also takes over what a killed holder left (see writer_ledger).
        with writer_ledger(runtime.settings.ledger.path) as ledger:
            self.ledger_path = runtime.settings.ledger.path
            self._ledger = ledger
            server = self._serve(runtime.settings)
            try:
                console = self._serve_console(runtime.settings)
            except BaseException:
                server.stop()
                raise
            try:
                self._loop(ledger, runtime)
            finally:
                notify("STOPPING=1")
                server.stop()
                if console is not None:
                    console.stop()

    def _loop(self, ledger: Ledger, runtime: _Runtime) -> None:
        self._schedule(ledger, runtime)
        watchdog = _watchdog_interval()
        if watchdog is not None:
            threading.Thread(target=self._watchdog, args=(watchdog,), name="syncd-watchdog",
                             daemon=True).start()
        notify("READY=1\nSTATUS=running")
        log.info("daemon_ready", listen=runtime.settings.daemon.listen, port=self.http_port)
        # Start with a poll, or with a full resync when there is nothing to poll from yet.
        self._jobs["poll" if engine.polled_before(ledger) else "resync"]()
        self._jobs["retention_setting"]()  # then nightly; status shows it from the start
        while not self._stop.is_set():
            self.beat()
            if self._reload.is_set():
                self._reload.clear()
                runtime = self.runtime = self._reloaded(ledger, runtime)
            runtime.scheduler.run_pending()
            self._flush_scrubbed(ledger)
            idle = runtime.scheduler.idle_seconds
            self._wake.wait(timeout=max(0.05, min(WORK_EVERY_SECONDS, idle or WORK_EVERY_SECONDS)))
            if self._wake.is_set() and not self._stop.is_set() and not self._reload.is_set():
                self._wake.clear()
                self._jobs["work"]()  # a webhook arrived: work now, not at the next tick
                self._flush_scrubbed(ledger)

    def _flush_scrubbed(self, ledger: Ledger) -> None:
        """Empty the WAL of what the jobs scrubbed; readers in the way mean: next turn."""
        try:
            ledger.flush_scrubbed()
        except LedgerError:
            log.warning("wal_flush_failed")

    def _safe_point(self) -> None:
        """Between pages and batches: stop here if asked, else show progress.

        Stopping here loses nothing: every queued task is durable, and the next
        start (or resync) carries on from the ledger.

        Raises:
            Interrupted: the daemon is stopping.
        """
        if self._stop.is_set():
            raise Interrupted("the daemon is stopping")
        self.beat()

    def beat(self) -> None:
        """Show the watchdog that work is moving (the loop turned, or a long job progressed).

        Every :data:`HEARTBEAT_EVERY_SECONDS` the beat is also written to the
        ledger, where ``syncd status`` (another process) looks for it.
        """
        self._last_beat = time.monotonic()
        if self._ledger is not None and self._heartbeat.due():
            try:
                self._ledger.set_cursor(health.HEARTBEAT_CURSOR, datetime.now(UTC).isoformat())
            except LedgerError:
                log.warning("heartbeat_write_failed")

    def _watchdog(self, interval: float) -> None:
        """Ping systemd while the loop or a long job keeps beating; a hang stops the pings."""
        while not self._stop.wait(interval):
            if time.monotonic() - self._last_beat < 2 * interval:
                notify("WATCHDOG=1")
            else:
                log.error("watchdog_withheld", seconds_since_progress=round(
                    time.monotonic() - self._last_beat))

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop.set()
        self._wake.set()

    def _on_reload(self, signum: int, _frame: FrameType | None) -> None:
        self._reload.set()
        self._wake.set()

    def _reloaded(self, ledger: Ledger, current: _Runtime) -> _Runtime:
        """The runtime from the re-read configuration, or ``current`` if it is unusable."""
        try:
            fresh = self._build(config.load(self.config_path))
            if str(fresh.settings.ledger.path) != str(current.settings.ledger.path):
                raise ConfigError(["ledger.path cannot change while running; restart syncd"])
            if fresh.settings.daemon.listen != current.settings.daemon.listen:
                log.warning("reload_listen_unchanged", reason="restart to move the listener")
            if (fresh.settings.console.listen, fresh.settings.console.enabled,
                    fresh.settings.console.secure_cookies) != (
                    current.settings.console.listen, current.settings.console.enabled,
                    current.settings.console.secure_cookies):
                log.warning("reload_console_unchanged",
                            reason="restart to move, enable or disable the console or change "
                            "its cookies")
        except ConfigError as error:
            for line in error.errors:
                log.error("reload_rejected", problem=line)
            notify("STATUS=running; the new configuration was rejected (see the log)")
            return current
        current.scheduler.clear()
        self._schedule(ledger, fresh)
        log.info("reload_applied")
        notify("STATUS=running; configuration reloaded")
        return fresh

    # -- building ----------------------------------------------------------------------------

    def _build(self, settings: config.Settings) -> _Runtime:
        """Connectors, keys and the webhook secret from a configuration.

        Raises:
            ConfigError: a section the daemon needs is missing, or a secret is unset.
        """
        built, keys = engine.build(settings, needed_by="the daemon")
        hook = getattr(settings.mailchimp, "webhook_secret", None)
        return _Runtime(settings, built, keys, hook.get_secret_value() if hook else None)

    def _schedule(self, ledger: Ledger, runtime: _Runtime) -> None:
        settings, policy = runtime.settings, RetryPolicy()
        now = lambda: datetime.now(UTC)  # noqa: E731

        def work() -> None:
            process_inbox(ledger, runtime.connectors["phorest"], runtime.keys, now=now())
            run_due(ledger, runtime.connectors, policy, runtime.keys, now=now(),
                    on_batch=lambda _done: self._safe_point())
            rights.advance(ledger, now=now())  # task steps close as their tasks finish

        def requests() -> None:
            # Phorest's Forget cannot be seen in its change feed for sure: read each client,
            # beating the watchdog (and heeding SIGTERM) between reads, a bounded number
            # per run in rotation, so a thousand waiting steps never stall the loop.
            advanced = rights.advance(ledger, phorest=runtime.connectors["phorest"], now=now(),
                                      on_read=self._safe_point, verify_after=self._forget_cursor,
                                      verify_limit=FORGET_CHECKS_PER_RUN)
            # Past the last step, the next run finds none and starts again from the first.
            self._forget_cursor = advanced.last_verified
            # Nothing is read from GA in a poll: one cheap check keeps its health true.
            for name in engine.WRITE_ONLY_PROCESSORS:
                if name in runtime.connectors:
                    self._record_check(ledger, name, runtime.connectors[name])

        def poll() -> None:
            try:
                engine.poll(ledger, runtime.connectors, runtime.keys, now=now(), policy=policy,
                            progress=lambda *_: self._safe_point())
            except ConnectorError:
                self._polls.labels("failed").inc()
                self._probe(ledger, runtime)
                raise
            self._polls.labels("ok").inc()
            ledger.set_cursor(health.LAST_POLL_CURSOR, now().isoformat())
            notify(f"STATUS=running; last poll {now():%H:%M:%S} UTC")
            self._reached(ledger, engine.PROCESSORS)

        def resync(processors: list[str] | None = None,
                   progress: engine.Progress | None = None) -> engine.ResyncResult:
            shown = _Every(RESYNC_STATUS_EVERY_SECONDS)

            def moved(stage: str, done: int, total: int | None) -> None:
                self._safe_point()
                if shown.due():
                    of = f"/{total}" if total is not None else ""
                    notify(f"STATUS=resync: {RESYNC_STAGES.get(stage, stage)} {done}{of}")
                if progress is not None:
                    progress(stage, done, total)

            result = engine.resync(settings, ledger, runtime.connectors, runtime.keys, now=now(),
                                   policy=policy, progress=moved, processors=processors)
            if processors is None:  # a full read is also the freshest possible poll
                finished = now().isoformat()
                ledger.set_cursor(health.LAST_RESYNC_CURSOR, finished)
                ledger.set_cursor(health.LAST_POLL_CURSOR, finished)
            self._reached(ledger, engine.PROCESSORS)
            notify(f"STATUS=running; last resync {now():%H:%M:%S} UTC")
            return result

        def commands() -> None:
            self._run_commands(ledger, resync)

        def purge() -> None:
            # The same purge as `syncd retention`, guard included; the work job then
            # carries the requests out like any request's.
            result = retention.purge(ledger, settings, runtime.connectors, runtime.keys,
                                     now=now(), progress=self._safe_point)
            log.info("retention_run", run_id=result.run_id, outcome=result.outcome,
                     filed=len(result.request_ids))

        def check_alerts() -> None:
            report = alerts.run_checks(ledger, settings, now=now())
            if report is not None and (report.sent or report.failed):
                log.info("alerts_dispatched", sent=report.sent, failed=report.failed,
                         reminders=report.reminders, recoveries=report.recoveries)

        def retention_setting() -> None:
            if engine.ANALYTICS in runtime.connectors and settings.google_analytics is not None:
                analytics.check_retention(ledger, runtime.connectors[engine.ANALYTICS],
                                          settings.google_analytics)

        def exports() -> None:
            # Console exports hold a person's data: gone after [console] export_keep_minutes.
            directory = settings.console.exports_path(settings.ledger.path)
            deleted = export.delete_expired(ledger, directory,
                                            settings.console.export_keep_minutes, now())
            if deleted:
                log.info("exports_deleted", files=deleted)

        jobs = {"work": work, "poll": poll, "resync": resync, "commands": commands,
                "alerts": check_alerts, "requests": requests, "retention": purge,
                "retention_setting": retention_setting, "exports": exports}
        self._jobs = {name: self._guarded(ledger, _Job(name, fn)) for name, fn in jobs.items()}
        interval = settings.phorest.poll_interval_seconds  # type: ignore[union-attr]
        runtime.scheduler.every(WORK_EVERY_SECONDS).seconds.do(self._jobs["work"])
        runtime.scheduler.every(WORK_EVERY_SECONDS).seconds.do(self._jobs["commands"])
        runtime.scheduler.every(settings.daemon.alert_check_seconds).seconds.do(
            self._jobs["alerts"])
        runtime.scheduler.every(EXPORTS_CHECK_SECONDS).seconds.do(self._jobs["exports"])
        runtime.scheduler.every(interval).seconds.do(self._jobs["poll"])
        runtime.scheduler.every(interval).seconds.do(self._jobs["requests"])
        runtime.scheduler.every().day.at(settings.daemon.nightly_resync_at).do(self._jobs["resync"])
        runtime.scheduler.every().day.at(settings.daemon.nightly_resync_at).do(
            self._jobs["retention_setting"])
        runtime.scheduler.every().day.at(settings.daemon.retention_purge_at).do(
            self._jobs["retention"])

    def _guarded(self, ledger: Ledger, job: _Job) -> Callable[[], None]:
        """``job`` wrapped so a failure is logged, counted, alerted and paused, never raised.

        Any exception counts, bugs included (an OverflowError from a setting, a
        TypeError): one job must never end the daemon. Only the exception's type
        is logged and stored, as its message may hold personal data.
        """

        def run() -> None:
            if time.monotonic() < job.paused_until:
                return
            try:
                job.run()
            except Interrupted:
                log.info("job_interrupted", job=job.name, reason="stopping")
                return
            except Exception as error:  # noqa: BLE001 - see the docstring
                job.failures += 1
                first, longest = JOB_BACKOFF_SECONDS
                pause = min(longest, first * 2 ** (job.failures - 1))
                job.paused_until = time.monotonic() + pause
                self._job_failures.labels(job.name).inc()
                log.error("job_failed", job=job.name, error=type(error).__name__,
                          failures=job.failures, retry_in_seconds=pause)
                try:
                    ledger.raise_alert(f"job_failed:{job.name}", "job_failed",
                                       f"the {job.name} job keeps failing "
                                       f"({type(error).__name__}); syncd retries it")
                except Exception as alert_error:  # noqa: BLE001 - the loop must go on
                    log.error("job_alert_failed", job=job.name, error=type(alert_error).__name__)
                return
            if job.failures:
                log.info("job_recovered", job=job.name, after_failures=job.failures)
                job.failures, job.paused_until = 0, 0.0
                try:
                    ledger.resolve_alert(f"job_failed:{job.name}")
                except Exception as alert_error:  # noqa: BLE001 - the loop must go on
                    log.error("job_alert_failed", job=job.name, error=type(alert_error).__name__)

        return run

    def _run_commands(self, ledger: Ledger,
                      resync: Callable[..., engine.ResyncResult]) -> None:
        """Run the oldest resync an operator asked for (``syncd resync`` while we run).

        Its progress is written to the command's row (at most every
        :data:`COMMAND_PROGRESS_EVERY_SECONDS`) for the waiting CLI, and its
        summary, or a one-line error, when it ends. A failed resync is recorded
        on the row and raised, so the job's backoff and alert apply as well.
        """
        command = ledger.next_command()
        if command is None or not ledger.start_command(command.id):
            return
        processor = command.options.get("processor")
        written = _Every(COMMAND_PROGRESS_EVERY_SECONDS)

        def progress(stage: str, done: int, total: int | None) -> None:
            if written.due():
                ledger.command_progress(command.id, {"stage": stage, "done": done, "total": total})

        log.info("resync_requested", command=command.id, processor=processor or "all")
        try:
            result = resync([processor] if processor else None, progress)
        except Interrupted:
            ledger.finish_command(command.id, "failed", error="the daemon stopped before it "
                                  "finished; ask again once it runs")
            raise
        except (SyncdError, OSError, ValueError, KeyError, RuntimeError) as error:
            ledger.finish_command(command.id, "failed",
                                  error=f"{type(error).__name__}: {redact_text(str(error))}")
            raise
        except Exception as error:  # a bug: its message may hold anything, so the type only
            ledger.finish_command(command.id, "failed", error=f"{type(error).__name__} (a bug "
                                  "in syncd; see the daemon's log)")
            raise
        summary = result.as_json()
        del summary["rows"]  # per-client rows stay with dry runs; the CLI prints counts
        ledger.finish_command(command.id, "done", result=summary)

    def _reached(self, ledger: Ledger, reached: Iterable[str]) -> None:
        for name in reached:
            ledger.record_contact(name, ok=True)

    def _probe(self, ledger: Ledger, runtime: _Runtime) -> None:
        """After a failed poll: find out which processor is unreachable, and record it."""
        for name, connector in runtime.connectors.items():
            self._record_check(ledger, name, connector)

    def _record_check(self, ledger: Ledger, name: str, connector: Any) -> None:
        result = connector.check()
        if result.ok:
            ledger.record_contact(name, ok=True)
        else:
            ledger.record_contact(name, ok=False, error=result.detail,
                                  credentials_ok=False if result.credentials_refused else None)

    # -- HTTP ----------------------------------------------------------------------------------

    def _serve(self, settings: config.Settings) -> httpd.HttpServer:
        server = httpd.serve(self._app, settings.daemon.host, settings.daemon.port)
        self.http_port = server.port
        return server

    def _serve_console(self, settings: config.Settings) -> httpd.HttpServer | None:
        """The manager's console on ``[console] listen``, or None when it is disabled."""
        if not settings.console.enabled:
            return None
        from syncd.console import create_app

        app = create_app(lambda: self.runtime.settings, wake=self._wake.set)  # type: ignore[union-attr]
        server = httpd.serve(app, settings.console.host, settings.console.port)
        self.console_port = server.port
        log.info("console_ready", listen=settings.console.listen, port=server.port)
        return server

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        runtime = self.runtime
        if path.startswith(WEBHOOK_PREFIX) and runtime and runtime.webhook_secret:
            record = recorder(self.ledger_path, self._wake.set)  # type: ignore[arg-type]
            return list(mailchimp_webhook_app(runtime.webhook_secret, record)(
                environ, start_response))
        if method not in ("GET", "HEAD"):
            return _reply(start_response, 405, b"method not allowed\n", "text/plain")
        if path == "/healthz":
            status, body = self.healthz()
            return _reply(start_response, status, json.dumps(body).encode() + b"\n",
                          "application/json")
        if path == "/metrics":
            return _reply(start_response, 200, generate_latest(self.registry),
                          "text/plain; version=0.0.4; charset=utf-8")
        return _reply(start_response, 404, b"not found\n", "text/plain")

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 200 when every processor was reached within the window.

        Read from the ledger on the caller's thread (its own connection), so the
        answer is the same as ``syncd status`` gives.
        """
        if self.ledger_path is None:
            return 503, {"status": "starting", "processors": {}}
        with Ledger.open(self.ledger_path) as ledger:
            return self.health(ledger)

    def health(self, ledger: Ledger) -> tuple[int, dict[str, Any]]:
        """:meth:`healthz` on an open ledger (the metrics scrape shares its connection)."""
        runtime = self.runtime
        if runtime is None:
            return 503, {"status": "starting", "processors": {}}
        processors = health.processor_states(
            ledger.processor_health(), sorted(runtime.connectors), now=datetime.now(UTC),
            window=health.health_window(runtime.settings))
        healthy = bool(processors) and all(p["state"] == "ok" for p in processors.values())
        return (200 if healthy else 503), {"status": "ok" if healthy else "degraded",
                                           "processors": processors}


class _LedgerCollector(Collector):
    """Task gauges read from the ledger at scrape time (a connection of its own)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily]:
        path = getattr(self.daemon, "ledger_path", None)
        up = GaugeMetricFamily("syncd_processor_up", "1 when the processor was reached "
                               "within the health window.", labels=["processor"])
        if path is None:
            yield up
            return
        tasks = GaugeMetricFamily("syncd_tasks", "Ledger tasks by processor and state.",
                                  labels=["processor", "state"])
        depth = GaugeMetricFamily("syncd_queue_depth", "Tasks pending or in flight.")
        oldest = GaugeMetricFamily("syncd_oldest_pending_task_age_seconds",
                                   "Age of the oldest pending task (0 when none).")
        resync = GaugeMetricFamily("syncd_last_resync_timestamp_seconds",
                                   "When the last full resync succeeded (0: never).")
        with Ledger.open(path) as ledger:
            _status, body = self.daemon.health(ledger)
            for name, state in body["processors"].items():
                up.add_metric([name], 1.0 if state["state"] == "ok" else 0.0)
            queued = 0
            for processor in (*engine.PROCESSORS, *engine.WRITE_ONLY_PROCESSORS):
                for state, count in ledger.count_tasks_by_state(processor).items():
                    tasks.add_metric([processor, state], count)
                    if state in ("pending", "in_flight"):
                        queued += count
            depth.add_metric([], queued)
            first = ledger.oldest_pending_task_at()
            oldest.add_metric([], max(0.0, time.time() - first.timestamp()) if first else 0.0)
            last = ledger.get_cursor(health.LAST_RESYNC_CURSOR)
            resync.add_metric([], datetime.fromisoformat(last).timestamp() if last else 0.0)
        yield from (up, tasks, depth, oldest, resync)


def _reply(start_response: Callable[..., Any], status: int, body: bytes,
           content_type: str) -> list[bytes]:
    reasons = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    start_response(f"{status} {reasons[status]}", [("Content-Type", content_type),
                                                   ("Content-Length", str(len(body)))])
    return [body]


def _watchdog_interval() -> float | None:
    """Half of systemd's watchdog timeout, or None when there is no watchdog for us."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
