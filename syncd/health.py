"""Whether syncd and its processors are alive: the daemon's cursors and the health window.

The daemon writes these cursors to the ledger as its loop turns (the heartbeat)
and as polls and resyncs succeed, and answers ``/healthz`` with
:func:`processor_states`; ``syncd status`` reads the same cursors and judges
the processors by the same function and window, so both give one answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from syncd.config import Settings
from syncd.ledger import ProcessorHealth
from syncd.log import redact_text

HEALTH_WINDOW_MIN_SECONDS = 180.0  # or three poll intervals, whichever is longer
HEARTBEAT_CURSOR = "daemon.heartbeat"
LAST_POLL_CURSOR = "daemon.last_poll"
LAST_RESYNC_CURSOR = "daemon.last_resync"


def health_window(settings: Settings) -> timedelta:
    """How recent a contact (or a heartbeat) must be to count as current."""
    interval = settings.phorest.poll_interval_seconds if settings.phorest else 60
    return timedelta(seconds=max(HEALTH_WINDOW_MIN_SECONDS, 3.0 * interval))


def processor_states(
    known: Mapping[str, ProcessorHealth], names: Iterable[str], *, now: datetime, window: timedelta
) -> dict[str, dict[str, Any]]:
    """Per configured processor: its state and the facts behind it, JSON-ready.

    States: ``ok`` (reached within ``window``), ``down`` (the latest contacts
    failed), ``stale`` (reached once, not within ``window``) and ``unknown``
    (never contacted).
    """
    states: dict[str, dict[str, Any]] = {}
    for name in names:
        health = known.get(name)
        if health is None:
            states[name] = {"state": "unknown", "last_ok": None, "last_error": None,
                            "last_error_at": None, "credentials_ok": None, "down_since": None}
            continue
        if health.down_since is not None:
            state = "down"
        elif health.last_ok_at is not None and now - health.last_ok_at <= window:
            state = "ok"
        else:
            state = "stale" if health.last_ok_at is not None else "unknown"
        states[name] = {
            "state": state,
            "last_ok": iso_seconds(health.last_ok_at),
            "last_error": redact_text(health.last_error) if health.last_error else None,
            "last_error_at": iso_seconds(health.last_error_at),
            "credentials_ok": health.credentials_ok,
            "down_since": iso_seconds(health.down_since),
        }
    return states


def iso_seconds(moment: datetime | None) -> str | None:
    """A time as ISO 8601 to the second, as reports show it (None stays None)."""
    return moment.isoformat(timespec="seconds") if moment is not None else None
