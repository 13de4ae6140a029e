"""Every registered connector honours the contract in connectors/base.py.

Parametrized over ``connectors.REGISTRY``, so a new connector is checked the
moment it is registered, against the sandbox's emulator of its system.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import connectors
from connectors.base import Action, Changes, ClientRecord, Connector, MemberRecord
from syncd import config
from syncd.retry import RetryPolicy
from syncd.sandbox.app import Sandbox

KINDS = sorted(connectors.REGISTRY)
RECORD_TYPES = {"phorest": ClientRecord, "mailchimp": MemberRecord}
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(clients=120, seed=4, smtp_port=None) as running:
        yield running


@pytest.fixture(scope="module")
def settings(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> config.Settings:
    path = tmp_path_factory.mktemp("conformance") / "syncd.toml"
    return config.load(sandbox.write_config(path))


def build(kind: str, section: object) -> Connector:
    return connectors.load(kind)(section, retry=NO_RETRY, sleep=lambda _: None)


def writes(sandbox: Sandbox, vendor: str) -> int:
    routes = sandbox.traffic.summary().get(vendor, {}).get("routes", {})
    return sum(sum(statuses.values()) for route, statuses in routes.items()
               if route.split(" ")[0] in WRITE_METHODS)


@pytest.mark.parametrize("kind", KINDS)
def test_connector_implements_the_protocol_under_its_registered_name(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    assert isinstance(connector, Connector)
    assert connector.name == kind
    assert isinstance(connector.apply_batch_size, int) and connector.apply_batch_size >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_check_passes_with_good_credentials_and_fails_without_raising_on_bad(
    kind: str, settings: config.Settings
) -> None:
    section = getattr(settings, kind)
    assert build(kind, section).check().ok
    secret = section.secret_fields()[0]
    wrong = section.model_copy(update={secret: type(getattr(section, secret))("wrong-value-us1")})
    result = build(kind, wrong).check()
    assert not result.ok and result.detail


@pytest.mark.parametrize("kind", KINDS)
def test_scan_streams_frozen_records_of_the_connector_kind(kind: str, settings: config.Settings) -> None:
    records = list(build(kind, getattr(settings, kind)).scan())
    assert records and all(isinstance(r, RECORD_TYPES[kind]) for r in records)
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].email = "x"  # type: ignore[misc]


@pytest.mark.parametrize("kind", KINDS)
def test_changes_without_a_cursor_is_a_full_read_with_a_cursor_to_continue(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    first = connector.changes(None)
    assert isinstance(first, Changes) and first.full and first.cursor
    again = connector.changes(first.cursor)
    assert isinstance(again.cursor, str) and again.cursor >= first.cursor


@pytest.mark.parametrize("kind", KINDS)
def test_apply_answers_every_action_once_in_order_without_raising(
    kind: str, settings: config.Settings
) -> None:
    connector = build(kind, getattr(settings, kind))
    assert connector.apply([]) == []
    actions = [Action("clear_extra_fields" if kind == "phorest" else "withdraw_consent", "k1"),
               Action("erase" if kind == "phorest" else "withdraw_consent", "k2")]
    outcomes = connector.apply(actions)
    assert [o.action for o in outcomes] == actions
    assert all(o.status == "permanent" for o in outcomes)


@pytest.mark.parametrize("kind", KINDS)
def test_dry_run_changes_nothing(kind: str, settings: config.Settings, sandbox: Sandbox) -> None:
    connector = build(kind, getattr(settings, kind))
    if kind == "phorest":
        client = next(r for r in connector.scan() if r.state == "active" and r.email_consent)
        actions = [Action("withdraw_consent", "k", client_id=client.client_id)]
    else:
        member = next(r for r in connector.scan() if r.status == "subscribed")
        actions = [Action("unsubscribe", "k", email=member.email),
                   Action("erase", "k2", email=member.email)]
    before = writes(sandbox, kind)
    outcomes = connector.apply(actions, dry_run=True)
    assert [o.status for o in outcomes] == ["done"] * len(actions)
    assert writes(sandbox, kind) == before


@pytest.mark.parametrize("kind", KINDS)
def test_connector_module_stays_inside_its_boundary(kind: str) -> None:
    module = connectors.REGISTRY[kind].partition(":")[0]
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "(['syncd', 'ledger'], ['syncd', 'daemon'], ['syncd', 'cli'], ['syncd', 'sandbox'])]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[1])
