"""``syncd check``: can syncd reach and log in to everything it is configured to use?

:func:`check_all` runs one check per configured thing, concurrently, and
:func:`render` turns the results into one line each plus an exit code:

- ``ledger``: the ``[ledger] path`` can be used. An existing file must be a
  readable and writable regular file that :meth:`Ledger.open` accepts (opening
  it migrates an older schema, exactly as the daemon's start would); a file
  that does not exist yet needs a writable directory, and is *not* created.
- every configured section that has a connector in :data:`connectors.REGISTRY`,
  in registry order: the connector's own ``check()`` (one or two cheap calls,
  not retried; for ``google_analytics`` a token from the key's token endpoint,
  then a read of the property's retention settings). A required secret that is
  missing is reported as such without building the connector, and so is a
  secret the connector cannot use (a service-account key that is not one).
- ``alerts``: the SMTP server accepts a connection (through SSL or STARTTLS as
  ``smtp_security`` says), and when ``smtp_username`` is set, that the login is
  accepted. A username with no password, or a server that offers no AUTH, is a
  failure: alert mail could not be sent. The optional webhook is not called.
- a configured processor section that has no connector in this version (none
  today) would be listed as SKIPPED and not count as a failure: failing would
  make ``check`` permanently red for a section the example configuration
  ships, and leaving it out would let an operator believe it was verified. A
  section switched off with ``enabled = false`` is listed as SKIPPED too.

Lines carry only the connectors' own detail text (written to be safe), syncd's
own messages, and exception type names: never a secret, an address, a username
or a response body. A check that raises unexpectedly becomes a FAILED line with
the exception's type name; no traceback reaches the terminal.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import connectors
from syncd.alerts import SMTP_TIMEOUT_SECONDS, smtp_session
from syncd.analytics import exceeds
from syncd.config import AlertsSettings, Section, Settings
from syncd.errors import ConfigError, LedgerError
from syncd.ledger import Ledger

MAX_WORKERS = 8
# Beyond its calls' own timeouts, how long a check may take (name resolution,
# TLS handshakes) before it is reported as timed out.
GRACE_SECONDS = 5.0
# Opening may wait out SQLite's busy timeout for the WAL switch and a migration.
LEDGER_BUDGET_SECONDS = 30.0
# Sections that are syncd's own settings, not something to reach.
LOCAL_SECTIONS = frozenset({"ledger", "identity", "policy", "daemon", "console", "logging"})

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class ProcessorCheck:
    """The result of checking one thing.

    Attributes:
        name: the configuration section (``ledger``, ``phorest``, ``alerts`` …).
        ok: True when it works, or when it was skipped (see ``skipped``).
        detail: a short, safe explanation.
        seconds: how long the check took.
        skipped: True when nothing was checked (no connector yet, or disabled).
    """

    name: str
    ok: bool
    detail: str
    seconds: float
    skipped: bool = False

    @property
    def status(self) -> str:
        """``OK``, ``FAILED`` or ``SKIPPED``."""
        if self.skipped:
            return "SKIPPED"
        return "OK" if self.ok else "FAILED"


@dataclass(frozen=True)
class _Job:
    name: str
    run: Callable[[], tuple[bool, str]]
    budget_seconds: float  # how long it may take before it counts as timed out


def check_all(settings: Settings, *, timeout_seconds: float | None = None) -> list[ProcessorCheck]:
    """Check the ledger and every configured processor; a failing check never raises.

    Args:
        settings: the loaded configuration.
        timeout_seconds: caps every network call of every check (a section's own,
            shorter ``timeout_seconds`` still applies); None: each section's own
            timeout, and 10 s for SMTP.

    Returns:
        One result per line: ``ledger``, then the connectors in registry order,
        then the configured processors that have none, then ``alerts``.

    Raises:
        ValueError: ``timeout_seconds`` is not positive (a caller's bug).
    """
    if timeout_seconds is not None and not timeout_seconds > 0:
        raise ValueError("timeout_seconds must be positive")
    results: dict[str, ProcessorCheck] = {}
    jobs: list[_Job] = [_Job("ledger", lambda: _check_ledger(Path(settings.ledger.path)),
                             LEDGER_BUDGET_SECONDS)]  # fmt: skip
    order = ["ledger"]
    configured = dict(settings.sections())

    for kind in connectors.REGISTRY:
        section = configured.get(kind)
        if section is None:
            continue
        order.append(kind)
        if not section.is_active():
            results[kind] = ProcessorCheck(kind, True, "disabled (enabled = false)", 0.0, True)
            continue
        section = _capped(section, timeout_seconds)
        # Two calls at most (Mailchimp: ping, then the audience; GA: a token, then the settings).
        per_call = float(getattr(section, "timeout_seconds", SMTP_TIMEOUT_SECONDS))
        budget = 2 * per_call + GRACE_SECONDS
        jobs.append(_Job(kind, _connector_check(kind, section), budget))

    for name, section in configured.items():
        if name in LOCAL_SECTIONS or name in connectors.REGISTRY or name == "alerts":
            continue
        order.append(name)
        detail = ("disabled (enabled = false)" if not section.is_active()
                  else "no connector in this version")  # fmt: skip
        results[name] = ProcessorCheck(name, True, detail, 0.0, True)

    alerts = configured.get("alerts")
    if isinstance(alerts, AlertsSettings):
        order.append("alerts")
        smtp_timeout = SMTP_TIMEOUT_SECONDS
        if timeout_seconds is not None:
            smtp_timeout = min(smtp_timeout, timeout_seconds)
        # connect, greeting, EHLO, STARTTLS, login, QUIT: each bounded by the socket timeout
        jobs.append(_Job("alerts", lambda: _check_smtp(alerts, smtp_timeout),
                         4 * smtp_timeout + GRACE_SECONDS))  # fmt: skip

    results.update(_run(jobs))
    return [results[name] for name in order]


def render(results: Sequence[ProcessorCheck]) -> tuple[str, int]:
    """The report, one line per check, and the exit code (1 when any check failed).

    ``name  OK  detail (123 ms)``, ``name  FAILED  detail`` or
    ``name  SKIPPED  detail``; SKIPPED is not a failure.
    """
    lines = []
    for result in results:
        detail = " ".join(result.detail.split())  # one line, whatever a detail holds
        line = f"{result.name}  {result.status}  {detail}"
        if result.status == "OK":
            line += f" ({round(result.seconds * 1000)} ms)"
        lines.append(line)
    failed = any(not r.ok for r in results)
    return "\n".join(lines) + "\n", EXIT_FAILED if failed else EXIT_OK


# --- running ----------------------------------------------------------------


def _run(jobs: list[_Job]) -> dict[str, ProcessorCheck]:
    if not jobs:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(len(jobs), MAX_WORKERS),
                              thread_name_prefix="syncd-check")  # fmt: skip
    started = time.monotonic()
    futures: dict[Future[ProcessorCheck], _Job] = {pool.submit(_timed, job): job for job in jobs}
    try:
        wait(futures, timeout=max(job.budget_seconds for job in jobs))
    finally:
        # A check stuck past its budget (e.g. in name resolution) is reported, not awaited.
        pool.shutdown(wait=False, cancel_futures=True)
    results = {}
    for future, job in futures.items():
        if future.done() and not future.cancelled():
            results[job.name] = future.result()
        else:
            elapsed = time.monotonic() - started
            results[job.name] = ProcessorCheck(job.name, False, f"timed out after {elapsed:.0f} s",
                                               elapsed)  # fmt: skip
    return results


def _timed(job: _Job) -> ProcessorCheck:
    started = time.monotonic()
    try:
        ok, detail = job.run()
    except Exception as exc:  # a bug or an unforeseen failure: a line, not a traceback
        ok, detail = False, f"unexpected error ({type(exc).__name__})"
    return ProcessorCheck(job.name, ok, detail, time.monotonic() - started)


def _capped(section: Section, timeout_seconds: float | None) -> Section:
    own = getattr(section, "timeout_seconds", None)
    if timeout_seconds is None or own is None or own <= timeout_seconds:
        return section
    return section.model_copy(update={"timeout_seconds": timeout_seconds})


# --- the checks ---------------------------------------------------------------


def _connector_check(kind: str, section: Section) -> Callable[[], tuple[bool, str]]:
    def run() -> tuple[bool, str]:
        missing = [key for key in section.required_secret_fields() if getattr(section, key) is None]
        if missing:
            return False, f"missing secret {missing[0]}"
        try:
            connector: Any = connectors.load(kind)(section)
        except ConfigError as error:  # e.g. a key file that is not a usable key: syncd's words
            return False, str(error)
        result = connector.check()
        detail = result.detail or ("ok" if result.ok else "failed")
        retention = result.extra.get("event_data_retention")
        if result.ok and retention:  # GA: the setting R9 holds to the policy's maximum
            allowed = getattr(section, "max_event_retention", None)
            verdict = ("LONGER than the policy's " if allowed and exceeds(retention, allowed)
                       else "policy maximum ")
            detail += f"; event data kept {retention} ({verdict}{allowed})"
        return bool(result.ok), detail

    return run


def _check_ledger(path: Path) -> tuple[bool, str]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return _check_ledger_directory(path)
    except OSError as exc:
        return False, f"{path}: cannot stat ({type(exc).__name__})"
    if not stat.S_ISREG(info.st_mode):
        return False, f"{path}: not a regular file"
    if not os.access(path, os.R_OK | os.W_OK):
        return False, f"{path}: not readable and writable by this user"
    try:
        with Ledger.open(path):
            pass
    except LedgerError as exc:
        # syncd's own one-line message (path, SQLite's reason); it starts with the path.
        return False, str(exc)
    except OSError as exc:
        return False, f"{path}: cannot open ({type(exc).__name__})"
    return True, f"{path} opens"


def _check_ledger_directory(path: Path) -> tuple[bool, str]:
    folder = path.absolute().parent
    if not folder.is_dir():
        return False, f"{path}: no directory {folder}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return False, f"{path} not created yet, and its directory is not writable by this user"
    return True, f"{path} not created yet; its directory is writable"


def _check_smtp(alerts: AlertsSettings, timeout: float) -> tuple[bool, str]:
    where = f"{alerts.smtp_host}:{alerts.smtp_port}"
    if alerts.smtp_username and alerts.smtp_password is None:
        return False, f"{where}: smtp_username is set but smtp_password is not"
    steps: list[str] = []  # the step under way, last
    server: smtplib.SMTP | None = None
    try:
        server = smtp_session(alerts, timeout=timeout, step=steps.append)
        detail = (f"{where} accepts connections, login accepted" if alerts.smtp_username
                  else f"{where} accepts connections (no login configured)")
        steps.append("QUIT")
        try:
            server.quit()
        except OSError:  # smtplib's errors included
            pass  # everything that matters has been answered
        server = None
        return True, detail
    except smtplib.SMTPNotSupportedError as exc:
        return False, f"{where}: {exc}"
    except smtplib.SMTPAuthenticationError as exc:
        return False, f"{where}: credentials refused ({exc.smtp_code})"
    except smtplib.SMTPResponseException as exc:
        # The code only: the server's text can echo the username.
        return False, f"{where}: {steps[-1]} refused ({exc.smtp_code})"
    except smtplib.SMTPException as exc:  # SMTPException is an OSError: before it
        return False, f"{where}: {steps[-1]} failed ({type(exc).__name__})"
    except ssl.SSLError as exc:
        return False, f"{where}: TLS failed during {steps[-1]} ({type(exc).__name__})"
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else "unreachable"
        return False, f"{where}: {reason} during {steps[-1]} ({type(exc).__name__})"
    finally:
        if server is not None:
            try:
                server.close()
            except OSError:
                pass
