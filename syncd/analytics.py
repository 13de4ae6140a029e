"""Google Analytics' data-retention setting against the policy's maximum (R9).

GA4 keeps event-level data (explorations, user-level reports) for as long as
the property's ``dataRetentionSettings.eventDataRetention`` says. The policy
allows at most ``[google_analytics] max_event_retention``. :func:`check_retention`
reads the setting (the daemon, every night after the resync), remembers it in
the ledger for ``syncd status``, and when it exceeds the maximum either
alerts the manager (``ga_retention:<property>``) or, with
``enforce_retention = true``, sets it to the maximum with an ``updateMask``
PATCH of that one field and records the change in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from syncd.ledger import Ledger

log = structlog.get_logger(__name__)

# RetentionDuration names, shortest first (GA4 Admin API v1beta).
DURATION_MONTHS = {"TWO_MONTHS": 2, "FOURTEEN_MONTHS": 14, "TWENTY_SIX_MONTHS": 26,
                   "THIRTY_EIGHT_MONTHS": 38, "FIFTY_MONTHS": 50}  # fmt: skip
RETENTION_CURSOR = "google_analytics.event_data_retention"
RETENTION_ALERT = "ga_retention"


@dataclass(frozen=True, slots=True)
class RetentionCheck:
    """What one check found and did.

    Attributes:
        current: the event-data retention GA held when read.
        allowed: the policy's maximum.
        drift: the setting exceeded the maximum.
        corrected: syncd set it to the maximum.
    """

    current: str
    allowed: str
    drift: bool
    corrected: bool = False


def exceeds(current: str, allowed: str) -> bool:
    """Whether ``current`` keeps data longer than ``allowed`` (unknown names count as longer)."""
    return DURATION_MONTHS.get(current, max(DURATION_MONTHS.values()) + 1) > DURATION_MONTHS[
        allowed]


def check_retention(ledger: Ledger, analytics: Any, settings: Any) -> RetentionCheck:
    """Read GA's event-data retention; alert, or correct when enforced, a longer one.

    Args:
        ledger: where the setting, the alert and the evidence go.
        analytics: the GA connector (``data_retention``, ``set_event_retention``).
        settings: the ``[google_analytics]`` section.

    Raises:
        ConnectorError: GA could not be read or refused the change (the daemon's job
            guard logs and alerts it, and tries again next night).
        LedgerError: SQLite failed.
    """
    allowed = settings.max_event_retention
    current = analytics.data_retention().event_data_retention
    problem = f"{RETENTION_ALERT}:{settings.property_id}"
    drift = exceeds(current, allowed)
    corrected = False
    if drift and settings.enforce_retention:
        stored = analytics.set_event_retention(allowed)
        corrected = True
        with ledger.transaction():
            ledger.add_audit(None, "google_analytics", "set_event_retention", "R9:retention",
                             "done", detail=f"{current} -> {stored.event_data_retention}")
        log.warning("google_analytics_retention_corrected", was=current,
                    now=stored.event_data_retention)
        current = stored.event_data_retention
    with ledger.transaction():
        ledger.set_cursor(RETENTION_CURSOR, current)
        if drift and not corrected:
            ledger.raise_alert(
                problem, RETENTION_ALERT,
                f"Google Analytics property {settings.property_id} keeps event data for "
                f"{_months(current)}, longer than the policy's {_months(allowed)}; set it "
                "in GA (Admin › Data collection and modification › Data retention) or set "
                "[google_analytics] enforce_retention = true")
        else:
            ledger.resolve_alert(problem)
    if drift and not corrected:
        log.warning("google_analytics_retention_drift", current=current, allowed=allowed)
    return RetentionCheck(current, allowed, drift, corrected)


def _months(duration: str) -> str:
    months = DURATION_MONTHS.get(duration)
    return f"{months} months" if months else duration
