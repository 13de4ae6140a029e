"""GA's data-retention setting against the policy's maximum (R9)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from connectors.google_analytics import RetentionSettings
from syncd.analytics import RETENTION_CURSOR, check_retention, exceeds
from syncd.ledger import Ledger


class FakeAnalytics:
    """A property whose event-data retention can be read and set."""

    def __init__(self, retention: str) -> None:
        self.held = RetentionSettings(retention, "FOURTEEN_MONTHS", True)
        self.patched: list[str] = []

    def data_retention(self) -> RetentionSettings:
        return self.held

    def set_event_retention(self, duration: str) -> RetentionSettings:
        self.patched.append(duration)
        self.held = replace(self.held, event_data_retention=duration)
        return self.held


def section(*, enforce: bool = False, allowed: str = "FOURTEEN_MONTHS") -> SimpleNamespace:
    return SimpleNamespace(property_id="123", max_event_retention=allowed,
                           enforce_retention=enforce)  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger.sqlite3") as opened:
        yield opened


@pytest.mark.parametrize(("current", "allowed", "longer"), [
    ("TWO_MONTHS", "FOURTEEN_MONTHS", False),
    ("FOURTEEN_MONTHS", "FOURTEEN_MONTHS", False),
    ("TWENTY_SIX_MONTHS", "FOURTEEN_MONTHS", True),
    ("FIFTY_MONTHS", "THIRTY_EIGHT_MONTHS", True),
    ("RETENTION_DURATION_UNSPECIFIED", "FIFTY_MONTHS", True),
])  # fmt: skip
def test_exceeds_compares_durations_by_months(current: str, allowed: str, longer: bool) -> None:
    assert exceeds(current, allowed) is longer


def test_a_setting_within_the_policy_is_recorded_and_changes_nothing(ledger: Ledger) -> None:
    analytics = FakeAnalytics("TWO_MONTHS")
    found = check_retention(ledger, analytics, section(enforce=True))
    assert (found.current, found.drift, found.corrected) == ("TWO_MONTHS", False, False)
    assert analytics.patched == [] and ledger.open_alerts() == []
    assert ledger.get_cursor(RETENTION_CURSOR) == "TWO_MONTHS"


def test_drift_is_alerted_once_and_resolved_when_fixed_in_ga(ledger: Ledger) -> None:
    analytics = FakeAnalytics("TWENTY_SIX_MONTHS")
    for _night in range(2):
        found = check_retention(ledger, analytics, section())
        assert found.drift and not found.corrected
    [alert] = ledger.open_alerts()
    assert alert.problem_key == "ga_retention:123"
    assert "26 months" in alert.summary and "14 months" in alert.summary
    assert analytics.patched == []

    analytics.held = replace(analytics.held, event_data_retention="FOURTEEN_MONTHS")
    check_retention(ledger, analytics, section())
    assert ledger.open_alerts() == []


def test_enforced_drift_is_corrected_with_evidence_and_no_alert(ledger: Ledger) -> None:
    analytics = FakeAnalytics("FIFTY_MONTHS")
    found = check_retention(ledger, analytics, section(enforce=True))
    assert (found.drift, found.corrected, found.current) == (True, True, "FOURTEEN_MONTHS")
    assert analytics.patched == ["FOURTEEN_MONTHS"]
    assert ledger.open_alerts() == []
    assert ledger.get_cursor(RETENTION_CURSOR) == "FOURTEEN_MONTHS"
    [event] = ledger.find_audit()
    assert (event.processor, event.action, event.outcome, event.detail) == (
        "google_analytics", "set_event_retention", "done", "FIFTY_MONTHS -> FOURTEEN_MONTHS")
